"""``--device`` of every command that takes one: the same one-line error for a device torch
does not know or this machine lacks, before any model is loaded."""

from __future__ import annotations

import pytest
import torch

from l2p.cli import main
from l2p.devices import pick_device

COMMANDS = {
    "data generate": ["data", "generate", "--source", "nowhere", "--prompts", "p.txt", "--out", "out"],
    "data embed": ["data", "embed", "--source", "nowhere", "--data", "data"],
    "sample": ["sample", "--model", "nowhere", "--prompt", "x"],
    "toy train-source": ["toy", "train-source", "--out", "nowhere"],
}


def test_pick_device():
    assert pick_device(None) == pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'bogus' is not a torch device.*use auto, cpu, cuda or cuda:N"):
        pick_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1 was asked for but no CUDA device is available"):
            pick_device("cuda:1")
    else:
        with pytest.raises(ValueError, match="cuda device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_every_command_gives_one_line(command, device, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a prompt\n")
    assert main(COMMANDS[command] + ["--device", device]) == 2
    err = capsys.readouterr().err
    shown = repr(device) if device == "bogus" else device  # a name torch cannot parse is quoted
    assert err.startswith(f"l2p {command.split()[0]}: error: --device {shown} ")
    assert len(err.strip().splitlines()) == 1
