"""`l2p info`: what was built, what "auto" picks, and whether the toy source ships."""

from __future__ import annotations

import json


def test_info_text_and_json(capsys, monkeypatch, tmp_path):
    import l2p.toy.source as toy_source
    from l2p.cli import main

    monkeypatch.setattr(toy_source, "SHIPPED_SOURCE_DIR", tmp_path / "none")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert 'backend="auto" picks' in out and "toy source: not shipped" in out

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "model_index.json").write_text("{}")
    (shipped / "training_record.json").write_text(json.dumps(
        {"device": "a CPU", "seconds": 600, "eval": {"heldout": {"overall": 0.5, "ci95": [0.4, 0.6]}}}))
    monkeypatch.setattr(toy_source, "SHIPPED_SOURCE_DIR", shipped)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["toy_source"]["shipped"] and info["toy_source"]["heldout_score"] == 0.5
    assert set(info["auto"]) == {"patch_embed", "unpatchify", "attention"}
    assert main(["info"]) == 0
    assert "held-out score 0.500 (95% CI 0.400-0.600), trained 10 min on a CPU" in capsys.readouterr().out
    # A source trained further (--init-from) reports the time of all its runs and their machines.
    first = {"device": "a CPU", "seconds": 900}
    second = {"device": "a CPU", "seconds": 300, "continued_from": first}
    (shipped / "training_record.json").write_text(json.dumps(
        {"device": "a GPU", "seconds": 600, "total_seconds": 1800, "continued_from": second,
         "eval": {"heldout": {"overall": 0.5, "ci95": [0.4, 0.6]}}}))
    assert main(["info"]) == 0
    assert "trained 30 min in 3 runs on a CPU, a GPU" in capsys.readouterr().out


def test_info_names_the_cuda_attention_kernels(capsys, monkeypatch):
    """On an H100 / H200 with an sm_90a build, the Hopper kernels and their switches; elsewhere
    the mma.sync / WMMA ones. (The GPU is simulated: what is checked is the wording of the
    choice attention_cuda.cpp makes.)"""
    import torch

    from l2p.cli import info as info_cmd
    from l2p.cli import main
    from l2p.ops import _extension

    build = {"cuda": True, "cuda_archs": "8.0;9.0a", "cpu_gemm": "blas", "torch_version": "x"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(_extension, "build_info", lambda: dict(build))
    monkeypatch.delenv("L2P_ATTENTION_WGMMA", raising=False)
    monkeypatch.delenv("L2P_ATTENTION_WGMMA_BACKWARD", raising=False)
    assert main(["info"]) == 0
    assert ('attention with backend="cuda" on this GPU: Hopper wgmma forward and backward for '
            "unmasked bf16 / fp16") in capsys.readouterr().out
    monkeypatch.setenv("L2P_ATTENTION_WGMMA_BACKWARD", "0")
    assert "backward is off: L2P_ATTENTION_WGMMA_BACKWARD=0" in info_cmd._cuda_attention(build)
    monkeypatch.setenv("L2P_ATTENTION_WGMMA", "0")
    assert "wgmma kernels are off: L2P_ATTENTION_WGMMA=0" in info_cmd._cuda_attention(build)
    monkeypatch.delenv("L2P_ATTENTION_WGMMA")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    assert info_cmd._cuda_attention(build).startswith("mma.sync / WMMA")
    assert info_cmd._cuda_attention({**build, "cuda": False}).startswith("none")


def test_info_names_the_cuda_unpatchify_kernel(capsys, monkeypatch):
    """The Hopper fused GEMM on an sm_90a build with the CUTLASS headers when switched on
    (off by default for now); the cuBLAS + fold path elsewhere (a simulated GPU, as above)."""
    import torch

    from l2p.cli import info as info_cmd
    from l2p.cli import main
    from l2p.ops import _extension

    build = {"cuda": True, "cuda_archs": "8.0;9.0a", "cutlass": True,
             "unpatchify_fused_default": False, "cpu_gemm": "blas", "torch_version": "x"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(_extension, "build_info", lambda: dict(build))
    monkeypatch.setenv("L2P_UNPATCHIFY_FUSED", "1")
    assert main(["info"]) == 0
    assert 'unpatchify with backend="cuda" on this GPU: Hopper fused GEMM' in capsys.readouterr().out
    monkeypatch.delenv("L2P_UNPATCHIFY_FUSED")  # the build's default: off until validated
    assert "fused GEMM is off; L2P_UNPATCHIFY_FUSED=1" in info_cmd._cuda_unpatchify(build)
    on_by_default = {**build, "unpatchify_fused_default": True}
    assert info_cmd._cuda_unpatchify(on_by_default).startswith("Hopper fused GEMM")
    monkeypatch.setenv("L2P_UNPATCHIFY_FUSED", "0")
    assert "fused GEMM is off; L2P_UNPATCHIFY_FUSED=0" in info_cmd._cuda_unpatchify(on_by_default)
    monkeypatch.setenv("L2P_UNPATCHIFY_FUSED", "1")
    assert "without the CUTLASS headers" in info_cmd._cuda_unpatchify({**build, "cutlass": False})
    assert info_cmd._cuda_unpatchify({**build, "cuda_archs": "8.0;9.0"}).startswith("cuBLAS")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # an A100
    assert info_cmd._cuda_unpatchify(build).startswith("cuBLAS")
    assert info_cmd._cuda_unpatchify({**build, "cuda": False}).startswith("none")
