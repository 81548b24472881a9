"""Training tiny PixArt (DDPM epsilon), SD3 (flow, static shift) and FLUX (flow, dynamic shift)
sources: the loss falls, frozen weights stay the source's, and resumed runs are bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from _trainkit import FAMILIES, make_config
from l2p.train import checkpoint as ckpt
from l2p.train.loop import Trainer


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    named = dict(trainer.model.named_parameters())
    out = {f"param/{n}": named[n].detach().clone() for n in trainer.param_names}
    tensors, _ = ckpt.optimizer_to_flat(trainer.optimizer, trainer.param_names)
    out.update({f"optim/{k}": v.clone() for k, v in tensors.items()})
    out.update({f"ema/{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_falls_and_frozen_weights_stay(family, sources, images, tmp_path):
    cfg = make_config(sources[family], images, tmp_path / "run", train__max_steps=10, optim__lr=3e-3,
                      optim__schedule="constant", optim__warmup_steps=0, data__caption_dropout=0.0,
                      sample__every=5, sample__prompts="[a red square, a blue disc]", sample__seeds="[0, 1]",
                      sample__steps=2)
    trainer = Trainer(cfg)
    # One fixed batch: the same images, noise and times before and after training.
    batch = trainer._micro_batch(step=0, slots=[0, 1, 2, 3], batch=trainer._load([0, 1, 2, 3]))
    with torch.no_grad():
        before = trainer._loss(*batch).item()
    result = trainer.run()
    with torch.no_grad():
        after = trainer._loss(*batch).item()
    assert after < 0.95 * before, (before, after, result.losses)

    import diffusers
    source = getattr(diffusers, trainer.source.transformer_class).from_pretrained(
        str(sources[family] / "transformer"))
    src = dict(source.named_parameters())
    frozen = [(n, p) for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and trainer.trainable_report.trainable_blocks
    for name, p in frozen:
        assert torch.equal(p, src[name.removeprefix("transformer.")]), name

    final = result.final_dir
    from l2p.models import PixelTransformer2DModel
    exported = PixelTransformer2DModel.from_pretrained(str(final / "pipeline" / "transformer"))
    assert not (final / "pipeline" / "vae").exists() and (final / "pipeline" / "model_index.json").is_file()
    with trainer.ema.swapped_in():
        for name, p in exported.named_parameters():
            assert torch.equal(p, dict(trainer.model.named_parameters())[name]), name
    assert (final / "delta.safetensors").is_file() and (final / "delta-raw.safetensors").is_file()
    from PIL import Image
    for name in ("step-00000005.png", "final.png"):
        with Image.open(tmp_path / "run" / "samples" / name) as grid:
            assert grid.size == (2 * 32, 2 * 32)  # 2 prompts x 2 seeds of 32 px
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_bit_identical(family, sources, images, tmp_path):
    straight = Trainer(make_config(sources[family], images, tmp_path / "a", checkpoint__every=100))
    straight.run()

    first = Trainer(make_config(sources[family], images, tmp_path / "b", train__max_steps=3))
    first.run()
    # A fresh trainer continues the run to step 6 from its step-3 checkpoint.
    resumed = Trainer(make_config(sources[family], images, tmp_path / "b", train__resume="latest"))
    assert resumed.step == 3
    resumed.run()
    assert resumed.step == 6
    _assert_identical(_state(straight), _state(resumed))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == ["step-00000003", "step-00000006"]


def test_toy_style_source_pixart_with_flow_dpm_solver(tmp_path):
    """The default migration's source kind: PixArt-Sigma with DPM-Solver in flow mode (issue 8's
    toy), VAE factor 4 -> pixel patch 8 at 64 px: flow objective with the scheduler's shift,
    and the sampler runs DPM-Solver on pixels."""
    import _trainkit as kit
    from l2p.toy.source import ToySourceConfig, build_toy_pipeline

    small = ToySourceConfig(layers=2, heads=2, head_dim=16, vae_channels=(8, 8, 8), text_dim=32,
                            text_layers=1, flow_shift=2.0)
    build_toy_pipeline(small, seed=0).save_pretrained(str(tmp_path / "toy"), safe_serialization=True)
    data = kit.make_images(tmp_path / "data", n=4, size=64)
    trainer = Trainer(make_config(tmp_path / "toy", data, tmp_path / "run", data__resolution=64,
                                  train__max_steps=2, model__head_channels="[8,8,16]",
                                  sample__prompts="[two red circles]", sample__steps=2))
    assert trainer.objective.kind == "flow" and trainer.objective.shift == 2.0
    assert trainer.model.config.patch_size == 8
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    exported = json.loads((result.final_dir / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["flow_shift"] == 2.0  # the source's

    # A model trained at another shift samples at it: the trainer's grids and the export.
    shifted = Trainer(make_config(tmp_path / "toy", data, tmp_path / "run3", data__resolution=64,
                                  train__max_steps=1, model__head_channels="[8,8,16]", objective__shift=3.0,
                                  sample__prompts="[two red circles]", sample__steps=2))
    assert shifted.objective.shift == 3.0 and shifted.scheduler_config["flow_shift"] == 3.0
    result = shifted.run()
    exported = json.loads((result.final_dir / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert exported == shifted.scheduler_config
    assert json.loads((tmp_path / "toy" / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == 2.0


def test_random_init_is_the_same_architecture_trained_from_scratch(sources, images, tmp_path):
    """model.init=random: the from-scratch baseline. Same pixel architecture, none of the
    source's transformer weights, everything trains, and the export holds what trained."""
    from l2p.train.config import ConfigError

    with pytest.raises(ConfigError, match="model.trainable=all"):
        make_config(sources["pixart"], images, tmp_path / "bad", model__init="random")
    cfg = make_config(sources["pixart"], images, tmp_path / "run", model__init="random",
                      model__trainable="all", train__max_steps=2)
    scratch = Trainer(cfg)
    transferred = Trainer(make_config(sources["pixart"], images, tmp_path / "l2p", model__trainable="all"))
    a, b = dict(scratch.model.named_parameters()), dict(transferred.model.named_parameters())
    assert a.keys() == b.keys() and all(a[n].shape == b[n].shape for n in a)
    assert all(p.requires_grad for p in a.values())
    blocks = [n for n in a if ".transformer_blocks." in n]
    assert blocks and not any(torch.equal(a[n], b[n]) for n in blocks if a[n].numel() > 1)
    result = scratch.run()
    from l2p.models import PixelTransformer2DModel
    exported = PixelTransformer2DModel.from_pretrained(str(result.final_dir / "pipeline" / "transformer"))
    with scratch.ema.swapped_in():
        for name, p in exported.named_parameters():
            assert torch.equal(p, a[name]), name


def _moved(before: dict, trainer: Trainer, names) -> float:
    named = dict(trainer.model.named_parameters())
    return max((named[n].detach() - before[n]).abs().max().item() for n in names)


@pytest.mark.parametrize("init", ["source", "random"])
def test_new_layers_train_at_their_own_rate(init, sources, images, tmp_path):
    """optim.new_layers_lr: every parameter of a layer convert_to_pixel initialised (the pixel
    embedding, its bias copied from the source included, and the head) takes that rate; the
    source's weights take optim.lr. From random init nothing comes from the source."""
    cfg = make_config(sources["pixart"], images, tmp_path / "run", model__init=init, model__trainable="all",
                      optim__lr=1e-4, optim__new_layers_lr=1e-2, optim__schedule="constant",
                      optim__warmup_steps=0, optim__weight_decay=0.0, train__max_steps=1)
    trainer = Trainer(cfg)
    fresh_layers = {n.rpartition(".")[0] for n in trainer.model.conversion_report.initialised}
    new = [n for n in trainer.param_names if init == "random" or n.rpartition(".")[0] in fresh_layers]
    transferred = [n for n in trainer.param_names if n not in new]
    if init == "source":
        assert "transformer.pos_embed.proj.bias" in new and "transformer.pos_embed.proj.weight" in new
        assert any(n.startswith("head.") for n in new) and transferred
        assert "transformer.pos_embed.proj.bias" in trainer.model.conversion_report.copied
    assert trainer.param_names == transferred + new  # the optimizer's (and checkpoints') order
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == ([1e-4, 1e-2] if transferred else [1e-2])
    # Adam's first step moves every parameter with a gradient by about its rate, never more.
    assert 0.9e-2 < _moved(before, trainer, new) <= 1.001e-2
    if transferred:
        assert 0.9e-4 < _moved(before, trainer, transferred) <= 1.001e-4


def test_resume_with_new_layers_lr_is_bit_identical(sources, images, tmp_path):
    settings = dict(optim__lr=1e-4, optim__new_layers_lr=3e-3, optim__warmup_steps=2)
    straight = Trainer(make_config(sources["pixart"], images, tmp_path / "a", checkpoint__every=100, **settings))
    straight.run()
    Trainer(make_config(sources["pixart"], images, tmp_path / "b", train__max_steps=3, **settings)).run()
    resumed = Trainer(make_config(sources["pixart"], images, tmp_path / "b", train__resume="latest", **settings))
    resumed.run()
    _assert_identical(_state(straight), _state(resumed))
    # A run resumed with another parameter split is refused, not silently mixed.
    with pytest.raises(ValueError, match="new_layers_lr"):
        Trainer(make_config(sources["pixart"], images, tmp_path / "b", train__resume="latest"))
