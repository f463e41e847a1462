"""The four encoders, loaded once and run in batches: CLIP frames, Synchformer, CLIP text, VAE."""
from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from shared.device import mixed_precision
from shared.media import Segment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderSettings:
    profile: str = "real"
    mode: str = "16k"
    device: str = "cpu"
    weights_dir: str | None = None
    precision: str = "auto"  # shared.device.mixed_precision
    frames_per_call: int = 64  # CLIP frames per forward pass
    windows_per_call: int = 24  # Synchformer windows per forward pass


class FeatureEncoder:
    """Loads each encoder on first use, so a caption-only change never loads the video models."""

    def __init__(self, settings: EncoderSettings):
        self.settings = settings
        self.device = torch.device(settings.device)
        self.seconds: dict[str, float] = defaultdict(float)  # time spent per encoder
        self._models: dict[str, torch.nn.Module] = {}

    @property
    def loaded_models(self) -> list[str]:
        return sorted(self._models)

    def _model(self, name: str):
        if name not in self._models:
            s = self.settings
            started = time.perf_counter()
            if name == "clip":
                from shared.clip import load_clip
                model = load_clip(s.profile, s.weights_dir, self.device)
            elif name == "synchformer":
                from shared.synchformer import load_synchformer
                model = load_synchformer(s.profile, s.weights_dir, self.device)
            elif name == "vae":
                from shared.vae import load_vae
                model = load_vae(s.mode, s.profile, s.weights_dir, self.device)
            else:
                from shared.mel import build_mel_converter
                model = build_mel_converter(s.mode).to(self.device)
            self._models[name] = model
            self.seconds["load models"] += time.perf_counter() - started
        return self._models[name]

    def _autocast(self):
        # the image/video transformers only; the VAE stays in float32 (latents are targets)
        return mixed_precision(self.device, self.settings.precision)

    @contextlib.contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - start

    @torch.no_grad()
    def encode_media(self, segments: list[Segment]) -> dict[str, torch.Tensor]:
        """Video and audio features of a batch of decoded segments (float32, on the CPU)."""
        clip_model, synchformer = self._model("clip"), self._model("synchformer")
        mel_converter, vae = self._model("mel"), self._model("vae")
        from shared.synchformer import encode_sync_frames

        clip_frames = torch.stack([s.clip_frames for s in segments])  # (B, 64, 3, 384, 384)
        with self._timed("clip frames"), self._autocast():
            flat = clip_frames.flatten(0, 1)
            step = self.settings.frames_per_call
            clip_features = torch.cat([clip_model.encode_frames(flat[i:i + step].to(self.device))
                                       for i in range(0, flat.shape[0], step)]).float()
        with self._timed("synchformer"), self._autocast():
            sync_frames = torch.stack([s.sync_frames for s in segments]).to(self.device)
            sync_features = encode_sync_frames(synchformer, sync_frames, self.settings.windows_per_call).float()
        with self._timed("vae"):
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
        with self._timed("clip text"), self._autocast():
            return self._model("clip").encode_text(captions).float().cpu()
