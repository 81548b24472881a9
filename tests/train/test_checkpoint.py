"""Checkpoints: pickle-free and atomic, pruned to the newest K, and a run killed with SIGKILL
resumes to the same weights as one that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from _trainkit import make_config, subprocess_env
from l2p.train import checkpoint as ckpt
from l2p.train.loop import Trainer


def _adamw_with_state():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    return params, opt


def test_optimizer_state_round_trips_exactly():
    params, opt = _adamw_with_state()
    tensors, meta = ckpt.optimizer_to_flat(opt, ["a", "b"])
    json.dumps(meta)  # the non-tensor part is plain JSON
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=5.0)
    ckpt.optimizer_from_flat(fresh, ["a", "b"], tensors, json.loads(json.dumps(meta)))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"][0]["lr"] == b["param_groups"][0]["lr"] == 1e-2
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k])


def test_rng_state_round_trip():
    import random

    import numpy as np

    tensors, meta = ckpt.rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(tensors, json.loads(json.dumps(meta)))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_checkpoint_folder_is_atomic_and_pruned(tmp_path):
    params, opt = _adamw_with_state()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, rank=0, trainable={"a": params[0], "b": params[1]}, ema=None,
                             optimizer=opt, param_names=["a", "b"], state={"step": step}, keep_last=2)
    # A half-written checkpoint (killed writer) is invisible.
    (ckpt.checkpoint_root(tmp_path) / ".tmp-step-00000004").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    latest = ckpt.latest_checkpoint(tmp_path)
    assert {p.suffix for p in latest.iterdir()} == {".safetensors", ".json"}  # no pickle
    loaded = ckpt.load_checkpoint(latest, rank=0)
    assert torch.equal(loaded["trainable"]["a"], params[0]) and loaded["state"]["step"] == 3


def test_sigkill_then_resume_matches_an_uninterrupted_run(sources, images, tmp_path):
    extra = dict(train__max_steps=8, checkpoint__every=1, checkpoint__keep_last=2)
    straight = Trainer(make_config(sources["sd3"], images, tmp_path / "straight", **extra))
    straight.run()

    run_dir = tmp_path / "killed"
    cfg = make_config(sources["sd3"], images, run_dir, **extra)
    cfg_path = tmp_path / "killed.yaml"
    cfg.save(cfg_path)
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "l2p.train", str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None and int(latest.name.split("-")[1]) >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    stopped_at = int(ckpt.latest_checkpoint(run_dir).name.split("-")[1])
    assert 3 <= stopped_at < 8 and not (run_dir / "final").exists()

    done = subprocess.run([sys.executable, "-m", "l2p.train", "--resume", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the steps redone after the kill are logged once
    for name in ("delta-raw.safetensors", "delta.safetensors"):
        a = load_file(str(tmp_path / "straight" / "final" / name))
        b = load_file(str(run_dir / "final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
