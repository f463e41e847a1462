"""PaSST and the metrics av-benchmark computes with it: KL_PaSST, the FD_PaSST embedding, IS_PaSST.

PaSST-S (`passt_s_swa_p16_128_ap476`, Koutini et al.) is a ViT over 16x16 patches, stride 10, of a
128-bin log-mel of 10 s at 32 kHz, trained on AudioSet's 527 classes. av-benchmark (the suite
MMAudio's papers report) runs it on every clip and reports:
- KL_PaSST: KL(real ‖ generated) between the two clips' softmax class distributions, per pair of
  clips, averaged: "is this the same kind of sound as the real audio of this clip";
- FD_PaSST: the Fréchet distance between the two sets' 768-d embeddings; IS_PaSST: the inception
  score of the generated set's logits.

The computation, step by step, follows av-benchmark's own code (its `AudioDataset` reading, the
hear21passt frontend, the network, its `compute_kl`), as `../shared/reference/README.md` section
"KL_PaSST" records it. Module names reproduce the official checkpoint
`passt-s-f128-p16-s10-ap.476-swa.pt`, so it loads strictly (its distillation head `head_dist` is
loaded but, as in the reference, never used).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.models.resample import TORCHAUDIO_DEFAULT_FILTER, resample
from shared.models.synchformer import FeedForward

SAMPLE_RATE = 32000
SCORED_SAMPLES = 320_000  # every clip is scored as 10 s: cut, or zero-padded at the end
N_FFT, HOP, WINDOW = 1024, 320, 800
MEL_BINS, MEL_FMAX = 128, 15000.0  # hear21passt's fmax=None: sr/2 - 2000/2
PREEMPHASIS = 0.97
CLASSES = 527


# -- reading a clip (av-benchmark's AudioDataset) ------------------------------------------------------

def prepare_audio(wave: torch.Tensor, rate: int, audio_length: float) -> torch.Tensor:
    """(C, T) float audio at `rate` → (L,) at 32 kHz, as av-benchmark reads a file: channels
    averaged, the whole file's mean removed (no peak normalisation: loudness matters), resampled
    with torchaudio's default Hann sinc, then the first `audio_length` seconds kept."""
    mono = wave.float().mean(dim=0)
    mono = mono - mono.mean()
    if rate != SAMPLE_RATE:
        mono = resample(mono, rate, SAMPLE_RATE, TORCHAUDIO_DEFAULT_FILTER)
    return mono[:int(SAMPLE_RATE * audio_length)]


# -- the frontend (hear21passt's AugmentMelSTFT in eval mode) ------------------------------------------

def kaldi_mel_banks(bins: int = MEL_BINS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE, f_min: float = 0.0,
                    f_max: float = MEL_FMAX) -> torch.Tensor:
    """(bins, n_fft/2 + 1) triangles on the Kaldi mel scale m(f) = 1127 ln(1 + f/700), peak 1, no
    area normalisation, evaluated in float32 at the bin frequencies; the Nyquist bin gets zeros."""
    def mel(f):
        return 1127.0 * (1.0 + f / 700.0).log() if isinstance(f, torch.Tensor) else 1127.0 * math.log(1.0 + f / 700.0)

    low, high = mel(f_min), mel(f_max)
    step = (high - low) / (bins + 1)
    index = torch.arange(bins, dtype=torch.float32)[:, None]
    left, center, right = low + index * step, low + (index + 1.0) * step, low + (index + 2.0) * step
    at = mel(rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float32))[None, :]
    rising, falling = (at - left) / (center - left), (right - at) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return F.pad(banks, (0, 1))


def frontend(wave_32k: torch.Tensor) -> torch.Tensor:
    """(B, L) audio at 32 kHz → (B, 128, 1000) normalised log-mel of the first 10 s (zero-padded)."""
    length = wave_32k.shape[-1]
    wave = wave_32k[..., :SCORED_SAMPLES] if length >= SCORED_SAMPLES else F.pad(wave_32k, (0, SCORED_SAMPLES - length))
    emphasised = wave[..., 1:] - PREEMPHASIS * wave[..., :-1]
    window = torch.hann_window(WINDOW, periodic=False, device=wave.device)
    spectrum = torch.stft(emphasised, N_FFT, hop_length=HOP, win_length=WINDOW, window=window, center=True,
                          pad_mode="reflect", normalized=False, onesided=True, return_complex=True)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    mel = kaldi_mel_banks().to(wave.device) @ power
    return ((mel + 1e-5).log() + 4.5) / 5.0


# -- the network ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PasstConfig:
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch: int = 16
    stride: int = 10
    frequency_patches: int = 12  # (128 - 16) / 10 + 1
    time_patches: int = 99  # (1000 - 16) / 10 + 1
    classes: int = CLASSES


class PatchEmbed(nn.Module):
    def __init__(self, config: PasstConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, config.dim, config.patch, stride=config.stride)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous())
        return self.proj(mixed.transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, config: PasstConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=1e-6)
        self.attn = Attention(config.dim, config.num_heads)
        self.norm2 = nn.LayerNorm(config.dim, eps=1e-6)
        self.mlp = FeedForward(config.dim, int(config.dim * config.mlp_ratio))  # a ViT's fc1, GELU, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Passt(nn.Module):
    """mel (B, 128, 1000) → (logits (B, 527), embedding (B, 768))."""

    def __init__(self, config: PasstConfig = PasstConfig()):
        super().__init__()
        self.config = config
        d = config.dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, d))
        self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, d, config.frequency_patches, 1))
        self.time_new_pos_embed = nn.Parameter(torch.zeros(1, d, 1, config.time_patches))
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.classes))  # torch's default eps, 1e-5
        self.head_dist = nn.Linear(d, config.classes)  # the distillation head: in the file, never used

    def tokens(self, mel: torch.Tensor) -> torch.Tensor:
        """The sequence entering the first block: cls, dist, then the patches frequency-major."""
        patches = self.patch_embed.proj(mel[:, None])  # (B, D, 12, 99)
        patches = patches + self.time_new_pos_embed[..., :patches.shape[-1]] + self.freq_new_pos_embed
        patches = patches.flatten(2).transpose(1, 2)  # token 99 f + t
        batch = patches.shape[0]
        cls = (self.cls_token + self.new_pos_embed[:, :1]).expand(batch, -1, -1)
        dist = (self.dist_token + self.new_pos_embed[:, 1:]).expand(batch, -1, -1)
        return torch.cat([cls, dist, patches], dim=1)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.tokens(mel)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        embedding = (x[:, 0] + x[:, 1]) / 2
        return self.head(embedding), embedding


def build_passt(config: PasstConfig = PasstConfig()) -> Passt:
    """PaSST-S at the official size (or `config`'s), weights not loaded."""
    return Passt(config)


def checkpoint_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The network's entries of a checkpoint file: its `model` entry when it has one."""
    return checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint


# -- the metrics (av-benchmark's compute_kl, compute_isc, compute_fd) -----------------------------------

def kl_per_clip(gt_logits: torch.Tensor, pred_logits: torch.Tensor) -> torch.Tensor:
    """KL(ground truth ‖ generated) of each pair of rows, softmax over the classes, natural log (float64)."""
    gt, pred = F.log_softmax(gt_logits.double(), dim=-1), F.log_softmax(pred_logits.double(), dim=-1)
    return (gt.exp() * (gt - pred)).sum(dim=-1)


def kl_softmax(gt_logits: torch.Tensor, pred_logits: torch.Tensor) -> float:
    """KL_PaSST: the mean over the N pairs of rows of KL(ground truth ‖ generated)."""
    return float(kl_per_clip(gt_logits, pred_logits).mean())


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS_PaSST of generated logits: rows shuffled by a seeded permutation, then per split
    exp(mean KL(p_row ‖ mean p of the split)); the mean and population std over the splits."""
    probs = F.softmax(logits.double(), dim=-1).numpy()
    probs = probs[np.random.RandomState(seed).permutation(len(probs))]
    scores = []
    for k in range(splits):
        part = probs[k * len(probs) // splits:(k + 1) * len(probs) // splits]
        marginal = part.mean(axis=0, keepdims=True)
        scores.append(math.exp(float((part * (np.log(part) - np.log(marginal))).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def frechet_distance(generated: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray) -> float:
    """FD between two sets of embeddings (rows): |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂); −1 when the
    square root keeps a real imaginary part."""
    from scipy import linalg

    generated, real = np.asarray(generated, dtype=np.float32), np.asarray(real, dtype=np.float32)
    mu_gen, mu_real = generated.mean(axis=0), real.mean(axis=0)
    sigma_gen, sigma_real = np.cov(generated, rowvar=False), np.cov(real, rowvar=False)
    root = linalg.sqrtm(sigma_gen.dot(sigma_real))
    if not np.isfinite(root).all():
        offset = np.eye(sigma_gen.shape[0]) * 1e-6
        root = linalg.sqrtm((sigma_gen + offset).dot(sigma_real + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            return -1.0
        root = root.real
    difference = mu_gen - mu_real
    return float(difference.dot(difference) + np.trace(sigma_gen) + np.trace(sigma_real) - 2 * np.trace(root))
