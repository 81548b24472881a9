"""A delta merges only onto the base it was trained from, not onto another checkpoint with the
same config (the fingerprint of its frozen tensors in the delta's metadata)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

import l2p
from l2p.cli import main as cli
from l2p.conversion.delta import BASE_FINGERPRINT, base_fingerprint
from l2p.conversion.folders import merge_folder

from _families import TINY

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
NAME = "SD3Transformer2DModel"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two converted bases of one config with different weights (a model and a fine-tune)."""
    root = tmp_path_factory.mktemp("bases")
    for tag, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        getattr(diffusers, NAME).from_config(TINY[NAME]).save_pretrained(root / f"src-{tag}")
        assert cli(["convert", "--source", str(root / f"src-{tag}"), "--out", str(root / tag), "--head", "linear"]) == 0
    model = l2p.PixelTransformer2DModel.from_pretrained(root / "a")
    l2p.set_trainable(model, "first_last:1")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.25)
    l2p.save_delta(model, root / "delta-a.safetensors")
    return root


def test_a_delta_refuses_another_base_with_the_same_config(bases, tmp_path, capsys):
    delta = bases / "delta-a.safetensors"
    assert cli(["merge", "--base", str(bases / "b"), "--delta", str(delta), "--out", str(tmp_path / "m")]) == 2
    assert "this delta was trained from another base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    other = l2p.PixelTransformer2DModel.from_pretrained(bases / "b")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="trained from another base"):
        l2p.merge_delta(other, delta)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # left untouched
    # Its own base takes it.
    assert cli(["merge", "--base", str(bases / "a"), "--delta", str(delta), "--out", str(tmp_path / "ok")]) == 0
    l2p.merge_delta(l2p.PixelTransformer2DModel.from_pretrained(bases / "a"), delta)


def test_a_delta_without_a_fingerprint_merges_with_a_warning(bases, tmp_path):
    tensors = load_file(str(bases / "delta-a.safetensors"))
    from safetensors import safe_open

    with safe_open(str(bases / "delta-a.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata[BASE_FINGERPRINT].startswith("sha256:")
    del metadata[BASE_FINGERPRINT]  # as an older l2p wrote it
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    with pytest.warns(UserWarning, match="no fingerprint"):
        merge_folder(bases / "b", tmp_path / "old.safetensors", tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file()


def test_the_fingerprint_reads_values_not_storage():
    # The trainer holds frozen tensors in float32 while the converted folder keeps bf16: the
    # same base either way. Another seed is another base.
    torch.manual_seed(0)
    model = l2p.convert_to_pixel(getattr(diffusers, NAME).from_config(TINY[NAME]).to(torch.bfloat16), head="linear")
    l2p.set_trainable(model, "first_last:1")
    bf16 = base_fingerprint(model)
    model.float()
    assert base_fingerprint(model) == bf16
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert base_fingerprint(model, names) == bf16
    with torch.no_grad():
        dict(model.named_parameters())["transformer.transformer_blocks.1.attn.to_q.weight"].mul_(1.01)
    assert base_fingerprint(model) != bf16


def test_a_float32_delta_merges_onto_a_bfloat16_base(tmp_path, capsys):
    # The trainer keeps what trains in float32 over a source stored in bfloat16: its delta
    # used to be refused by the folder it was trained from.
    torch.manual_seed(3)
    getattr(diffusers, NAME).from_config(TINY[NAME]).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    assert cli(["convert", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "base"), "--head", "linear"]) == 0
    trained = l2p.PixelTransformer2DModel.from_pretrained(tmp_path / "base")
    assert trained.dtype == torch.bfloat16
    l2p.set_trainable(trained, "first_last:1")
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.data = p.data.float() + 1e-3  # fp32 master weights, off the bfloat16 grid
    delta = tmp_path / "delta.safetensors"
    names = l2p.save_delta(trained, delta)
    capsys.readouterr()

    assert cli(["merge", "--base", str(tmp_path / "base"), "--delta", str(delta), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert f"l2p merge: {len(names)} of the delta's {len(names)} tensors are float32 where" in out
    assert "stores bfloat16: written as the delta holds them" in out
    merged = l2p.conversion.folders.load_state(tmp_path / "m")
    base = l2p.conversion.folders.load_state(tmp_path / "base")
    for name, value in trained.state_dict().items():
        expected = value if name in names else base[name]
        assert merged[name].dtype == expected.dtype and torch.equal(merged[name], expected), name
    l2p.PixelTransformer2DModel.from_pretrained(tmp_path / "m", torch_dtype=torch.float32)

    # In memory the model keeps the dtype it was loaded in.
    model = l2p.PixelTransformer2DModel.from_pretrained(tmp_path / "base")
    l2p.merge_delta(model, delta)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], trained.state_dict()[n].to(torch.bfloat16)) for n in names)

    # What truly does not fit is still refused: another shape, or an integer tensor.
    tensors = load_file(str(delta))
    from safetensors import safe_open

    with safe_open(str(delta), "pt") as f:
        metadata = f.metadata()
    for bad in ({"head.bias": tensors["head.bias"][:-1]}, {"head.bias": tensors["head.bias"].long()}):
        save_file({**tensors, **bad}, str(tmp_path / "bad.safetensors"), metadata=metadata)
        with pytest.raises(ValueError, match="delta tensor head.bias is .* merge the delta onto the folder"):
            merge_folder(tmp_path / "base", tmp_path / "bad.safetensors", tmp_path / "m2")
    assert not (tmp_path / "m2").exists()
