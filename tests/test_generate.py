"""Using the result: generation, evaluation, training samples and the demo, with the tiny profile
on real files (real decoding, real memmaps, real mp4 and wav output)."""
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from generate.model import ModelSource, resolve_source
from generate.run import GenerateJob, generate
from mmaudio_lora.cli import app
from shared.runtime import Runtime
from shared.synthesis import SamplingSettings
from shared.weights import MissingWeightsError

from conftest import EXAMPLE_DATA, FEATURE_CLIP_SECONDS, imports_refused

EXAMPLE = EXAMPLE_DATA / "example_videos" / "F8Zt3mYlOqU_000094.mp4"
FAST = SamplingSettings(steps=2)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray().reshape(-1) for frame in container.decode(stream)]
        return np.concatenate(chunks).astype(np.float64) / (32768 if chunks[0].dtype == np.int16 else 1), stream.rate


def stream_types(path: Path) -> dict[str, float]:
    import av

    with av.open(str(path)) as container:
        return {s.type: float(s.duration * s.time_base) for s in container.streams}


@pytest.fixture(scope="module")
def run(trained_run) -> Path:
    return trained_run


def test_cli_generates_wav_and_mp4_for_a_real_clip(run, tmp_path):
    out = tmp_path / "out"
    finished = CliRunner().invoke(app, ["generate", "--run", str(run), "--video", str(EXAMPLE), "--out", str(out),
                                        "--profile", "tiny", "--prompt", "a dog barks", "--steps", "2", "--cfg",
                                        "4.5", "--seed", "3"])
    assert finished.exit_code == 0, finished.output
    audio, rate = read_audio(out / f"{EXAMPLE.stem}.wav")
    from shared.media import picture_duration

    picture = picture_duration(EXAMPLE)  # 10.04 s: past the window, voiced whole by two continued windows
    assert rate == 16000 and audio.shape[0] == round(picture * 16000)
    assert np.isfinite(audio).all() and audio.std() > 1e-3
    streams = stream_types(out / f"{EXAMPLE.stem}.mp4")
    assert set(streams) == {"video", "audio"}
    assert abs(streams["video"] - picture) < 0.1 and abs(streams["audio"] - picture) < 0.1


def test_features_give_the_video_s_audio_without_any_encoder(run, features, tmp_path):
    """A 3.5 s clip from its stored features (encoders never imported) equals the same clip
    decoded and encoded from its video with its caption as prompt."""
    with imports_refused("open_clip", "shared.models.clip", "shared.models.synchformer", "shared.models.mel") as refused:
        from generate.model import resolve_source as resolve_anew
        from generate.run import GenerateJob as JobAnew, generate as generate_anew
        from shared.synthesis import SamplingSettings as SamplingAnew

        summary = generate_anew(JobAnew(out=tmp_path / "stored", source=resolve_anew(run=run), features=features,
                                        ids=["c1"], sampling=SamplingAnew(steps=2)), show_progress=False)
    assert refused.attempts == []
    assert summary.models_loaded == ["network", "vae decoder", "vocoder"]
    stored, rate = read_audio(tmp_path / "stored" / "c1.wav")
    assert stored.shape[0] == 3.5 * rate

    # The file's picture lasts 3.52 s (88 frames at 25 fps); the features hold the TSV's 3.5 s.
    summary = generate(GenerateJob(out=tmp_path / "video", source=resolve_source(run=run), prompt="sound 1",
                                   videos=[features.parent / "videos" / "c1.mp4"], duration=3.5, sampling=FAST),
                       show_progress=False)
    assert sorted(p.name for p in summary.written) == ["c1.mp4", "c1.wav"]
    from_video, _ = read_audio(tmp_path / "video" / "c1.wav")
    assert from_video.shape == stored.shape
    np.testing.assert_allclose(from_video, stored, atol=2e-3)
    assert abs(stream_types(tmp_path / "video" / "c1.mp4")["video"] - 3.5) < 0.1


def test_prompt_alone_duration_and_lora_scale(run, features, tmp_path):
    text_only = generate(GenerateJob(out=tmp_path / "text", source=ModelSource(Runtime(variant="small_16k", profile="tiny")),
                                     prompt="rain on a tin roof", duration=2.5, sampling=FAST), show_progress=False)
    assert [p.name for p in text_only.written] == ["rain_on_a_tin_roof_8b8cb6b1.wav"]
    audio, rate = read_audio(text_only.written[0])
    assert audio.shape[0] == 2.5 * rate and audio.std() > 1e-3
    wide = generate(GenerateJob(out=tmp_path / "44k", source=ModelSource(Runtime(variant="large_44k_v2", profile="tiny")),
                                prompt="rain", duration=1.0, sampling=FAST), show_progress=False)
    audio, rate = read_audio(wide.written[0])
    assert rate == 44100 and audio.shape[0] == 44100 and np.isfinite(audio).all()

    def stored_clip(out: str, source: ModelSource, scale: float = 1.0) -> np.ndarray:
        generate(GenerateJob(out=tmp_path / out, source=source, features=features, ids=["c0"], sampling=FAST,
                             lora_scale=scale), show_progress=False)
        return read_audio(tmp_path / out / "c0.wav")[0]

    base = stored_clip("base", resolve_source(profile="tiny", variant="small_16k"))
    np.testing.assert_array_equal(stored_clip("scale0", resolve_source(run=run), 0.0), base)
    assert np.abs(stored_clip("tuned", resolve_source(run=run)) - base).max() > 1e-3


def test_a_folder_of_videos_each_at_its_own_length(run, features, tmp_path):
    summary = generate(GenerateJob(out=tmp_path, source=resolve_source(run=run), videos=[features.parent / "videos"],
                                   sampling=SamplingSettings(steps=1), batch_size=4), show_progress=False)
    assert sorted(p.name for p in summary.written) == sorted(f"{c}{s}" for c in FEATURE_CLIP_SECONDS
                                                             for s in (".wav", ".mp4"))
    for clip, seconds in FEATURE_CLIP_SECONDS.items():
        picture = round(seconds * 25) / 25  # the synthetic clips' frames at 25 fps
        audio, rate = read_audio(tmp_path / f"{clip}.wav")
        assert audio.shape[0] == round(picture * rate)
        assert abs(stream_types(tmp_path / f"{clip}.mp4")["video"] - picture) < 0.05


def _audio_only_file(path: Path) -> Path:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(np.full((1, 1024), 0.1, dtype=np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_bad_inputs_give_clear_errors(run, tmp_path):
    runner = CliRunner()
    no_picture = _audio_only_file(tmp_path / "sound_only.mp4")
    result = runner.invoke(app, ["generate", "--run", str(run), "--video", str(no_picture), "--out",
                                 str(tmp_path / "out"), "--steps", "1"])
    assert result.exit_code == 1 and "sound_only.mp4: no video stream" in result.output

    result = runner.invoke(app, ["generate", "--run", str(run), "--video", str(tmp_path / "nowhere.mp4")])
    assert result.exit_code == 1 and "nowhere.mp4: no such video file or folder" in result.output

    result = runner.invoke(app, ["generate", "--run", str(run), "--features", str(tmp_path)])
    assert result.exit_code == 1 and "clips.tsv; is this a folder written by `mmaudio-lora features`?" in result.output

    result = runner.invoke(app, ["generate", "--run", str(run), "--variant", "large_44k_v2", "--video", str(EXAMPLE),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "trained on variant 'small_16k'" in result.output

    result = runner.invoke(app, ["generate", "--run", str(run), "--no-adapter", "--video", str(EXAMPLE)])
    flat = " ".join(result.output.replace("│", " ").split())  # typer draws usage errors in a box
    assert result.exit_code == 2 and "exactly one of --run, --adapter or --no-adapter" in flat

    weights = tmp_path / "weights"  # every real file in place but the 16k vocoder
    for name in ("mmaudio_small_16k.pth", "v1-16.pth", "synchformer_state_dict.pth",
                 "DFN5B-CLIP-ViT-H-14-384/open_clip_pytorch_model.bin"):
        (weights / name).parent.mkdir(parents=True, exist_ok=True)
        (weights / name).write_bytes(b"placeholder")
    job = GenerateJob(out=tmp_path / "out", videos=[EXAMPLE],
                      source=ModelSource(Runtime(variant="small_16k", weights_dir=weights)))
    with pytest.raises(MissingWeightsError, match=r"missing weight file\(s\) for small_16k: best_netG\.pt; run"):
        generate(job, show_progress=False)


def test_evaluate_prints_the_table_and_writes_json(run, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run), "--steps", "2", "--out",
                                      str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert "validation flow loss" in result.output and "log-mel L1" in result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["val_flow_loss"]) == set(report["mel_l1"]) == {"base", "tuned"}
    assert all(np.isfinite(v) and v > 0 for v in [*report["val_flow_loss"].values(), *report["mel_l1"].values()])
    assert report["val_flow_loss"]["tuned"] != report["val_flow_loss"]["base"]
    assert report["clips"] == json.loads((run / "split.json").read_text())["val_ids"]
    assert set(report["per_clip_mel_l1"]) == set(report["clips"])


def test_training_writes_audio_samples(run):
    steps = sorted(p.name for p in (run / "samples").iterdir())
    assert steps == ["step-000003", "step-000006"]
    written = sorted((run / "samples" / "step-000006").glob("*.wav"))
    assert len(written) == 2
    for path in written:
        audio, rate = read_audio(path)
        assert np.isfinite(audio).all() and audio.std() > 1e-4
        picture = round(FEATURE_CLIP_SECONDS[path.stem] * 25) / 25  # the synthetic clips' frames at 25 fps
        assert audio.shape[0] == round(picture * rate)  # the clip's own duration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"audio": 0})
    events.Reload()
    assert sorted(events.Tags()["audio"]) == [f"samples/{p.stem}" for p in written]
    assert [event.step for event in events.Audio(f"samples/{written[0].stem}")] == [3, 6]


def test_demo_ends_with_generated_audio(tmp_path):
    from mmaudio_lora.demo import run_demo

    result = run_demo(tmp_path / "demo", steps=2, seeds=1, sampling_steps=2)
    assert [p.suffix for p in result.generated] == [".wav", ".mp4"]
    assert set(stream_types(result.generated[1])) == {"video", "audio"}
    assert [p.suffix for p in result.commercial] == [".wav", ".mp4"]  # the 20 s commercial, whole
    import soundfile

    assert soundfile.info(str(result.commercial[0])).frames == 20 * 16000
    split = json.loads((result.run / "split.json").read_text())  # validation by source video
    held = {split["group_of"][i] for i in split["val_ids"]}
    assert held and not held & {split["group_of"][i] for i in split["train_ids"]}
    assert set(result.evaluation.desync) == {"base", "tuned", "real"} and "DeSync" in result.evaluation.table()
    assert result.evaluation.basis().startswith(f"{len(split['val_ids'])} clips from 2 source videos")
    assert len(held) == 2 and result.evaluation.verdict().startswith("Too few source videos to tell")
    assert set(result.evaluation.kl_passt) == {"base", "tuned"} and "KL_PaSST" in result.evaluation.table()
