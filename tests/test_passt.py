"""PaSST and KL_PaSST reproduce av-benchmark's own outputs (../shared/reference/passt.safetensors)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import relative_error
from shared.models.passt import (build_passt, frechet_distance, frontend, inception_score, kaldi_mel_banks,
                                 kl_per_clip, kl_softmax, prepare_audio)
from shared.models.resample import TORCHAUDIO_DEFAULT_FILTER, resampling_kernel

# Bounds relative to the largest value: waveform 1e-6; logits and embedding 1e-4, as every network here.
# The mel: 1e-4, the reference README's bound for mels. Its goldens are float32 STFTs made with another
# torch build, whose FFT rounds differently: ours sit 2.8e-6 to 4.6e-5 away on these cases, and the
# same frontend in float64 sits as far (3.0e-5 on the noise case), so that spread is the goldens' own
# float32 rounding, amplified by the log where the power is small. A periodic instead of a symmetric
# window, or a missing pre-emphasis, is off by more than 1e-2.
WAVE, MEL, NETWORK = 1e-6, 1e-4, 1e-4


@pytest.fixture(scope="module")
def golden(reference_dir):
    path = reference_dir / "passt.safetensors"
    with safe_open(str(path), "pt") as handle:
        info = json.loads(handle.metadata()["info"])
    return load_file(path), info


@pytest.fixture(scope="module")
def passt(reference_dir, fill_state_dict):
    manifest = json.loads((reference_dir / "passt_state_dict_manifest.json").read_text())
    network = build_passt().eval()
    shapes = {key: list(value.shape) for key, value in network.state_dict().items()}
    assert shapes == manifest["state_dict"]  # the official file's keys and shapes, head_dist included
    network.load_state_dict(fill_state_dict(network.state_dict()), strict=True)
    return network


def _wave(tensors, case):
    return tensors[f"{case}_pcm16"].float() / 32768, int(tensors[f"{case}_sr"])


def test_reading_and_frontend_match_av_benchmark(golden):
    tensors, info = golden
    assert torch.equal(torch.hann_window(800, periodic=False), tensors["window"])
    # float32 ln() of the mel scale differs by an ulp between CPU kernels (vector against scalar
    # paths): a few entries move by 1.8e-5 here; a wrong f_max or mel formula moves them by > 1e-2
    assert relative_error(kaldi_mel_banks(), tensors["mel_basis"]) <= 1e-4
    for rate in (16000, 44100):
        kernel, _ = resampling_kernel(rate, 32000, TORCHAUDIO_DEFAULT_FILTER)
        assert relative_error(kernel, tensors[f"resample_kernel_{rate}"]) <= 1e-6
    for case in info["cases"]:
        wave_32k = prepare_audio(*_wave(tensors, case), info["audio_length"])
        assert wave_32k.shape == tensors[f"{case}_32k"].shape, case  # 96119 for tone_3s_44k: float32 rounding
        assert (wave_32k - tensors[f"{case}_32k"]).abs().max() <= WAVE * max(tensors[f"{case}_32k"].abs().max(), 1), case
        mel = frontend(tensors[f"{case}_32k"][None])[0]
        assert relative_error(mel, tensors[f"{case}_mel"]) <= MEL, case


def test_network_matches_av_benchmark(golden, passt):
    tensors, info = golden
    mels = torch.stack([tensors[f"{case}_mel"] for case in info["cases"]])
    with torch.no_grad():
        assert relative_error(passt.tokens(mels[:1])[0, :22], tensors["tone_8s_16k_seq_first22"]) <= NETWORK
        logits, embedding = passt(mels)  # all eight cases in one batch
    for n, case in enumerate(info["cases"]):
        assert relative_error(logits[n], tensors[f"{case}_logits"]) <= NETWORK, case
        assert relative_error(embedding[n], tensors[f"{case}_embedding"]) <= NETWORK, case
    assert relative_error(logits[tensors["batch_index"]], tensors["batch_logits"]) <= NETWORK
    assert relative_error(embedding[tensors["batch_index"]], tensors["batch_embedding"]) <= NETWORK
    pairs = zip(tensors["pairs_gt_index"].tolist(), tensors["pairs_pred_index"].tolist())
    gt, pred = map(torch.stack, zip(*[(logits[g], logits[p]) for g, p in pairs]))
    # KL values here are 1e-5..5e-4 from near-uniform softmaxes: float32 rounding alone moves them ~2e-7
    torch.testing.assert_close(kl_per_clip(gt, pred), tensors["kl_softmax_pairs"], rtol=0, atol=1e-6)
    assert kl_softmax(gt, pred) == pytest.approx(float(tensors["kl_softmax_mean"]), abs=1e-6)


def test_metrics_match_av_benchmark(golden):
    tensors, _ = golden
    gt, pred = tensors["metric_gt_logits"], tensors["metric_pred_logits"]
    torch.testing.assert_close(kl_per_clip(gt, pred), tensors["metric_kl_softmax_per_clip"], rtol=1e-5, atol=0)
    assert kl_softmax(gt, pred) == pytest.approx(7.4320197105407715, rel=1e-5)
    assert kl_softmax(pred, gt) != pytest.approx(kl_softmax(gt, pred), rel=1e-2)  # direction matters: KL(real ‖ gen)
    mean, std = inception_score(pred)
    assert (mean, std) == pytest.approx((float(tensors["metric_isc_mean"]), float(tensors["metric_isc_std"])), rel=1e-6)
    real = torch.randn((1000, 768), generator=torch.Generator().manual_seed(61))
    generated = 0.8 * torch.randn((1000, 768), generator=torch.Generator().manual_seed(62)) + 0.05
    assert torch.equal(real[0, :8], tensors["fd_gt_first8"]) and torch.equal(generated[0, :8], tensors["fd_pred_first8"])
    assert frechet_distance(generated, real) == pytest.approx(float(tensors["fd_value"]), rel=1e-4)


def test_silence_reads_as_the_reference_s_floor():
    mel = frontend(torch.zeros(1, 1000))
    assert np.allclose(mel[0, :, 10:].numpy(), (np.log(1e-5) + 4.5) / 5)
