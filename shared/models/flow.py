"""Conditional flow matching: the training objective and the Euler sampler.

x0 is Gaussian noise, x1 the normalized data latent; t runs from 0 (noise) to 1 (data).
min_sigma is 0 in every official setting, so the path is the straight line between them.
"""
from __future__ import annotations

import torch

from shared.models.network import MMAudio, Conditions
from shared.models.sequence import SequenceConfig


def sample_time(batch_size: int, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Logit-normal times: t = sigmoid(n), n ~ N(mean, std), one per sample."""
    n = torch.randn(batch_size, generator=generator, device=device) * std + mean
    return torch.sigmoid(n)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t on the straight path from noise x0 to data x1, t of shape (B,)."""
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return (1 - t) * x0 + t * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def flow_loss(predicted: torch.Tensor, target: torch.Tensor,
              valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared error (B,), averaged over channels and valid latent frames.

    `valid_mask` (B, N) marks frames inside each clip's real duration; padded frames carry no
    loss, so a clip padded to the window is not taught to produce its padding. Without a mask
    every frame counts, which is the reference loss.
    """
    squared = (predicted.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    if valid_mask is None:
        return squared.mean(dim=1)
    mask = valid_mask.to(squared.dtype)
    frames = mask.sum(dim=1)
    if bool((frames == 0).any()):
        raise ValueError("a sample has no valid latent frame; its loss is undefined")
    return (squared * mask).sum(dim=1) / frames


def valid_frame_mask(valid_frames: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, seq_len) boolean mask from each sample's count of valid leading frames."""
    positions = torch.arange(seq_len, device=valid_frames.device)
    return positions[None, :] < valid_frames[:, None]


def valid_frames(duration_sec: torch.Tensor, seq: SequenceConfig) -> torch.Tensor:
    """Each clip's count of real latent frames in `seq`'s window (at least one)."""
    frames = torch.tensor([seq.latent_frames(seconds) for seconds in duration_sec.tolist()], dtype=torch.long)
    return frames.clamp(1, seq.latent_seq_len)


def masked_flow_loss(forward, batch: dict[str, torch.Tensor], seq: SequenceConfig, normalize,
                     posterior_noise: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                     conditions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The objective, per sample (B,): flow matching from noise x0 to a posterior sample of each
    clip's stored latent, counted over the clip's real frames only. Padded frames are also taken
    out of the input (x1 := x0 there, so x_t is pure noise whatever was stored). Training and
    validation both call this; they differ only in where the noise, times and conditions come from.
    `conditions` (clip, sync, text) default to the batch's own."""
    device = x0.device
    x1 = normalize(batch["a_mean"] + batch["a_std"] * posterior_noise)
    mask = valid_frame_mask(valid_frames(batch["duration_sec"], seq).to(device), seq.latent_seq_len)
    x1 = torch.where(mask.unsqueeze(-1), x1, x0)
    clip_f, sync_f, text_f = conditions or (batch["clip_features"], batch["sync_features"], batch["text_features"])
    predicted = forward(interpolate(x0, x1, t), clip_f, sync_f, text_f, t)
    return flow_loss(predicted, target_velocity(x0, x1), mask)


def guided_flow(network: MMAudio, t: torch.Tensor, x: torch.Tensor, conditions: Conditions,
                empty_conditions: Conditions, cfg_strength: float) -> torch.Tensor:
    """The flow with classifier-free guidance: cfg * f(cond) + (1 - cfg) * f(empty)."""
    t = t.expand(x.shape[0])
    if cfg_strength < 1.0:
        return network.predict_flow(x, t, conditions)
    conditional = network.predict_flow(x, t, conditions)
    unconditional = network.predict_flow(x, t, empty_conditions)
    return cfg_strength * conditional + (1.0 - cfg_strength) * unconditional


@torch.no_grad()
def euler_sample(network: MMAudio, x0: torch.Tensor, conditions: Conditions,
                 empty_conditions: Conditions, *, num_steps: int = 25,
                 cfg_strength: float = 4.5, known: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate the guided flow from noise x0 (t=0) to a normalized latent (t=1) with Euler; with
    `known`, the first frames are held to it (see `integrate`)."""
    def flow(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guided_flow(network, t, x, conditions, empty_conditions, cfg_strength)

    return integrate(flow, x0, num_steps, known)


def integrate(flow, x0: torch.Tensor, num_steps: int, known: torch.Tensor | None = None) -> torch.Tensor:
    """Euler from x0 (t=0) to t=1 along `flow(x, t)` (any velocity field: the network's, or an
    analytic one in bench/long.py). With `known` (B, K, C), the first K frames end exactly on it:
    at every step the flow's predicted endpoint x1 = x + (1 - t) v has its first K frames replaced
    by `known`, and the step goes to (1 - t') x0 + t' x1 with the predicted noise x0 = x - t v, so
    the other frames are drawn towards a continuation of `known` (inpainting on the endpoint; a
    continued window holds its overlap with the previous one this way)."""
    times = torch.linspace(0, 1, num_steps + 1, device=x0.device, dtype=torch.float32)
    x = x0
    for t_now, t_next in zip(times[:-1], times[1:]):
        velocity = flow(x, t_now.reshape(1).to(x.dtype))
        if known is None:
            x = x + (t_next - t_now).to(x.dtype) * velocity
            continue
        endpoint, noise = x + (1 - t_now) * velocity, x - t_now * velocity
        endpoint[:, :known.shape[1]] = known
        x = (1 - t_next) * noise + t_next * endpoint
    if known is not None:
        x = torch.cat([known.to(x.dtype), x[:, known.shape[1]:]], dim=1)
    return x


VALIDATION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def validation_losses(network: MMAudio, batches, seq: SequenceConfig, seed: int = 1234) -> torch.Tensor:
    """Each clip's loss (N,) with noise and times fixed by `seed`, no dropout: comparable from step
    to step, and between models on the same clips."""
    generator = torch.Generator().manual_seed(seed)
    per_clip = []
    for batch in batches:
        device = batch["a_mean"].device
        size = batch["a_mean"].shape[0]
        posterior_noise = torch.randn(batch["a_mean"].shape, generator=generator).to(device)
        total = torch.zeros(size, dtype=torch.float64)
        for t_value in VALIDATION_TIMES:
            x0 = torch.randn(batch["a_mean"].shape, generator=generator).to(device)
            t = torch.full((size,), t_value, device=device)
            total += masked_flow_loss(network, batch, seq, network.normalize, posterior_noise, x0, t).double().cpu()
        per_clip.append(total / len(VALIDATION_TIMES))
    return torch.cat(per_clip) if per_clip else torch.zeros(0, dtype=torch.float64)
