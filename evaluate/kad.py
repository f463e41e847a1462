"""The kernel audio distance (KAD, Chung et al. 2025, arXiv 2502.15602) between a generated and a
real set of embeddings: the unbiased MMD² with a Gaussian kernel, made for small samples, where
Fréchet distances are meaningless. As kadtk computes it: the bandwidth is the median pairwise
distance within the real set, k(a, b) = exp(-|a - b|² / (2 σ² + 1e-8)), and the value is scaled
by 100. It describes sets, so it gets an interval by resampling sources, never a verdict.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SCALE = 100.0  # kadtk's scale factor
RESAMPLES = 2000
RESAMPLING_SEED = 0


def kernel_audio_distance(real: torch.Tensor, generated: torch.Tensor, bandwidth: float | None = None) -> float:
    """KAD of two sets of embeddings (rows); NaN when a set has fewer than two rows."""
    real, generated = real.double(), generated.double()
    if len(real) < 2 or len(generated) < 2:
        return math.nan
    if bandwidth is None:
        bandwidth = float(torch.pdist(real).median())
    gamma = 1.0 / (2 * bandwidth ** 2 + 1e-8)

    def mean_kernel(a: torch.Tensor, b: torch.Tensor, same: bool) -> float:
        kernel = torch.exp(-gamma * torch.cdist(a, b) ** 2)
        if same:  # the unbiased estimate leaves each point's kernel with itself out
            return float((kernel.sum() - kernel.diagonal().sum()) / (len(a) * (len(a) - 1)))
        return float(kernel.mean())

    mmd = mean_kernel(real, real, True) + mean_kernel(generated, generated, True) - 2 * mean_kernel(real, generated,
                                                                                                    False)
    return SCALE * mmd


def kad_by_source(real: dict[str, torch.Tensor], generated: dict[str, torch.Tensor], group_of: dict[str, str]
                  ) -> tuple[float, list[float] | None]:
    """KAD of the generated against the real clips ({clip: (rows, D)} each), and a 95 % percentile
    interval from resampling whole sources with replacement (the bandwidth fixed from the full real
    set); no interval below three sources."""
    clips = sorted(real)
    value = kernel_audio_distance(torch.cat([real[c] for c in clips]), torch.cat([generated[c] for c in clips]))
    sources: dict[str, list[str]] = {}
    for clip in clips:
        sources.setdefault(group_of.get(clip, clip), []).append(clip)
    if len(sources) < 3 or not math.isfinite(value):
        return value, None
    bandwidth = float(torch.pdist(torch.cat([real[c] for c in clips]).double()).median())
    names = sorted(sources)
    draws = np.random.default_rng(RESAMPLING_SEED).integers(0, len(names), (RESAMPLES, len(names)))
    values = []
    for draw in draws:
        picked = [clip for index in draw for clip in sources[names[index]]]
        values.append(kernel_audio_distance(torch.cat([real[c] for c in picked]),
                                            torch.cat([generated[c] for c in picked]), bandwidth))
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return value, [float(low), float(high)]
