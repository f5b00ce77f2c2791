"""What the launcher says about this process: the one place that reads rank, world size and device.

torchrun, `deepspeed` and `accelerate launch` all set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; without them (or with WORLD_SIZE 1) the process is a job of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 without a launcher).
        world_size: processes in the job (1 without a launcher).
        local_rank: rank on this machine: the CUDA device a GPU rank takes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Launch:
        """Read the launcher's variables (a lone process when they are not all set)."""
        if not all(v in os.environ for v in LAUNCH_VARS):
            return cls()
        env = os.environ
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))

    @property
    def launched(self) -> bool:
        """True when a launcher started this process as one of several."""
        return self.world_size > 1

    def device(self, configured: str) -> torch.device:
        """Where this rank computes: `configured`, except that each launched GPU rank takes
        cuda:LOCAL_RANK."""
        device = torch.device(configured)
        if device.type == "cuda" and self.launched:
            return torch.device("cuda", self.local_rank)
        return device
