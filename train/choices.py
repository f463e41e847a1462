"""The run's choices from its validation losses: which adapter is the best so far, and when
early stopping ends the run. Fed the same numbers, every torchrun rank makes the same choices; the
trainer feeds it rank 0's (shared.distributed.Ranks.from_main), so a rounding difference between
ranks can never send one rank out of the loop while the others wait for it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Choices:
    patience: int = 0  # validations without a new best that end the run (0: never)
    best: float | None = None  # the lowest loss so far
    best_step: int | None = None  # when it was measured
    stale: int = 0  # validations since then

    def record(self, step: int, loss: float) -> bool:
        """One validation's loss; True when it is a new best (its adapter is the one to keep)."""
        if self.best is None or loss < self.best:
            self.best, self.best_step, self.stale = loss, step, 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience
