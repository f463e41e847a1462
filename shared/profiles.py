"""The `real` and `tiny` profiles: the same classes, official sizes or small test sizes.

This module imports no encoder: the trainer reads feature widths from here.

`tiny` shrinks only widths and depths. Sequence lengths, latent widths and preprocessing stay
those of the real models, so everything downstream of the encoders runs unchanged, with
deterministic weights and no files. Tests, CI and the offline demo use `tiny`.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from shared.errors import UserError

if TYPE_CHECKING:  # torch loads where weights are made: the runtime checks a profile without it
    import torch
    from torch import nn

    from shared.models.network import NetworkConfig

PROFILES = ("real", "tiny")

# Tiny CLIP: open_clip's ViT-H-14-378 layout (378 px input, full vocabulary) at small widths, with
# patches of 54 px: 49 tokens a frame instead of 729 (attention was most of the tiny encoder's time,
# 6x more, and every test that encodes a video pays it).
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 54},
             "text_cfg": {"layers": 2, "width": 32, "heads": 2}}
# Tiny Synchformer: patches of 56 px, 16 tokens a frame instead of 196 (its divided attention was
# most of the time every video a test encodes costs); still 8 features a window.
TINY_SYNCHFORMER = {"dim": 32, "depth": 2, "num_heads": 2, "patch_size": 56}
# DeSync's audio branch and sync head, at the width of the tiny Synchformer's video features
TINY_SYNC_SCORER = {"dim": TINY_SYNCHFORMER["dim"], "ast_depth": 2, "ast_heads": 2, "head_depth": 1, "head_heads": 2}
# PaSST (evaluate's KL_PaSST) at small widths; its input, patch grid and 527 classes stay
TINY_PASST = {"dim": 32, "depth": 2, "num_heads": 2}
TINY_VAE_HIDDEN = 16
# Tiny vocoder: the six upsampling stages keep the hop (64 channels halve to 1); one dilation a stage
# (of the three) makes it 2.5x faster, and every test that decodes audio pays it.
TINY_VOCODER = {"upsample_initial_channel": 64, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1]]}
TINY_NETWORK = {"hidden_dim": 64, "depth": 3, "fused_depth": 2, "num_heads": 2}


@dataclass(frozen=True)
class FeatureDims:
    """Widths of the stored conditioning features (the network's clip/sync/text dims)."""

    clip: int
    sync: int
    text: int


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    return profile


def feature_dims(profile: str = "real") -> FeatureDims:
    if check_profile(profile) == "real":
        return FeatureDims(clip=1024, sync=768, text=1024)
    return FeatureDims(clip=TINY_CLIP["embed_dim"], sync=TINY_SYNCHFORMER["dim"], text=TINY_CLIP["text_cfg"]["width"])


def network_config(variant: str, profile: str = "real") -> NetworkConfig:
    """An official variant, or for `tiny` a small network with the variant's latent layout."""
    from shared.models.network import VARIANTS

    if variant not in VARIANTS:
        raise UserError(f"unknown network variant {variant!r}; expected one of {sorted(VARIANTS)}")
    official = VARIANTS[variant]
    if check_profile(profile) == "real":
        return official
    dims = feature_dims("tiny")
    return replace(official, clip_dim=dims.clip, sync_dim=dims.sync, text_dim=dims.text, **TINY_NETWORK)


def deterministic_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Weights that depend only on a key and a shape: scaled by fan-in, norms near one."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=generator)
    leaf = key.rsplit(".", 1)[-1]
    if "std" in leaf:
        return 1.0 + 0.1 * noise.abs()
    if len(shape) <= 1 and leaf == "weight" and "norm" in key:
        return 1.0 + 0.1 * noise
    if len(shape) >= 2:
        return noise / math.sqrt(math.prod(shape[1:]))
    return 0.02 * noise


def fill_deterministically(module: nn.Module) -> nn.Module:
    """Overwrite every floating-point tensor of the state dict with `deterministic_tensor`."""
    import torch

    filled = {key: deterministic_tensor(key, tuple(value.shape)).to(value.dtype)
              if torch.is_floating_point(value) else value
              for key, value in module.state_dict().items()}
    module.load_state_dict(filled, strict=True)
    return module

