"""A verdict you can trust: validation by source video, the run's recorded split, the v2 dropout
recipe, intervals, and a report that survives odd ids and a failed strength."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmaudio_lora.cli import app
from precompute.demo_clips import ClipSpec, write_clip
from precompute.run import FeatureJob, run_features
from shared.features import split
from shared.runtime import Runtime

runner = CliRunner()
SEGMENTS = 2  # per source video


def _segment_list(path: Path, sources: list[str]) -> Path:
    """The first user's schema: segments of a few source videos, with original_video and title_folder."""
    lines = ["video_path\tstart_time\tend_time\tcaption\toriginal_video\ttitle_folder"]
    for source in sources:
        for k in range(SEGMENTS):
            lines.append(f"{source}/seg_{k}.mp4\t0\t1.5\t{source} part {k}\t{source}_full.mp4\t{source}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_sources(videos: Path, sources: list[str]) -> None:
    for n, source in enumerate(sources):
        for k in range(SEGMENTS):
            write_clip(videos / source / f"seg_{k}.mp4", ClipSpec(1.5, width=48, height=32, seed=10 * n + k,
                                                                  tone_hz=300 + 150 * n))


def test_validation_holds_out_whole_sources_and_evaluate_keeps_the_run_s_split(tmp_path, caplog):
    videos, features = tmp_path / "videos", tmp_path / "features"
    sources = ["commercial_a", "commercial_b", "commercial_c"]
    _write_sources(videos, sources)
    job = FeatureJob(tsv=_segment_list(tmp_path / "clips.tsv", sources), video_root=videos, out=features,
                     runtime=Runtime(mode="16k", profile="tiny"), workers=0)
    run_features(job, show_progress=False)
    rows = (features / "clips.tsv").read_text().splitlines()
    assert rows[0] == "id\tlabel\tgroup" and rows[1].endswith("\tcommercial_a_full.mp4")

    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--profile", "tiny",
                                  "--steps", "2", "--batch-size", "2", "--val-fraction", "0.34"])
    assert trained.exit_code == 0, trained.output
    recorded = json.loads((run / "split.json").read_text())
    held = {recorded["group_of"][i] for i in recorded["val_ids"]}
    trained_on = {recorded["group_of"][i] for i in recorded["train_ids"]}
    assert len(recorded["val_ids"]) == SEGMENTS and len(held) == 1 and not held & trained_on
    assert "validation: 2 clips from 1 source video (none of their segments in training)" in trained.output

    # clips added to the features later are never in the run's validation split
    _write_sources(videos, ["commercial_d"])
    run_features(replace(job, tsv=_segment_list(tmp_path / "more.tsv", sources + ["commercial_d"])), show_progress=False)
    with caplog.at_level("WARNING"):
        evaluated = runner.invoke(app, ["evaluate", "--run", str(run), "--steps", "1", "--seeds", "1",
                                        "--out", str(tmp_path / "evaluation.json")])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "evaluation.json").read_text())["clips"] == recorded["val_ids"]
    assert any("changed since the run started (2 clip(s) added)" in r.getMessage() for r in caplog.records)


def test_split_by_group_rules(caplog):
    ids = [f"s{n}" for n in range(10)]
    groups = ["a"] * 4 + ["b"] * 3 + ["c"] * 2 + ["d"]
    train, val = split(ids, groups, 0.3)
    held = {groups[n] for n in val}
    assert held and not held & {groups[n] for n in train}  # whole groups
    assert abs(len(val) - 3) <= 1  # the fraction, rounded to whole groups
    assert split(ids, groups, 0.3) == (train, val)  # deterministic
    _, by_group = split(ids, groups, 0.3, val_groups=["c"])
    assert [ids[n] for n in by_group] == ["s7", "s8"]
    _, by_id = split(ids, groups, 0.3, val_ids=["s0"], val_groups=["c"])  # val_ids wins
    assert by_id == [0]
    with caplog.at_level("WARNING"):
        assert split(ids, ["one"] * 10, 0.3) == (list(range(10)), [])
    assert "one source video" in caplog.text


def test_a_feature_folder_without_groups_keeps_working(features, tmp_path, caplog):
    from shared.features import FeatureSet, data_dim
    from shared.profiles import feature_dims
    from shared.models.sequence import SequenceConfig

    old = tmp_path / "old"
    shutil.copytree(features, old)
    rows = [line.rsplit("\t", 1)[0] for line in (old / "clips.tsv").read_text().splitlines()]
    (old / "clips.tsv").write_text("\n".join(rows) + "\n")  # id, label: as written before groups
    with caplog.at_level("WARNING"):
        for _ in range(2):
            clips = FeatureSet.load([str(old)], data_dim(SequenceConfig("16k"), feature_dims("tiny")), 8.0)
    assert clips.groups == clips.ids  # each clip its own source
    assert caplog.text.count("no `group` column") == 1  # said once


def test_v2_networks_drop_clip_and_sync_independently_v1_together(monkeypatch):
    import train.objective as objective
    from shared.lora import base_network
    from shared.models.sequence import SequenceConfig

    drawn = {}
    real = objective.apply_null_conditions

    def spy(network, batch, drop_clip, drop_sync, drop_text):
        drawn.update(clip=drop_clip.clone(), sync=drop_sync.clone(), text=drop_text.clone())
        return real(network, batch, drop_clip, drop_sync, drop_text)

    monkeypatch.setattr(objective, "apply_null_conditions", spy)
    for variant, independent in (("small_16k", False), ("large_44k_v2", True)):
        network = base_network("tiny", None, variant)[0]
        assert network.config.v2 == independent
        seq = SequenceConfig(network.config.mode, 1.0)
        network.update_seq_lengths(seq.latent_seq_len, seq.clip_seq_len, seq.sync_seq_len)
        g, size, c = torch.Generator().manual_seed(0), 64, network.config
        batch = {"a_mean": torch.randn(size, seq.latent_seq_len, c.latent_dim, generator=g),
                 "a_std": torch.rand(size, seq.latent_seq_len, c.latent_dim, generator=g),
                 "clip_features": torch.randn(size, seq.clip_seq_len, c.clip_dim, generator=g),
                 "sync_features": torch.randn(size, seq.sync_seq_len, c.sync_dim, generator=g),
                 "text_features": torch.randn(size, 77, c.text_dim, generator=g), "duration_sec": torch.ones(size)}
        with torch.no_grad():
            objective.training_loss(network, batch, seq, torch.Generator().manual_seed(1), null_probability=0.5)
        assert 10 < int(drawn["clip"].sum()) < 54 and 10 < int(drawn["sync"].sum()) < 54
        assert torch.equal(drawn["clip"], drawn["sync"]) != independent
        assert not torch.equal(drawn["clip"], drawn["text"])  # text is always its own draw


def test_intervals_decide_the_verdict():
    from generate.verdict import Evaluation, assessment, bootstrap_interval

    assert bootstrap_interval([0.5]) is None  # one clip: no interval
    low, high = bootstrap_interval([-0.30, -0.20, -0.25, -0.35])
    assert -0.35 <= low < -0.275 < high <= -0.2  # around the mean, inside the values
    assert bootstrap_interval([-0.30, -0.20, -0.25, -0.35]) == (low, high)  # a fixed resampling seed
    assert assessment((low, high)) == "better" and assessment((-0.1, 0.2)) == "no clear difference"
    assert assessment((0.1, 0.2)) == "worse" and assessment(None) == "n/a"
    result = Evaluation("small_16k", "here", ["a", "b", "c"], {}, seeds=3, sources=2,
                        ci95={"flow_loss": [-0.3, -0.1], "mel_l1": [-0.001, 0.002], "desync": None})
    assert result.verdict() == ("The fine-tune is better in validation flow loss; no clear difference in log-mel L1 "
                                "to the real audio.")
    assert "3 held-out clips from 2 source videos, 3 seeds each" in result.basis()
    result.ci95["flow_loss"] = [-0.3, 0.1]  # a change whose interval holds zero is never called better
    assert result.verdict().startswith("No clear difference")


def test_odd_ids_and_a_failed_strength(trained_run, features, tmp_path):
    """Clip ids with # and ? (legal file names) keep working links; a strength whose scores are
    not finite is shown as failed, never chosen, and the JSON stays strict (null, not NaN)."""
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    tsv = (copy / "clips.tsv").read_text().replace("c1\t", "c#1?x\t", 1)
    (copy / "clips.tsv").write_text(tsv)
    out = tmp_path / "numbers.json"
    result = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--features", str(copy), "--id", "c#1?x",
                                 "--id", "c0", "--steps", "1", "--seeds", "1", "--lora-scale", "1e30,1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert numbers["scales"]["1e+30"] == {"failed": True} and numbers["lora_scale"] == 1.0
    assert "failed (not finite)" in result.output
    assert numbers["desync"]["real"] is None  # clips under 4.8 s: n/a, written as null
    page = (trained_run / "evaluation" / "index.html").read_text()
    assert 'src="audio/c%231%3Fx_tuned.wav"' in page and 'src="images/c%231%3Fx_mel.png"' in page
    assert (trained_run / "evaluation" / "audio" / "c#1?x_tuned.wav").is_file()
    assert "failed: not finite" in page and "(the clip is under 4.8 s)" in page
    assert not math.isnan(numbers["val_flow_loss"]["tuned"])
