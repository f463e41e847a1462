"""Band-limited resampling: a windowed sinc filter applied as one strided convolution.

The math of torchaudio's `resample`, written here so that no torch version ties us to torchaudio.
The rates are reduced by their gcd to `source` → `target` samples per period; output sample j of a
period is the input convolved with a sinc centred at j·source/target, low-passed at `rolloff` × the
lower Nyquist frequency and windowed `lowpass_filter_width` zero crossings wide. Two settings are
used, each where the reference uses it:
- MMAudio's training extractor (the features): a Kaiser window, 64 zero crossings, rolloff 0.9476;
- torchaudio's defaults, which av-benchmark reads every audio file with (DeSync's 16 kHz, PaSST's
  32 kHz): a Hann window, 6 zero crossings, rolloff 0.99.

The kernel is computed in float64 with the same roundings as the reference (the phase offsets in
float32, beta and I0(beta) as float32 values), then applied in float32, and the output length is
torchaudio's: the ceiling of target·N/source after that quotient is rounded to float32 (132464
samples at 44.1 → 32 kHz give 96119, not 96120). Results agree with the reference to the last bit
on the rates we use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SincFilter:
    lowpass_filter_width: int = 64
    rolloff: float = 0.9475937167399596
    window: str = "kaiser"  # or "hann"
    beta: float = 14.769656459379492  # the Kaiser window's


# The reference training extractor's parameters (MMAudio's audio preprocessing).
REFERENCE_FILTER = SincFilter()
# torchaudio's `Resample(rate, new_rate)` at its defaults, as av-benchmark reads audio.
TORCHAUDIO_DEFAULT_FILTER = SincFilter(lowpass_filter_width=6, rolloff=0.99, window="hann")


def resampling_kernel(source_rate: int, target_rate: int, sinc: SincFilter) -> tuple[torch.Tensor, int]:
    """(target, 1, taps) float32 filters, one per output phase of the reduced rates, and the
    input padding `width`."""
    common = math.gcd(source_rate, target_rate)
    return _kernel(source_rate // common, target_rate // common, sinc)


@lru_cache(maxsize=16)
def _kernel(source: int, target: int, sinc: SincFilter) -> tuple[torch.Tensor, int]:
    cutoff = min(source, target) * sinc.rolloff  # in units of the reduced rates
    crossings = sinc.lowpass_filter_width
    width = math.ceil(crossings * source / cutoff)
    taps = torch.arange(-width, width + source, dtype=torch.float64) / source
    phases = (torch.arange(0, -target, -1) / target).to(torch.float64)  # float32 division, as the reference
    time = ((phases[:, None] + taps[None, :]) * cutoff).clamp(-crossings, crossings)
    if sinc.window == "hann":
        window = torch.cos(time * math.pi / crossings / 2) ** 2
    else:
        beta = torch.tensor(sinc.beta, dtype=torch.float32)
        window = torch.i0(beta.double() * torch.sqrt(1 - (time / crossings) ** 2)) / torch.i0(beta).double()
    angle = time * math.pi
    sinc_values = torch.where(angle == 0, torch.ones_like(angle), angle.sin() / angle)
    kernel = sinc_values * window * (cutoff / source)
    return kernel.to(torch.float32)[:, None, :], width


def resample(waveform: torch.Tensor, source_rate: int, target_rate: int,
             sinc: SincFilter = REFERENCE_FILTER) -> torch.Tensor:
    """Resample (..., N) float32 audio from `source_rate` to `target_rate` Hz: about
    N · target / source samples (see the module's note), the signal taken as zero outside [0, N)."""
    if source_rate == target_rate:
        return waveform
    common = math.gcd(source_rate, target_rate)
    source, target = source_rate // common, target_rate // common
    kernel, width = _kernel(source, target, sinc)
    leading, length = waveform.shape[:-1], waveform.shape[-1]
    padded = F.pad(waveform.reshape(-1, 1, length), (width, width + source))
    phases = F.conv1d(padded, kernel.to(waveform.device), stride=source)  # (B, target, periods)
    interleaved = phases.transpose(1, 2).reshape(phases.shape[0], -1)
    out_length = math.ceil(float(np.float32(target * length / source)))
    return interleaved[:, :out_length].reshape(*leading, -1)
