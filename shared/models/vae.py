"""MMAudio's mel VAE: a magnitude-preserving 1-D conv net (EDM2 style).

The official files hold raw convolution weights. Each convolution normalizes its weight when
it runs (the reference does the same once, in place, before inference: identical numbers), so
`load_state_dict` takes the official file as it is and `state_dict()` gives it back unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


CLAMP = 256.0
RESIDUAL_BALANCE = 0.3


@dataclass(frozen=True)
class VAEConfig:
    mel_bins: int
    latent_dim: int
    hidden_dim: int
    ch_mult: tuple[int, ...] = (1, 2, 4)


VAE_CONFIGS: dict[str, VAEConfig] = {
    "16k": VAEConfig(mel_bins=80, latent_dim=20, hidden_dim=384),
    "44k": VAEConfig(mel_bins=128, latent_dim=40, hidden_dim=512),
}


def mp_normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-4) -> torch.Tensor:
    """Scale x so its RMS over `dims` is one."""
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


class MPConv1D(nn.Module):
    """Bias-free conv whose raw weight is normalized to unit-norm rows when it runs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        weight = mp_normalize(self.weight, dims=(1, 2)) / math.sqrt(fan_in)
        return F.conv1d(x, (weight * gain).to(x.dtype), padding=self.weight.shape[-1] // 2)


class ResnetBlock1D(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = MPConv1D(in_dim, out_dim, 3)
        self.conv2 = MPConv1D(out_dim, out_dim, 3)
        if in_dim != out_dim:
            self.nin_shortcut = MPConv1D(in_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = mp_normalize(x, dims=(1,))
        h = self.conv2(mp_silu(self.conv1(mp_silu(x))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return mp_sum(x, h, RESIDUAL_BALANCE)


class AttnBlock1D(nn.Module):
    """Single-head self-attention over time, with cosine-normalized q, k, v."""

    def __init__(self, channels: int):
        super().__init__()
        self.qkv = MPConv1D(channels, channels * 3, 1)
        self.proj_out = MPConv1D(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        # Channel index c * 3 + j holds q, k, v for j = 0, 1, 2.
        qkv = mp_normalize(self.qkv(x).view(batch, channels, 3, length), dims=(1,))
        q, k, v = (part.transpose(1, 2).unsqueeze(1) for part in qkv.unbind(2))  # (B, 1, L, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        return mp_sum(x, self.proj_out(h), RESIDUAL_BALANCE)


class Downsample1D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = MPConv1D(channels, channels, 1)
        self.conv2 = MPConv1D(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.avg_pool1d(self.conv1(x), kernel_size=2))


class Upsample1D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = MPConv1D(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))


class _Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock1D(channels, channels)
        self.attn_1 = AttnBlock1D(channels)
        self.block_2 = ResnetBlock1D(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x))).clamp(-CLAMP, CLAMP)


class _Level(nn.Module):
    """Resnet blocks at one width, then an optional resampling (`downsample` / `upsample`)."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, resample: str | None = None):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock1D(in_dim if i == 0 else out_dim, out_dim) for i in range(num_blocks)])
        if resample == "down":
            self.downsample = Downsample1D(out_dim)
        elif resample == "up":
            self.upsample = Upsample1D(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x).clamp(-CLAMP, CLAMP)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder1D(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.hidden_dim * m for m in config.ch_mult]
        self.learnable_gain = nn.Parameter(torch.zeros([]))
        self.conv_in = MPConv1D(config.mel_bins, config.hidden_dim, 3)
        self.down = nn.ModuleList([
            _Level(config.hidden_dim if i == 0 else widths[i - 1], width, num_blocks=2,
                   resample="down" if i == 0 else None)
            for i, width in enumerate(widths)
        ])
        self.mid = _Middle(widths[-1])
        self.conv_out = MPConv1D(widths[-1], 2 * config.latent_dim, 3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(mel)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(mp_silu(x), gain=self.learnable_gain + 1)


class Decoder1D(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.hidden_dim * m for m in config.ch_mult]
        self.learnable_gain = nn.Parameter(torch.zeros([]))
        self.conv_in = MPConv1D(config.latent_dim, widths[-1], 3)
        self.mid = _Middle(widths[-1])
        # Stored as up.0 (narrowest) .. up.N-1 and run from the widest level down.
        self.up = nn.ModuleList([
            _Level(widths[min(i + 1, len(widths) - 1)], width, num_blocks=3,
                   resample="up" if i == 1 else None)
            for i, width in enumerate(widths)
        ])
        self.conv_out = MPConv1D(config.hidden_dim, config.mel_bins, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(mp_silu(x), gain=self.learnable_gain + 1)


class VAE(nn.Module):
    """Mel (B, bins, 2L) ↔ latent (B, latent_dim, L)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.register_buffer("data_mean", torch.zeros(1, config.mel_bins, 1))
        self.register_buffer("data_std", torch.ones(1, config.mel_bins, 1))
        self.encoder = Encoder1D(config)
        self.decoder = Decoder1D(config)

    def encode(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior (mean, std), each (B, latent_dim, frames // 2)."""
        moments = self.encoder((mel - self.data_mean) / self.data_std)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return mean, std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z) * self.data_std + self.data_mean


def build_vae(mode: str, hidden_dim: int | None = None) -> VAE:
    """The VAE of an audio mode, weights not loaded; `hidden_dim` shrinks only its width (tests)."""
    if mode not in VAE_CONFIGS:
        raise ValueError(f"unknown audio mode {mode!r}; expected one of {sorted(VAE_CONFIGS)}")
    config = VAE_CONFIGS[mode]
    return VAE(config if hidden_dim is None else replace(config, hidden_dim=hidden_dim))
