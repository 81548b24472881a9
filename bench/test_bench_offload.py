"""Block offload (``L2PPipeline.enable_block_offload``) against the transformer resident on the
GPU: time of one model call and the GPU memory it needs.

    pytest bench/test_bench_offload.py --benchmark-enable -s

A FLUX-width pixel transformer (width 3072, 4 double + 8 single blocks: 2.56B parameters,
4.8 GiB in bf16) converted with ``l2p.convert_to_pixel`` at P = 16, one forward at 1024^2
(4096 image tokens, 128 text tokens), batch 1, random weights, bf16. "resident": the model on
the GPU; "blocks": its weights in pinned host memory, each block copied over for its own
forward (l2p/sample/offload.py), the non-block layers once per call. Peak: max_memory_allocated
during the calls (weights included). CUDA only: on the CPU there is nothing to offload to.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from l2p.sample.offload import BlockOffload

CUDA = torch.cuda.is_available()
SIDE, PATCH, TEXT_TOKENS = 1024, 16, 128


def _model():
    from diffusers import FluxTransformer2DModel

    from l2p import convert_to_pixel

    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of a minute
        flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return convert_to_pixel(flux.eval(), patch_size=PATCH).to("cuda", torch.bfloat16)


def _inputs():
    from diffusers import FluxPipeline

    rows, dtype, device = SIDE // PATCH, torch.bfloat16, torch.device("cuda")
    return dict(hidden_states=torch.randn(1, 3, SIDE, SIDE, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 4096, device=device, dtype=dtype),
                pooled_projections=torch.randn(1, 768, device=device, dtype=dtype),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, rows, rows, device, dtype),
                txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype))


@pytest.mark.skipif(not CUDA, reason="block offload moves weights between host and GPU: needs a CUDA device")
@pytest.mark.parametrize("mode", ["resident", "blocks"])
def test_one_model_call(benchmark, capsys, mode):
    model, inputs = _model(), _inputs()
    offload = None
    if mode == "blocks":
        source = model.transformer
        blocks = [b for group in model.adapter.block_groups for b in source.get_submodule(group)]
        model.to("cpu")
        offload = BlockOffload(model, blocks, torch.device("cuda"))

    times = []

    def call():
        start = time.perf_counter()
        if offload is not None:
            offload.onload_rest()
        with torch.no_grad():
            out = model(**inputs).sample
        if offload is not None:
            offload.offload()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return out

    call()  # warm-up: kernels, allocator
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"one pixel FLUX-width call, 12 blocks, {SIDE}^2, bf16"
    times.clear()
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)
    median_ms = statistics.median(times[-5:]) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**30
    benchmark.extra_info.update({"median_ms": median_ms, "peak_gib": peak, "weights_gib": weights,
                                 "baseline": mode == "resident", "device": torch.cuda.get_device_name()})
    with capsys.disabled():
        print(f"\n{mode}: median {median_ms:.1f} ms, peak {peak:.2f} GiB "
              f"(weights {weights:.2f} GiB)")
