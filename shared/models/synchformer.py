"""Synchformer's visual feature extractor (a MotionFormer with divided space-time attention).

Only the visual branch MMAudio uses; the module's keys all sit under `vfeat_extractor.` as in
the official `synchformer_state_dict.pth`, whose other entries (audio branch, sync transformer)
are dropped on load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.models.sequence import SYNC_WINDOW_FRAMES, SYNC_WINDOW_STRIDE

IMAGE_SIZE = 224
TUBELET = 2  # frames per 3-D patch
KEY_PREFIX = "vfeat_extractor"


@dataclass(frozen=True)
class SynchformerConfig:
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16  # pixels a side; the tiny profile's larger patches make fewer tokens a frame


class DividedAttention(nn.Module):
    """Attention within groups of patch tokens (over time or over space), plus the CLS token.

    The CLS query attends to every token; each patch token attends within its group and to CLS.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, frames: int, over_time: bool) -> torch.Tensor:
        batch, tokens, dim = x.shape
        patches = (tokens - 1) // frames
        # q, k, v are contiguous thirds; heads are (head, head_dim) inside each.
        q, k, v = (t.view(batch, tokens, self.num_heads, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, N, d)
        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)

        def grouped(t: torch.Tensor) -> torch.Tensor:
            # (B, H, frames * patches, d) → (B, H, groups, group size, d)
            t = t[:, :, 1:].unflatten(2, (frames, patches))
            return t.transpose(2, 3) if over_time else t

        q_groups, k_groups, v_groups = grouped(q), grouped(k), grouped(v)
        groups = q_groups.shape[2]
        cls_k = k[:, :, None, :1].expand(-1, -1, groups, -1, -1)
        cls_v = v[:, :, None, :1].expand(-1, -1, groups, -1, -1)
        out = F.scaled_dot_product_attention(q_groups, torch.cat((cls_k, k_groups), dim=3),
                                             torch.cat((cls_v, v_groups), dim=3))
        if over_time:
            out = out.transpose(2, 3)
        out = torch.cat((cls_out, out.flatten(2, 3)), dim=2)  # back to token order, CLS first
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DividedAttention(dim, num_heads)
        self.timeattn = DividedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), frames, over_time=True)
        x = x + self.attn(self.norm1(x), frames, over_time=False)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Kept only so the official state dict loads: the forward pass never uses it."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)


class PatchEmbed3D(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        size = (TUBELET, patch_size, patch_size)
        self.proj = nn.Conv3d(3, dim, kernel_size=size, stride=size)


class ClsAggregation(nn.TransformerEncoderLayer):
    """One pre-norm encoder layer over a set of tokens with a CLS token prepended; the CLS output
    is kept. Synchformer aggregates each time step's patches with it (video: space, audio:
    frequency)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__(d_model=dim, nhead=num_heads, dim_feedforward=int(dim * mlp_ratio), dropout=0.0,
                         activation="gelu", layer_norm_eps=1e-6, batch_first=True, norm_first=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, patches, D) → (N, D)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return super().forward(torch.cat((cls, patches), dim=1))[:, 0]


class MotionFormer(nn.Module):
    def __init__(self, config: SynchformerConfig):
        super().__init__()
        dim = config.dim
        grid = IMAGE_SIZE // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.temp_embed = nn.Parameter(torch.zeros(1, SYNC_WINDOW_FRAMES // TUBELET, dim))
        self.patch_embed = PatchEmbed(dim, config.patch_size)
        self.patch_embed_3d = PatchEmbed3D(dim, config.patch_size)
        self.blocks = nn.ModuleList([DividedSpaceTimeBlock(dim, config.num_heads, config.mlp_ratio)
                                     for _ in range(config.depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.spatial_attn_agg = ClsAggregation(dim, config.num_heads, config.mlp_ratio)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) → (N, T / 2, D): one feature per temporal patch."""
        return self.forward_patches(self.patch_embed_3d.proj(video))

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Embedded patches (N, D, T / 2, h, w) → (N, T / 2, D)."""
        n, dim, frames, height, width = x.shape
        x = x.flatten(2).transpose(1, 2)  # tokens in (time, row, column) order
        patch_pos = self.pos_embed[:, 1:].repeat(1, frames, 1)
        time_pos = self.temp_embed[:, :frames].repeat_interleave(height * width, dim=1)
        x = x + patch_pos + time_pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat((cls, x), dim=1)
        for block in self.blocks:
            x = block(x, frames)
        x = self.norm(x[:, 1:])
        per_frame = x.view(n * frames, height * width, dim)
        return self.spatial_attn_agg(per_frame).view(n, frames, dim)


class Synchformer(nn.Module):
    """(B, S, 16, 3, 224, 224) windows in [-1, 1] → (B, S, 8, D) features."""

    def __init__(self, config: SynchformerConfig = SynchformerConfig()):
        super().__init__()
        self.config = config
        self.vfeat_extractor = MotionFormer(config)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        batch, segments = windows.shape[:2]
        video = windows.flatten(0, 1).transpose(1, 2)  # (B S, C, T, H, W)
        return self.vfeat_extractor(video).unflatten(0, (batch, segments))


def visual_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a full Synchformer checkpoint that the visual extractor uses."""
    return {key: value for key, value in state_dict.items() if key.startswith(KEY_PREFIX)}


def sync_windows(frames: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) → (B, S, 16, 3, H, W): windows of 16 frames with stride 8 (the tail dropped)."""
    count = _window_count(frames.shape[1])
    return frames.unfold(1, SYNC_WINDOW_FRAMES, SYNC_WINDOW_STRIDE)[:, :count].movedim(-1, 2)


def _window_count(frames: int) -> int:
    count = (frames - SYNC_WINDOW_FRAMES) // SYNC_WINDOW_STRIDE + 1
    if count < 1:
        raise ValueError(f"{frames} sync frames are fewer than one window of {SYNC_WINDOW_FRAMES}")
    return count


@torch.no_grad()
def encode_sync_frames(synchformer: Synchformer, frames: torch.Tensor, windows_per_call: int | None = None
                       ) -> torch.Tensor:
    """(B, T, 3, 224, 224) sync frames → (B, 8 S, D): window after window, 8 tokens each.

    The same numbers as `synchformer(sync_windows(frames))`, for half the patch embedding: windows
    start every 8 frames, so each window's 2-frame patches are patches of the whole clip, embedded
    once here and shared by the two windows that hold them (nor are overlapping pixel windows copied).
    """
    count = _window_count(frames.shape[1])
    used = (count - 1) * SYNC_WINDOW_STRIDE + SYNC_WINDOW_FRAMES
    extractor = synchformer.vfeat_extractor
    patches = extractor.patch_embed_3d.proj(frames[:, :used].transpose(1, 2))  # (B, D, used / 2, h, w)
    per_window, stride = SYNC_WINDOW_FRAMES // TUBELET, SYNC_WINDOW_STRIDE // TUBELET
    windows = patches.unfold(2, per_window, stride).permute(0, 2, 1, 5, 3, 4)  # (B, S, D, 8, h, w)
    batch = windows.shape[0]
    flat = windows.flatten(0, 1)  # (B S, D, 8, h, w)
    step = windows_per_call or flat.shape[0]
    features = torch.cat([extractor.forward_patches(flat[i:i + step]) for i in range(0, flat.shape[0], step)])
    return features.view(batch, count * features.shape[1], -1)


def build_synchformer(config: SynchformerConfig = SynchformerConfig()) -> Synchformer:
    """The visual extractor at the official size (or `config`'s), weights not loaded."""
    return Synchformer(config)
