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


def test_sample_cli_offload_gives_the_same_png(converted, tmp_path):
    import numpy as np
    from PIL import Image

    from l2p.cli import main

    common = ["sample", "--model", str(converted["pixart"]), "--prompt", "a red circle", "--height", "16",
              "--width", "16", "--steps", "2", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(common + ["--offload", "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(*(np.asarray(Image.open(tmp_path / f)) for f in ("a.png", "b.png")))


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
