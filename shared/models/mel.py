"""Log-mel spectrograms, the VAE's input, exactly as MMAudio computes them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.sequence import AUDIO_MODES


@dataclass(frozen=True)
class MelConfig:
    sampling_rate: int
    hop_length: int
    n_fft: int
    n_mels: int
    f_max: float
    log10: bool  # 16k uses log10, 44k the natural log
    f_min: float = 0.0


MEL_CONFIGS: dict[str, MelConfig] = {
    "16k": MelConfig(*AUDIO_MODES["16k"], n_fft=1024, n_mels=80, f_max=8000.0, log10=True),
    "44k": MelConfig(*AUDIO_MODES["44k"], n_fft=2048, n_mels=128, f_max=22050.0, log10=False),
}


# The Slaney mel scale (librosa's default): linear below 1 kHz, logarithmic above.
_LINEAR_HZ_PER_MEL = 200.0 / 3
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: float, scale: str) -> float:
    if scale == "htk":
        return 2595.0 * math.log10(1.0 + hz / 700.0)
    if hz < _LOG_START_HZ:
        return hz / _LINEAR_HZ_PER_MEL
    return _LOG_START_MEL + math.log(hz / _LOG_START_HZ) / _LOG_STEP


def _mel_to_hz(mels: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    linear = mels * _LINEAR_HZ_PER_MEL
    logarithmic = _LOG_START_HZ * torch.exp(_LOG_STEP * (mels - _LOG_START_MEL))
    return torch.where(mels >= _LOG_START_MEL, logarithmic, linear)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                   scale: str = "slaney", area_normalized: bool = True) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters evenly spaced on a mel scale, in float32. The default,
    the Slaney scale with each filter scaled to unit area, is librosa's (MMAudio's mel); the HTK
    scale without normalisation is torchaudio's default (Synchformer's audio input, for DeSync)."""
    bin_hz = torch.linspace(0, sample_rate // 2, n_freqs)
    edges_hz = _mel_to_hz(torch.linspace(_hz_to_mel(f_min, scale), _hz_to_mel(f_max, scale), n_mels + 2), scale)
    edge_gaps = edges_hz[1:] - edges_hz[:-1]
    to_edge = edges_hz[None, :] - bin_hz[:, None]  # (n_freqs, n_mels + 2)
    rising = -to_edge[:, :-2] / edge_gaps[:-1]
    falling = to_edge[:, 2:] / edge_gaps[1:]
    triangles = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if not area_normalized:
        return triangles
    return triangles * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[None, :]


class MelConverter(nn.Module):
    """Waveform (B, N) in [-1, 1] → log-mel (B, n_mels, frames)."""

    def __init__(self, config: MelConfig):
        super().__init__()
        self.config = config
        basis = mel_filterbank(config.n_fft // 2 + 1, config.f_min, config.f_max, config.n_mels,
                               config.sampling_rate)
        self.register_buffer("mel_basis", basis.T.contiguous())
        self.register_buffer("hann_window", torch.hann_window(config.n_fft))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        config = self.config
        waveform = waveform.clamp(-1, 1)
        pad = (config.n_fft - config.hop_length) // 2
        waveform = F.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spectrum = torch.stft(waveform, config.n_fft, hop_length=config.hop_length, win_length=config.n_fft,
                              window=self.hann_window, center=False, normalized=False, onesided=True,
                              return_complex=True)
        magnitude = torch.sqrt(spectrum.real.pow(2) + spectrum.imag.pow(2) + 1e-9)
        mel = torch.matmul(self.mel_basis, magnitude).clamp(min=1e-5)
        return torch.log10(mel) if config.log10 else torch.log(mel)


def build_mel_converter(mode: str) -> MelConverter:
    if mode not in MEL_CONFIGS:
        raise ValueError(f"unknown audio mode {mode!r}; expected one of {sorted(MEL_CONFIGS)}")
    return MelConverter(MEL_CONFIGS[mode])
