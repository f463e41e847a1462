"""Runs that neither mix nor lie (bad input, round two): which folders count as ours, what a resume
may change, recorded paths, settings from a TOML file, one-line messages, short clips and windows."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmaudio_lora.cli import app
from shared.errors import UserError
from shared.outputs import OutputError
from train.config import TrainConfig
from train.loop import train

runner = CliRunner()


def tiny(features, run, **options) -> TrainConfig:
    values = dict(features=[str(features)], run=str(run), profile="tiny", steps=2, batch_size=2, device="cpu",
                  checkpoint_every=2)
    values.update(options)
    return TrainConfig(**values)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_common_file_name_never_makes_a_folder_ours(features, tmp_path):
    """A folder with any config.json is not a run, one with any manifest.json not a feature folder:
    --overwrite and --resume refuse it, and features refuses to replace it."""
    weights = tmp_path / "bigvgan"
    weights.mkdir()
    (weights / "config.json").write_text('{"resblock": "1"}')
    (weights / "bigvgan_generator.pt").write_bytes(b"weights")
    web = tmp_path / "site"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "my app"}')
    (web / "index.html").write_text("<html></html>")
    before = tree(tmp_path)
    for flags in ([], ["--overwrite"], ["--resume"]):
        result = runner.invoke(app, ["train", "--features", str(features), "--run", str(weights), "--profile", "tiny",
                                     "--steps", "1", *flags])
        assert result.exit_code == 1 and "did not write (no .mmaudio-lora marker)" in result.output, result.output
    from precompute.run import FeatureJob, run_features
    from shared.runtime import Runtime

    with pytest.raises(OutputError, match="did not write"):
        run_features(FeatureJob(tsv=tmp_path / "clips.tsv", video_root=tmp_path, out=web,
                                runtime=Runtime(mode="16k", profile="tiny")))
    assert tree(tmp_path) == before


def test_resume_refuses_other_settings_and_data_and_records_what_may_change(features, tmp_path):
    data = tmp_path / "features"
    shutil.copytree(features, data)
    run = tmp_path / "run"
    train(tiny(data, run), show_progress=False)
    base = ["train", "--features", str(data), "--run", str(run), "--profile", "tiny", "--batch-size", "2"]
    for flags, named in ((["--lr", "3e-4"], "lr 0.0001 → 0.0003"), (["--rank", "4"], "rank 16 → 4"),
                         (["--seed", "7"], "seed 42 → 7"), (["--val-fraction", "0.5"], "val_fraction 0.1 → 0.5")):
        refused = runner.invoke(app, [*base, "--steps", "4", "--resume", *flags])
        assert refused.exit_code == 1 and "--resume would mix two runs" in refused.output and named in refused.output
    both = runner.invoke(app, [*base, "--resume", "--overwrite"])
    assert both.exit_code == 1 and "give one of them" in both.output
    assert json.loads((run / "config.json").read_text())["steps"] == 2  # nothing recorded by a refusal

    longer = runner.invoke(app, [*base, "--steps", "4", "--resume"])  # steps (and intervals) may change
    assert longer.exit_code == 0, longer.output
    assert "trained 2 steps (now at step 4)" in longer.output
    assert json.loads((run / "config.json").read_text())["steps"] == 4

    other = tmp_path / "other"  # another folder, other content: refused
    shutil.copytree(features, other)
    from tensordict import TensorDict

    TensorDict.load_memmap(other / "memmap")["mean"][0] += 1.0  # a clip re-encoded to other values
    refused = runner.invoke(app, [*base[:2], str(other), *base[3:], "--steps", "6", "--resume"])
    assert refused.exit_code == 1 and f"features [{str(data)!r}] → [{str(other)!r}]" in refused.output
    TensorDict.load_memmap(data / "memmap")["mean"][0] += 1.0  # the run's own folder, its content changed
    changed = runner.invoke(app, [*base, "--steps", "6", "--resume"])
    assert changed.exit_code == 1 and f"{data}: changed since the run started" in changed.output


def test_recorded_paths_are_absolute_and_a_moved_feature_folder_is_named(features, tmp_path, monkeypatch):
    workspace = tmp_path / "project"
    shutil.copytree(features, workspace / "features")
    monkeypatch.chdir(workspace)
    train(tiny("features", "runs/a", val_fraction=0.34), show_progress=False)
    recorded = json.loads((workspace / "runs" / "a" / "config.json").read_text())
    assert recorded["features"] == [str(workspace / "features")] and recorded["run"] == str(workspace / "runs" / "a")

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "features").mkdir(parents=True)  # a folder of the same name that is not the run's
    monkeypatch.chdir(elsewhere)
    run = workspace / "runs" / "a"
    common = ["evaluate", "--run", str(run), "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "e.json")]
    assert runner.invoke(app, common).exit_code == 0  # from another folder: the run's own clips
    (workspace / "features").rename(workspace / "features-moved")
    moved = runner.invoke(app, common)
    assert moved.exit_code == 1 and "its features" in moved.output and "are gone (moved or deleted)" in moved.output


def test_toml_values_win_over_options_not_given_and_bad_values_are_one_line(features, tmp_path):
    toml = tmp_path / "tiny.toml"
    toml.write_text('profile = "tiny"\ndevice = "cpu"\nsteps = 1\nbatch_size = 2\n')
    ok = runner.invoke(app, ["train", "--features", str(features), "--run", str(tmp_path / "run"), "--config",
                             str(toml)])
    assert ok.exit_code == 0, ok.output  # without the TOML's profile this would look for real weights
    assert json.loads((tmp_path / "run" / "config.json").read_text())["profile"] == "tiny"
    for text, message in (('rank = "big"', "rank must be a whole number, not 'big'"),
                          ("lr = -1.0", "lr must be positive"),
                          ("betas = 0.9", "betas must be two numbers"),
                          ('target_modules = "("', "target_modules is not a regular expression"),
                          ("length_bucket_sec = 30.0", "length_bucket_sec must be 0 (off) or a length up to"),
                          ("rank = ", "not valid TOML")):
        toml.write_text(f'profile = "tiny"\n{text}\n')
        run = tmp_path / f"refused-{len(message)}"
        result = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--config", str(toml)])
        assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output
        assert not run.exists()  # checked before anything is created
    flag = runner.invoke(app, ["train", "--features", str(features), "--run", str(tmp_path / "r"), "--profile",
                               "tiny", "--device", "gpu"])
    assert flag.exit_code == 1 and "--device must be auto, cpu, cuda or cuda:N, not 'gpu'" in flag.output


def test_a_damaged_run_record_is_named_in_one_line(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.json").write_text('{"features": [')
    result = runner.invoke(app, ["generate", "--run", str(run), "--prompt", "rain", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and f"{run / 'config.json'}: not valid JSON" in result.output
    (run / "config.json").write_text('{"rank": 4}')
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "m.pth")])
    assert result.exit_code == 1 and "lacks features, profile" in result.output


def test_short_segments_are_skipped_and_windows_checked_before_any_model(features, tmp_path):
    from precompute.demo_clips import ClipSpec, write_clip
    from precompute.run import FeatureJob, run_features
    from shared.runtime import Runtime

    videos = tmp_path / "videos"
    write_clip(videos / "a.mp4", ClipSpec(3.0, width=48, height=32, seed=1))
    tsv = tmp_path / "clips.tsv"
    tsv.write_text("video_path\tstart_time\tend_time\tcaption\na.mp4\t0\t2.5\tlong enough\n"
                   "a.mp4\t2.5\t3.0\tcut near the end\n")
    runtime = Runtime(mode="16k", profile="tiny")
    for window in (0.3, -1.0, 1000.0, 1.3, 0.7):
        with pytest.raises(UserError, match=r"--window \S+: must be a multiple of 0.125 s .* from 0.75 s"):
            run_features(FeatureJob(tsv=tsv, video_root=videos, out=tmp_path / "never", runtime=runtime,
                                    window_sec=window))
    assert runtime.loaded_models == [] and not (tmp_path / "never").exists()
    summary = run_features(FeatureJob(tsv=tsv, video_root=videos, out=tmp_path / "f4", runtime=runtime, workers=0,
                                      window_sec=4.0), show_progress=False)
    assert summary.clips == 2 and len(summary.skipped) == 1
    assert "row 3" in summary.skipped[0] and "shorter than the 0.64 s minimum" in summary.skipped[0]
    strict = runner.invoke(app, ["features", "--tsv", str(tsv), "--video-root", str(videos), "--out",
                                 str(tmp_path / "f4"), "--profile", "tiny", "--mode", "16k", "--window", "4",
                                 "--strict"])
    assert strict.exit_code == 1 and "1 clip(s) are skipped and --strict is set" in strict.output  # up to date too
    with pytest.raises(UserError, match="nearest: 1.25 or 1.375"):
        run_features(FeatureJob(tsv=tsv, video_root=videos, out=tmp_path / "never", runtime=runtime, window_sec=1.3))
    # features of a 4 s window train at that window, and the run evaluates and generates at it
    result = train(tiny(tmp_path / "f4", tmp_path / "run", batch_size=1, val_fraction=0.0), show_progress=False)
    assert result.steps == 2 and (tmp_path / "run" / "adapter").is_dir()
    evaluated = runner.invoke(app, ["evaluate", "--run", str(tmp_path / "run"), "--features", str(tmp_path / "f4"),
                                    "--allow-trained", "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "e.json")])
    assert evaluated.exit_code == 0, evaluated.output
    generated = runner.invoke(app, ["generate", "--run", str(tmp_path / "run"), "--features", str(tmp_path / "f4"),
                                    "--out", str(tmp_path / "generated"), "--steps", "1"])
    assert generated.exit_code == 0, generated.output


def test_random_bytes_are_not_called_code(tmp_path):
    from shared.checkpoint import CheckpointError, read_checkpoint

    noise = tmp_path / "noise.pth"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a checkpoint: neither a PyTorch weight file nor safetensors"):
        read_checkpoint(noise)
