"""Several `torchrun` processes: ranks, sharding, collectives; rank 0 writes results."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def rank_rows(items, rank: int, world_size: int):
    """The rows a rank takes of anything indexable (a list, a batch tensor): every world_size-th
    from its rank. The one rule for splitting work and batches across processes."""
    return items[rank::world_size]


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the rank's device in a process group (its GPU under NCCL)
    grouped: bool = False  # a process group is up: collectives run (also for a group of one)

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
        return cls(rank, dist.get_world_size(), local, grouped=True)

    def shard(self, items: list) -> list:
        """This rank's share of `items`."""
        return rank_rows(items, self.rank, self.world_size)

    def barrier(self) -> None:
        if self.grouped:
            import torch.distributed as dist

            dist.barrier()

    def _sum(self, value: float, dtype: torch.dtype) -> float:
        """all_reduce of one number, on the rank's device: NCCL reduces only GPU tensors."""
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=dtype, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()

    def total(self, count: int) -> int:
        """The sum of a count over all ranks."""
        return int(self._sum(count, torch.int64)) if self.grouped else count

    def mean(self, value: float) -> float:
        """The mean of a float over all ranks."""
        return self._sum(value, torch.float64) / self.world_size if self.grouped else value

    @property
    def is_main(self) -> bool:
        """Rank 0: it writes the results and reports; the others only compute."""
        return self.rank == 0
