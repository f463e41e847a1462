"""Several `torchrun` processes: ranks, sharding, collectives; rank 0 writes results."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # set when each rank has its own GPU

    @classmethod
    def from_environment(cls, device: str = "auto") -> "Ranks":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import torch.distributed as dist

        use_cuda = device != "cpu" and torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(local)
        return cls(rank, dist.get_world_size(), local)

    def shard(self, items: list) -> list:
        return items[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def total(self, count: int) -> int:
        """The sum of a count over all ranks."""
        if self.world_size == 1:
            return count
        import torch.distributed as dist

        value = torch.tensor([count])
        dist.all_reduce(value)
        return int(value.item())

    def mean(self, value: float) -> float:
        """The mean of a float over all ranks."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0
