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


def vocoder_hyperparameters(mode: str, config_file: str | os.PathLike | None = None,
                            sizes: dict | None = None) -> dict:
    """The generator's hyper-parameters: 16k from MMAudio's yml, 44k from its `config.json` (or,
    without the file, the official shapes this module records); `sizes` shrink the channels (tests)."""
    if mode == "16k":
        base = dict(BIGVGAN_16K)
    elif mode == "44k":
        base = json.loads(Path(config_file).read_text()) if config_file is not None else dict(BIGVGAN_16K, **BIGVGAN_44K)
    else:
        raise ValueError(f"unknown audio mode {mode!r}; expected '16k' or '44k'")
    return base if sizes is None else dict(base, **sizes)


def inference_form(generator: nn.Module) -> nn.Module:
    """The generator with weight norm removed, in eval mode: mel (B, n_mels, T) → waveform (B, 1, T * hop)."""
    _quietly(generator.remove_weight_norm)
    return generator.eval()
