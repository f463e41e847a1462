"""The training objective: shared.models.flow.masked_flow_loss with random posterior samples,
logit-normal times and classifier-free dropout of the conditions: for v1 networks the CLIP and
Synchformer features are dropped together (the released recipe), for v2 networks (large_44k_v2)
each on its own draw, as the v2 models were trained (MMAudio's author, hkchengrex/MMAudio#86);
the text always on its own draw.

The stored padding (the latent of silence) has no influence at all: the masked loss takes padded
frames out of the loss and the input, so the model is never taught that a short clip continues
with silence.
"""
from __future__ import annotations

import torch

from shared.distributed import rank_rows
from shared.models.flow import masked_flow_loss, sample_time
from shared.models.network import MMAudio
from shared.models.sequence import SequenceConfig


def apply_null_conditions(network: MMAudio, batch: dict, drop_clip: torch.Tensor, drop_sync: torch.Tensor,
                          drop_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace the conditions of dropped samples by the network's empty features."""
    clip_f, sync_f, text_f = batch["clip_features"], batch["sync_features"], batch["text_features"]
    clip_f = torch.where(drop_clip.view(-1, 1, 1), network.empty_clip_feat.expand_as(clip_f), clip_f)
    sync_f = torch.where(drop_sync.view(-1, 1, 1), network.empty_sync_feat.expand_as(sync_f), sync_f)
    text_f = torch.where(drop_text.view(-1, 1, 1), network.empty_string_feat.expand_as(text_f), text_f)
    return clip_f, sync_f, text_f


def training_loss(network: MMAudio, batch: dict, seq: SequenceConfig, generator: torch.Generator,
                  null_probability: float = 0.1, forward=None, shard: tuple[int, int] = (0, 1),
                  global_size: int | None = None) -> torch.Tensor:
    """Mean masked flow-matching loss of one batch; all randomness from `generator` (resumable).

    Under DDP, `forward` is the wrapped model and `batch` holds rows rank::world of the global
    batch of `global_size` rows (`shard` = (rank, world)): every rank draws the global batch's
    noise and keeps its rows, so N processes compute what one process does with the same global
    batch, and every rank's generator advances alike.
    """
    device = batch["a_mean"].device
    rank, world = shard
    size = global_size or batch["a_mean"].shape[0] * world
    forward = forward or network

    def draw(values: torch.Tensor) -> torch.Tensor:
        return rank_rows(values, rank, world).to(device)

    shape = (size, *batch["a_mean"].shape[1:])
    posterior_noise = draw(torch.randn(shape, generator=generator))
    t = draw(sample_time(size, generator=generator))
    x0 = draw(torch.randn(shape, generator=generator))
    drop_clip = draw(torch.rand(size, generator=generator) < null_probability)
    drop_sync = draw(torch.rand(size, generator=generator) < null_probability) if network.config.v2 else drop_clip
    drop_text = draw(torch.rand(size, generator=generator) < null_probability)
    conditions = apply_null_conditions(network, batch, drop_clip, drop_sync, drop_text)
    return masked_flow_loss(forward, batch, seq, network.normalize, posterior_noise, x0, t, conditions).mean()
