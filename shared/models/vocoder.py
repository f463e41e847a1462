"""Mel → waveform vocoders, built with the `bigvgan` package from PyPI.

16k: the BigVGAN v1 generator MMAudio ships as `best_netG.pt`. 44k: NVIDIA's
`bigvgan_v2_44khz_128band_512x` (config.json + bigvgan_generator.pt). Both run with weight norm
removed and without the CUDA kernel.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from shared.errors import UserError

# MMAudio's bigvgan_vocoder.yml (only the generator's hyper-parameters matter here).
BIGVGAN_16K = {
    "num_mels": 80,
    "upsample_rates": [4, 4, 2, 2, 2, 2],
    "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4],
    "upsample_initial_channel": 1536,
    "resblock": "1",
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "activation": "snakebeta",
    "snake_logscale": True,
}
# What the official 44k vocoder's config.json changes from the 16k generator (the real profile reads
# the file itself; the tiny profile and the device check build from this): its shapes, and no
# tanh or bias at the final layer.
BIGVGAN_44K = {
    "num_mels": 128,
    "upsample_rates": [8, 4, 2, 2, 2, 2],
    "upsample_kernel_sizes": [16, 8, 4, 4, 4, 4],
    "use_tanh_at_final": False,
    "use_bias_at_final": False,
}
TINY_CHANNELS = {"upsample_initial_channel": 64, "resblock_kernel_sizes": [3],
                 "resblock_dilation_sizes": [[1, 3, 5]]}

_PARAMETRIZED = re.compile(r"\.parametrizations\.weight\.original([01])$")


def legacy_weight_norm_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torch's parametrized weight-norm keys to the `weight_g` / `weight_v` the package uses."""
    names = {"0": ".weight_g", "1": ".weight_v"}
    return {_PARAMETRIZED.sub(lambda m: names[m.group(1)], key): value for key, value in state_dict.items()}


def _quietly(function, *args):
    # bigvgan prints progress to stdout; the CLI's output is ours.
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def bigvgan_generator(hyperparameters: dict) -> nn.Module:
    """The BigVGAN generator of these hyper-parameters, in weight-norm form (as its files store it)."""
    from bigvgan import BigVGAN
    from bigvgan.env import AttrDict

    with warnings.catch_warnings():  # the package still uses torch's older weight_norm
        warnings.simplefilter("ignore", FutureWarning)
        return BigVGAN(AttrDict(hyperparameters), use_cuda_kernel=False)


def vocoder_hyperparameters(mode: str, profile: str = "real", config_file: str | os.PathLike | None = None) -> dict:
    from shared.profiles import check_profile

    check_profile(profile)
    if mode == "16k":
        base = dict(BIGVGAN_16K)
    elif mode == "44k":
        if profile == "real":
            if config_file is None:
                raise ValueError("the 44k vocoder's hyper-parameters come from its config.json")
            return json.loads(Path(config_file).read_text())
        base = dict(BIGVGAN_16K, **BIGVGAN_44K)
    else:
        raise UserError(f"unknown audio mode {mode!r}; expected '16k' or '44k'")
    return base if profile == "real" else dict(base, **TINY_CHANNELS)


def build_vocoder(mode: str, state_dict: dict[str, torch.Tensor] | None = None, profile: str = "real",
                  config_file: str | os.PathLike | None = None, source: str = "state dict") -> nn.Module:
    """A vocoder ready for inference: mel (B, n_mels, T) → waveform (B, 1, T * hop).

    `state_dict` is the generator in weight-norm form, in either naming (torch's
    `parametrizations.weight.original0/1` or the older `weight_g` / `weight_v`).
    """
    from shared.checkpoint import load_strict

    generator = bigvgan_generator(vocoder_hyperparameters(mode, profile, config_file))
    if state_dict is not None:
        load_strict(generator, legacy_weight_norm_names(state_dict), source, f"the {mode} vocoder")
    _quietly(generator.remove_weight_norm)
    return generator.eval()


def load_vocoder(mode: str, profile: str = "real", weights_dir: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu") -> nn.Module:
    """The vocoder of a mode from its official file, or deterministic weights for `tiny`."""
    from shared.checkpoint import CheckpointError, read_checkpoint
    from shared.profiles import fill_deterministically
    from shared.weights import VOCODER_WEIGHTS, require

    if profile == "tiny":
        generator = bigvgan_generator(vocoder_hyperparameters(mode, profile))
        fill_deterministically(generator)
        _quietly(generator.remove_weight_norm)
        return generator.eval().to(device)
    weight_file = VOCODER_WEIGHTS[mode]
    path = require(weight_file, weights_dir)
    config_file = path.parent / "config.json" if mode == "44k" else None
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("generator"), dict):
        raise CheckpointError(f"{path}: expected a dict with a 'generator' entry (a BigVGAN checkpoint)")
    return build_vocoder(mode, checkpoint["generator"], profile, config_file, source=str(path)).to(device)
