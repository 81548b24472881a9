"""torchrun integration: process group from torchrun's environment, DDP or FSDP2 wrapping.

torchrun publishes RANK / WORLD_SIZE / LOCAL_RANK; ``l2p.torchrun.DistEnv.from_torchrun`` is
the one place that reads them. A plain ``python -m l2p.train`` run is world size 1 and never touches
torch.distributed.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from l2p.torchrun import DistEnv


def init_distributed(env: DistEnv, device: torch.device, backend: str | None = None,
                     timeout_minutes: float = 30.0) -> None:
    """Join the process group that torchrun (or a test's launcher) set up (env:// rendezvous)."""
    if not env.has_process_group or torch.distributed.is_initialized():
        return
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                         timeout=timedelta(minutes=timeout_minutes))


def shutdown_distributed(wait_for_peers: bool = False) -> None:
    """Leave the process group. With ``wait_for_peers`` (for a rank that finished normally),
    first wait until every rank has got here: rank 0 hosts the rendezvous store, and taking the
    group down while another rank still talks to it can abort that rank's process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait_for_peers:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def pick_device(name: str, env: DistEnv) -> torch.device:
    from l2p.devices import pick_device as parse_device

    device = parse_device(name, option="train.device")
    # Under torchrun each process takes the GPU of its local rank unless an index is given.
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    return device


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Frozen parameters are ignored by DDP (requires_grad False); every trainable one is
    # used in every step, so no unused-parameter search is needed.
    return DistributedDataParallel(model, device_ids=ids)


def wrap_fsdp(model: nn.Module, blocks: list[nn.Module], *, bf16: bool, offload_frozen: bool = False) -> int:
    """FSDP2: shard every block (trainable and frozen alike), then the root, which holds the
    embeddings and the head. Parameters become DTensors sharded on dim 0. With
    ``offload_frozen``, the shards of blocks without trainable parameters stay in host memory
    (CPUOffloadPolicy: copied to the device for each forward and for the backward through
    them, freed after). Returns how many blocks were offloaded."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    offloaded = 0
    for block in blocks:
        frozen = not any(p.requires_grad for p in block.parameters())
        if offload_frozen and frozen:
            # Pinned host memory makes the copies asynchronous; there is none without CUDA.
            policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
            offloaded += 1
        else:
            policy = OffloadPolicy()
        fully_shard(block, mp_policy=mp, offload_policy=policy)
    fully_shard(model, mp_policy=mp)
    return offloaded


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit. A forward without a backward (the
    sampler's) leaves the root unit unsharded, and checkpoints and exports read the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_shared_folder(folder: Path, env: DistEnv, device: torch.device) -> None:
    """Fail at the start, on every rank alike, unless every process sees the same ``folder``:
    rank 0 writes a file with a fresh token there and each rank looks for it. The checkpoint
    folders rank 0 creates are written into by every rank and read back by every rank on
    resume, so a node-local output folder would otherwise fail at the first checkpoint (or
    resume some ranks and start others afresh)."""
    from l2p.atomic import write_text
    from l2p.train.config import ConfigError

    token = torch.tensor([int.from_bytes(os.urandom(7), "little") if env.is_main else 0], device=device)
    torch.distributed.broadcast(token, src=0)
    marker = folder / f".l2p-shared-{int(token.item()):x}"
    if env.is_main:
        write_text(marker, "the output folder is shared by every process\n")
    torch.distributed.barrier()
    # A few seconds' grace for filesystems whose other clients see new files late.
    deadline = time.monotonic() + 5.0
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.25)
    missing = torch.zeros(env.world_size, device=device)
    missing[env.rank] = float(not marker.is_file())
    # Every rank has looked once all have added their flag.
    torch.distributed.all_reduce(missing, op=torch.distributed.ReduceOp.SUM)
    if env.is_main:
        marker.unlink(missing_ok=True)
    blind = [r for r, m in enumerate(missing.tolist()) if m]
    if blind:
        raise ConfigError(f"train.output_dir {folder} is not the same folder on every process: rank(s) "
                          f"{', '.join(map(str, blind))} of {env.world_size} do not see the file rank 0 wrote "
                          "there. Every rank writes into and resumes from the run's checkpoints: put "
                          "train.output_dir on a filesystem that every node mounts at the same path")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values
