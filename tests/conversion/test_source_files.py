"""Source checkpoints as they are found: mixed dtypes, variant-only weights, unreadable files."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

import l2p
from l2p.cli import main as cli

from _families import TINY

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
NAME = "SD3Transformer2DModel"


def _source(path, dtype=torch.float32, **save):
    torch.manual_seed(0)
    getattr(diffusers, NAME).from_config(TINY[NAME]).to(dtype).save_pretrained(path, **save)
    return path


def test_mixed_dtype_checkpoint_keeps_every_stored_dtype(tmp_path):
    src = _source(tmp_path / "src")
    weights = src / "diffusion_pytorch_model.safetensors"
    # bf16 weights with fp32 norms, the first tensor in the file bf16 (it used to set the
    # dtype everything was read in, rounding the fp32 norms).
    stored = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
    assert {v.dtype for v in stored.values()} == {torch.float32, torch.bfloat16}
    save_file(stored, str(weights), metadata={"format": "pt"})
    assert cli(["convert", "--source", str(src), "--out", str(tmp_path / "px"), "--head", "linear"]) == 0
    out = l2p.conversion.folders.load_state(tmp_path / "px")
    compared = 0
    for key, value in stored.items():
        converted = out.get("transformer." + key)
        if converted is not None and converted.shape == value.shape:
            assert converted.dtype == value.dtype and torch.equal(converted, value), key
            compared += 1
    assert compared > 50


def test_variant_only_weights_are_read(tmp_path):
    src = _source(tmp_path / "src", torch.float16, variant="fp16")
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    assert cli(["convert", "--source", str(src), "--out", str(tmp_path / "px"), "--head", "linear"]) == 0
    out = l2p.conversion.folders.load_state(tmp_path / "px")
    stored = load_file(str(src / "diffusion_pytorch_model.fp16.safetensors"))
    key = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(out["transformer." + key], stored[key])


def test_several_variants_and_no_plain_weights_are_refused(tmp_path, capsys):
    src = _source(tmp_path / "src", torch.float16, variant="fp16")
    _source(tmp_path / "other", torch.bfloat16, variant="bf16")
    (tmp_path / "other" / "diffusion_pytorch_model.bf16.safetensors").rename(
        src / "diffusion_pytorch_model.bf16.safetensors")
    assert cli(["convert", "--source", str(src), "--out", str(tmp_path / "px")]) == 2
    err = capsys.readouterr().err
    assert "several variants (bf16, fp16)" in err and len(err.strip().splitlines()) == 1


def test_unreadable_safetensors_are_one_line_errors(tmp_path, capsys):
    src = _source(tmp_path / "src")
    weights = src / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # header intact, data cut short
    assert cli(["convert", "--source", str(src), "--out", str(tmp_path / "px")]) == 2
    err = capsys.readouterr().err
    assert "is not a readable safetensors file" in err and len(err.strip().splitlines()) == 1

    good = _source(tmp_path / "good")
    assert cli(["convert", "--source", str(good), "--out", str(tmp_path / "px"), "--head", "linear"]) == 0
    (tmp_path / "delta.json").write_text(json.dumps({"not": "a delta"}))
    for delta in (tmp_path / "delta.json", weights):
        assert cli(["merge", "--base", str(tmp_path / "px"), "--delta", str(delta), "--out", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert f"{delta} is not a readable safetensors file" in err and len(err.strip().splitlines()) == 1


def test_os_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import l2p.cli.convert as convert_cli

    def missing(args):  # what diffusers raises for a model folder without its weights
        raise OSError("Error no file named diffusion_pytorch_model.safetensors found in\n"
                      f"directory {args.source}.")

    monkeypatch.setattr(convert_cli, "run", missing)
    assert cli(["convert", "--source", str(tmp_path), "--out", str(tmp_path / "px")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no file named" in err and str(tmp_path) in err

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(convert_cli, "run", bug)
    with pytest.raises(KeyError):
        cli(["convert", "--source", str(tmp_path), "--out", str(tmp_path / "px")])


def test_config_that_does_not_fit_the_weights_is_one_line_naming_the_tensor(tmp_path, capsys):
    # A config.json edited or copied from another checkpoint: diffusers' answer was a
    # multi-line RuntimeError suggesting ignore_mismatched_sizes.
    src = _source(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "joint_attention_dim": 48}))
    assert cli(["convert", "--source", str(src), "--out", str(tmp_path / "px")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert (f"the transformer config in {src} does not match its weights: context_embedder.weight is "
            f"stored as (32, 32) but the config builds (32, 48);") in err
    assert "config.json that was saved with these weights" in err and "more)" not in err
    assert not (tmp_path / "px").exists()

    # Many mismatches: the first few are named and the rest counted.
    (src / "config.json").write_text(json.dumps({**config, "attention_head_dim": 8}))
    with pytest.raises(ValueError, match=r"does not match its weights: .* \(and \d+ more\); config.json"):
        l2p.conversion.convert_folder(src, tmp_path / "px")
