"""The runtime of one command: which models (network variant or audio mode, profile, weight files),
where and how they run (device, precision), and the models themselves, each loaded on first use
and then kept.

A command builds one `Runtime` and hands it to features, train, generate, evaluate or export, so no
stage threads profile, weights folder, device and precision on its own or keeps its own model
cache. Model modules are imported only inside the method that loads them: the trainer holds a
runtime and never imports an encoder, and the no-op `features` check imports no torch at all.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from shared.device import check_device, check_precision
from shared.errors import UserError
from shared.profiles import check_profile
from shared.models.sequence import (AUDIO_MODES, CLIP_FPS, DEFAULT_VARIANT, DEFAULT_WINDOW_SEC, MIN_CLIP_SEC,
                                    VARIANT_MODES, SequenceConfig)

if TYPE_CHECKING:
    import torch

    from shared.profiles import FeatureDims

log = logging.getLogger(__name__)

def mode_of(variant: str) -> str:
    """The audio mode of a network variant the user named (one line for an unknown one)."""
    if variant not in VARIANT_MODES:
        raise UserError(f"unknown network variant {variant!r}; expected one of {sorted(VARIANT_MODES)}")
    return VARIANT_MODES[variant]


WINDOW_RULE = (f"a multiple of {1 / CLIP_FPS:g} s (CLIP takes {CLIP_FPS} frames a second) from "
               f"{math.ceil(MIN_CLIP_SEC * CLIP_FPS) / CLIP_FPS:g} s (the shortest such length that holds one "
               f"Synchformer window of {MIN_CLIP_SEC:g} s) to {DEFAULT_WINDOW_SEC:g} s (the networks' window)")


def check_window(window_sec: float, what: str = "--window") -> float:
    """A feature window the network can train on: whole CLIP frames (8 a second), from the first
    such length that holds a Synchformer window (0.75 s) up to the networks' 8 s; a wrong one is
    refused with the nearest valid values."""
    shortest = math.ceil(MIN_CLIP_SEC * CLIP_FPS) / CLIP_FPS
    valid = (isinstance(window_sec, (int, float)) and math.isfinite(window_sec)
             and shortest <= window_sec <= DEFAULT_WINDOW_SEC and float(window_sec * CLIP_FPS).is_integer())
    if not valid:
        nearest = ""
        if isinstance(window_sec, (int, float)) and math.isfinite(window_sec):
            low = min(max(math.floor(window_sec * CLIP_FPS) / CLIP_FPS, shortest), DEFAULT_WINDOW_SEC)
            high = min(max(math.ceil(window_sec * CLIP_FPS) / CLIP_FPS, shortest), DEFAULT_WINDOW_SEC)
            nearest = f"; nearest: {low:g}" + (f" or {high:g}" if high != low else "")
        raise UserError(f"{what} {window_sec}: must be {WINDOW_RULE}{nearest}")
    return float(window_sec)


# The variant of a mode when none is named (e.g. training on 16k features without --variant).
VARIANT_OF_MODE = {"16k": "small_16k", "44k": DEFAULT_VARIANT}


@dataclass(eq=False)
class Runtime:
    """What the models are, where they run, and the models once loaded.

    The audio mode follows from the variant; give `mode` alone when no network is involved
    (features) or the variant is to be read from `network_file`. Without either, the mode is that
    of the default variant."""

    variant: str | None = None
    mode: str | None = None
    profile: str = "real"
    weights_dir: str | os.PathLike | None = None  # official files (real); default data/weights
    network_file: str | os.PathLike | None = None  # base network (real; --checkpoint); default the variant's
    device: str = "auto"  # auto (CUDA when usable), cpu, cuda, cuda:N
    precision: str = "auto"  # shared.device.mixed_precision
    load_seconds: float = field(default=0.0, init=False)  # time spent loading models
    _models: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_profile(self.profile)
        check_precision(self.precision)
        check_device(self.device)
        if self.mode is not None and self.mode not in AUDIO_MODES:
            raise UserError(f"unknown audio mode {self.mode!r}; expected one of {sorted(AUDIO_MODES)}")
        if self.variant is not None:
            self._agree(mode_of(self.variant), f"variant {self.variant}")
        elif self.mode is None and (self.network_file is None or self.profile == "tiny"):
            self.variant, self.mode = DEFAULT_VARIANT, mode_of(DEFAULT_VARIANT)
        if self.weights_dir is not None:
            self.weights_dir = str(self.weights_dir)
        if self.network_file is not None:
            self.network_file = str(self.network_file)

    def _agree(self, mode: str, source: str) -> None:
        if self.mode is not None and self.mode != mode:
            raise UserError(f"{source} makes {mode} audio, not the {self.mode} audio asked for (--mode, or "
                            "the features' mode)")
        self.mode = mode

    # -- what follows from the settings (no torch) -------------------------------------------------
    def sequence(self, window_sec: float = DEFAULT_WINDOW_SEC) -> SequenceConfig:
        """The stream lengths of a window of `window_sec` in this runtime's mode."""
        return SequenceConfig(self.audio_mode, window_sec)

    @property
    def audio_mode(self) -> str:
        if self.mode is None:  # only the network file knows: its shapes give the variant
            self.network()
        return self.mode

    def data_dim(self, window_sec: float = DEFAULT_WINDOW_SEC) -> dict[str, int]:
        """ExtractedVGG's `data_dim` for this mode and profile."""
        from shared.features import data_dim

        return data_dim(self.sequence(window_sec), self.feature_dims)

    @property
    def feature_dims(self) -> FeatureDims:
        from shared.profiles import feature_dims

        return feature_dims(self.profile)

    def encoder_weights(self) -> dict[str, str]:
        """What each encoder's weights are, cheaply (file name, size, mtime): the fingerprint a
        change of weights recomputes features by."""
        if self.profile == "tiny":
            return {name: "tiny-deterministic" for name in ("clip", "synchformer", "vae")}
        from shared.weights import CLIP_WEIGHTS, SYNCHFORMER_WEIGHTS, VAE_WEIGHTS, require

        identity = {}
        for name, weight_file in (("clip", CLIP_WEIGHTS), ("synchformer", SYNCHFORMER_WEIGHTS),
                                  ("vae", VAE_WEIGHTS[self.audio_mode])):
            stat = require(weight_file, self.weights_dir).stat()
            identity[name] = f"{weight_file.filename}:{stat.st_size}:{stat.st_mtime_ns}"
        return identity

    # -- where and how --------------------------------------------------------------------------------
    def on(self, device) -> "Runtime":
        """The same settings on another device (a torchrun rank's GPU); nothing loaded yet."""
        if self._models:
            raise RuntimeError("move a runtime to its device before it loads a model")
        return replace(self, device=str(device))

    @functools.cached_property
    def torch_device(self) -> torch.device:
        from shared.device import resolve_device

        return resolve_device(self.device)

    def autocast(self):
        """The mixed-precision context of the transformers (network, CLIP, Synchformer)."""
        from shared.device import mixed_precision

        return mixed_precision(self.torch_device, self.precision)

    # -- the models, each loaded once -----------------------------------------------------------------
    @property
    def loaded_models(self) -> list[str]:
        return sorted(self._models)

    def _load(self, name: str, loader):
        if name not in self._models:
            started = time.perf_counter()
            self._models[name] = loader()
            self.load_seconds += time.perf_counter() - started
            log.debug("loaded %s in %.1f s", name, time.perf_counter() - started)
        return self._models[name]

    def network(self):
        """The base network (`network_file`, else the variant's official file; tiny: deterministic), on
        the CPU. Callers adapt it in place (LoRA, a merged adapter): a runtime serves one model."""
        def load():
            from shared.lora import base_network

            variant = self.variant
            if variant is None and not (self.profile == "real" and self.network_file):
                variant = VARIANT_OF_MODE[self.mode]
            network, variant = base_network(self.profile, self.network_file, variant, self.weights_dir)
            if self.variant is None:
                self._agree(mode_of(variant), f"{self.network_file} (variant {variant})")
                self.variant = variant
            return network
        return self._load("network", load)

    def clip(self):
        from shared.pretrained import load_clip

        return self._load("clip", lambda: load_clip(self.profile, self.weights_dir, self.torch_device))

    def synchformer(self):
        from shared.pretrained import load_synchformer

        return self._load("synchformer", lambda: load_synchformer(self.profile, self.weights_dir, self.torch_device))

    def sync_scorer(self):
        """DeSync's model: Synchformer's audio branch and sync head, from the same weight file as
        the Synchformer (its other entries)."""
        from shared.pretrained import load_sync_scorer

        return self._load("sync scorer", lambda: load_sync_scorer(self.profile, self.weights_dir, self.torch_device))

    def passt(self):
        """PaSST-S for KL_PaSST (evaluate); for `real` it needs its own file (`download` fetches it)."""
        from shared.pretrained import load_passt

        return self._load("passt", lambda: load_passt(self.profile, self.weights_dir, self.torch_device))

    def mel_converter(self):
        from shared.models.mel import build_mel_converter

        return self._load("mel", lambda: build_mel_converter(self.audio_mode).to(self.torch_device))

    def vae(self):
        """The whole VAE (encoder and decoder): audio → latents."""
        from shared.pretrained import load_vae

        return self._load("vae", lambda: load_vae(self.audio_mode, self.profile, self.weights_dir, self.torch_device))

    def vae_decoder(self):
        """The VAE for latents → mel: its encoder is dropped, unless the whole VAE is loaded anyway."""
        if "vae" in self._models:
            return self._models["vae"]

        def load():
            from shared.pretrained import load_vae

            vae = load_vae(self.audio_mode, self.profile, self.weights_dir, self.torch_device)
            del vae.encoder
            return vae
        return self._load("vae decoder", load)

    def vocoder(self):
        from shared.pretrained import load_vocoder

        return self._load("vocoder", lambda: load_vocoder(self.audio_mode, self.profile, self.weights_dir,
                                                          self.torch_device))
