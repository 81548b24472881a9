"""The two content fingerprints are recorded in files that outlive the code: deltas carry
base_fingerprint (l2p merge refuses a delta whose value differs), generated data and embedding
caches carry source_digest (a re-run refuses a folder whose value differs). Pinned here so that
no refactor changes either value and makes old records refuse their own base or source."""

from __future__ import annotations

import json

import torch
from torch import nn

from l2p.conversion.delta import base_fingerprint
from l2p.data.generate import source_digest


class _Frozen(nn.Module):
    """Exact values (no RNG, no rounding that could change between torch versions)."""

    def __init__(self):
        super().__init__()
        # More elements than the fingerprint samples (4096), stored in bfloat16.
        self.big = nn.Parameter((torch.arange(5000, dtype=torch.float32) / 7).reshape(50, 100).to(torch.bfloat16),
                                requires_grad=False)
        self.small = nn.Parameter(((torch.arange(12, dtype=torch.float32) - 6) / 4).reshape(3, 4),
                                  requires_grad=False)
        self.trained = nn.Parameter(torch.ones(4))  # not part of the base


def test_base_fingerprint_is_pinned():
    model = _Frozen()
    pinned = "sha256:287f65d4e10d33f3239f9b4ce27658fa471325b48183df9163ac55e32e2a8a87"
    assert base_fingerprint(model) == pinned
    assert base_fingerprint(model, ["trained"]) == pinned
    model.float()  # values, not storage
    assert base_fingerprint(model) == pinned


def _safetensors_bytes(tensors: dict[str, list[float]]) -> bytes:
    """A float32 safetensors file written by hand, so the pin does not depend on how a
    safetensors version lays out its header."""
    header, data = {}, b""
    for name, values in tensors.items():
        raw = torch.tensor(values, dtype=torch.float32).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": [len(values)], "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_source_digest_is_pinned(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline", '
                                               '"transformer": ["diffusers", "PixArtTransformer2DModel"], '
                                               '"tokenizer": ["transformers", "T5Tokenizer"]}\n')
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"num_layers": 2}\n')
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(
        _safetensors_bytes({"a.weight": [float(i) / 8 for i in range(40)], "b.bias": [0.5, -0.25]}))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(bytes(range(256)))
    (tmp_path / "README.md").write_text("not part of the digest\n")
    assert source_digest(tmp_path) == "b34e882b49fa2935c4a24dc40190c05f61099c36cee35108495260b0f38b8b0f"
