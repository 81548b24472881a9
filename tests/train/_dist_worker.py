"""One rank of the 2-process gloo runs (spawned by test_distributed.py): each config in turn,
so the spawn's imports are paid once."""

from __future__ import annotations

import os


def run_rank(rank: int, world_size: int, port: int, runs: list[list[str]]) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1")
    from l2p.train.config import load_config
    from l2p.train.distributed import DistEnv
    from l2p.train.loop import train

    for i, overrides in enumerate(runs):
        os.environ["MASTER_PORT"] = str(port + i)
        result = train(load_config(None, overrides), DistEnv(rank=rank, world_size=world_size, local_rank=rank))
        if rank == 0:  # what the parent process cannot see in the children
            (result.output_dir / "offloaded-blocks.txt").write_text(str(result.offloaded_blocks))


def run_rank_own_folder(rank: int, world_size: int, port: int, overrides_by_rank: list[list[str]],
                        errors) -> None:
    """Rank r trains with ``overrides_by_rank[r]`` (e.g. its own output folder, as on a node
    whose disk the others do not see) and reports the error it stopped with in ``errors[r]``."""
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from l2p.train.config import load_config
    from l2p.train.distributed import DistEnv
    from l2p.train.loop import train

    try:
        train(load_config(None, overrides_by_rank[rank]), DistEnv(rank=rank, world_size=world_size, local_rank=rank))
    except Exception as exc:
        errors[rank] = f"{type(exc).__name__}: {exc}"
