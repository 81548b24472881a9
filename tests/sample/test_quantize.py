"""Weight-only int8 blocks: the rounding bound, what stays as it was, memory, and the
pipeline's images staying close; refusals where a quantized model cannot go."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from l2p import L2PPipeline
from l2p.models.quantize import Int8Linear


def _fresh(converted, name, dtype=None):
    pipe = L2PPipeline.from_pretrained(converted[name], torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, steps=4):
    return pipe("a red circle", height=16, width=16, num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def test_int8_linear_rounds_each_row_to_half_its_scale():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 48, generator=gen) * torch.logspace(-3, 1, 24)[:, None])
        linear.weight[5] = 0  # a zero row must not divide by zero
    q = Int8Linear.from_linear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_scale.shape == (24, 1)
    error = (q.weight - linear.weight).abs()
    assert torch.all(error <= q.weight_scale / 2 * (1 + 1e-6))
    assert torch.equal(q.weight[5], torch.zeros(48))
    x = torch.randn(3, 7, 48, generator=gen)
    torch.testing.assert_close(q(x), nn.functional.linear(x, q.weight, linear.bias))
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert q.weight.dtype == torch.float32 and q.to(torch.bfloat16).weight.dtype == torch.bfloat16
    assert q.weight_int8.dtype == torch.int8


@pytest.mark.parametrize("name", ("pixart", "sd3", "flux"))
def test_quantized_pipeline_keeps_head_and_embedding_and_stays_close(converted, name):
    pipe = _fresh(converted, name)
    reference = _run(pipe)
    model = pipe.transformer
    outside = {n: p.detach().clone() for n, p in model.named_parameters()
               if not any(n.startswith(block + ".") for block, _ in model.blocks())}
    block_linears = sum(isinstance(m, nn.Linear) for _, b in model.blocks() for m in b.modules())

    report = pipe.quantize_int8()
    assert report.layers == block_linears > 0
    assert not any(type(m) is nn.Linear for _, b in model.blocks() for m in b.modules())
    # Everything outside the blocks (pixel embedding, head, embeddings, final norm) is untouched.
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in outside.items())
    # float32 weights -> int8 + a float32 scale per row: the blocks' Linear bytes fall about 4x.
    assert report.bytes_after < report.bytes_before
    assert pipe.quantize_int8().layers == 0  # idempotent
    images = _run(pipe)
    # Random tiny weights move the images by about 2e-6 on average (0.5 is their spread).
    assert 0 < (images - reference).abs().mean() < 1e-4, (images - reference).abs().mean()


def test_quantized_pipeline_refuses_save_and_lora(converted, tmp_path):
    from safetensors.torch import save_file

    pipe = _fresh(converted, "pixart")
    pipe.quantize_int8()
    with pytest.raises(ValueError, match="save the pipeline before quantizing"):
        pipe.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    layer = "transformer_blocks.0.attn1.to_q"
    save_file({f"transformer.{layer}.lora_A.weight": torch.randn(2, 32),
               f"transformer.{layer}.lora_B.weight": torch.randn(32, 2)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(ValueError, match="fuse LoRAs before quantize_int8"):
        pipe.fuse_lora(tmp_path / "l.safetensors")


def test_sample_cli_int8_with_offload(converted, tmp_path, capsys):
    from l2p.cli import main

    assert main(["sample", "--model", str(converted["sd3"]), "--prompt", "a red circle", "--height", "16",
                 "--width", "16", "--steps", "2", "--int8", "--offload", "--device", "cpu",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert "int8 weights in" in capsys.readouterr().out and (tmp_path / "a.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_on_cuda_in_bfloat16_stays_close(converted):
    pipe = _fresh(converted, "flux", dtype=torch.bfloat16).to("cuda")
    reference = _run(pipe).float()
    pipe.quantize_int8()
    assert all(m.weight_int8.is_cuda for m in pipe.transformer.modules() if hasattr(m, "weight_int8"))
    images = _run(pipe).float()
    assert (images - reference).abs().mean() < 0.01
