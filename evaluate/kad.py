"""The kernel audio distance (KAD, Chung et al. 2025, arXiv 2502.15602) between a generated and a
real set of embeddings: the unbiased MMD² with a Gaussian kernel, made for small samples, where
Fréchet distances are meaningless. As kadtk computes it: the bandwidth is the median pairwise
distance within the real set, k(a, b) = exp(-|a - b|² / (2 σ² + 1e-8)), and the value is scaled
by 100. It describes sets, so it gets an interval by resampling sources, never a verdict.

The interval resamples whole sources with replacement, so a clip can be drawn twice. The unbiased
estimate leaves out each point's kernel with itself; a drawn copy of a clip is the same point, so
every pair between two copies of one clip is left out too, in all three terms (real-real,
generated-generated, real-generated). Without that, the copies pair with themselves, every
resample's distance is biased low and the interval misses its own point estimate (19 times in 20
under no difference). With each clip drawn once, the resampled estimate is the point estimate.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SCALE = 100.0  # kadtk's scale factor
RESAMPLES = 2000
RESAMPLING_SEED = 0


def _gamma(bandwidth: float) -> float:
    return 1.0 / (2 * bandwidth ** 2 + 1e-8)


def kernel_audio_distance(real: torch.Tensor, generated: torch.Tensor, bandwidth: float | None = None) -> float:
    """KAD of two sets of embeddings (rows); NaN when a set has fewer than two rows."""
    real, generated = real.double(), generated.double()
    if len(real) < 2 or len(generated) < 2:
        return math.nan
    if bandwidth is None:
        bandwidth = float(torch.pdist(real).median())
    gamma = _gamma(bandwidth)

    def mean_kernel(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
        kernel = torch.exp(-gamma * torch.cdist(a, b) ** 2)
        if same:  # the unbiased estimate leaves each point's kernel with itself out
            return float((kernel.sum() - kernel.diagonal().sum()) / (len(a) * (len(a) - 1)))
        return float(kernel.mean())

    mmd = mean_kernel(real, real, True) + mean_kernel(generated, generated, True) - 2 * mean_kernel(real, generated,
                                                                                                    False)
    return SCALE * mmd


class _ClipKernels:
    """The kernel summed over each pair of clips' rows ({clip: (rows, D)}), so that a resample's
    three terms are weighted sums of these blocks: a clip drawn n times counts n times against
    every other clip drawn, and its own rows pair within one copy only."""

    def __init__(self, real: list[torch.Tensor], generated: list[torch.Tensor], gamma: float):
        def blocks(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
            kernel = torch.exp(-gamma * torch.cdist(torch.cat(a).double(), torch.cat(b).double()) ** 2)
            rows_a, rows_b = [len(x) for x in a], [len(x) for x in b]
            starts_a, starts_b = np.cumsum([0, *rows_a[:-1]]), np.cumsum([0, *rows_b[:-1]])
            sums = np.add.reduceat(np.add.reduceat(kernel.numpy(), starts_a, axis=0), starts_b, axis=1)
            return sums, np.outer(rows_a, rows_b).astype(np.float64)

        self.real_real, self.real_pairs = blocks(real, real)
        self.generated_generated, self.generated_pairs = blocks(generated, generated)
        self.real_generated, self.cross_pairs = blocks(real, generated)
        # the pairs of a point with itself (within one set) are never counted
        self.real_self = np.array([float(len(x)) for x in real])
        self.generated_self = np.array([float(len(x)) for x in generated])

    @staticmethod
    def _mean(sums: np.ndarray, pairs: np.ndarray, counts: np.ndarray, self_sum: np.ndarray | None) -> np.ndarray:
        """Mean kernel over the pairs each draw (a row of `counts`: copies per clip) keeps: pairs of
        different clips (weighted by both counts) and pairs inside one copy of a clip (weighted by
        its count)."""
        within = np.diagonal(sums) - (self_sum if self_sum is not None else 0.0)
        within_pairs = np.diagonal(pairs) - (self_sum if self_sum is not None else 0.0)
        squared = counts ** 2
        total = np.einsum("ri,ij,rj->r", counts, sums, counts) - squared @ np.diagonal(sums) + counts @ within
        count = np.einsum("ri,ij,rj->r", counts, pairs, counts) - squared @ np.diagonal(pairs) + counts @ within_pairs
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.where(count > 0, count, 1.0), math.nan)

    def distance(self, counts: np.ndarray) -> np.ndarray:
        """KAD of each draw (rows of `counts`, copies per clip)."""
        return SCALE * (self._mean(self.real_real, self.real_pairs, counts, self.real_self)
                        + self._mean(self.generated_generated, self.generated_pairs, counts, self.generated_self)
                        - 2 * self._mean(self.real_generated, self.cross_pairs, counts, None))


def kad_by_source(real: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], group_of: dict[str, str]
                  ) -> tuple[float, list[float] | None]:
    """KAD of the generated against the real clips ({clip: (rows, D)} each), and a 95 % percentile
    interval from resampling whole sources with replacement (the bandwidth fixed from the full real
    set; copies of one clip never paired); no interval below three sources."""
    clips = sorted(real)
    value = kernel_audio_distance(torch.cat([real[c] for c in clips]), torch.cat([generated[c] for c in clips]))
    sources: dict[str, list[int]] = {}
    for index, clip in enumerate(clips):
        sources.setdefault(group_of.get(clip, clip), []).append(index)
    if len(sources) < 3 or not math.isfinite(value):
        return value, None
    bandwidth = float(torch.pdist(torch.cat([real[c] for c in clips]).double()).median())
    kernels = _ClipKernels([real[c] for c in clips], [generated[c] for c in clips], _gamma(bandwidth))
    members = [sources[name] for name in sorted(sources)]
    draws = np.random.default_rng(RESAMPLING_SEED).integers(0, len(members), (RESAMPLES, len(members)))
    counts = np.zeros((RESAMPLES, len(clips)))
    for source, indices in enumerate(members):  # a source drawn n times adds n copies of each of its clips
        counts[:, indices] += (draws == source).sum(axis=1, keepdims=True)
    values = kernels.distance(counts)
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return value, [float(low), float(high)]
