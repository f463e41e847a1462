"""From conditions to sound: Euler sampling over a window of any duration, then the VAE decoder
and the vocoder. Generation, evaluation and the trainer's samples all go through here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.device import full_precision
from shared.errors import UserError
from shared.models.flow import euler_sample
from shared.models.network import MMAudio
from shared.runtime import Runtime
from shared.models.sequence import SequenceConfig


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 25  # Euler steps
    cfg_strength: float = 4.5  # classifier-free guidance; below 1 the unconditional pass is skipped
    seed: int = 42  # every clip starts from the noise of this seed, whatever its batch

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, not {self.steps}")
        if self.cfg_strength < 0:
            raise UserError(f"cfg strength must be non-negative, not {self.cfg_strength}")


SEED_LIMIT = 2 ** 64  # torch's generators take 0 .. 2^64 - 1


def check_seed(seed: int, what: str = "--seed") -> int:
    if not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise UserError(f"{what} must be a whole number from 0 to 2^64 - 1, not {seed}")
    return seed


def use_duration(network: MMAudio, seq: SequenceConfig) -> None:
    """Set the network's sequence lengths to `seq`'s window (the weights do not depend on them)."""
    lengths = (seq.latent_seq_len, seq.clip_seq_len, seq.sync_seq_len)
    if lengths != (network.latent_seq_len, network.clip_seq_len, network.sync_seq_len):
        network.update_seq_lengths(*lengths)


def crop_video_features(clip_features: torch.Tensor, sync_features: torch.Tensor,
                        seq: SequenceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a longer window cut to `seq`'s duration.

    Exactly the features of the shorter clip: CLIP frames are encoded one by one and every
    Synchformer window on its own, and both are taken at fixed times from the clip's start.
    """
    if clip_features.shape[1] < seq.clip_seq_len or sync_features.shape[1] < seq.sync_seq_len:
        raise ValueError(f"features cover {clip_features.shape[1] / seq.clip_seq_len * seq.window_sec:.2f} s, "
                         f"less than the {seq.window_sec} s asked for")
    return clip_features[:, :seq.clip_seq_len], sync_features[:, :seq.sync_seq_len]


def duration_batches(durations: list[float], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal duration (a batch shares the network's lengths), at most
    `batch_size` per batch, shortest first."""
    from itertools import groupby

    order = sorted(range(len(durations)), key=lambda n: durations[n])
    groups = [list(members) for _, members in groupby(order, key=lambda n: durations[n])]
    return [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]


@torch.no_grad()
def sample_latents(runtime: Runtime, network: MMAudio, clip_features: torch.Tensor, sync_features: torch.Tensor,
                   text_features: torch.Tensor, settings: SamplingSettings,
                   negative_text_features: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (B, latent_seq_len, latent_dim), unnormalized, for a batch of conditions whose
    lengths match the network's (see `use_duration`), in the runtime's precision. Every clip starts
    from the noise of `settings.seed`, whatever its batch."""
    batch = clip_features.shape[0]
    shape = (1, network.latent_seq_len, network.config.latent_dim)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed))
                       for _ in range(batch)])
    latents = sample_normalized(runtime, network, clip_features, sync_features, text_features, settings, noise,
                                negative_text_features)
    return network.unnormalize(latents.float())


@torch.no_grad()
def sample_normalized(runtime: Runtime, network: MMAudio, clip_features: torch.Tensor, sync_features: torch.Tensor,
                      text_features: torch.Tensor, settings: SamplingSettings, noise: torch.Tensor,
                      negative_text_features: torch.Tensor | None = None,
                      known: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized latents from `noise` (B, latent_seq_len, latent_dim) under the conditions; with
    `known` (normalized), the first frames end exactly on it (a continued window)."""
    device = next(network.parameters()).device
    batch = clip_features.shape[0]
    with runtime.autocast():
        conditions = network.preprocess_conditions(clip_features.to(device), sync_features.to(device),
                                                   text_features.to(device))
        empty = network.get_empty_conditions(
            batch, None if negative_text_features is None else negative_text_features.to(device))
        return euler_sample(network, noise.to(device), conditions, empty, num_steps=settings.steps,
                            cfg_strength=settings.cfg_strength, known=None if known is None else known.to(device))


def sample_stored_clips(runtime: Runtime, network: MMAudio, clips: dict[str, torch.Tensor],
                        settings: SamplingSettings, batch_size: int = 4):
    """Generate precomputed clips, each at its own duration: yields (row indices, SequenceConfig,
    latents) per batch. `clips` holds clip/sync/text features of full windows and duration_sec.
    The network's window is restored afterwards."""
    lengths = (network.latent_seq_len, network.clip_seq_len, network.sync_seq_len)
    durations = [float(d) for d in clips["duration_sec"]]
    try:
        for rows in duration_batches(durations, batch_size):
            seq = runtime.sequence(durations[rows[0]])
            use_duration(network, seq)
            index = torch.tensor(rows)
            clip_f, sync_f = crop_video_features(clips["clip_features"][index], clips["sync_features"][index], seq)
            yield rows, seq, sample_latents(runtime, network, clip_f, sync_f, clips["text_features"][index], settings)
    finally:
        network.update_seq_lengths(*lengths)


class AudioDecoder:
    """Latents → mel (the runtime's VAE decoder) → waveform (its vocoder), in float32."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.sampling_rate = runtime.sequence().sampling_rate

    @torch.no_grad()
    def mel(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, latent_dim) → log-mel (B, bins, 2N), float32."""
        device = self.runtime.torch_device
        with full_precision(device):
            return self.runtime.vae_decoder().decode(latents.transpose(1, 2).float().to(device))

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel (B, bins, T) → mono audio (B, T * hop) at the mode's rate, on the CPU."""
        device = self.runtime.torch_device
        with full_precision(device):
            return self.runtime.vocoder()(mel.float().to(device)).squeeze(1).float().cpu()

    @torch.no_grad()
    def waveform(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, latent_dim) → mono audio (B, 2N * hop) at the mode's rate, on the CPU."""
        return self.vocode(self.mel(latents))
