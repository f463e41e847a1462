"""Each model of shared/models as a profile has it: built at the profile's size and given its
weights, the official files for `real` (read safely, loaded strictly) and deterministic ones for
`tiny`. The runtime (shared/runtime.py) loads every model through here, once.

The models themselves know nothing of profiles, weight folders or files; this module is where
those meet them.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from shared.profiles import (TINY_CLIP, TINY_PASST, TINY_SYNC_SCORER, TINY_SYNCHFORMER, TINY_VAE_HIDDEN,
                             TINY_VOCODER, check_profile, fill_deterministically)
from shared.weights import (CLIP_WEIGHTS, PASST_WEIGHTS, SYNCHFORMER_WEIGHTS, VAE_WEIGHTS, VOCODER_WEIGHTS, WeightFile,
                            require)

Device = torch.device | str
WeightsDir = str | os.PathLike | None


def with_weights(module: nn.Module, profile: str, weight_file: WeightFile, weights_dir: WeightsDir, what: str,
                 select: Callable[[dict], dict] | None = None) -> nn.Module:
    """Deterministic weights for `tiny`; for `real` the official file, strictly loaded.

    `select` picks the entries the module uses from a file holding more.
    """
    from shared.checkpoint import load_strict, read_state_dict

    if check_profile(profile) == "tiny":
        return fill_deterministically(module)
    path = require(weight_file, weights_dir)
    state = read_state_dict(path)
    load_strict(module, select(state) if select else state, path, what)
    return module


# -- the encoders of `features` ---------------------------------------------------------------------

def build_clip(profile: str = "real"):
    """CLIP at the profile's size, weights zeroed."""
    from shared.models.clip import build_clip as clip_architecture

    return clip_architecture(TINY_CLIP if check_profile(profile) == "tiny" else None)


def load_clip(profile: str = "real", weights_dir: WeightsDir = None, device: Device = "cpu"):
    """CLIP ready to encode: the DFN5B weights for `real`."""
    from shared.models.clip import MODEL_NAME

    encoder = build_clip(profile)
    with_weights(encoder.model, profile, CLIP_WEIGHTS, weights_dir, MODEL_NAME)
    return encoder.to(device).eval()


def build_synchformer(profile: str = "real"):
    from shared.models.synchformer import SynchformerConfig, build_synchformer as synchformer_architecture

    tiny = check_profile(profile) == "tiny"
    return synchformer_architecture(SynchformerConfig(**TINY_SYNCHFORMER) if tiny else SynchformerConfig())


def load_synchformer(profile: str = "real", weights_dir: WeightsDir = None, device: Device = "cpu"):
    """The visual extractor from `synchformer_state_dict.pth` (its other entries dropped)."""
    from shared.models.synchformer import visual_state_dict

    synchformer = build_synchformer(profile)
    with_weights(synchformer, profile, SYNCHFORMER_WEIGHTS, weights_dir, "Synchformer", select=visual_state_dict)
    return synchformer.to(device).eval()


def build_vae(mode: str, profile: str = "real"):
    """The VAE of an audio mode; `tiny` shrinks only its hidden width."""
    from shared.models.vae import build_vae as vae_architecture

    return vae_architecture(mode, TINY_VAE_HIDDEN if check_profile(profile) == "tiny" else None)


def load_vae(mode: str, profile: str = "real", weights_dir: WeightsDir = None, device: Device = "cpu"):
    """The VAE from its official file (`v1-16.pth` / `v1-44.pth`)."""
    vae = build_vae(mode, profile)
    with_weights(vae, profile, VAE_WEIGHTS[mode], weights_dir, f"the {mode} VAE")
    return vae.to(device).eval()


# -- the decoders of `generate` ---------------------------------------------------------------------

def vocoder_hyperparameters(mode: str, profile: str = "real", config_file: str | os.PathLike | None = None) -> dict:
    from shared.models.vocoder import vocoder_hyperparameters as hyperparameters

    return hyperparameters(mode, config_file, TINY_VOCODER if check_profile(profile) == "tiny" else None)


def vocoder_from_state_dict(mode: str, state_dict: dict[str, torch.Tensor], profile: str = "real",
                            config_file: str | os.PathLike | None = None, source: str = "state dict") -> nn.Module:
    """A vocoder ready for inference from its generator's weights in weight-norm form, in either
    naming (torch's `parametrizations.weight.original0/1` or the older `weight_g` / `weight_v`)."""
    from shared.checkpoint import load_strict
    from shared.models.vocoder import bigvgan_generator, inference_form, legacy_weight_norm_names

    with torch.device("meta"):  # every tensor comes from the state dict: no random initialisation to overwrite
        generator = bigvgan_generator(vocoder_hyperparameters(mode, profile, config_file))
    generator = generator.to_empty(device="cpu")
    load_strict(generator, legacy_weight_norm_names(state_dict), source, f"the {mode} vocoder")
    return inference_form(generator)


def load_vocoder(mode: str, profile: str = "real", weights_dir: WeightsDir = None, device: Device = "cpu") -> nn.Module:
    """The vocoder of a mode from its official file (the 44k one with its `config.json`)."""
    from shared.checkpoint import CheckpointError, read_checkpoint
    from shared.models.vocoder import bigvgan_generator, inference_form

    if check_profile(profile) == "tiny":
        generator = fill_deterministically(bigvgan_generator(vocoder_hyperparameters(mode, profile)))
        return inference_form(generator).to(device)
    path = require(VOCODER_WEIGHTS[mode], weights_dir)
    config_file = path.parent / "config.json" if mode == "44k" else None
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("generator"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'generator' entry (a BigVGAN checkpoint)")
    return vocoder_from_state_dict(mode, checkpoint["generator"], profile, config_file, source=str(path)).to(device)


# -- the metric models of `evaluate` ----------------------------------------------------------------

def build_sync_scorer(profile: str = "real"):
    from shared.models.desync import SyncScorerConfig, build_sync_scorer as scorer_architecture

    tiny = check_profile(profile) == "tiny"
    return scorer_architecture(SyncScorerConfig(**TINY_SYNC_SCORER) if tiny else SyncScorerConfig())


def load_sync_scorer(profile: str = "real", weights_dir: WeightsDir = None, device: Device = "cpu"):
    """DeSync's scorer from `synchformer_state_dict.pth` (the file `features` reads its visual
    branch from), strictly."""
    from shared.models.desync import scorer_state_dict

    scorer = build_sync_scorer(profile)
    with_weights(scorer, profile, SYNCHFORMER_WEIGHTS, weights_dir, "Synchformer's audio branch and sync head",
                 select=scorer_state_dict)
    return scorer.to(device).eval()


def build_passt(profile: str = "real"):
    from shared.models.passt import PasstConfig, build_passt as passt_architecture

    return passt_architecture(PasstConfig(**TINY_PASST) if check_profile(profile) == "tiny" else PasstConfig())


def load_passt(profile: str = "real", weights_dir: WeightsDir = None, device: Device = "cpu"):
    """PaSST-S from `passt-s-f128-p16-s10-ap.476-swa.pt` (its `model` entry when it has one), strictly."""
    from shared.models.passt import checkpoint_state_dict

    passt = build_passt(profile)
    with_weights(passt, profile, PASST_WEIGHTS, weights_dir, "PaSST-S", select=checkpoint_state_dict)
    return passt.to(device).eval()
