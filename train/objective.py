"""The training objective: flow matching on stored VAE posteriors, with classifier-free dropout
and a loss that only counts each clip's real (unpadded) latent frames.

Padded frames are also taken out of the input: there x1 is set to the noise x0, so x_t is pure
noise whatever was stored. The stored padding (the latent of silence) then has no influence at
all, and the model is never taught that a short clip continues with silence.
"""
from __future__ import annotations

import torch

from shared.flow import flow_loss, interpolate, sample_time, target_velocity, valid_frame_mask, valid_frames
from shared.network import MMAudio
from shared.sequence import SequenceConfig


def apply_null_conditions(network: MMAudio, batch: dict, drop_video: torch.Tensor,
                          drop_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace the conditions of dropped samples by the network's empty features."""
    clip_f, sync_f, text_f = batch["clip_features"], batch["sync_features"], batch["text_features"]
    video = drop_video.view(-1, 1, 1)
    clip_f = torch.where(video, network.empty_clip_feat.expand_as(clip_f), clip_f)
    sync_f = torch.where(video, network.empty_sync_feat.expand_as(sync_f), sync_f)
    text_f = torch.where(drop_text.view(-1, 1, 1), network.empty_string_feat.expand_as(text_f), text_f)
    return clip_f, sync_f, text_f


def training_loss(network: MMAudio, batch: dict, seq: SequenceConfig, generator: torch.Generator,
                  null_probability: float = 0.1, forward=None, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Mean masked flow-matching loss of one batch; all randomness from `generator` (resumable).

    Under DDP, `forward` is the wrapped model and `batch` holds rows rank::world of the global
    batch (`shard` = (rank, world)): every rank draws the global batch's noise and keeps its rows,
    so N processes compute what one process does with the same global batch.
    """
    device = batch["a_mean"].device
    rank, world = shard
    size = batch["a_mean"].shape[0] * world
    forward = forward or network

    def draw(values: torch.Tensor) -> torch.Tensor:
        return values[rank::world].to(device)

    def noise(shape):
        return draw(torch.randn((size, *shape[1:]), generator=generator))

    x1 = network.normalize(batch["a_mean"] + batch["a_std"] * noise(batch["a_mean"].shape))
    t = draw(sample_time(size, generator=generator))
    x0 = noise(x1.shape)
    mask = valid_frame_mask(valid_frames(batch["duration_sec"], seq).to(device), seq.latent_seq_len)
    x1 = torch.where(mask.unsqueeze(-1), x1, x0)
    drop_video = draw(torch.rand(size, generator=generator) < null_probability)
    drop_text = draw(torch.rand(size, generator=generator) < null_probability)
    clip_f, sync_f, text_f = apply_null_conditions(network, batch, drop_video, drop_text)
    predicted = forward(interpolate(x0, x1, t), clip_f, sync_f, text_f, t)
    return flow_loss(predicted, target_velocity(x0, x1), mask).mean()
