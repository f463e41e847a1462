"""Length buckets: each batch trains at one clip length, so a 3 s clip costs what 3 s cost.

A clip's bucket is its duration rounded up to a multiple of `bucket_sec` (at most the window).
An epoch shuffles the clips by (seed, epoch), fills each bucket's batch in that order, and carries
a bucket's leftovers up into the next longer bucket (they train padded and masked there, as every
clip did at the fixed window), so no clip is dropped for a half-empty bucket and every batch is
full. The batches are then shuffled by (seed, epoch) too: the plan of an epoch depends on nothing
else, so a resumed run repeats it, and every DDP rank computes the same plan.
With a single bucket (every clip 8 s, or `bucket_sec = 0`) the plan is the fixed-window
trainer's: consecutive slices of the shuffled order, the last partial batch dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    seconds: float  # the bucket's length: the network's sequence lengths for this batch
    indices: list[int]  # rows of the training set


def bucket_lengths(durations: list[float], bucket_sec: float, window_sec: float) -> list[float]:
    """Each clip's bucket: its duration rounded up to a multiple of `bucket_sec`, within the window."""
    if bucket_sec <= 0:
        return [window_sec] * len(durations)
    return [min(window_sec, max(bucket_sec, math.ceil(round(d / bucket_sec, 6)) * bucket_sec)) for d in durations]


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so resuming repeats it."""
    # modulo 2^64: the generator's range (unchanged for every seed below 1.8e14, so old runs resume alike)
    return torch.randperm(count, generator=torch.Generator().manual_seed((seed * 100003 + epoch) % 2 ** 64))


def epoch_plan(buckets: list[float], batch_size: int, seed: int, epoch: int) -> list[Batch]:
    """The batches of one epoch (see the module's docstring)."""
    order = epoch_order(len(buckets), seed, epoch).tolist()
    lengths = sorted(set(buckets))
    if len(lengths) == 1 or len(buckets) < batch_size:
        # one bucket: the fixed window's plan; fewer clips than a batch: all of them, at the longest length
        if len(buckets) < batch_size:
            return [Batch(lengths[-1], order)]
        return [Batch(lengths[0], order[i:i + batch_size])
                for i in range(0, len(order) - batch_size + 1, batch_size)]
    pending: dict[float, list[int]] = {length: [] for length in lengths}
    batches = []
    for index in order:
        members = pending[buckets[index]]
        members.append(index)
        if len(members) == batch_size:
            batches.append(Batch(buckets[index], list(members)))
            members.clear()
    carried: list[int] = []
    for length in lengths:
        members = carried + pending[length]
        while len(members) >= batch_size:
            batches.append(Batch(length, members[:batch_size]))
            members = members[batch_size:]
        carried = members  # up into the next longer bucket; the last remainder is dropped
    generator = torch.Generator().manual_seed((seed * 100003 + epoch + 7919) % 2 ** 64)
    shuffle = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in shuffle.tolist()]
