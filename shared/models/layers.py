"""Building blocks of the MMAudio transformer, named as the official state dict names them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLastConv1d(nn.Conv1d):
    """A Conv1d applied to (B, N, C) sequences.

    A subclass rather than a wrapper so that the weight keys stay `<name>.weight` and peft
    builds its LoRA layers with this class.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def swiglu_hidden_dim(hidden_dim: int, multiple_of: int = 256) -> int:
    """The SwiGLU width: two thirds of the nominal width, rounded up to a multiple of 256."""
    hidden_dim = int(2 * hidden_dim / 3)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        hidden_dim = swiglu_hidden_dim(hidden_dim)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ConvMLP(nn.Module):
    """SwiGLU feed-forward whose three projections are channel-last convolutions."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int, padding: int):
        super().__init__()
        hidden_dim = swiglu_hidden_dim(hidden_dim)
        self.w1 = ChannelLastConv1d(dim, hidden_dim, kernel_size, padding=padding, bias=False)
        self.w2 = ChannelLastConv1d(hidden_dim, dim, kernel_size, padding=padding, bias=False)
        self.w3 = ChannelLastConv1d(dim, hidden_dim, kernel_size, padding=padding, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rotary_table(length: int, head_dim: int, freq_scaling: float = 1.0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, length, head_dim / 2, 2) table of (cos, sin) for rotary position embedding."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)[: head_dim // 2] / head_dim
    freqs = freq_scaling / (10000.0 ** exponents)
    positions = torch.arange(length, dtype=torch.float32, device=device)
    angles = torch.outer(positions, freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)[None, None]


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (B, H, N, d) by the table's angle, in float32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        pairs = x.float().unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        cos, sin = table[..., 0], table[..., 1]
        rotated = torch.stack((cos * even - sin * odd, sin * even + cos * odd), dim=-1)
        return rotated.flatten(-2).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose weight follows the input's dtype. Under bf16 autocast the input is bf16 and
    the weight float32, and torch then leaves its fused kernel for a slow path (a warning per
    call); matching the dtypes keeps the fused kernel, which accumulates in float32 anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class SelfAttention(nn.Module):
    """The qkv projection and per-head RMS norms of one stream; attention itself is joint."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def pre_attention(self, x: torch.Tensor, rot: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return split_heads(self.qkv(x), self.num_heads, self.q_norm, self.k_norm, rot)


def split_heads(qkv: torch.Tensor, num_heads: int, q_norm: nn.Module, k_norm: nn.Module,
                rot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3 D) projections → q, k, v of shape (B, H, N, d), each contiguous.

    The official layout interleaves q, k, v innermost (index (head * d + i) * 3 + j), so a plain
    view leaves v with a stride of 3 in its last dimension. The fused attention kernels (flash,
    memory-efficient, cuDNN) need stride 1 there: with a strided v, SDPA falls back to the math
    kernel (float32 upcast, the whole attention matrix kept for backward), and cuDNN training can
    crash on it (MMAudio's own code makes them contiguous for that reason)."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.view(batch, tokens, num_heads, -1, 3).permute(4, 0, 2, 1, 3).unbind(0)
    q, k = q_norm(q), k_norm(k)
    if rot is not None:
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
    return q.contiguous(), k.contiguous(), v.contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention on (B, H, N, d) inputs, returning (B, N, H * d)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class MMDitSingleBlock(nn.Module):
    """One stream of a transformer block with adaLN modulation.

    `pre_only` blocks only produce q, k, v (the last joint block's clip and text streams,
    whose outputs nothing reads).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False,
                 kernel_size: int = 7, padding: int = 3):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads)
        self.pre_only = pre_only
        if pre_only:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
            return
        if kernel_size == 1:
            self.linear1 = nn.Linear(dim, dim)
        else:
            self.linear1 = ChannelLastConv1d(dim, dim, kernel_size=kernel_size, padding=padding)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        if kernel_size == 1:
            self.ffn = MLP(dim, int(dim * mlp_ratio))
        else:
            self.ffn = ConvMLP(dim, int(dim * mlp_ratio), kernel_size=kernel_size, padding=padding)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor, rot: torch.Tensor | None):
        """q, k, v of the modulated input, and the modulation the post-attention step needs."""
        modulation = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        shift_msa, scale_msa = modulation[:2]
        q, k, v = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa), rot)
        return (q, k, v), modulation[2:]

    def post_attention(self, x: torch.Tensor, attn_out: torch.Tensor,
                       modulation: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.pre_only:
            return x
        gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + self.linear1(attn_out) * gate_msa
        x = x + self.ffn(modulate(self.norm2(x), shift_mlp, scale_mlp)) * gate_mlp
        return x

    def forward(self, x: torch.Tensor, c: torch.Tensor, rot: torch.Tensor | None) -> torch.Tensor:
        """As a fused block: the stream attends to itself only."""
        (q, k, v), modulation = self.pre_attention(x, c, rot)
        return self.post_attention(x, attention(q, k, v), modulation)


class JointBlock(nn.Module):
    """Latent, CLIP and text streams attending jointly over their concatenated tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, pre_only: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.latent_block = MMDitSingleBlock(dim, num_heads, mlp_ratio, pre_only=False,
                                             kernel_size=3, padding=1)
        self.clip_block = MMDitSingleBlock(dim, num_heads, mlp_ratio, pre_only=pre_only,
                                           kernel_size=3, padding=1)
        self.text_block = MMDitSingleBlock(dim, num_heads, mlp_ratio, pre_only=pre_only, kernel_size=1)

    def forward(self, latent: torch.Tensor, clip_f: torch.Tensor, text_f: torch.Tensor,
                global_c: torch.Tensor, extended_c: torch.Tensor, latent_rot: torch.Tensor,
                clip_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent_qkv, latent_mod = self.latent_block.pre_attention(latent, extended_c, latent_rot)
        clip_qkv, clip_mod = self.clip_block.pre_attention(clip_f, global_c, clip_rot)
        text_qkv, text_mod = self.text_block.pre_attention(text_f, global_c, None)

        lengths = (latent.shape[1], clip_f.shape[1], text_f.shape[1])
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(latent_qkv, clip_qkv, text_qkv))
        latent_out, clip_out, text_out = attention(q, k, v).split(lengths, dim=1)

        latent = self.latent_block.post_attention(latent, latent_out, latent_mod)
        clip_f = self.clip_block.post_attention(clip_f, clip_out, clip_mod)
        text_f = self.text_block.post_attention(text_f, text_out, text_mod)
        return latent, clip_f, text_f


class FinalBlock(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.conv = ChannelLastConv1d(dim, out_dim, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.conv(modulate(self.norm(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the flow time t, followed by a two-layer MLP."""

    def __init__(self, dim: int, frequency_embedding_size: int, max_period: float):
        super().__init__()
        self.dim = dim
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, dim, bias=True),
            nn.SiLU(),
            nn.Linear(dim, dim, bias=True),
        )
        self.register_buffer("freqs", self.frequencies(), persistent=False)

    def frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32, device=device) / half))
        return freqs * (10000.0 / self.max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None].float() * self.freqs[None]
        embedding = torch.cat((angles.cos(), angles.sin()), dim=-1).to(t.dtype)
        return self.mlp(embedding)
