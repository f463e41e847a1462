"""Our resampler and mel filterbank against what torchaudio produced (we no longer depend on it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shared.models.resample import resample

# Made once with torchaudio 2.11.0 (torch 2.11.0, CPU): transforms.Resample(source, target,
# resampling_method="sinc_interp_kaiser", lowpass_filter_width=64, rolloff=0.9475937167399596,
# beta=14.769656459379492) on 0.1 s of seeded noise (randn * 0.3) per source rate.
CASES = load_file(Path(__file__).parent / "data" / "resample_torchaudio_2.11.0.safetensors")
RATE_PAIRS = [tuple(int(rate) for rate in key.split("_")[1:]) for key in CASES if key.startswith("out_")]
# The kernel matches to the last bit; what remains is float32 summation order in conv1d, which
# differs between CPU kernels by a few ulps (measured 0 here). A wrong kernel is off by > 1e-3.
TOLERANCE = 1e-6


@pytest.mark.parametrize("source_rate,target_rate", RATE_PAIRS)
def test_resample_matches_torchaudio(source_rate, target_rate):
    source = CASES[f"in_{source_rate}"]
    expected = CASES[f"out_{source_rate}_{target_rate}"]
    ours = resample(source, source_rate, target_rate)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= TOLERANCE * expected.abs().max().item()


def test_resample_batches_and_keeps_leading_dimensions():
    source = CASES["in_48000"]
    batch = torch.stack([source, -source, source * 0.5])[None]  # (1, 3, N)
    out = resample(batch, 48000, 16000)
    assert out.shape == (1, 3, 1600)
    assert torch.allclose(out[0, 0], resample(source, 48000, 16000), rtol=0, atol=1e-6)
    assert torch.allclose(out[0, 1], -out[0, 0]) and torch.allclose(out[0, 2], out[0, 0] * 0.5)


def test_resample_is_band_limited():
    """A 10 kHz tone disappears when going to 16 kHz (Nyquist 8 kHz); a 1 kHz tone survives."""
    time = torch.arange(48000) / 48000
    low = resample(torch.sin(2 * torch.pi * 1000 * time), 48000, 16000)
    high = resample(torch.sin(2 * torch.pi * 10000 * time), 48000, 16000)
    middle = slice(1000, -1000)
    assert low[middle].abs().max() > 0.99 and high[middle].abs().max() < 5e-3  # > 46 dB down
