"""What an adversarial pass found: nothing of the user's is lost, odd media decodes, one-line errors.

Media are made here with PyAV, small and fast; every command runs on real files.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmaudio_lora.cli import app
from precompute.run import FeatureJob, run_features
from precompute.demo_clips import ClipSpec, write_clip
from shared.clip_list import ClipListError, read_clip_list
from shared.errors import UserError
from shared.outputs import OutputError
from shared.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write_media(path: Path, seconds: float = 3.0, *, audio_start: float = 0.0, layout: str = "stereo",
                codec: str = "aac", tone_at: float | None = None, rate: int = 48000) -> Path:
    """A small mp4 (or mkv for PCM): grey frames at 25 fps, and noise with a 1 kHz tone of 0.2 s at
    `tone_at` seconds of the picture's timeline; the sound starts `audio_start` s after the picture."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"preset": "ultrafast"}
        audio = container.add_stream(codec, rate=rate, layout=layout)
        channels = audio.layout.nb_channels
        for index in range(int(seconds * 25)):
            image = np.full((48, 64, 3), 40 + index % 50, dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        count = int((seconds - audio_start) * rate)
        time = audio_start + np.arange(count) / rate
        wave = 0.01 * np.random.default_rng(0).standard_normal(count)
        if tone_at is not None:
            wave += 0.8 * np.sin(2 * math.pi * 1000 * time) * ((time >= tone_at) & (time < tone_at + 0.2))
        interleaved = np.repeat(wave.astype(np.float32)[:, None], channels, axis=1)  # (samples, channels)
        offset = int(round(audio_start * rate))
        block = audio.codec_context.frame_size or 1024
        for start in range(0, count, block):
            # packed: PyAV's planar path mishandles 8 channels
            chunk = np.ascontiguousarray(interleaved[start:start + block]).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout=layout)
            frame.sample_rate, frame.pts = rate, offset + start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def tiny_job(tsv: Path, videos: Path, out: Path, **options) -> FeatureJob:
    return FeatureJob(tsv=tsv, video_root=videos, out=out, runtime=Runtime(mode="16k", profile="tiny"), workers=0,
                      **options)


def segment_tsv(path: Path, rows: list[tuple[str, float, float, str]]) -> Path:
    lines = ["video_path\tstart_time\tend_time\tcaption"] + [f"{v}\t{s}\t{e}\t{c}" for v, s, e, c in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    videos = root / "videos"
    write_clip(videos / "a.mp4", ClipSpec(2.0, width=48, height=32, seed=1))
    write_clip(videos / "b.mp4", ClipSpec(2.5, width=48, height=32, seed=2))
    tsv = segment_tsv(root / "clips.tsv", [("a.mp4", 0, 2.0, "one"), ("b.mp4", 0, 2.5, "two")])
    return root, videos, tsv


# -- data loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["foreign folder", "video root", "file", "parent of the videos"])
def test_features_refuses_outputs_it_did_not_write(case, small_set, tmp_path):
    root, videos, tsv = small_set
    if case == "foreign folder":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif case == "video root":
        out = videos
    elif case == "file":
        out = tmp_path / "notes.txt"
        out.write_text("keep me")
    else:
        out = root
    before = sorted(p.relative_to(root.parent) for p in root.parent.rglob("*")) + sorted(tmp_path.rglob("*"))
    with pytest.raises(OutputError):
        run_features(tiny_job(tsv, videos, out))
    after = sorted(p.relative_to(root.parent) for p in root.parent.rglob("*")) + sorted(tmp_path.rglob("*"))
    assert before == after  # nothing moved, deleted or left behind


def test_features_refuses_the_current_folder_in_one_line(small_set, tmp_path):
    root, videos, tsv = small_set
    result = subprocess.run([sys.executable, "-m", "mmaudio_lora", "features", "--tsv", str(tsv), "--video-root",
                             str(videos), "--out", ".", "--profile", "tiny", "--mode", "16k", "--workers", "0"],
                            capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO),
                                                                                "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "current folder" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_the_same_folder_is_refused_while_one_holds_it(small_set, features, tmp_path):
    from shared.outputs import folder_lock
    from train.config import TrainConfig
    from train.loop import train

    root, videos, tsv = small_set
    out = tmp_path / "features"
    with folder_lock(out.resolve(), "features"):
        with pytest.raises(UserError, match=r"another command \(`features`, pid \d+\) is writing"):
            run_features(tiny_job(tsv, videos, out))
    assert not out.exists()
    run = tmp_path / "run"
    with folder_lock(run.resolve(), "train"):
        with pytest.raises(UserError, match=r"another command \(`train`, pid \d+\) is writing this folder"):
            train(TrainConfig(features=[str(features)], run=str(run), profile="tiny", steps=1, batch_size=2,
                              device="cpu"), show_progress=False)
    assert not run.exists()


def test_feature_folder_ids_are_checked_before_they_become_file_names(features, tmp_path):
    import shutil

    from shared.features import FeatureFormatError, feature_ids

    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    rows = (copy / "clips.tsv").read_text().splitlines()
    rows[1] = "../../escape\t" + rows[1].split("\t", 1)[1]
    (copy / "clips.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(FeatureFormatError, match=r"row 2: id '../../escape' is not a plain file name"):
        feature_ids(copy)


def test_generate_and_export_refuse_paths_they_did_not_write(tmp_path):
    from generate.export import check_export_target
    from shared.outputs import claim_output_folder

    def claim_generated_folder(folder):
        return claim_output_folder(folder, "generated")

    foreign = tmp_path / "videos"
    foreign.mkdir()
    (foreign / "clip.mp4").write_bytes(b"not ours")
    with pytest.raises(OutputError, match="did not write"):
        claim_generated_folder(foreign)
    with pytest.raises(OutputError, match="not a folder"):
        claim_generated_folder(foreign / "clip.mp4")
    ours = claim_generated_folder(tmp_path / "generated")
    (ours / "x.wav").write_bytes(b"")
    assert claim_generated_folder(ours) == ours  # a folder we wrote is used again
    (tmp_path / "model.pth").write_bytes(b"user's")
    with pytest.raises(OutputError, match="did not export"):
        check_export_target(tmp_path / "model.pth")
    with pytest.raises(OutputError, match="not a file"):
        check_export_target(foreign)
    assert (tmp_path / "model.pth").read_bytes() == b"user's"
    from evaluate.held_out import check_evaluation_target

    (tmp_path / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(OutputError, match="did not write"):
        check_evaluation_target(tmp_path / "notes.json")
    (tmp_path / "evaluation.json").write_text('{"val_flow_loss": {"base": 1.0}}')
    assert check_evaluation_target(tmp_path / "evaluation.json") == tmp_path / "evaluation.json"


# -- odd media ------------------------------------------------------------------------------------

def test_eight_channel_audio_decodes_in_a_child_process(tmp_path):
    """7.1 audio (AAC and PCM) once crashed PyAV's planar conversion (a segmentation fault): decode
    it where a crash cannot take the test run down, and check the downmix is the channels' mean."""
    paths = [write_media(tmp_path / "surround.mp4", 2.0, layout="7.1", codec="aac", tone_at=0.5),
             write_media(tmp_path / "surround.mkv", 2.0, layout="7.1", codec="pcm_s16le", tone_at=0.5)]
    script = ("import sys; from shared.media import load_segment\n"
              "for path in sys.argv[1:]:\n"
              "    s = load_segment(path, 0, 2.0); print(s.audio.shape[0], float(s.audio.abs().max()), s.duration_sec)")
    result = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:  # AAC, then PCM
        samples, peak, duration = line.split()
        assert int(samples) == 128000 and 0.8 < float(peak) <= 1.0 and float(duration) == 2.0


def test_audio_that_starts_after_the_picture_keeps_its_place(tmp_path):
    from shared.media import load_segment

    path = write_media(tmp_path / "late.mp4", 4.0, audio_start=0.94, tone_at=2.0)
    segment = load_segment(path, 0.0, 4.0)
    envelope = segment.audio.abs().unfold(0, 160, 160).max(dim=1).values  # 10 ms blocks at 16 kHz
    onset = int(torch.nonzero(envelope > 0.3)[0]) / 100
    assert abs(onset - 2.0) < 0.03, onset
    assert segment.audio[:int(0.9 * 16000)].abs().max() < 1e-3  # silence before the sound starts


# -- lists ----------------------------------------------------------------------------------------

SEGMENT_HEADER = "video_path\tstart_time\tend_time\tcaption"
BAD_LISTS = {  # name: (the list's bytes, what the one-line error must say)
    "ids with paths": (f"{SEGMENT_HEADER}\tid\nx.mp4\t0\t1\tok\t../../x\ny.mp4\t0\t1\tok\t/abs/y\n"
                       "z.mp4\t0\t1\tok\tfine\n".encode(), r"rows 2, 3: id is not a plain file name"),
    "MMAudio id '..'": (b"id\tlabel\n..\tup\n", r"row 2: id is not a plain file name"),
    "ragged rows": (f"{SEGMENT_HEADER}\nx.mp4\t0\t1\tok\nx.mp4\t1\t2\tok\textra\nx.mp4\t2\t3\n".encode(),
                    r"rows 3, 4: not 4 tab-separated fields"),
    "not UTF-8": (f"{SEGMENT_HEADER}\nx.mp4\t0\t1\tok\nx.mp4\t1\t2\tcafé\n".encode("latin-1"),
                  r"list.tsv: line 3 is not UTF-8 \(byte 0xe9\)"),
}


@pytest.mark.parametrize("case", BAD_LISTS)
def test_bad_lists_are_refused_naming_rows(case, tmp_path):
    content, message = BAD_LISTS[case]
    (tmp_path / "list.tsv").write_bytes(content)
    with pytest.raises(ClipListError, match=message):
        read_clip_list(tmp_path / "list.tsv", tmp_path)


def test_quoted_fields_keep_their_tabs_and_quotes(tmp_path):
    quoted = tmp_path / "quoted.tsv"
    quoted.write_text(f'{SEGMENT_HEADER}\nx.mp4\t0\t1\t"rain\tand ""thunder"""\n')
    assert read_clip_list(quoted, tmp_path)[0].caption == 'rain\tand "thunder"'


def test_symlinks_leading_outside_are_named_and_can_be_allowed(tmp_path):
    videos, elsewhere = tmp_path / "videos", tmp_path / "elsewhere"
    videos.mkdir()
    elsewhere.mkdir()
    (elsewhere / "real.mp4").write_bytes(b"")
    (videos / "link.mp4").symlink_to(elsewhere / "real.mp4")
    tsv = segment_tsv(tmp_path / "list.tsv", [("link.mp4", 0, 1, "linked"), ("../elsewhere/real.mp4", 0, 1, "up")])
    with pytest.raises(ClipListError) as refused:
        read_clip_list(tsv, videos)
    message = str(refused.value)
    assert "row 2: a symbolic link leads outside the video root" in message and "real.mp4" in message
    assert "--allow-symlinks" in message and "row 3: path escapes the video root" in message
    tsv = segment_tsv(tmp_path / "links.tsv", [("link.mp4", 0, 1, "linked")])
    clip = read_clip_list(tsv, videos, allow_symlinks=True)[0]
    assert clip.video == videos.resolve() / "link.mp4" and clip.id == "link"


# -- arguments and messages -----------------------------------------------------------------------

@pytest.mark.parametrize("duration,long", [("0", "windows"), ("-2", "windows"), ("nan", "windows"),
                                           ("0.3", "windows"), ("700", "windows"), ("1e9", "windows"), ("30", "off")])
def test_generate_rejects_a_bad_duration_before_loading_anything(duration, long, tmp_path):
    result = runner.invoke(app, ["generate", "--no-adapter", "--profile", "tiny", "--prompt", "rain",
                                 "--duration", duration, "--out", str(tmp_path / "out"), "--long", long])
    assert result.exit_code == 1
    limit = "600 s (--max-duration)" if long == "windows" else "8 s (the networks' window; --long windows goes further)"
    assert f"--duration must be between 0.64 s (one Synchformer window) and {limit}" in result.output
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_would_run_code_is_called_that(tmp_path):
    import os

    from shared.checkpoint import CheckpointError, read_checkpoint

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo never",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(tmp_path / "evil.pth")
    message = str(refused.value)
    assert "would run code" in message and "system" in message
    assert "weights_only" not in message and "False" not in message


def test_an_os_error_is_one_line_naming_the_path(small_set, tmp_path):
    """A folder that cannot be made (its parent is a file): the OS's reason and the path, no traceback."""
    root, videos, tsv = small_set
    (tmp_path / "a-file").write_text("")
    result = runner.invoke(app, ["features", "--tsv", str(tsv), "--video-root", str(videos), "--out",
                                 str(tmp_path / "a-file" / "features"), "--profile", "tiny", "--mode", "16k",
                                 "--workers", "0"])
    assert result.exit_code == 1, result.output
    assert "a-file: File exists" in result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0


def test_a_file_that_kills_its_decoding_worker_is_skipped_and_the_rest_written(small_set, tmp_path, monkeypatch):
    """The decoder's crash is simulated (a segmentation fault on one file); everything else is real:
    DataLoader workers, encoders, the memmap."""
    import os
    import signal

    import precompute.decode

    root, videos, tsv = small_set
    write_clip(tmp_path / "videos" / "crash.mp4", ClipSpec(2.0, width=48, height=32, seed=3))
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / "videos" / name).symlink_to(videos / name)
    listing = segment_tsv(tmp_path / "clips.tsv", [("a.mp4", 0, 2.0, "one"), ("crash.mp4", 0, 2.0, "boom"),
                                                  ("b.mp4", 0, 2.5, "two")])
    real_load = precompute.decode.load_segment

    def crashing_load(path, *args, **kwargs):
        if Path(path).name == "crash.mp4":
            os.kill(os.getpid(), signal.SIGSEGV)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(precompute.decode, "load_segment", crashing_load)
    summary = run_features(FeatureJob(tsv=listing, video_root=tmp_path / "videos", out=tmp_path / "features",
                                      runtime=Runtime(mode="16k", profile="tiny"), workers=2, batch_size=1,
                                      allow_symlinks=True))
    assert summary.clips == 3 and len(summary.skipped) == 1
    assert "crash.mp4: the decoder crashed on this file" in summary.skipped[0]
    assert (tmp_path / "features" / "clips.tsv").read_text().split()[3:] == ["a", "one", "a.mp4", "b", "two", "b.mp4"]


def _picture(path: Path, frame_times: list[float], *, rotation: int = 0, size=(64, 32)) -> Path:
    """A video whose frames have a white left half (as stored), at the given times (ms clock), with
    a display rotation; a steady tone as sound."""
    import av
    from fractions import Fraction

    width, height = size
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        video.options = {"preset": "ultrafast"}
        if rotation:
            video.set_display_rotation(rotation)
        audio = container.add_stream("aac", rate=16000, layout="mono")
        for time in frame_times:
            image = np.zeros((height, width, 3), np.uint8)
            image[:, : width // 2] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(time * 1000), Fraction(1, 1000)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        seconds = frame_times[-1] + 0.1
        wave = (0.5 * np.sin(2 * math.pi * 440 * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)
        for start in range(0, wave.shape[0], 1024):
            chunk = av.AudioFrame.from_ndarray(wave[None, start:start + 1024].copy(), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())
    return path


def test_rotated_video_is_seen_upright_and_the_output_keeps_the_rotation(tmp_path):
    """A phone clip stored sideways (display rotation 90° counter-clockwise): the white left half of
    the stored picture is the bottom half of what a player shows, and of what the encoders get."""
    import av

    from shared.media import clip_pixels, load_video, sync_pixels, write_video_with_audio

    path = _picture(tmp_path / "phone.mp4", [i / 25 for i in range(50)], rotation=90)
    frames = load_video(path, 0.0, 2.0)
    for picture in (clip_pixels(frames.clip_frames[0]), sync_pixels(frames.sync_frames[0])):
        top, bottom = picture[:, : picture.shape[1] // 3].mean(), picture[:, -picture.shape[1] // 3:].mean()
        assert bottom > top + 0.5, (float(top), float(bottom))
    out = write_video_with_audio(path, tmp_path / "out.mp4", torch.zeros(16000), 16000)
    with av.open(str(out)) as container:
        assert next(container.decode(video=0)).rotation == 90


def test_variable_frame_rate_output_keeps_the_source_timestamps(tmp_path):
    import av

    from shared.media import write_video_with_audio

    times = [0.0, 0.04, 0.08, 0.5, 0.52, 0.9, 1.3, 1.34, 1.7]  # bursts and gaps
    path = _picture(tmp_path / "vfr.mp4", times)
    out = write_video_with_audio(path, tmp_path / "out.mp4", torch.zeros(32000), 16000)
    with av.open(str(out)) as container:
        written = [frame.time for frame in container.decode(video=0)]
    assert len(written) == len(times)
    assert max(abs(a - b) for a, b in zip(written, times)) < 2e-3


# -- round two: the demo, exports, generated files, the evaluation ------------------------------------

def test_the_demo_writes_only_into_a_new_empty_or_demo_folder(tmp_path):
    user_data = tmp_path / "data"
    user_data.mkdir()
    (user_data / "segmented_clips.tsv").write_text("video_path\tstart_time\tend_time\tcaption\nmine.mp4\t0\t3\tmine\n")
    (user_data / "segmented_videos").mkdir()
    def contents():
        return {str(p): p.read_bytes() if p.is_file() else None for p in user_data.rglob("*")}

    before = contents()
    result = runner.invoke(app, ["demo", "--root", str(user_data), "--steps", "1"])
    assert result.exit_code == 1 and "did not write (no .mmaudio-lora marker)" in result.output
    assert contents() == before


def test_export_checks_each_file_it_would_replace(trained_run, tmp_path):
    from generate.export import check_export_target, export_checkpoint

    out = tmp_path / "merged_16k.pth"
    export_checkpoint(trained_run, out)
    assert check_export_target(out) == (out, out.with_suffix(".safetensors"))  # our own pair: replaced
    out.write_bytes(b"the user's own model")  # a .pth of the user's beside our .safetensors
    with pytest.raises(OutputError, match="not the .pth exported with merged_16k.safetensors"):
        check_export_target(out)
    assert out.read_bytes() == b"the user's own model"


def test_generated_files_are_finite_named_apart_and_never_read_back(trained_run, tmp_path):
    from generate.model import resolve_source
    from generate.run import GenerateJob, generate, prompt_name
    from shared.synthesis import SamplingSettings

    fast = SamplingSettings(steps=1)
    # a diverged model writes nothing and says which clip
    diverged = generate(GenerateJob(out=tmp_path / "nan", source=resolve_source(run=trained_run), prompt="rain",
                                    duration=1.0, lora_scale=1e30, sampling=fast), show_progress=False)
    assert diverged.written == [] and "not finite" in diverged.skipped[0]
    assert not list((tmp_path / "nan").glob("*.wav"))
    # prompts in any script, and the empty one, keep files of their own
    names = {prompt_name(p) for p in ("雨の音", "дождь", "", "rain", "rain!")}
    assert len(names) == 5 and all(n.isascii() for n in names)
    # title folders whose segments share file names, and the output folder inside the input
    videos = tmp_path / "videos"
    for title in ("TitleA", "TitleB"):
        write_clip(videos / title / "seg_001.mp4", ClipSpec(1.0, width=32, height=32, seed=len(title)))
    for attempt in range(2):  # the second run must not read the first run's mp4s as inputs
        summary = generate(GenerateJob(out=videos / "generated", source=resolve_source(run=trained_run),
                                       videos=[videos], sampling=fast), show_progress=False)
        assert sorted(p.name for p in summary.written) == ["TitleA__seg_001.mp4", "TitleA__seg_001.wav",
                                                           "TitleB__seg_001.mp4", "TitleB__seg_001.wav"]
    assert len(summary.replaced) == 4  # and the second run says it replaced the first's files


def test_evaluate_checks_first_and_starts_its_report_afresh(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    blocked = tmp_path / "a-file"  # a place no file can go (root ignores permissions, not this)
    blocked.write_text("")
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--out", str(blocked / "e.json")])
    assert result.exit_code == 1 and "cannot write there" in result.output and "held-out" not in result.output
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "best")
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--checkpoints"])
    assert result.exit_code == 1 and "keeps no checkpoint or best adapter" in result.output
    stale = run / ".evaluation.tmp" / "audio" / "killed_run.wav"  # left by a run killed while writing its report
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--steps", "1", "--seeds", "1", "--id", "c2"])
    assert result.exit_code == 0, result.output
    assert not (run / "evaluation" / "audio" / "killed_run.wav").exists()
