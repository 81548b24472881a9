"""What a resume must not get wrong: a loader that shifts dropout, a fresh run on top of an old
one, abandoned checkpoints, settings changed between runs, damaged checkpoints, an embedding
cache of another source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _trainkit import make_config
from l2p.train import checkpoint as ckpt
from l2p.train.config import ConfigError
from l2p.train.loop import Trainer


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_workers_and_dropout_is_bit_identical(sources, images, tmp_path):
    """A data loader must not draw from the global generator that dropout uses."""
    source = tmp_path / "pixart-dropout"
    shutil.copytree(sources["pixart"], source)
    config = source / "transformer" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), dropout=0.3)))
    extra = dict(data__num_workers=1, train__max_steps=4, checkpoint__every=2)
    straight = Trainer(make_config(source, images, tmp_path / "a", **extra))
    straight.run()
    Trainer(make_config(source, images, tmp_path / "b", **dict(extra, train__max_steps=2))).run()
    resumed = Trainer(make_config(source, images, tmp_path / "b", train__resume="latest", **extra))
    resumed.run()
    assert _identical(_weights(straight), _weights(resumed))


def test_a_fresh_run_refuses_a_folder_with_checkpoints(sources, images, tmp_path):
    Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__max_steps=3)).run()
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*step-00000003.*train.resume=latest"):
        Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__seed=1)).run()


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(sources, images, tmp_path):
    run = tmp_path / "run"
    extra = dict(train__max_steps=4, checkpoint__every=1, checkpoint__keep_last=4)
    Trainer(make_config(sources["pixart"], images, run, **extra)).run()
    root = ckpt.checkpoint_root(run)
    straight = Trainer(make_config(sources["pixart"], images, tmp_path / "straight", **extra))
    straight.run()
    # Continue from step 2: steps 3 and 4 of the first continuation are abandoned, not mixed in.
    branch = Trainer(make_config(sources["pixart"], images, run, train__resume=str(root / "step-00000002"),
                                 **extra))
    assert branch.step == 2
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    aside = root / "abandoned-at-step-00000002"
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000003", "step-00000004"]
    branch.run()
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(run)) == 4
    assert _identical(_weights(straight), _weights(branch))


def test_resume_takes_this_runs_optimizer_settings_and_starts_a_new_ema_from_the_weights(
        sources, images, tmp_path, capsys):
    Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__max_steps=3,
                        ema__enabled="false")).run()
    resumed = Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__resume="latest",
                                  optim__weight_decay=0.5, optim__beta1=0.5, optim__eps=1e-3))
    for group in resumed.optimizer.param_groups:
        assert group["weight_decay"] == 0.5 and tuple(group["betas"]) == (0.5, 0.999) and group["eps"] == 1e-3
    # The checkpoint had no EMA: the average starts at the resumed weights.
    saved = load_file(str(ckpt.latest_checkpoint(tmp_path / "run") / "trainable.safetensors"))
    assert _identical(resumed.ema.state_dict(), saved)
    assert "has no EMA weights" in capsys.readouterr().out


def test_resume_at_another_global_batch_says_so(sources, images, tmp_path, capsys):
    Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__max_steps=3)).run()
    capsys.readouterr()
    Trainer(make_config(sources["pixart"], images, tmp_path / "run", train__resume="latest",
                        train__batch_size=1))
    assert "trained at a global batch of 2, this run continues at 1" in capsys.readouterr().out


def test_resume_on_changed_data_or_seed_says_so(sources, images, tmp_path, capsys):
    data = tmp_path / "images"
    shutil.copytree(images, data)
    Trainer(make_config(sources["pixart"], data, tmp_path / "run", train__max_steps=3)).run()
    capsys.readouterr()
    Trainer(make_config(sources["pixart"], data, tmp_path / "run", train__resume="latest"))
    out = capsys.readouterr().out
    assert "trained on other data" not in out and "train.seed" not in out
    Trainer(make_config(sources["pixart"], data, tmp_path / "run", train__resume="latest", train__seed=5))
    assert "trained with train.seed=0, this run has 5" in capsys.readouterr().out
    metadata = (data / "metadata.csv").read_text()
    first_row = metadata.splitlines()[1]
    (data / "metadata.csv").write_text(metadata + first_row + "\n")  # one image listed twice: 9 items
    Trainer(make_config(sources["pixart"], data, tmp_path / "run", train__resume="latest"))
    out = capsys.readouterr().out
    assert "was trained on other data (8 usable images then, 9 in" in out and "in a new permutation" in out


def test_a_mismatched_or_damaged_checkpoint_is_a_clear_error(sources, images, tmp_path):
    run = tmp_path / "run"
    Trainer(make_config(sources["pixart"], images, run, train__max_steps=3)).run()
    latest = ckpt.latest_checkpoint(run)
    tensors = load_file(str(latest / "trainable.safetensors"))
    name = next(iter(tensors))
    save_file(dict(tensors, **{name: torch.zeros(3)}), str(latest / "trainable.safetensors"))
    with pytest.raises(ValueError, match=rf"holds {name} of shape \(3,\) but this model's is .*own config"):
        Trainer(make_config(sources["pixart"], images, run, train__resume="latest"))
    (latest / "trainable.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(ValueError, match=r"trainable.safetensors is damaged.*delete the checkpoint"):
        Trainer(make_config(sources["pixart"], images, run, train__resume="latest"))
    save_file(tensors, str(latest / "trainable.safetensors"))
    (latest / "optimizer.json").write_text("{")
    with pytest.raises(ValueError, match=r"optimizer.json is damaged"):
        ckpt.load_checkpoint(latest, rank=0)


def test_embedding_cache_of_another_source(sources, images, tmp_path, capsys):
    from l2p.cli import main

    data = tmp_path / "data"
    shutil.copytree(images, data)
    assert main(["data", "embed", "--source", str(sources["sd3"]), "--data", str(data), "--device", "cpu"]) == 0
    with pytest.raises(ConfigError, match=r"embeddings of a SD3Transformer2DModel source.*data.embeddings=null"):
        Trainer(make_config(sources["pixart"], data, tmp_path / "run", data__embeddings="auto"))
    # The same weights copied elsewhere: the cache's digest matches, nothing to say.
    copy = tmp_path / "sd3-copy"
    shutil.copytree(sources["sd3"], copy)
    capsys.readouterr()
    Trainer(make_config(copy, data, tmp_path / "run", data__embeddings="auto"))
    assert "was made from" not in capsys.readouterr().out
    # Another model of the same class in that folder: a warning, not a refusal (its text
    # encoders may be the same ones).
    import _trainkit as kit
    shutil.rmtree(copy)
    kit.build_sd3(copy, seed=1)
    Trainer(make_config(copy, data, tmp_path / "run", data__embeddings="auto"))
    assert "which is not the model now at model.source" in capsys.readouterr().out


def test_a_checkpoint_replaced_mid_way_is_put_back(tmp_path):
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.AdamW(params)
    ckpt.save_checkpoint(tmp_path, 5, rank=0, trainable={"a": params[0]}, ema=None, optimizer=opt,
                         param_names=["a"], state={"step": 5}, keep_last=1)
    root = ckpt.checkpoint_root(tmp_path)
    # Killed while re-saving step 5: the old copy moved aside, the new one not yet in place.
    (root / "step-00000005").rename(root / ".old-step-00000005")
    (root / ".tmp-step-00000005").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) is None
    ckpt.recover_interrupted_save(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-00000005"
    assert ckpt.load_checkpoint(root / "step-00000005", rank=0)["state"]["step"] == 5
    # A completed re-save leaves no old copy behind.
    ckpt.save_checkpoint(tmp_path, 5, rank=0, trainable={"a": params[0]}, ema=None, optimizer=opt,
                         param_names=["a"], state={"step": 5}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]


def test_device_names_are_checked():
    from l2p.train.distributed import DistEnv, pick_device

    env = DistEnv(rank=0, world_size=1, local_rank=0)
    with pytest.raises(ValueError, match="train.device 'gpu0' is not a torch device"):
        pick_device("gpu0", env)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device cuda was asked for but no CUDA device"):
            pick_device("cuda", env)
