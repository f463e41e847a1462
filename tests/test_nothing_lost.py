"""Round three of bad input: nothing of the user's is deleted, diverged runs stop, small shared
memory and full disks are one line, resumes survive an upgrade or a move, and logs stay readable."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO
from mmaudio_lora.cli import app
from precompute.demo_clips import ClipSpec, write_clip
from precompute.run import FeatureJob, run_features
from shared.errors import UserError
from shared.runtime import Runtime
from train.config import TrainConfig
from train.loop import train

runner = CliRunner()


def tiny(features: Path, run: Path, **options) -> TrainConfig:
    settings = dict(features=[str(features)], run=str(run), profile="tiny", steps=2, batch_size=2, device="cpu",
                    val_every=1, checkpoint_every=1)
    return TrainConfig(**(settings | options))


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-clips")
    for name, seconds in (("a", 2.0), ("b", 2.5)):
        write_clip(root / "videos" / f"{name}.mp4", ClipSpec(seconds, width=48, height=32, seed=len(name)))
    (root / "clips.tsv").write_text("video_path\tstart_time\tend_time\tcaption\na.mp4\t0\t2\tone\nb.mp4\t0\t2.5\ttwo\n")
    return root


def job(root: Path, out: Path, **options) -> FeatureJob:
    return FeatureJob(tsv=root / "clips.tsv", video_root=root / "videos", out=out,
                      runtime=Runtime(mode="16k", profile="tiny"), workers=0, **options)


# -- data loss ----------------------------------------------------------------------------------------

def test_overwrite_checks_everything_before_the_old_run_goes(features, tmp_path):
    run = tmp_path / "run"
    train(tiny(features, run), show_progress=False)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for broken in (tiny(features.parent / "typo", run), tiny(features, run, val_ids=["no-such-clip"]),
                   tiny(features, run, target_modules=".*attn.*")):
        with pytest.raises(UserError):
            train(broken, overwrite=True, show_progress=False)
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # the previous run is whole
    assert train(tiny(features, run, steps=1), overwrite=True, show_progress=False).steps == 1


def test_helper_folders_that_are_not_ours_are_never_touched(two_clips, tmp_path):
    out = tmp_path / "features"
    run_features(job(two_clips, out), show_progress=False)
    for suffix in ("old", "staging", "work"):
        helper = tmp_path / f".features.{suffix}"
        helper.mkdir()
        (helper / "thesis.txt").write_text("mine")
        (two_clips / "clips.tsv").touch()  # not needed for a refusal: the check comes first
        with pytest.raises(UserError, match=rf"\.features\.{suffix}: mmaudio-lora keeps its working files there"):
            run_features(job(two_clips, out, strict=False), show_progress=False)
        assert (helper / "thesis.txt").read_text() == "mine"
        shutil.rmtree(helper)
    # a helper of ours (a killed run's) is cleaned up as before
    run_features(job(two_clips, out), show_progress=False)


def test_a_diverged_run_stops_and_its_weights_are_refused(features, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--profile", "tiny",
                                 "--steps", "30", "--batch-size", "2", "--lr", "1e4", "--device", "cpu"])
    assert result.exit_code == 1 and "training diverged" in result.output and "Lower lr" in result.output
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1]["step"] < 30 and not (run / "adapter").exists()
    # an adapter whose weights are not finite is refused by export and generate
    from safetensors.torch import load_file, save_file

    good = run.parent / "good"
    train(tiny(features, good), show_progress=False)
    tensors = load_file(good / "adapter" / "adapter_model.safetensors")
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(good / "adapter" / "adapter_model.safetensors"))
    exported = runner.invoke(app, ["export", "--run", str(good), "--out", str(tmp_path / "m_16k.pth")])
    assert exported.exit_code == 1 and "not finite (a diverged run" in exported.output
    assert not (tmp_path / "m_16k.pth").exists()
    generated = runner.invoke(app, ["generate", "--run", str(good), "--prompt", "rain", "--duration", "1",
                                    "--out", str(tmp_path / "out"), "--steps", "1"])
    assert generated.exit_code == 1 and "not finite" in generated.output


def test_evaluate_is_locked_against_train_and_reports_beside_its_json(trained_run, tmp_path):
    from shared.outputs import folder_lock

    with folder_lock(trained_run, "train"):
        held = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--steps", "1", "--seeds", "1",
                                   "--out", str(tmp_path / "x.json")])
    assert held.exit_code == 1 and "another command (`train`, pid" in held.output
    with folder_lock(trained_run, "evaluate", shared=True):  # readers share the run
        other = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--steps", "1", "--seeds", "1",
                                    "--out", str(tmp_path / "other.json")])
    assert other.exit_code == 0, other.output
    assert (tmp_path / "other" / "index.html").is_file() and not list(trained_run.glob(".evaluation*"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--out", str(tmp_path / "mine.json")])
    assert refused.exit_code == 1 and "not a report of mmaudio-lora" in refused.output
    assert (mine / "notes.txt").read_text() == "mine"


# -- wrong results --------------------------------------------------------------------------------------

def test_a_run_without_its_split_is_not_continued_or_judged(features, tmp_path):
    run = tmp_path / "run"
    train(tiny(features, run), show_progress=False)
    (run / "split.json").unlink()  # as an older version left it
    with pytest.raises(UserError, match="did not record its split"):
        train(tiny(features, run, steps=3), resume=True, show_progress=False)
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--steps", "1", "--seeds", "1"])
    assert result.exit_code == 1 and "did not record its split" in result.output


# -- hangs and crashes ----------------------------------------------------------------------------------

def test_features_finish_with_docker_s_64_mb_of_shared_memory(two_clips, tmp_path):
    """In a private mount namespace /dev/shm is a 64 MB tmpfs, as Docker gives by default: a batch
    does not fit, so decoding runs in the main process (said, with the fix) instead of hanging."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root (and unshare) to mount a private 64 MB /dev/shm")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64m tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()}")
    command = (f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} -m mmaudio_lora features "
               f"--tsv {two_clips / 'clips.tsv'} --video-root {two_clips / 'videos'} --out {tmp_path / 'f'} "
               "--profile tiny --mode 16k --workers 2 --batch-size 2 --device cpu")
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=900,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "decoding in the main process" in result.stderr and "--shm-size" in result.stderr
    assert (tmp_path / "f" / "memmap" / "meta.json").is_file()


def test_a_full_disk_is_one_line_before_the_write(two_clips, features, tmp_path, monkeypatch):
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: real(path)._replace(free=5 * 2 ** 20))
    with pytest.raises(UserError, match=r"not enough disk space for (an encoded clip|the feature memmap).* MB free"):
        run_features(job(two_clips, tmp_path / "f"), show_progress=False)
    assert not (tmp_path / "f" / "memmap").exists()
    with pytest.raises(UserError, match=r"not enough disk space for (an adapter|a checkpoint)"):
        train(tiny(features, tmp_path / "run"), show_progress=False)


def test_small_mistakes_are_one_line(features, two_clips, tmp_path):
    long_id = "x" * 201
    (tmp_path / "long.tsv").write_text(f"video_path\tstart_time\tend_time\tcaption\tid\na.mp4\t0\t2\tone\t{long_id}\n")
    with pytest.raises(UserError, match="row 2: id 'x{40}'... is 201 bytes; .* at most 200"):
        run_features(FeatureJob(tsv=tmp_path / "long.tsv", video_root=two_clips / "videos", out=tmp_path / "f",
                                runtime=Runtime(mode="16k", profile="tiny")), show_progress=False)
    result = runner.invoke(app, ["train", "--features", str(features), "--run", str(tmp_path / "r"), "--profile",
                                 "tiny", "--seed", str(2 ** 64)])
    assert result.exit_code == 1 and "seed must be a whole number from 0 to 2^64 - 1" in result.output
    toml = tmp_path / "bom.toml"
    toml.write_bytes('\ufeffprofile = "tiny"\nsteps = 1\n'.encode("utf-8"))
    from train.config import read_toml

    assert read_toml(toml) == {"profile": "tiny", "steps": 1}
    result = runner.invoke(app, ["train", "--features", str(features), "--run", str(tmp_path / "nothing"),
                                 "--profile", "tiny", "--device", "cuda:7"])
    assert result.exit_code == 1 and not (tmp_path / "nothing").exists()  # checked before anything is made


def test_an_unfinished_metrics_line_is_left_out(features, trained_run, tmp_path):
    run = tmp_path / "run"
    train(tiny(features, run, steps=2), show_progress=False)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "train_lo')  # killed while writing
    assert train(tiny(features, run, steps=3), resume=True, show_progress=False).steps == 3
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines) and json.loads(lines[-1])["step"] == 3


def test_progress_in_a_log_is_lines_not_frames(monkeypatch):
    """stderr to a pipe or a file: a line every 10 % or 5 s, never carriage-return frames; on a
    terminal the usual bar."""
    import io

    from shared.progress import progress

    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr("shared.progress.LOG_EVERY_SECONDS", 0.0)  # the seconds rule apart: the 10 % rule alone
    with progress(total=200, desc="training", unit="step") as bar:
        for _ in range(200):
            bar.update(1)
            bar.set_postfix(loss="1.0", refresh=False)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line.startswith("training") for line in lines)
    assert 10 <= len(lines) <= 13 and lines[-1].startswith("training: 100%")
    assert list(progress(range(3), desc="x", disable=True)) == [0, 1, 2]


# -- round three, the rest ------------------------------------------------------------------------------

def test_rotation_lists_and_removes_only_our_checkpoints(features, tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny(features, run, steps=2, keep_last=1), show_progress=False)
    keep = run / "checkpoints" / "step-000001-keep"
    shutil.copytree(run / "checkpoints" / "step-000002", keep)
    (run / "checkpoints" / "step-000002 copy").mkdir()
    with caplog.at_level("WARNING"):
        train(tiny(features, run, steps=4, keep_last=1), resume=True, show_progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000001-keep", "step-000002 copy", "step-000004"]
    assert "left alone (not checkpoints of ours)" in caplog.text
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--checkpoints", "--steps", "1", "--seeds", "1"])
    assert result.exit_code == 0, result.output


def test_resume_after_groups_were_added_and_after_a_move(two_clips, tmp_path):
    features = tmp_path / "project" / "features"
    run_features(job(two_clips, features), show_progress=False)
    run = tmp_path / "project" / "run"
    train(tiny(features, run, val_fraction=0.0), show_progress=False)
    # features run again only to add a group column (the same clips and captions): the same data
    from shared.features import feature_fingerprint

    rows, fingerprint = (features / "clips.tsv").read_text().splitlines(), feature_fingerprint(features)
    (two_clips / "grouped.tsv").write_text("video_path\tstart_time\tend_time\tcaption\toriginal_video\n"
                                           "a.mp4\t0\t2\tone\tfilm.mp4\nb.mp4\t0\t2.5\ttwo\tfilm.mp4\n")
    run_features(FeatureJob(tsv=two_clips / "grouped.tsv", video_root=two_clips / "videos", out=features,
                            runtime=Runtime(mode="16k", profile="tiny"), workers=0), show_progress=False)
    assert (features / "clips.tsv").read_text().splitlines() != rows
    assert feature_fingerprint(features) == fingerprint
    assert train(tiny(features, run, steps=3, val_fraction=0.0), resume=True, show_progress=False).steps == 3
    # the whole project moved: the same features at another path are the same data
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "project", moved)
    result = train(tiny(moved / "features", moved / "run", steps=4, val_fraction=0.0), resume=True,
                   show_progress=False)
    assert result.steps == 4
    assert json.loads((moved / "run" / "config.json").read_text())["features"] == [str((moved / "features").resolve())]
    assert list(json.loads((moved / "run" / "split.json").read_text())["feature_folders"]) == \
        [str((moved / "features").resolve())]
    too_few = runner.invoke(app, ["train", "--features", str(moved / "features"), "--run", str(moved / "run"),
                                  "--resume", "--steps", "2"])
    assert too_few.exit_code == 1 and "the run is at step 4; --steps 2 would train nothing" in too_few.output


def test_an_export_killed_between_its_files_recognises_its_own_pth(trained_run, tmp_path, monkeypatch):
    import generate.export as export
    import shared.checkpoint

    out = tmp_path / "merged_16k.pth"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shared.checkpoint, "save_state_dict", killed)  # the .safetensors: never written
    with pytest.raises(KeyboardInterrupt):
        export.export_checkpoint(trained_run, out)
    assert out.is_file() and not out.with_suffix(".safetensors").exists()
    monkeypatch.undo()
    result = export.export_checkpoint(trained_run, out)  # its own half-written pair is taken up again
    assert result.safetensors.is_file() and not export.pending_note(out).exists()


def test_make_test_names_the_browser_it_needs_when_it_cannot_install_it(tmp_path):
    """On a bare machine as an ordinary user, `make test` stops at once with the one command that
    installs chromium (as root it installs it, as CI does)."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "id").write_text("#!/bin/sh\necho 1000\n")  # an ordinary user
    (bin_folder / "id").chmod(0o755)
    result = subprocess.run(["/bin/sh", str(REPO / "tests" / "tools" / "require-browser")], capture_output=True,
                            text=True, env={"PATH": f"{bin_folder}:/nonexistent"})
    assert result.returncode == 1 and "sudo apt-get install chromium" in result.stderr
    (bin_folder / "chromium").write_text("#!/bin/sh\n")
    (bin_folder / "chromium").chmod(0o755)
    assert subprocess.run(["/bin/sh", str(REPO / "tests" / "tools" / "require-browser")],
                          env={"PATH": f"{bin_folder}:/nonexistent"}).returncode == 0


def _paths(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_refusal_leaves_the_disk_as_it_was(features, two_clips, trained_run, tmp_path):
    """An unusable device, a diverged adapter, a seed out of range, a duration too long: each
    command refuses in one line before it makes anything (no output folder, no work folder)."""
    from safetensors.torch import load_file, save_file

    diverged = tmp_path / "diverged"
    shutil.copytree(trained_run, diverged)
    tensors = load_file(diverged / "adapter" / "adapter_model.safetensors")
    tensors = {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}
    save_file(tensors, str(diverged / "adapter" / "adapter_model.safetensors"))
    work = tmp_path / "work"
    work.mkdir()
    generate = ["generate", "--profile", "tiny", "--variant", "small_16k", "--prompt", "rain", "--duration", "1",
                "--steps", "1", "--out", str(work / "out")]
    cases = {
        "features, unusable device": ["features", "--tsv", str(two_clips / "clips.tsv"), "--video-root",
                                      str(two_clips / "videos"), "--out", str(work / "f"), "--profile", "tiny",
                                      "--mode", "16k", "--device", "cuda:99"],
        "generate, unusable device": [*generate, "--no-adapter", "--device", "cuda:99"],
        "generate, diverged adapter": ["generate", "--run", str(diverged), "--prompt", "rain", "--duration", "1",
                                       "--steps", "1", "--out", str(work / "out")],
        "generate, seed 2^64": [*generate, "--no-adapter", "--seed", str(2 ** 64)],
        "generate, duration": [*generate[:-4], "--no-adapter", "--duration", "601", "--out", str(work / "out")],
        "evaluate, seed 2^64": ["evaluate", "--run", str(trained_run), "--seed", str(2 ** 64), "--out",
                                str(work / "e" / "e.json")],
        "evaluate, last seed past 2^64": ["evaluate", "--run", str(trained_run), "--seed", str(2 ** 64 - 2),
                                          "--seeds", "3", "--out", str(work / "e" / "e.json")],
        "evaluate, unusable device": ["evaluate", "--run", str(trained_run), "--device", "cuda:99", "--out",
                                      str(work / "e" / "e.json")],
        "evaluate, diverged adapter": ["evaluate", "--run", str(diverged), "--out", str(work / "e" / "e.json")],
        "train, seed 2^64": ["train", "--features", str(features), "--run", str(work / "r"), "--profile", "tiny",
                             "--seed", str(2 ** 64)],
    }
    before, around = _paths(work), _paths(tmp_path.parent)
    for case, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and result.output.startswith("error: "), (case, result.output)
        assert len(result.output.strip().splitlines()) == 1, (case, result.output)
        assert _paths(work) == before, case
    assert _paths(tmp_path.parent) == around


def test_a_run_on_an_earlier_version_s_bf16_folder_resumes_after_the_advised_re_run(two_clips, tmp_path, caplog):
    """A feature folder as the previous version wrote it on a GPU (Synchformer features in bf16,
    media fingerprints of its own), a run made on it, then `features` run again as advised: it
    re-encodes (float32 Synchformer features) and the run continues on it, said in one line, with
    its split and clips unchanged."""
    from tensordict import TensorDict

    out = tmp_path / "features"
    run_features(job(two_clips, out), show_progress=False)
    memmap = TensorDict.load_memmap(out / "memmap")
    memmap["sync_features"].copy_(memmap["sync_features"].to(torch.bfloat16).float())  # made at bf16
    manifest = json.loads((out / "manifest.json").read_text())
    for rows in (manifest["entries"], manifest["rows"]):
        for row in rows:
            row[-2] += "-earlier-version"  # its media fingerprints did not say "synchformer fp32"
    for clip in manifest["clips"]:
        clip["media_key"] += "-earlier-version"
    (out / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    train(tiny(features=out, run=run, steps=2), show_progress=False)
    split = (run / "split.json").read_text()
    summary = run_features(job(two_clips, out), show_progress=False)
    assert summary.encoded_media == 2  # re-encoded, once
    assert not torch.equal(TensorDict.load_memmap(out / "memmap")["sync_features"], memmap["sync_features"])
    with caplog.at_level("WARNING"):
        result = train(tiny(features=out, run=run, steps=3), resume=True, show_progress=False)
    assert result.steps == 3 and result.steps_this_run == 1
    assert sum("re-encoded since the run started" in r.getMessage() for r in caplog.records) == 1
    assert json.loads((run / "split.json").read_text())["train_ids"] == json.loads(split)["train_ids"]


def test_the_small_ones_of_the_fourth_pass(features, tmp_path, monkeypatch):
    """A last step skipped as not finite is said, and the card counts trained steps; `.*` as
    target_modules names what it matched; --overwrite keeps the old run until the new one has an
    adapter (a new run that fails before that leaves the old one as it was); the disk refusal
    states its margin."""
    import train.loop as loop

    real, calls = loop.training_loss, {"n": 0}

    def last_one_not_finite(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop, "training_loss", last_one_not_finite)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--profile", "tiny",
                                 "--steps", "3", "--batch-size", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "last training loss not finite: that step updated nothing" in result.output
    assert "1 step(s) had a loss that was not finite" in result.output
    card = (run / "adapter" / "README.md").read_text()
    assert "| steps | 2 trained, 1 more skipped: loss not finite (step 3 of 3;" in card
    monkeypatch.setattr(loop, "training_loss", real)

    with pytest.raises(UserError, match=r"target_modules '\.\*' matches \d+ module\(s\), \d+ of them holding layers.*"
                                        r"'' \(the whole network\) \(MMAudio\)"):
        train(tiny(features, tmp_path / "dotstar", target_modules=".*"), show_progress=False)

    before = _paths(run)
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    failing = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--profile", "tiny",
                                  "--steps", "30", "--batch-size", "2", "--lr", "1e4", "--device", "cpu",
                                  "--overwrite"])
    assert failing.exit_code == 1 and "training diverged" in failing.output
    assert _paths(run) == before and (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert not (tmp_path / ".run.previous").exists()
    replaced = train(tiny(features, run, steps=1), overwrite=True, show_progress=False)
    assert replaced.steps == 1 and not (tmp_path / ".run.previous").exists()

    import shutil as shutil_module

    disk = shutil_module.disk_usage
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: disk(path)._replace(free=5 * 2 ** 20))
    with pytest.raises(UserError, match=r"needed and 16.8 MB kept free as a margin, 5.2 MB free"):
        train(tiny(features, tmp_path / "full"), show_progress=False)
