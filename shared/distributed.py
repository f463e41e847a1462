"""Several `torchrun` processes: ranks, sharding, collectives; rank 0 writes results."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from shared.errors import UserError

# Control collectives wait for the slowest rank (its share of `features` can take hours on a big
# list): NCCL's default 10-minute watchdog would abort a healthy job.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=int(os.environ.get("MMAUDIO_LORA_COLLECTIVE_TIMEOUT_HOURS", "12")))


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
        if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
            return cls()  # not started by torchrun: one process, no group
        import torch.distributed as dist

        use_cuda = device != "cpu" and torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
        rank = dist.get_rank()
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(local)
        return cls(rank, dist.get_world_size(), local, grouped=True)

    def shard(self, items: list) -> list:
        """This rank's share of `items`."""
        return rank_rows(items, self.rank, self.world_size)

    def main_first(self, action):
        """`action()` on rank 0 while the other ranks wait; a UserError there stops every rank
        (the others would otherwise wait for it forever)."""
        failure, result = None, None
        if self.is_main:
            try:
                result = action()
            except UserError as error:
                failure = error
        stopped = self.total(int(failure is not None)) if self.grouped else int(failure is not None)
        if failure is not None:
            raise failure
        if stopped:
            raise UserError("rank 0 stopped the job; its message says why")
        return result

    def close(self) -> None:
        """End the process group this process started (torchrun jobs), so NCCL exits cleanly."""
        if self.grouped:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.grouped = False

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """The group ends together after a success: every rank first waits for rank 0 to finish
        writing. A gloo process that tore its group down and exited while its peer was still busy
        was seen to abort at exit ("terminate called without an active exception"). After a
        failure each rank leaves at once (torchrun stops the others)."""
        if kind is None:
            self.barrier()
        self.close()

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

    def from_main(self, value: float | None) -> float | None:
        """Rank 0's value, on every rank. Whatever ends or branches a loop is decided on it: numbers
        each rank computes for itself can differ by a rounding, and a rank that leaves the loop alone
        leaves the others waiting for it until the collective timeout."""
        if not self.grouped:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value is not None, 0.0 if value is None else value], dtype=torch.float64,
                              device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor[1].item() if tensor[0].item() else None

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
