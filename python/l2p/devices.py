"""The device a command or a run asks for (``--device``, ``train.device``): one parser, so a
device this machine lacks is the same one-line error everywhere instead of a traceback from
deep inside torch."""

from __future__ import annotations

import torch


def pick_device(name: str | None, option: str = "--device") -> torch.device:
    """The torch device that ``name`` asks for; None or "auto": the accelerator if there is
    one (CUDA on the machines l2p runs on), else the CPU. A ValueError (printed as one line by
    the ``l2p`` command) for a name torch does not parse or a device this machine lacks."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{option} {name!r} is not a torch device ({reason}); use auto, cpu, cuda or "
                         "cuda:N") from None
    if device.type == "cpu":
        return device
    # torch.accelerator knows CUDA, ROCm (as cuda), XPU and MPS alike.
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type != device.type:
        found = f"this machine has {accelerator.type}" if accelerator is not None else \
            f"this torch {torch.__version__} sees no accelerator"
        raise ValueError(f"{option} {name} was asked for but no {device.type.upper()} device is available "
                         f"({found}); use {option} cpu or run where one is")
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"{option} {name} was asked for but this machine has {count} {device.type} "
                         f"device{'s' if count != 1 else ''} (indices 0..{count - 1})")
    return device
