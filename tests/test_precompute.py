"""Precompute end to end: real and generated clips, skips, incremental runs, resume, two processes."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from typer.testing import CliRunner

from mmaudio_lora.cli import app
from shared.clip_list import ClipListError, read_clip_list
from precompute.run import FeatureJob, StrictModeError, run_features
from precompute.demo_clips import ClipSpec, write_clip
from shared.features import FeatureFormatError, data_dim, open_feature_dir
from shared.profiles import feature_dims
from shared.runtime import Runtime
from shared.models.sequence import SequenceConfig

REPO = Path(__file__).resolve().parents[1]
HEADER = ["video_path", "start_time", "end_time", "caption", "original_video", "title_folder",
          "original_start_time", "original_end_time"]


def write_tsv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(HEADER)
        for video, start, end, caption in rows:
            writer.writerow([video, start, end, caption, "orig.mp4", Path(video).parent.name, 0, end])
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Generated clips in title folders, the user's TSV schema, and the bad files to skip."""
    root = tmp_path_factory.mktemp("clips")
    videos = root / "segmented_videos"
    specs = {
        "beach/short_2s.mp4": ClipSpec(2.0, fps=24, seed=1),
        "beach/mid_5s.mp4": ClipSpec(5.3, fps=30, width=80, height=48, seed=2),
        "city/full_8s.mp4": ClipSpec(8.0, fps=25, seed=3, channels=1, sample_rate=22050),
        "city/long_11s.mp4": ClipSpec(11.0, fps=29.97, seed=4),
        "city/portrait.mp4": ClipSpec(3.0, fps=25, width=48, height=96, seed=5),
        "bad/no_audio.mp4": ClipSpec(3.0, audio=False),
        "bad/silent.mp4": ClipSpec(3.0, silent=True),
    }
    for name, spec in specs.items():
        write_clip(videos / name, spec)
    (videos / "bad" / "zero.mp4").write_bytes(b"")
    (videos / "bad" / "corrupt.mp4").write_bytes(os.urandom(5000))
    rows = [
        ["beach/short_2s.mp4", 0, 2.0, "waves, a bell"],
        ["beach/mid_5s.mp4", 0, 5.3, "gulls"],
        ["city/full_8s.mp4", 0, 8.0, "traffic"],
        ["city/long_11s.mp4", 0, 11.0, "a long street"],
        ["city/portrait.mp4", 0.5, 2.5, "a phone video"],
        ["bad/no_audio.mp4", 0, 3.0, "nothing to hear"],
        ["bad/silent.mp4", 0, 3.0, "silence"],
        ["bad/zero.mp4", 0, 3.0, "empty file"],
        ["bad/corrupt.mp4", 0, 3.0, "garbage"],
        ["bad/missing.mp4", 0, 3.0, "not there"],
    ]
    tsv = write_tsv(root / "segmented_clips.tsv", rows)
    return root, tsv, videos


def _job(tsv, videos, out, **options) -> FeatureJob:
    return FeatureJob(tsv=tsv, video_root=videos, out=out, runtime=Runtime(mode="16k", profile="tiny"),
                      **{"workers": 0, "batch_size": 4, **options})


def _load(out: Path):
    return TensorDict.load_memmap(out / "memmap"), list(csv.DictReader(open(out / "clips.tsv"), delimiter="\t"))


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory):
    _, tsv, videos = dataset
    out = tmp_path_factory.mktemp("features") / "train"
    summary = run_features(_job(tsv, videos, out), show_progress=False)
    return out, summary


def test_output_layout_shapes_and_padding(first_run):
    out, summary = first_run
    assert sorted(p.name for p in out.iterdir()) == [".mmaudio-lora", "clips.tsv", "manifest.json", "memmap",
                                                     "skipped.txt"]
    td, rows = _load(out)
    seq, dims = SequenceConfig("16k"), feature_dims("tiny")
    assert [r["id"] for r in rows] == ["beach__short_2s", "beach__mid_5s", "city__full_8s", "city__long_11s",
                                       "city__portrait"]
    assert [r["label"] for r in rows][:2] == ["waves, a bell", "gulls"]
    n = len(rows)
    assert td["mean"].shape == td["std"].shape == (n, seq.latent_seq_len, 20)
    assert td["clip_features"].shape == (n, seq.clip_seq_len, dims.clip)
    assert td["sync_features"].shape == (n, seq.sync_seq_len, dims.sync)
    assert td["text_features"].shape == (n, 77, dims.text)
    assert all(torch.isfinite(td[k]).all() for k in td.keys())
    assert td["duration_sec"].tolist() == pytest.approx([2.0, 5.3, 8.0, 8.0, 2.0], abs=0.05)
    assert summary.padded == 3 and summary.encoded_media == 5
    assert not list(out.parent.glob(".train.*"))  # no staging or work folder left behind


def test_skips_are_reported_with_row_file_and_reason(first_run):
    out, summary = first_run
    report = (out / "skipped.txt").read_text().splitlines()
    assert len(report) == 5 and report == summary.skipped
    reasons = {line.split(":")[0]: line for line in report}
    assert "no audio track" in reasons["row 7 (bad__no_audio)"]
    assert "silent" in reasons["row 8 (bad__silent)"]
    assert "empty file" in reasons["row 9 (bad__zero)"]
    assert "cannot decode" in reasons["row 10 (bad__corrupt)"] or "no video" in reasons["row 10 (bad__corrupt)"]
    assert "no such file" in reasons["row 11 (bad__missing)"]


def test_loader_reads_the_output_like_extracted_vgg(first_run):
    out, _ = first_run
    dims = data_dim(SequenceConfig("16k"), feature_dims("tiny"))
    features = open_feature_dir(out, dims)
    item = features[1]
    assert set(item) >= {"id", "a_mean", "a_std", "clip_features", "sync_features", "text_features", "caption",
                         "video_exist", "text_exist", "duration_sec"}
    assert item["id"] == "beach__mid_5s" and item["caption"] == "gulls"
    assert item["a_mean"].shape == (250, 20)
    with pytest.raises(FeatureFormatError, match="another mode"):
        open_feature_dir(out, data_dim(SequenceConfig("44k"), feature_dims("tiny")))
    # the source video of each clip rides along as an extra column, which MMAudio's own reader
    # (pandas, then each record's id and label) passes over
    import pandas as pd

    records = pd.read_csv(out / "clips.tsv", sep="\t").to_dict("records")
    assert list(records[0]) == ["id", "label", "group"]
    assert [r["id"] for r in records] == features.ids and [r["label"] for r in records] == features.captions
    assert [r["group"] for r in records] == ["orig.mp4"] * len(records)  # the list's original_video


def _copy_dataset(dataset, tmp_path):
    import shutil
    root, tsv, videos = dataset
    shutil.copytree(videos, tmp_path / "videos")
    return tmp_path / "videos"


def test_incremental_runs(dataset, tmp_path):
    _, tsv, _ = dataset
    videos = _copy_dataset(dataset, tmp_path)
    rows = [["beach/short_2s.mp4", 0, 2.0, "waves"], ["beach/mid_5s.mp4", 0, 5.3, "gulls"],
            ["city/portrait.mp4", 0.5, 2.5, "phone"]]
    tsv = write_tsv(tmp_path / "clips.tsv", rows)
    out = tmp_path / "features"
    first = run_features(_job(tsv, videos, out), show_progress=False)
    assert first.encoded_media == 3
    before, _ = _load(out)
    before = {k: before[k].clone() for k in before.keys()}

    again = run_features(_job(tsv, videos, out), show_progress=False)
    assert again.up_to_date and again.models_loaded == [] and again.seconds < 1.0

    rows[0][3] = "waves on pebbles"  # a caption edit: only the text encoder runs
    write_tsv(tsv, rows)
    caption = run_features(_job(tsv, videos, out), show_progress=False)
    assert (caption.encoded_media, caption.encoded_text, caption.models_loaded) == (0, 1, ["clip"])
    after, labels = _load(out)
    assert labels[0]["label"] == "waves on pebbles"
    assert torch.equal(after["mean"], before["mean"]) and torch.equal(after["sync_features"], before["sync_features"])
    assert not torch.equal(after["text_features"][0], before["text_features"][0])
    assert torch.equal(after["text_features"][1:], before["text_features"][1:])

    write_clip(videos / "beach/mid_5s.mp4", ClipSpec(5.3, fps=30, seed=99))  # new content
    rows[2][1] = 0.0  # a new time range
    rows.append(["city/full_8s.mp4", 0, 8.0, "traffic"])  # a new row
    del rows[0]  # a removed row
    write_tsv(tsv, rows)
    changed = run_features(_job(tsv, videos, out), show_progress=False)
    assert changed.encoded_media == 3 and changed.encoded_text == 1
    after, labels = _load(out)
    assert [r["id"] for r in labels] == ["beach__mid_5s", "city__portrait", "city__full_8s"]
    assert not torch.equal(after["mean"][0], before["mean"][1])


def test_strict_fails_and_keeps_the_previous_output(dataset, tmp_path):
    _, tsv, videos = dataset
    out = tmp_path / "features"
    good = write_tsv(tmp_path / "good.tsv", [["beach/short_2s.mp4", 0, 2.0, "waves"]])
    run_features(_job(good, videos, out), show_progress=False)
    manifest = (out / "manifest.json").read_text()
    bad = write_tsv(tmp_path / "bad.tsv", [["beach/short_2s.mp4", 0, 2.0, "waves"], ["bad/silent.mp4", 0, 3, "x"]])
    with pytest.raises(StrictModeError, match="silent"):
        run_features(_job(bad, videos, out, strict=True), show_progress=False)
    assert (out / "manifest.json").read_text() == manifest

    result = CliRunner().invoke(app, ["features", "--tsv", str(bad), "--video-root", str(videos), "--out",
                                      str(out), "--profile", "tiny", "--mode", "16k", "--strict", "--workers", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["features", "--tsv", str(bad), "--video-root", str(videos), "--out",
                                      str(out), "--profile", "tiny", "--mode", "16k", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "skipped row 3 (bad__silent)" in result.output and "skipped.txt" in result.output


def test_split_long_cuts_consecutive_windows(dataset, tmp_path):
    _, _, videos = dataset
    tsv = write_tsv(tmp_path / "long.tsv", [["city/long_11s.mp4", 0, 11.0, "street"]])
    out = tmp_path / "features"
    run_features(_job(tsv, videos, out, split_long=True), show_progress=False)
    td, rows = _load(out)
    assert [r["id"] for r in rows] == ["city__long_11s_w0", "city__long_11s_w1"]
    assert td["duration_sec"].tolist() == pytest.approx([8.0, 3.0], abs=0.05)
    assert rows[0]["group"] == rows[1]["group"]  # the windows of one source are one group
    # a row whose id is a window's name: refused at planning, before any encoding
    clash = tmp_path / "clash.tsv"
    clash.write_text("video_path\tstart_time\tend_time\tcaption\tid\ncity/long_11s.mp4\t0\t11\tstreet\tx\n"
                     "city/long_11s.mp4\t0\t2\tstart\tx_w1\n")
    with pytest.raises(ClipListError, match=r"id 'x_w1' names a window of one row and another row \(rows 2, 3\)"):
        run_features(_job(clash, videos, tmp_path / "clash", split_long=True), show_progress=False)
    assert not (tmp_path / "clash").exists()


LIST_ERRORS = {  # name: (the list, what the one-line error must say)
    "missing column": ("video_path\tcaption\na.mp4\tx\n", "missing column"),
    "times": ("video_path\tstart_time\tend_time\tcaption\na.mp4\tzero\t1\tx\nb.mp4\t2\t1\ty\n",
              "row 2: start_time/end_time is not a number; row 3: end_time is not after start_time"),
    "escape": ("video_path\tstart_time\tend_time\tcaption\n../../etc/passwd\t0\t1\tx\n", "escapes the video root"),
    "duplicates": ("id\tlabel\nabc\tx\nabc\ty\n", "duplicate ids: id 'abc' on rows 2, 3"),
    "no schema": ("name\tcaption\na\tb\n", "needs either an `id` column"),
}


@pytest.mark.parametrize("case", LIST_ERRORS)
def test_bad_lists_name_their_rows(case, tmp_path):
    text, message = LIST_ERRORS[case]
    path = tmp_path / "list.tsv"
    path.write_text(text)
    with pytest.raises(ClipListError, match=message):
        read_clip_list(path, tmp_path)
    result = CliRunner().invoke(app, ["features", "--tsv", str(path), "--video-root", str(tmp_path),
                                      "--out", str(tmp_path / "out"), "--profile", "tiny"])
    assert result.exit_code == 1 and "Traceback" not in result.output and message.split(":")[0] in result.output


def test_mmaudio_id_label_schema_and_same_file_segments(tmp_path):
    (tmp_path / "a1.mp4").touch()
    (tmp_path / "id.tsv").write_text("id\tlabel\na1\tdog barking\n")
    clip, = read_clip_list(tmp_path / "id.tsv", tmp_path)
    assert (clip.id, clip.video.name, clip.start_sec, clip.end_sec, clip.caption) == ("a1", "a1.mp4", 0.0, None,
                                                                                       "dog barking")
    (tmp_path / "seg.tsv").write_text("video_path\tstart_time\tend_time\tcaption\nt/x.mp4\t0\t4\ta\nt/x.mp4\t4\t7.5\tb\n")
    ids = [c.id for c in read_clip_list(tmp_path / "seg.tsv", tmp_path)]
    assert ids == ["t__x_0-4s", "t__x_4-7.5s"]


def test_real_example_clips_tiny_profile_end_to_end(reference_dir, tmp_path):
    """The two real VGGSound clips through decoding and every (tiny) encoder, MMAudio's own list format."""
    examples = reference_dir.parent / "data"
    out = tmp_path / "features"
    job = FeatureJob(tsv=examples / "example_videos.tsv", video_root=examples / "example_videos", out=out,
                     runtime=Runtime(mode="16k", profile="tiny"), workers=2, batch_size=2)
    summary = run_features(job, show_progress=False)
    assert summary.encoded_media == 2 and not summary.skipped
    td, rows = _load(out)
    assert [r["label"] for r in rows] == ["child speech, kid speaking", "whale calling"]
    assert td["duration_sec"].tolist() == [8.0, 8.0]
    assert all(torch.isfinite(td[k]).all() and td[k].std() > 0 for k in ("mean", "clip_features", "sync_features"))


def _features_command(tsv, videos, out, extra=()):
    return [sys.executable, "-m", "mmaudio_lora", "features", "--tsv", str(tsv), "--video-root", str(videos),
            "--out", str(out), "--profile", "tiny", "--mode", "16k", "--workers", "0", "--batch-size", "1", *extra]


def test_killed_run_resumes_to_the_same_result(dataset, tmp_path):
    _, _, videos = dataset
    rows = [["beach/short_2s.mp4", 0, 2.0, "a"], ["beach/mid_5s.mp4", 0, 5.3, "b"], ["city/full_8s.mp4", 0, 8, "c"],
            ["city/portrait.mp4", 0, 3, "d"]]
    tsv = write_tsv(tmp_path / "clips.tsv", rows)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    run_features(_job(tsv, videos, clean, batch_size=1), show_progress=False)  # the command's settings

    process = subprocess.Popen(_features_command(tsv, videos, resumed), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    work = tmp_path / ".resumed.work" / "media"
    deadline = time.time() + 600  # a busy machine starts the process slowly; this only waits as needed
    while time.time() < deadline and len(list(work.glob("*.safetensors"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "manifest.json").exists()  # killed before writing
    done = len(list(work.glob("*.safetensors")))
    assert 1 <= done < 4

    summary = run_features(_job(tsv, videos, resumed, batch_size=1), show_progress=False)
    assert summary.encoded_media == 4 - done
    a, _ = _load(clean)
    b, _ = _load(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a.keys())


def test_two_processes_equal_one(dataset, tmp_path):
    _, _, videos = dataset
    rows = [["beach/short_2s.mp4", 0, 2.0, "a"], ["beach/mid_5s.mp4", 0, 5.3, "b"], ["city/portrait.mp4", 0, 3, "c"]]
    tsv = write_tsv(tmp_path / "clips.tsv", rows)
    single, double = tmp_path / "single", tmp_path / "double"
    run_features(_job(tsv, videos, single), show_progress=False)  # in this process: no startup to pay
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mmaudio_lora"] + _features_command(tsv, videos, double, ["--device", "cpu"])[3:]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("clips written (3 encoded") == 1  # rank 0 reports for both
    a, rows_a = _load(single)
    b, rows_b = _load(double)
    assert rows_a == rows_b
    # Equal up to float rounding: each rank batches other clips together, and CPU matrix kernels
    # block differently for other batch shapes (Synchformer differs by ~1e-6).
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a.keys())


@pytest.mark.parametrize("clip_id", ["0B4dYTMsgHA_000130", "F8Zt3mYlOqU_000094"])
def test_segment_preprocessing_matches_the_reference_reader(clip_id, reference_dir):
    """Frames and audio of the real clips against the reference reader and training extractor."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from helpers import relative_error
    from shared.media import clip_pixels, load_segment, sync_pixels
    from shared.models.mel import build_mel_converter

    golden = load_file(reference_dir / f"preprocess_{clip_id}.safetensors")
    segment = load_segment(reference_dir.parent / "data" / "example_videos" / f"{clip_id}.mp4", 0.0, None)
    assert segment.clip_frames.dtype == segment.sync_frames.dtype == torch.uint8  # a quarter of float32 between processes
    clip_frames, sync_frames = clip_pixels(segment.clip_frames), sync_pixels(segment.sync_frames)
    assert clip_frames.shape == (64, 3, 384, 384) and sync_frames.shape == (200, 3, 224, 224)
    assert segment.duration_sec == 8.0

    def near(ours, reference, tolerance):
        """Each frame's statistics within tolerance of the reference frame or a neighbour (a
        decoder may round a boundary timestamp the other way)."""
        scale = reference.abs().max()
        for i in range(ours.shape[0]):
            candidates = [reference[j] for j in (i - 1, i, i + 1) if 0 <= j < reference.shape[0]]
            assert min((ours[i] - c).abs().max() / scale for c in candidates) <= tolerance, i

    # Frames are resized on uint8 exactly as the reference does: measured differences are float
    # rounding (< 6e-7). The bounds allow one grey level (1/255 in [0, 1], 2/255 in [-1, 1]) for a
    # decoder's colour conversion on another CPU, five times tighter than the README's 2e-2.
    near(clip_frames.mean(dim=(2, 3)), golden["clip_mean"], 4e-3)
    near(clip_frames.std(dim=(2, 3)), golden["clip_std"], 4e-3)
    near(sync_frames.mean(dim=(2, 3)), golden["sync_mean"], 8e-3)
    near(sync_frames.std(dim=(2, 3)), golden["sync_std"], 8e-3)
    for index in (0, 31, 63):
        assert relative_error(F.avg_pool2d(clip_frames[index], 4), golden[f"clip_frame_{index}_pool4"]) <= 4e-3
    for index in (0, 100, 199):
        assert relative_error(F.avg_pool2d(sync_frames[index], 4), golden[f"sync_frame_{index}_pool4"]) <= 8e-3
    assert relative_error(segment.audio, golden["audio_16k"]) <= 1e-3
    assert relative_error(build_mel_converter("16k")(segment.audio[None])[0], golden["mel_16k"]) <= 1e-3


def test_up_to_date_check_imports_no_torch(features):
    """The no-op run reads the list, stats the files and reads the manifest: no torch, no model."""
    root = features.parent
    code = f"""
import sys
from typer.testing import CliRunner
from mmaudio_lora.cli import app
result = CliRunner().invoke(app, ["features", "--tsv", {str(root / 'clips.tsv')!r}, "--video-root",
                                  {str(root / 'videos')!r}, "--out", {str(features)!r}, "--profile", "tiny",
                                  "--variant", "small_16k"])
print(result.output)
print("TORCH", "torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "up to date (6 clips, 0 skipped)" in result.stdout and "TORCH False" in result.stdout


def test_uint8_resize_is_torchvision_s_bit_for_bit():
    """Decoding resizes with torch's uint8 kernel directly; torchvision's v2 transforms (what the
    reference runs) give the very same bytes, for landscape, portrait, odd and square sizes."""
    from torchvision.transforms.v2 import InterpolationMode, functional as TF

    from shared.media import _resize_clip, _resize_sync

    bicubic = InterpolationMode.BICUBIC
    for height, width in [(720, 1280), (1280, 720), (481, 853), (384, 384), (100, 300)]:
        frames = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(height))
        clip = TF.resize(frames, [384, 384], interpolation=bicubic, antialias=True)
        sync = TF.center_crop(TF.resize(frames, 224, interpolation=bicubic, antialias=True), [224, 224])
        assert torch.equal(_resize_clip(frames), clip)
        assert torch.equal(_resize_sync(frames), sync)
