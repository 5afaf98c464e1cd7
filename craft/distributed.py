"""Data-parallel training across processes (torchrun), reduced to what the loop needs.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; with one process everything here is a no-op.
"""

from __future__ import annotations

import os

import torch


class Distributed:
    """Rank / world size from torchrun's environment; a no-op for one process.

    CPU: gloo. GPUs: nccl, one GPU per process (LOCAL_RANK). Every collective below is called
    by all ranks at the same points of the loop, so their decisions (stop, save, best) agree.
    """

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.device = torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.enabled:
            import torch.distributed as dist

            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64; the identity for one process)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
