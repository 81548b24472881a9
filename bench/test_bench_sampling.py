"""One denoising step plus the final image: the pixel path (L2P) against the latent path
(latent transformer step + AutoencoderKL decode), peak memory and time.

    pytest bench/test_bench_sampling.py --benchmark-enable -s

- pixel path: a FLUX-style transformer (1 double + 1 single block; width 1536 on the CPU,
  3072 = FLUX's on CUDA) converted with ``l2p.convert_to_pixel`` at the patch that keeps the
  1K token grid (P = 16, 32, 64, 128 at 1K, 2K, 4K, 8K: 4096 tokens), one forward (pixel
  embedding, blocks, Detailer Head untiled or tiled), then the image to uint8;
- latent path: the same transformer at its latent grid (H/16 x W/16 tokens: 4x more at 2K),
  one forward, then the FLUX VAE decode (AutoencoderKL, 16 latent channels, 128/256/512/512)
  untiled or tiled with 512 px tiles (diffusers ``enable_tiling``), then to uint8.

Random weights, 128 text tokens, batch 1; fp32 on the CPU, bf16 on CUDA. Sizes: on CUDA
1K-8K (the untiled 8K decode, ~150 GiB, skipped) and the tiled pixel path at 16K (P = 256);
on the CPU the pixel path at 1K and 2K and the latent path at 1K (its decode alone takes 2-5
minutes at 1K on 2 cores, about 15 at 2K).
Each case runs in a fresh process (models built, kernels warmed at a small size, then the
measured step once on the CPU / median of 3 on CUDA); its figures are in
``extra_info`` and printed: seconds of the step and of the final image, and the peak memory
over the loaded weights (CPU: growth of the peak RSS, VmHWM; CUDA: max_memory_allocated).
pytest-benchmark's own time of a case is the whole child process (building included).
About 7 minutes on 2 CPU cores, most of it the two 1K VAE decodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
SIZES = [1024, 2048] + ([4096, 8192, 16384] if CUDA else [])
PATCH = {1024: 16, 2048: 32, 4096: 64, 8192: 128, 16384: 256}
HEAD_TILE = 512  # pixels, for the tiled Detailer Head
VAE_TILE = 512  # pixels, for the tiled VAE decode (latent tile 64)
TEXT_TOKENS = 128

# CPU bytes per output pixel of the untiled FLUX VAE decode in fp32 (4.4 GB at 1024^2 on the
# CPU in PERF-ANCHORS), to skip what would not fit in the free memory.
_VAE_BYTES_PER_PIXEL = 4.4e9 / 1024**2


def _flux(width_heads: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=width_heads,
                                  joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                  axes_dims_rope=(16, 56, 56)).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                         block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _flux_kwargs(batch: int, rows: int, cols: int, device, dtype) -> dict:
    from diffusers import FluxPipeline

    return dict(encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, 4096, device=device, dtype=dtype),
                pooled_projections=torch.randn(batch, 768, device=device, dtype=dtype),
                timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((batch,), 3.5, device=device, dtype=dtype),
                img_ids=FluxPipeline._prepare_latent_image_ids(batch, rows, cols, device, dtype),
                txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype))


def _high_water() -> tuple[int, int]:
    """(peak RSS, current RSS) of this process in bytes."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def measure(case: dict) -> dict:
    """Runs in the child process: build, warm up, measure one case."""
    from l2p import convert_to_pixel

    torch.manual_seed(0)
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    side, path, tiled = case["side"], case["path"], case["tiled"]
    with device:  # random init where the model runs: on a GPU, seconds instead of a minute
        flux = _flux(24 if CUDA else 12)
    if path == "pixel":
        p = PATCH[side]
        model = convert_to_pixel(flux, patch_size=p).to(device, dtype)
        rows = side // p
        if tiled:
            model.enable_head_tiling(HEAD_TILE)

        def step(s, r):
            x = torch.randn(1, 3, s, s, device=device, dtype=dtype)
            return model(x, **_flux_kwargs(1, r, r, device, dtype)).sample

        def final(out):
            return _to_uint8(out)

        warm = (2 * p, 2)
    else:
        model = flux.to(device, dtype)
        vae = _vae().to(device, dtype)
        if tiled:
            vae.enable_tiling()
            vae.tile_sample_min_size = VAE_TILE
            vae.tile_latent_min_size = VAE_TILE // 8
        rows = side // 16

        def step(s, r):
            x = torch.randn(1, r * r, 64, device=device, dtype=dtype)
            return model(hidden_states=x, **_flux_kwargs(1, r, r, device, dtype)).sample

        def final(out):
            r = int(out.shape[1] ** 0.5)
            latent = out.view(1, r, r, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, 2 * r, 2 * r)
            latent = latent / vae.config.scaling_factor + vae.config.shift_factor
            return _to_uint8(vae.decode(latent).sample)

        warm = (32, 2)

    def job(s, r):
        t0 = time.perf_counter()
        out = step(s, r)
        if CUDA:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        image = final(out)
        if CUDA:
            torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t1, tuple(image.shape)

    with torch.no_grad():
        job(*warm)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runs = [job(side, rows) for _ in range(3)]
            peak = torch.cuda.max_memory_allocated() - base
            step_s = sorted(r[0] for r in runs)[1]
            final_s = sorted(r[1] for r in runs)[1]
            shape = runs[0][2]
        else:
            _, rss = _high_water()
            step_s, final_s, shape = job(side, rows)
            peak = _high_water()[0] - rss
    return {"step_s": step_s, "final_s": final_s, "total_s": step_s + final_s, "peak_gib": peak / 2**30,
            "image_shape": list(shape), "tokens": rows * rows, "device": torch.cuda.get_device_name() if CUDA
            else f"cpu x{torch.get_num_threads()}", "dtype": str(dtype)}


def _free_bytes() -> int:
    from l2p.sample.tiling import free_memory

    return free_memory(torch.device("cuda" if CUDA else "cpu"))


CASES = [(side, path, tiled) for side in SIZES for path in ("pixel", "latent") for tiled in (False, True)
         if side < 16384 or (path, tiled) == ("pixel", True)]


@pytest.mark.parametrize("side,path,tiled", CASES,
                         ids=[f"{s}-{p}-{'tiled' if t else 'untiled'}" for s, p, t in CASES])
def test_step_and_final_image(benchmark, capsys, side, path, tiled):
    if path == "latent" and not CUDA and side > 1024:
        pytest.skip("the VAE decode at 2K takes about 15 minutes on 2 CPU cores; the latent path runs at "
                    "1K on the CPU and at every size on CUDA")
    if path == "latent" and not tiled and not CUDA and _free_bytes() < 1.2 * _VAE_BYTES_PER_PIXEL * side**2:
        pytest.skip(f"untiled VAE decode at {side}^2 needs about {_VAE_BYTES_PER_PIXEL * side**2 / 2**30:.0f} GiB")
    if CUDA and path == "latent" and not tiled and side >= 8192:
        pytest.skip("untiled VAE decode at 8K needs about 150 GiB")
    benchmark.group = f"one step + final image, {side}^2"
    result = {}

    def run():
        proc = subprocess.run([sys.executable, __file__, json.dumps({"side": side, "path": path, "tiled": tiled})],
                              capture_output=True, text=True, timeout=1200)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    benchmark.extra_info["baseline"] = path == "latent" and tiled
    with capsys.disabled():
        print(f"\n  {side}^2 {path} {'tiled' if tiled else 'untiled'} ({result['tokens']} tokens, "
              f"{result['device']}, {result['dtype']}): step {result['step_s']:.3f} s + final image "
              f"{result['final_s']:.3f} s = {result['total_s']:.3f} s; peak +{result['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
