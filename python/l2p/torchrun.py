"""The process layout torchrun publishes (RANK, WORLD_SIZE, LOCAL_RANK): the one place l2p
reads it, for the trainer and for the corpus generator alike."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DistEnv:
    """This process's place among torchrun's processes (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Started by torchrun (or a launcher that sets its variables), even with one process:
    # then a process group can be joined, which FSDP2 needs even for one GPU.
    launched: bool = False

    @property
    def enabled(self) -> bool:
        """Several processes share the work."""
        return self.world_size > 1

    @property
    def has_process_group(self) -> bool:
        return self.enabled or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_torchrun(cls) -> "DistEnv":
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), launched=True)
