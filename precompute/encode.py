"""The four encoders, loaded once and run in batches: CLIP frames, Synchformer, CLIP text, VAE."""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict

import torch

from shared.device import full_precision
from shared.media import Segment, clip_pixels, sync_pixels
from shared.runtime import Runtime

log = logging.getLogger(__name__)


class FeatureEncoder:
    """Runs the runtime's encoders in batches; each model loads on first use, so a caption-only
    change never loads the video models."""

    def __init__(self, runtime: Runtime, frames_per_call: int = 64, windows_per_call: int = 24):
        self.runtime = runtime
        self.device = runtime.torch_device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the VAE's convolutions see one shape per batch size
        self.frames_per_call = frames_per_call  # CLIP frames per forward pass
        self.windows_per_call = windows_per_call  # Synchformer windows per forward pass
        self.seconds: dict[str, float] = defaultdict(float)  # time spent per encoder

    @contextlib.contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - start

    @torch.no_grad()
    def encode_media(self, segments: list[Segment]) -> dict[str, torch.Tensor]:
        """Video and audio features of a batch of decoded segments (float32, on the CPU)."""
        clip_model, synchformer = self.runtime.clip(), self.runtime.synchformer()
        mel_converter, vae = self.runtime.mel_converter(), self.runtime.vae()
        from shared.models.synchformer import encode_sync_frames

        clip_frames = torch.stack([s.clip_frames for s in segments])  # (B, 64, 3, 384, 384) uint8
        with self._timed("clip frames"), self.runtime.autocast():
            flat = clip_frames.flatten(0, 1)
            step = self.frames_per_call
            clip_features = torch.cat([clip_model.encode_frames(clip_pixels(flat[i:i + step].to(self.device)))
                                       for i in range(0, flat.shape[0], step)]).float()
        # float32 whatever the precision: DeSync compares generated audio with these features, and
        # av-benchmark computes them in float32 (a bf16 argmax can land on another offset class)
        with self._timed("synchformer"):
            sync_frames = sync_pixels(torch.stack([s.sync_frames for s in segments]).to(self.device))
            sync_features = encode_sync_frames(synchformer, sync_frames, self.windows_per_call).float()
        with self._timed("vae"), full_precision(self.device):  # float32: the latents are the training targets
            audio = torch.stack([s.audio for s in segments]).to(self.device)
            mean, std = vae.encode(mel_converter(audio))
        return {
            "mean": mean.transpose(1, 2).float().cpu(),  # (B, latents, latent_dim): time-major
            "std": std.transpose(1, 2).float().cpu(),
            "clip_features": clip_features.view(len(segments), -1, clip_features.shape[-1]).cpu(),
            "sync_features": sync_features.cpu(),
            "duration_sec": torch.tensor([s.duration_sec for s in segments], dtype=torch.float32),
        }

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        with self._timed("clip text"), self.runtime.autocast():
            return self.runtime.clip().encode_text(captions).float().cpu()
