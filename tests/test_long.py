"""A whole commercial's soundtrack: continued windows past the 8 s window, as long as the picture, in
bounded memory; one window is exactly what it was; the seam measured where the truth is known."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import TINY, audio_samples
from mmaudio_lora.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _bench():
    spec = importlib.util.spec_from_file_location("bench_long", REPO / "bench" / "long.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from precompute.demo_clips import ClipSpec, write_clip

    folder = tmp_path_factory.mktemp("long-videos")
    for name, seconds in (("short", 5.0), ("twenty", 20.0)):
        write_clip(folder / f"{name}.mp4", ClipSpec(seconds, width=64, height=48, seed=len(name)))
    return folder


def test_the_chosen_method_leaves_no_seam_on_the_gaussian_process_flow():
    """On the analytic flow (Gaussian process over latent frames), 12 seeds, 8 s windows of 250
    frames, a 2 s overlap, 25 Euler steps: continued windows join like one long draw (median join
    statistic within [0.8, 1.25]); independent windows (a jump) and a crossfade (a blur) do not."""
    bench = _bench()
    medians = {method: statistics.median(bench.join(method, seed, 25, 10.0) for seed in range(12))
               for method in ("continued", "independent", "crossfade")}
    assert 0.8 <= medians["continued"] <= 1.25
    assert medians["independent"] > 1.25 and medians["crossfade"] < 0.8


def test_windows_plan_and_overlap_rules():
    from generate.long import overlap_frames, plan_windows
    from shared.errors import UserError
    from shared.models.sequence import SequenceConfig

    seq = SequenceConfig("16k")
    assert overlap_frames(None, seq) == 62 and overlap_frames(1.984, seq) == 62
    with pytest.raises(UserError, match="nearest 1.984 or 2.016"):
        overlap_frames(2.0, seq)
    assert overlap_frames(None, SequenceConfig("44k")) == 86
    assert [w.frames for w in plan_windows(8.0, seq, 62)] == [250]  # exactly one window: as before
    windows = plan_windows(20.0, seq, 62)
    assert [(w.start, w.frames, w.held) for w in windows] == [(0, 250, 0), (188, 250, 62), (376, 249, 62)]
    assert windows[-1].start + windows[-1].frames == seq.latent_frames(20.0)
    sixty = plan_windows(60.0, seq, 62)
    assert len(sixty) == 10 and all(w.held == 62 for w in sixty[1:])


def test_a_video_within_the_window_gives_exactly_today_s_audio(videos, tmp_path):
    """A 5 s video: --long windows and --long off give the same noise and the same samples."""
    import soundfile

    outputs = []
    for mode in ("windows", "off"):
        out = tmp_path / mode
        result = runner.invoke(app, ["generate", "--no-adapter", *TINY, "--video", str(videos / "short.mp4"),
                                     "--out", str(out), "--steps", "3", "--long", mode, "--no-mp4"])
        assert result.exit_code == 0, result.output
        outputs.append(soundfile.read(out / "short.wav")[0])
    assert (outputs[0] == outputs[1]).all() and len(outputs[0]) == 5 * 16000


def test_a_long_video_gets_a_whole_track_in_sync_and_the_text_past_the_window(videos, trained_run, tmp_path):
    """A 20 s video with the run's adapter: the wav as long as the picture (to the sample), the mp4
    with the whole picture and track; off keeps today's 8 s; a 12 s prompt is 12 s; too long is
    refused in one line."""
    out = tmp_path / "long"
    result = runner.invoke(app, ["generate", "--run", str(trained_run), "--video", str(videos / "twenty.mp4"),
                                 "--video", str(videos / "short.mp4"), "--out", str(out), "--steps", "2",
                                 "--lora-scale", "0.5", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert audio_samples(out / "twenty.wav") == 20 * 16000 and audio_samples(out / "short.wav") == 5 * 16000
    import av

    with av.open(str(out / "twenty.mp4")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert float(video.duration * video.time_base) == pytest.approx(20.0, abs=0.05)
        assert float(audio.duration * audio.time_base) == pytest.approx(20.0, abs=0.05)
    trimmed = runner.invoke(app, ["generate", "--run", str(trained_run), "--video", str(videos / "twenty.mp4"),
                                  "--out", str(tmp_path / "off"), "--steps", "2", "--long", "off", "--no-mp4"])
    assert trimmed.exit_code == 0 and audio_samples(tmp_path / "off" / "twenty.wav") == 8 * 16000
    text = runner.invoke(app, ["generate", "--no-adapter", *TINY, "--prompt", "rain", "--duration", "12",
                               "--out", str(tmp_path / "text"), "--steps", "2"])
    assert text.exit_code == 0, text.output
    assert audio_samples(next((tmp_path / "text").glob("*.wav"))) == 12 * 16000
    refused = runner.invoke(app, ["generate", "--no-adapter", *TINY, "--prompt", "rain", "--duration", "700",
                                  "--out", str(tmp_path / "refused")])
    assert refused.exit_code != 0 and "--max-duration" in refused.output and not (tmp_path / "refused").exists()
    skipped = runner.invoke(app, ["generate", "--no-adapter", *TINY, "--video", str(videos / "twenty.mp4"),
                                  "--out", str(tmp_path / "skipped"), "--max-duration", "10", "--steps", "1"])
    assert skipped.exit_code == 1 and "longer than --max-duration 10" in skipped.output
    overlap = runner.invoke(app, ["generate", "--no-adapter", *TINY, "--prompt", "rain", "--duration", "12",
                                  "--out", str(tmp_path / "overlap"), "--overlap", "2"])
    assert overlap.exit_code != 0 and "nearest 1.984 or 2.016" in overlap.output
    assert not (tmp_path / "overlap").exists()


def test_continued_windows_hold_the_overlap_and_decode_without_a_step():
    """The overlap's latents at t = 1 are the previous window's exactly; the vocoder in chunks with
    context and a short crossfade gives the whole decode's audio (it is convolutional), and the
    log-mel of a track past two minutes, decoded in chunks, stays close to the whole decode."""
    from generate.long import LongSettings, decode_track, in_chunks, voice_windows
    from generate.model import ModelSource
    from shared.runtime import Runtime
    from shared.synthesis import AudioDecoder, SamplingSettings

    runtime = Runtime(mode="16k", profile="tiny", device="cpu")
    network = ModelSource(runtime).load()
    decoder = AudioDecoder(runtime)
    text = runtime.clip().encode_text(["a hum"]).float()
    track = voice_windows(runtime, network, decoder, None, text, 14.0, SamplingSettings(steps=2), LongSettings())
    assert track.overlap_max_abs == 0.0 and len(track.windows) == 2 and track.audio.shape == (14 * 16000,)
    assert (network.latent_seq_len, network.clip_seq_len) == (250, 64)  # the network's window restored
    latents = network.unnormalize(torch.randn(1, 400, 20, generator=torch.Generator().manual_seed(0)))
    mel = decoder.mel(latents)
    whole = decoder.vocode(mel)
    difference = (decode_track(decoder, latents, 250) - whole).abs()
    # the vocoder is local: the same audio but for float rounding (a few samples near saturation)
    assert float(difference.mean()) < 1e-4 and float(difference.quantile(0.999)) < 1e-3
    tail = in_chunks(lambda first, last: decoder.mel(latents[:, first:last]), 400, 250, 2)  # past two minutes
    assert tail.shape == mel.shape and float((tail - mel).abs().mean()) <= 0.05 * float(mel.abs().mean())


def test_bench_json_has_the_contract_keys(tmp_path, monkeypatch):
    """bench/long.py --json: the Gaussian-process table and the tiny profile's costs."""
    import runpy

    out = tmp_path / "long.json"
    monkeypatch.setattr(sys, "argv", ["long.py", "--json", str(out), "--quick", "--seeds", "2"])
    runpy.run_path(str(REPO / "bench" / "long.py"), run_name="__main__")
    numbers = json.loads(out.read_text())
    for method in ("one_draw", "independent", "crossfade", "continued"):
        assert set(numbers["gp"][method]) >= {"join_stat_median", "join_stat_range"}
    for name in ("single", "independent", "continued"):
        assert numbers["tiny"][name]["seconds_per_generated_second"] > 0
    assert numbers["tiny"]["continued"]["overlap_max_abs"] == 0.0
