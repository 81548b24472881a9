"""Model CPU offload: each model on the device only while it runs, the same images."""

from __future__ import annotations

import pytest
import torch

from l2p import L2PPipeline


def _run(pipe):
    return pipe("a red circle", height=16, width=16, num_inference_steps=2, output_type="pt",
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("name", ("pixart", "sd3"))
def test_each_model_is_on_the_device_only_while_it_runs(converted, name):
    pipe = L2PPipeline.from_pretrained(converted[name])
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe)

    # This machine's only device is the CPU, so the moves are recorded rather than seen.
    pipe.enable_model_cpu_offload("cpu")
    events = []
    encoders = list(pipe._text_encoders().values())
    assert encoders
    for module in [pipe.transformer, *encoders]:
        def spy(*args, _module=module, _original=module.to, **kwargs):
            events.append(("to", _module))
            return _original(*args, **kwargs)
        module.to = spy
        kind = "step" if module is pipe.transformer else "encode"
        module.register_forward_pre_hook(lambda *_, _kind=kind, _module=module: events.append((_kind, _module)))

    offloaded = _run(pipe)
    assert torch.equal(offloaded, plain)
    kinds = [kind for kind, _ in events]
    first_step, last_step = kinds.index("step"), len(kinds) - 1 - kinds[::-1].index("step")
    last_encode = len(kinds) - 1 - kinds[::-1].index("encode")
    # Each encoder: to the device before it encodes, back before the first denoising step.
    for encoder in encoders:
        moves = [i for i, (kind, m) in enumerate(events) if kind == "to" and m is encoder]
        encodes = [i for i, (kind, m) in enumerate(events) if kind == "encode" and m is encoder]
        assert len(moves) == 2 and moves[0] < min(encodes) and max(encodes) < moves[1] < first_step
    # The transformer: to the device after the encoders are done, back after the last step.
    moves = [i for i, (kind, m) in enumerate(events) if kind == "to" and m is pipe.transformer]
    assert len(moves) == 2 and last_encode < moves[0] < first_step and moves[1] > last_step
    assert pipe.device == torch.device("cpu")
    pipe.disable_model_cpu_offload()
    assert torch.equal(_run(pipe), plain)


def test_to_under_offload_is_refused_and_a_missing_device_is_a_clear_error(converted):
    pipe = L2PPipeline.from_pretrained(converted["pixart"])
    pipe.enable_model_cpu_offload("cpu")
    with pytest.raises(ValueError, match="disable_model_cpu_offload"):
        pipe.to("cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        pipe.enable_model_cpu_offload("nonsense")


def test_sample_cli_offload_model_and_blocks_give_the_same_png(converted, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from l2p.cli import main

    enabled = []
    for method in ("enable_model_cpu_offload", "enable_block_offload"):
        original = getattr(L2PPipeline, method)
        monkeypatch.setattr(L2PPipeline, method, lambda self, device, _m=method, _o=original: (
            enabled.append(_m), _o(self, device))[1])

    common = ["sample", "--model", str(converted["pixart"]), "--prompt", "a red circle", "--height", "16",
              "--width", "16", "--steps", "2", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(common + ["--offload", "--out", str(tmp_path / "b.png")]) == 0
    assert main(common + ["--offload", "blocks", "--out", str(tmp_path / "c.png")]) == 0
    assert enabled == ["enable_model_cpu_offload", "enable_block_offload"]
    a = np.asarray(Image.open(tmp_path / "a.png"))
    for other in ("b.png", "c.png"):
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / other)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_to_cuda_matches_the_pipeline_on_cuda(converted):
    pipe = L2PPipeline.from_pretrained(converted["sd3"])
    pipe.set_progress_bar_config(disable=True)
    on_gpu = _run(pipe.to("cuda")).cpu()
    pipe.to("cpu").enable_model_cpu_offload("cuda")
    offloaded = _run(pipe).cpu()
    torch.testing.assert_close(offloaded, on_gpu, rtol=0, atol=0)
    modules = [pipe.transformer, *pipe._text_encoders().values()]
    assert all(p.device.type == "cpu" for m in modules for p in m.parameters())


# -- block offload ----------------------------------------------------------------------------

def _record_block_offload(pipe):
    """Events (kind, model, index) of every onload / offload of the pipeline's HostWeights and
    every block forward, in order; index -1 is a model's non-block rest."""
    events = []
    for offload in pipe._block_offloads.values():
        for index, weights in [(-1, offload.rest), *enumerate(offload.blocks)]:
            for kind in ("onload", "offload"):
                def spy(_kind=kind, _model=offload.model, _index=index, _original=getattr(weights, kind)):
                    events.append((_kind, _model, _index))
                    _original()
                setattr(weights, kind, spy)
    return events


@pytest.mark.parametrize("name", ("pixart", "sd3", "flux"))
def test_block_offload_gives_the_same_images_with_one_block_on_the_device_at_a_time(converted, name):
    pipe = L2PPipeline.from_pretrained(converted[name])
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe)

    pipe.enable_block_offload("cpu")
    offload = pipe._block_offloads[id(pipe.transformer)]
    source = pipe.transformer.transformer
    blocks = [b for group in pipe.transformer.adapter.block_groups for b in source.get_submodule(group)]
    assert len(offload.blocks) == len(blocks) > 1
    # Every transformer weight is in exactly one group: the rest or one block.
    grouped = [id(t) for w in [offload.rest, *offload.blocks] for t in w.tensors]
    assert sorted(grouped) == sorted(id(t) for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()])
    encoders = list(pipe._text_encoders().values())
    assert all(len(pipe._block_offloads[id(e)].blocks) >= 1 for e in encoders)

    events = _record_block_offload(pipe)
    forwards = []
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(
            lambda *_, i=index: forwards.append((len(events), i, [w.onloaded for w in offload.blocks])))
    assert torch.equal(_run(pipe), plain)

    # Each block forward runs with its own weights on the device and no other block's.
    assert forwards
    for _, index, onloaded in forwards:
        assert onloaded == [i == index for i in range(len(blocks))]
    # The transformer's rest: on the device once for the loop, after the encoders are done.
    transformer = [(k, i) for k, m, i in events if m is pipe.transformer and i == -1]
    assert transformer[0] == ("onload", -1) and transformer[-1] == ("offload", -1)
    first_block = min(n for n, _, _ in forwards)
    last_encoder = max(n for n, (k, m, _) in enumerate(events) if any(m is e for e in encoders))
    assert last_encoder < first_block
    # Nothing is left on the device, and the pipeline works again once offload is off.
    assert not any(w.onloaded for o in pipe._block_offloads.values() for w in [o.rest, *o.blocks])
    pipe.disable_block_offload()
    assert torch.equal(_run(pipe), plain)


def test_block_offload_refuses_what_would_change_its_weights(converted, tmp_path):
    pipe = L2PPipeline.from_pretrained(converted["pixart"])
    pipe.enable_block_offload("cpu")
    with pytest.raises(ValueError, match="disable_block_offload"):
        pipe.quantize_int8()
    with pytest.raises(ValueError, match="disable_block_offload"):
        pipe.fuse_lora(tmp_path / "any.safetensors")
    with pytest.raises(ValueError, match="block offload is on"):
        pipe.to("cpu")
    # Switching to model offload replaces block offload (its hooks go).
    pipe.enable_model_cpu_offload("cpu")
    assert not pipe._block_offloads
    assert not any(block._forward_pre_hooks for block in pipe.transformer.transformer.transformer_blocks)


def test_block_offload_of_an_int8_pipeline_gives_its_images(converted):
    pipe = L2PPipeline.from_pretrained(converted["sd3"])
    pipe.set_progress_bar_config(disable=True)
    pipe.quantize_int8()
    quantized = _run(pipe)
    pipe.enable_block_offload("cpu")
    # The int8 buffers travel with their block.
    names = {n for w in pipe._block_offloads[id(pipe.transformer)].blocks for t in w.tensors
             for n, b in pipe.transformer.named_buffers() if b is t}
    assert any(n.endswith("weight_int8") for n in names)
    assert torch.equal(_run(pipe), quantized)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_offload_to_cuda_matches_the_pipeline_on_cuda_in_less_memory(converted):
    pipe = L2PPipeline.from_pretrained(converted["flux"])
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.reset_peak_memory_stats()
    on_gpu = _run(pipe.to("cuda")).cpu()
    whole = torch.cuda.max_memory_allocated()
    pipe.to("cpu")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pipe.enable_block_offload("cuda")
    offloaded = _run(pipe).cpu()
    torch.testing.assert_close(offloaded, on_gpu, rtol=0, atol=0)
    assert torch.cuda.max_memory_allocated() < whole
    modules = [pipe.transformer, *pipe._text_encoders().values()]
    assert all(p.device.type == "cpu" for m in modules for p in m.parameters())
