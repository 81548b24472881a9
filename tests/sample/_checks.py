"""Checks shared by the per-family end-to-end sampling tests."""

from __future__ import annotations

import torch

from l2p.sample import attention as attn_mod


def converted_pipelines(sources: dict, root) -> dict:
    """``l2p convert`` each source folder into ``root`` (a small Detailer Head: 8 channels per
    level) and load it as an L2PPipeline without progress bars."""
    from l2p import L2PPipeline
    from l2p.conversion import convert_folder

    out = {}
    for name, source in sources.items():
        convert_folder(source, root / name, head={"type": "detailer", "max_channels": 8}, seed=1)
        out[name] = L2PPipeline.from_pretrained(root / name)
        out[name].set_progress_bar_config(disable=True)
    return out


def assert_attention_modes_agree(pipe, run, monkeypatch) -> None:
    """``run(pipe)`` gives the same image with attention="native" and "l2p" (within 1e-5),
    and only the "l2p" mode reaches l2p's attention."""
    calls = []
    original = attn_mod.l2p_attention
    monkeypatch.setattr(attn_mod, "l2p_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    images = {}
    try:
        for mode in ("native", "l2p"):
            pipe.set_attention(mode)
            images[mode] = run(pipe)
            assert bool(calls) == (mode == "l2p")
    finally:
        pipe.set_attention("auto")
    torch.testing.assert_close(images["l2p"], images["native"], rtol=1e-5, atol=1e-5)


def assert_block_offload_agrees(pipe, run) -> None:
    """``run(pipe)`` under block offload (to the CPU, the only device here) gives the images it
    gives without, with every block of the family's block groups offloaded on its own."""
    plain = run(pipe)
    pipe.enable_block_offload("cpu")
    try:
        offload = pipe._block_offloads[id(pipe.transformer)]
        source = pipe.transformer.transformer
        assert len(offload.blocks) == sum(len(source.get_submodule(g)) for g in pipe.transformer.adapter.block_groups)
        assert torch.equal(run(pipe), plain)
    finally:
        pipe.disable_block_offload()


def assert_batch_is_each_prompt_alone(pipe, prompts: list[str], negatives: list[str], **kwargs) -> None:
    """A batch of different prompts (captions of different lengths, so padding and masks
    differ), each with its own negative prompt and generator, gives each prompt's image
    alone with the same generator (within float rounding), two per prompt as well."""
    def generators(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    kwargs = {"num_inference_steps": 2, "output_type": "pt", **kwargs}
    batch = pipe(prompts, negative_prompt=negatives, generator=generators(0, 1), **kwargs).images
    alone = [pipe(p, negative_prompt=n, generator=generators(i), **kwargs).images
             for i, (p, n) in enumerate(zip(prompts, negatives))]
    torch.testing.assert_close(batch, torch.cat(alone), rtol=0, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-4  # the prompts do differ
    pairs = pipe(prompts, negative_prompt=negatives, num_images_per_prompt=2, generator=generators(0, 1, 2, 3),
                 **kwargs).images
    alone = [pipe(p, negative_prompt=n, num_images_per_prompt=2, generator=generators(2 * i, 2 * i + 1),
                  **kwargs).images for i, (p, n) in enumerate(zip(prompts, negatives))]
    torch.testing.assert_close(pairs, torch.cat(alone), rtol=0, atol=1e-5)
