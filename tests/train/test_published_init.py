"""Training on from a published L2P checkpoint (model.published_l2p): the run starts from the
checkpoint's weights, and its delta merges onto `l2p convert --published-l2p` to the exported
model, tensor for tensor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _trainkit import make_images, overrides
from l2p.train.config import ConfigError, load_config
from l2p.train.loop import Trainer, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "conversion"))
from _published import write_published  # noqa: E402


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from l2p import testing

    root = tmp_path_factory.mktemp("published")
    source = root / "z-image"
    testing.build_tiny_z_image_pipeline(source)
    config = json.loads((source / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    checkpoint = root / "l2p.safetensors"
    write_published(checkpoint, config, 4, [4, 8])  # the tiny pipeline's pixel patch: 2 x VAE 2
    return source, checkpoint


def _config(source, checkpoint, tmp_path, **extra):
    data = make_images(tmp_path / "data", n=4, size=16)
    settings = dict(model__published_l2p=checkpoint, data__resolution=16, train__max_steps=2,
                    checkpoint__every=0, model__trainable="first_last:1", model__head_channels="[]")
    return load_config(None, overrides(source, data, tmp_path / "run", **{**settings, **extra}))


def test_the_run_starts_from_the_checkpoint_and_its_delta_merges_onto_the_published_conversion(published, tmp_path):
    from l2p.cli import main

    source, checkpoint = published
    stored = load_file(str(checkpoint))
    cfg = _config(source, checkpoint, tmp_path)
    trainer = Trainer(cfg)
    params = dict(trainer.model.named_parameters())
    assert trainer.model.config.head_config["features"] == "blocks"
    assert torch.equal(params["head.proj_out.weight"], -stored["local_decoder.out_conv.weight"])
    assert torch.equal(params["transformer.layers.0.attention.to_q.weight"], stored["layers.0.attention.to_q.weight"])
    trainer.run()

    run = tmp_path / "run" / "final"
    assert main(["convert", "--source", str(source), "--out", str(tmp_path / "base"),
                 "--published-l2p", str(checkpoint)]) == 0
    assert main(["merge", "--base", str(tmp_path / "base"), "--delta", str(run / "delta.safetensors"),
                 "--out", str(tmp_path / "merged")]) == 0

    def tensors(folder):
        out = {}
        for weights in (folder / "transformer").glob("*.safetensors"):
            out.update(load_file(str(weights)))
        return out

    exported, merged = tensors(run / "pipeline"), tensors(tmp_path / "merged")
    assert exported.keys() == merged.keys()
    assert all(torch.equal(exported[k], merged[k]) for k in exported)
    # The frozen middle is the checkpoint's, not the source's.
    frozen = "transformer.layers.0.attention.to_q.weight"  # blocks: noise_refiner.0, layers.0, layers.1
    assert frozen not in load_file(str(run / "delta.safetensors"))
    assert torch.equal(exported[frozen], stored["layers.0.attention.to_q.weight"])


def test_published_l2p_brings_its_own_layout(published, tmp_path):
    source, checkpoint = published
    for extra in (dict(model__patch_size=8), dict(model__init="random", model__trainable="all"),
                  dict(model__head_channels="[8,16]")):
        with pytest.raises(ConfigError, match="model.published_l2p brings its own weights"):
            _config(source, checkpoint, tmp_path, **extra).validate()
    with pytest.raises(ValueError, match="not an L2P checkpoint"):
        train(_config(source, source / "transformer" / next(
            p.name for p in (source / "transformer").glob("*.safetensors")), tmp_path))
