"""The typed config: YAML in/out, --set overrides, errors that say what to do."""

from __future__ import annotations

import pytest
import yaml

from l2p.train.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config()
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert load_config(path) == cfg


def test_a_failed_save_leaves_the_old_config(tmp_path):
    """A rewrite of a run's config.yaml that fails part-way (the file-size limit stands in for
    a full disk) keeps the old file whole, as `l2p-train --resume RUN_DIR` needs it."""
    import resource
    import signal

    cfg = load_config(None, ["train.max_steps=12"])
    path = tmp_path / "config.yaml"
    cfg.save(path)
    before = path.read_text()
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, limits[1]))
    try:
        with pytest.raises(OSError):
            load_config(None, ["train.max_steps=13"]).save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary left behind


def test_set_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-4", "train.max_steps=12", "ema.enabled=false",
                             "sample.prompts=[a cat, a dog]", "sample.seeds=1,2", "model.patch_size=null",
                             "objective.shift=3", "model.head_channels=[8,16]"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 12 and cfg.ema.enabled is False
    assert cfg.sample.prompts == ["a cat", "a dog"] and cfg.sample.seeds == [1, 2]
    assert cfg.model.patch_size is None and cfg.objective.shift == 3.0
    assert cfg.model.head_channels == [8, 16]


def test_yaml_booleans_in_text_fields_mean_the_word(tmp_path):
    # YAML 1.1 reads `no` as false: train.mixed_precision=no (the fp32 setting) must still work,
    # from --set and from a file, and a yes/true there is refused by the field's choices.
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of auto, no, bf16"):
        load_config(None, ["train.mixed_precision=true"])


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rat'.*did you mean 'optim.lr'|did you mean"):
        load_config(None, ["optim.learning_rat=1"])
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        config_from_dict({"train": {"batch_sise": 4}})
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        config_from_dict({"optm": {}})


def test_bad_types_and_choices():
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="ema.enabled must be true or false"):
        load_config(None, ["ema.enabled=perhaps"])
    with pytest.raises(ConfigError, match="optim.schedule must be one of cosine, constant.*'cosine'"):
        load_config(None, ["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match="data.caption_dropout"):
        load_config(None, ["data.caption_dropout=1.5"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="optim.new_layers_lr must be > 0"):
        load_config(None, ["optim.new_layers_lr=0"])
    assert load_config(None, ["optim.new_layers_lr=null"]).optim.new_layers_lr is None
    # Values that used to be accepted and failed (or silently misbehaved) mid-run.
    for setting, message in [("logging.every=0", "logging.every must be >= 1"),
                             ("optim.warmup_steps=-10", "optim.warmup_steps must be >= 0"),
                             ("optim.min_lr_ratio=-1", r"optim.min_lr_ratio must be in \[0, 1\]"),
                             ("optim.min_lr_ratio=3", r"optim.min_lr_ratio must be in \[0, 1\]"),
                             ("checkpoint.every=-2", "checkpoint.every must be >= 0"),
                             ("sample.steps=0", "sample.steps must be >= 1"),
                             ("optim.grad_clip=-1", "optim.grad_clip must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [setting])
    with pytest.raises(ConfigError, match="sample.seeds is empty"):
        load_config(None, ["sample.prompts=[a cat]", "sample.seeds=[]"])
    with pytest.raises(ConfigError, match="cpu_offload runs on FSDP2.*torchrun --nproc-per-node 1"):
        load_config(None, ["low_memory.cpu_offload=true"])
    assert load_config(None, ["low_memory.cpu_offload=true", "distributed.strategy=fsdp"]).low_memory.cpu_offload


def test_cli_print_config_and_errors(capsys):
    from l2p.cli.train import main

    assert main(["--print-config", "--set", "optim.lr=2e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 2e-4 and printed["model"]["source"] == "toy"
    assert main(["--print-config", "--set", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_no_arguments_runs_the_toy_migration_or_says_what_is_missing(monkeypatch, tmp_path, capsys):
    # With no arguments l2p-train runs the toy migration (tests/toy/test_migration.py runs it
    # end to end); without the toy source it says how to make one.
    import l2p.toy.source as toy_source

    from l2p.cli.train import main

    monkeypatch.setattr(toy_source, "SHIPPED_SOURCE_DIR", tmp_path / "no-toy")
    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "toy source is missing" in err and "l2p toy train-source" in err


def test_shipped_toy_config_is_valid():
    from l2p.train.config import DEFAULT_CONFIG_DIR

    cfg = load_config(DEFAULT_CONFIG_DIR / "toy.yaml")
    assert cfg.model.source == "toy"


def test_l2p_train_subcommand_is_registered():
    from l2p.cli import build_parser

    args = build_parser().parse_args(["train", "cfg.yaml", "--set", "optim.lr=1"])
    assert args.config == "cfg.yaml" and args.overrides == ["optim.lr=1"]


def test_the_collective_timeout_is_configurable(monkeypatch):
    from datetime import timedelta

    import torch

    from l2p.torchrun import DistEnv
    from l2p.train.config import ConfigError, load_config
    from l2p.train.distributed import init_distributed

    with pytest.raises(ConfigError, match="distributed.timeout_minutes must be > 0"):
        load_config(None, ["distributed.timeout_minutes=0"])
    cfg = load_config(None, ["distributed.timeout_minutes=5"])
    seen = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    init_distributed(DistEnv(rank=0, world_size=2, local_rank=0, launched=True), torch.device("cpu"),
                     cfg.distributed.backend, cfg.distributed.timeout_minutes)
    assert seen["timeout"] == timedelta(minutes=5) and seen["backend"] == "gloo"
