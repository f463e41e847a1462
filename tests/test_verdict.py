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
from shared.errors import UserError
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
    assert split(ids, groups, 0.3) == (train, val)  # deterministic
    _, by_group = split(ids, groups, 0.3, val_groups=["c"])
    assert [ids[n] for n in by_group] == ["s7", "s8"]
    _, by_id = split(ids, groups, 0.3, val_ids=["s0"], val_groups=["c"])  # val_ids wins
    assert by_id == [0]
    _, tiny = split(ids, groups, 1e-9)  # at least one source, however small the fraction
    _, nearly_all = split(ids, groups, 0.999999)  # never every source
    assert len({groups[n] for n in tiny}) == 1 and len({groups[n] for n in nearly_all}) == 3
    with caplog.at_level("WARNING"):
        assert split(ids, ["one"] * 10, 0.3) == (list(range(10)), [])
    assert "one source video" in caplog.text


def test_split_stays_put_when_sources_are_added():
    """Each source is held out by its own name's hash: a 17th commercial moves none of the 16."""
    def held_out(sources: list[str]) -> set[str]:
        ids = [f"{source}_seg{k}" for source in sources for k in range(4)]
        groups = [source for source in sources for _ in range(4)]
        return {groups[n] for n in split(ids, groups, 0.2)[1]}

    sources = [f"commercial_{n:02d}.mp4" for n in range(16)]
    before = held_out(sources)
    assert 1 <= len(before) < 16
    for added in (f"commercial_{n:02d}.mp4" for n in range(16, 40)):
        assert held_out(sources + [added]) - {added} == before


def test_folds_hold_whole_sources_balanced_by_clips():
    from shared.features import source_folds

    groups = [g for g, n in zip("abcdefgh", [5, 4, 4, 3, 3, 2, 1, 1]) for _ in range(n)]
    ids = [f"clip{n}" for n in range(len(groups))]
    folds = source_folds(ids, groups, 4)
    assert sorted(i for fold in folds for i in fold) == sorted(ids)
    sources = [{groups[ids.index(i)] for i in fold} for fold in folds]
    assert all(not a & b for n, a in enumerate(sources) for b in sources[n + 1:])  # no source in two folds
    assert max(map(len, folds)) - min(map(len, folds)) <= 1  # 23 clips: 6, 6, 6, 5
    assert source_folds(ids, groups, 4) == folds  # deterministic
    with pytest.raises(UserError, match="--folds 9: needs 2 to 8"):
        source_folds(ids, groups, 9)


def test_groups_join_original_videos_and_title_folders(tmp_path):
    """A title folder holding cuts of two originals, and an original cut into two folders, are one
    source; without group columns the videos' folder under the root is the source."""
    from shared.clip_list import read_clip_list

    rows = [("A/1.mp4", "a.mp4", "A"), ("A/2.mp4", "b.mp4", "A"), ("B/1.mp4", "b.mp4", "B"),
            ("C/1.mp4", "c.mp4", "C"), ("D/1.mp4", "", "D")]
    both = tmp_path / "both.tsv"
    both.write_text("video_path\tstart_time\tend_time\tcaption\toriginal_video\ttitle_folder\n"
                    + "".join(f"{v}\t0\t1\tx\t{o}\t{t}\n" for v, o, t in rows))
    listed = read_clip_list(both, tmp_path)
    assert [c.group for c in listed] == ["a.mp4", "a.mp4", "a.mp4", "c.mp4", "D"]
    assert listed.grouping == "clips sharing an original_video or a title_folder are one source"
    bare = tmp_path / "bare.tsv"
    bare.write_text("video_path\tstart_time\tend_time\tcaption\n" + "".join(f"{v}\t0\t1\tx\n" for v, _, _ in rows)
                    + "loose.mp4\t0\t1\tx\n")
    listed = read_clip_list(bare, tmp_path)
    assert [c.group for c in listed] == ["A", "A", "B", "C", "D", "loose.mp4"]
    assert listed.grouping == "the video's folder under the video root (else the video file)"


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


def test_the_test_is_over_sources_exact_and_holm_adjusted():
    from evaluate.verdict import MIN_SOURCES, holm, judge, paired_test, sign_flip_p_value

    assert sign_flip_p_value([1.0] * 6) == pytest.approx(2 / 64)  # all 2^6 patterns: only ±all as extreme
    assert sign_flip_p_value([1.0, -1.0]) == 1.0
    assert sign_flip_p_value([3.0, 1.0, -1.0]) == pytest.approx(6 / 8)  # |sum| ≥ 3: +++, ++-, +-- and mirrors
    many = sign_flip_p_value([1.0] * 25)  # beyond 20 sources: a seeded Monte Carlo
    assert many == sign_flip_p_value([1.0] * 25) and many < 1e-4
    # clips of one source count once: ten segments of a commercial are one vote
    group_of = {f"a{k}": "A" for k in range(10)} | {"b": "B", "c": "C", "d": "D", "e": "E", "f": "F"}
    differences = {clip: -1.0 for clip in group_of} | {"nan-clip": math.nan}
    test = paired_test(differences, group_of)
    assert (test.groups, test.clips, test.left_out) == (6, 15, 1)
    assert test.p_value == pytest.approx(2 / 64) and test.delta == -1.0 and test.assessment == "better"
    assert paired_test({k: v for k, v in differences.items() if k not in "ef"}, group_of).assessment == "too few sources"
    assert MIN_SOURCES == 6
    assert holm({"x": 0.01, "y": 0.04, "z": None, "w": 0.03}) == pytest.approx({"x": 0.03, "y": 0.06, "z": None,
                                                                                 "w": 0.06}, nan_ok=True)
    # the same six sources, four metrics: Holm multiplies the smallest p by 4, so nothing can be called at 6
    tests = judge({metric: differences for metric in ("m1", "m2", "m3", "m4")}, group_of)
    assert {t.assessment for t in tests.values()} == {"too few sources"} and tests["m1"].p_holm == pytest.approx(0.125)
    eight = group_of | {"g": "G", "h": "H"}
    tests = judge({"m1": {c: -1.0 for c in eight}, "m2": {c: 0.1 * (-1) ** n for n, c in enumerate(eight)}}, eight)
    assert tests["m1"].assessment == "better" and tests["m2"].assessment == "no clear difference"


def test_no_effect_is_called_no_more_than_five_percent_of_the_time():
    """A simulation at the user's scale under no difference: 8-16 commercials of 2-9 correlated
    segments (a shared per-commercial offset, symmetric), three metrics per verdict. The verdict
    calls something better or worse in at most 5 % of datasets (allowing for the simulation's
    own spread), where an interval over clips did so in 25-50 %."""
    import numpy as np

    from evaluate.verdict import judge

    rng = np.random.default_rng(7)
    calls, datasets = 0, 400
    for _ in range(datasets):
        sources = int(rng.integers(8, 13))
        group_of = {f"s{s}_c{c}": f"s{s}" for s in range(sources) for c in range(int(rng.integers(2, 10)))}
        differences = {}
        for metric in ("flow_loss", "mel_l1", "desync"):
            offset = {f"s{s}": rng.standard_t(3) for s in range(sources)}
            differences[metric] = {clip: offset[g] + 0.3 * rng.standard_normal() for clip, g in group_of.items()}
        calls += any(t.assessment in ("better", "worse") for t in judge(differences, group_of).values())
    assert calls / datasets <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / datasets)


def test_verdict_sentences_say_what_was_decided():
    from evaluate.verdict import Evaluation, paired_test

    sources = {f"c{n}": f"s{n}" for n in range(8)}
    better = {c: -1.0 for c in sources}
    mixed = {c: 0.2 * (-1) ** n for n, c in enumerate(sources)}
    result = Evaluation("small_16k", "here", list(sources), {}, seeds=3, sources=8, group_of=sources)
    from evaluate.verdict import judge

    result.metrics = judge({"flow_loss": better, "mel_l1": mixed}, sources)
    assert result.verdict() == ("The fine-tune is better in validation flow loss; no clear difference in log-mel L1 "
                                "to the real audio.")
    assert "8 clips from 8 source videos, 3 seeds each" in result.basis()
    result.metrics = judge({"flow_loss": {c: -1.0 for c in list(sources)[:2]}}, sources)
    assert result.verdict().startswith("Too few source videos to tell: the clips come from 2 sources")
    assert json.loads(result.to_json())["metrics"]["flow_loss"]["assessment"] == "too few sources"
    assert paired_test({}, {}).assessment == "n/a"


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
                                 "--out", str(out), "--allow-trained"])
    assert result.exit_code == 0, result.output
    numbers = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert numbers["scales"]["1e+30"] == {"failed": True} and numbers["lora_scale"] == 1.0
    assert "failed (not finite)" in result.output
    assert numbers["desync"]["real"] is None  # clips under 4.8 s: n/a, written as null
    page = (tmp_path / "numbers" / "index.html").read_text()  # the report beside its JSON
    assert 'src="audio/c%231%3Fx_tuned.wav"' in page and 'src="images/c%231%3Fx_mel.png"' in page
    assert (tmp_path / "numbers" / "audio" / "c#1?x_tuned.wav").is_file()
    assert "failed: not finite" in page and "(the clip is under 4.8 s)" in page
    assert not math.isnan(numbers["val_flow_loss"]["tuned"])
