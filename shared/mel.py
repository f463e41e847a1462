"""Log-mel spectrograms, the VAE's input, exactly as MMAudio computes them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.sequence import AUDIO_MODES


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


class MelConverter(nn.Module):
    """Waveform (B, N) in [-1, 1] → log-mel (B, n_mels, frames)."""

    def __init__(self, config: MelConfig):
        super().__init__()
        import torchaudio

        self.config = config
        # librosa's default filterbank: slaney mel scale with slaney area normalisation.
        basis = torchaudio.functional.melscale_fbanks(
            n_freqs=config.n_fft // 2 + 1, f_min=config.f_min, f_max=config.f_max,
            n_mels=config.n_mels, sample_rate=config.sampling_rate, norm="slaney", mel_scale="slaney")
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
