"""Cross-validation by source: every source judged by an adapter that never saw it (nor chose on it),
pooled over sources, resumable as one experiment; and evaluate never passes trained clips off as held out."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmaudio_lora.cli import app

runner = CliRunner()
FOLD_ARGS = ["--folds", "3", "--steps", "4", "--seeds", "1", "--eval-steps", "2", "--tuning-fraction", "0.3",
             "--lora-scale", "0.5,1"]


def _tree(folder: Path) -> dict[str, int]:
    """Every path under `folder` with its modification time: what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _no_passt(monkeypatch, tmp_path):
    from shared.runtime import Runtime
    from shared.weights import PASST_WEIGHTS, require

    monkeypatch.setattr(Runtime, "passt", lambda self: require(PASST_WEIGHTS, tmp_path / "no-weights"))


@pytest.fixture(scope="module")
def crossval_run(features, tmp_path_factory):
    """Three folds of the six one-clip sources, a tuning set inside each fold, two strengths: first
    without PaSST's weights, then continued once they are there (the judge arriving midway)."""
    run = tmp_path_factory.mktemp("crossval") / "cv"
    config = run.parent / "train.toml"
    config.write_text('profile = "tiny"\ndevice = "cpu"\nbatch_size = 2\nlr = 1e-2\nwarmup_steps = 1\n'
                      'val_every = 2\ncheckpoint_every = 2\n')
    args = ["crossval", "--features", str(features), "--run", str(run), "--config", str(config), *FOLD_ARGS]
    with pytest.MonkeyPatch.context() as patch:
        _no_passt(patch, run.parent)
        first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    before = {"crossval": json.loads((run / "crossval.json").read_text()),
              "folds": [json.loads((run / f"fold-{k}" / "evaluation.json").read_text()) for k in range(3)],
              "adapters": [(run / f"fold-{k}" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
                           for k in range(3)]}
    import evaluate.held_out as held_out

    calls = {"flow": 0, "desync": 0}
    with pytest.MonkeyPatch.context() as patch:
        flow, desync = held_out._flow_losses, held_out.Judges.desync

        def counted_flow(*a, **k):
            calls["flow"] += 1
            return flow(*a, **k)

        def counted_desync(*a, **k):
            calls["desync"] += 1
            return desync(*a, **k)

        patch.setattr(held_out, "_flow_losses", counted_flow)
        patch.setattr(held_out.Judges, "desync", counted_desync)
        second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    return run, second.output, before, calls


def test_every_clip_is_judged_by_a_fold_that_never_saw_its_source(crossval_run, features):
    run, output, _, _ = crossval_run
    numbers = json.loads((run / "crossval.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    all_ids = [line.split("\t")[0] for line in (features / "clips.tsv").read_text().splitlines()[1:]]
    judged = [clip for fold in numbers["folds"] for clip in fold["val_ids"]]
    assert sorted(judged) == sorted(all_ids) and len(numbers["folds"]) == 3
    for k, fold in enumerate(numbers["folds"]):
        split = json.loads((run / f"fold-{k}" / "split.json").read_text())
        assert split["val_ids"] == fold["val_ids"]  # an ordinary run: the fold's sources are its held-out set
        held = {split["group_of"][i] for i in split["val_ids"]}
        seen = {split["group_of"][i] for i in split["train_ids"] + split["tuning_ids"]}
        assert split["tuning_ids"] and not held & seen  # choices made on its own training side
        assert fold["val_groups"] == sorted(held)
        evaluated = json.loads((run / f"fold-{k}" / "evaluation.json").read_text())
        assert evaluated["clips"] == fold["val_ids"]
    assert set(numbers["per_clip"]["flow_loss"]) == set(all_ids)
    metric = numbers["metrics"]["flow_loss"]
    assert set(metric) >= {"delta", "ci95", "p_value", "p_holm", "assessment", "clips", "groups"}
    assert (metric["clips"], metric["groups"]) == (6, 6)
    assert "kl_passt" in numbers["metrics"] and numbers["kad_passt"]["base"] is not None
    assert metric["assessment"] == "too few sources"  # six sources, four metrics under Holm: eight are needed
    assert numbers["verdict"] in output and "at least 8" in numbers["verdict"]
    assert "about these 3 adapters" in numbers["verdict"] and numbers["repeats"] == 1
    # the settings the adapters were trained and judged with, and every fold's notes
    trained = numbers["settings"]["training"]
    assert (trained["steps"], trained["lr"], trained["batch_size"], trained["tuning_fraction"]) == (4, 0.01, 2, 0.3)
    assert numbers["settings"]["judging"]["seeds"] == 1 and numbers["steps"] == 4
    assert any("separate tuning clips" in note for note in numbers["notes"])
    assert "sampling steps" in output and "each fold trained 4 steps" in output
    # the step advice says where it was chosen and trains a new run with the folds' recipe
    assert isinstance(numbers["best_step"], int) and f"--steps {numbers['best_step']}" in output
    assert "chosen on the clips that judged" in output and f"--config {run / 'train.toml'}" in output
    assert (run / "train.toml").is_file() and f"--run {run.parent / ('cv-' + str(numbers['best_step']) + '-steps')}" \
        in output.replace("\n", "")
    # the strengths explored are pooled too
    assert set(numbers["scales"]) == {"0.5", "1"} and "flow_loss" in numbers["scales"]["0.5"]["tests"]
    assert "scale 0.5" in output
    page = (run / "crossval" / "index.html").read_text()
    assert "Per source" in page and "fold-2.png" in page and (run / "crossval" / "images" / "fold-0.png").is_file()
    assert "Adapter strengths (exploratory)" in page


def test_the_report_lets_you_listen_to_every_held_out_clip(crossval_run):
    """Per clip, the real, base and tuned audio and the spectrograms, from the fold that held it out
    (the folds keep them), each fold's run and evaluation linked."""
    run, _, _, _ = crossval_run
    page = (run / "crossval" / "index.html").read_text()
    numbers = json.loads((run / "crossval.json").read_text())
    for fold in numbers["folds"]:
        for clip in fold["val_ids"]:
            for key in ("real", "base", "tuned"):
                link = f"../{Path(fold['run']).name}/evaluation/audio/{clip}_{key}.wav"
                assert link in page and (run / "crossval" / link).resolve().is_file()
            assert f"../{Path(fold['run']).name}/evaluation/images/{clip}_mel.png" in page
        assert f"../{Path(fold['run']).name}/evaluation/index.html" in page


def test_a_judge_that_arrives_midway_is_scored_for_every_fold_and_only_for_its_metrics(crossval_run):
    run, output, before, calls = crossval_run
    assert "kl_passt" not in before["crossval"]["metrics"] and before["crossval"]["kad_passt"] == {}
    assert any("KL_PaSST and KAD left out" in note for note in before["crossval"]["notes"])
    numbers = json.loads((run / "crossval.json").read_text())
    assert not any("left out" in note for note in numbers["notes"]) and "left out" not in output
    assert numbers["metrics"]["kl_passt"]["clips"] == 6  # every fold's clips, not the last fold's
    assert calls == {"flow": 0, "desync": 0}  # only KL_PaSST was scored again
    for k in range(3):
        after = json.loads((run / f"fold-{k}" / "evaluation.json").read_text())
        assert after["per_clip"]["flow_loss"] == before["folds"][k]["per_clip"]["flow_loss"]
        assert after["judges"] == {"desync": True, "passt": True} and before["folds"][k]["judges"]["passt"] is False
        assert (run / f"fold-{k}" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == \
            before["adapters"][k]


def test_a_finished_cross_validation_is_one_experiment(crossval_run, features):
    """Continued with the same settings it does nothing again; with any other setting it is refused,
    naming each, and nothing on disk changes."""
    run, _, _, _ = crossval_run
    config = run.parent / "train.toml"
    watched = [run / "fold-1" / "adapter" / "adapter_model.safetensors", run / "fold-1" / "evaluation.json",
               run / "fold-2" / "metrics.jsonl"]
    before = [path.stat().st_mtime_ns for path in watched]
    base = ["crossval", "--features", str(features), "--run", str(run), "--config", str(config)]
    again = runner.invoke(app, base + FOLD_ARGS)
    assert again.exit_code == 0, again.output
    assert [path.stat().st_mtime_ns for path in watched] == before
    tree = _tree(run.parent)
    changed_config = run.parent / "other.toml"
    changed_config.write_text(config.read_text().replace("lr = 1e-2", "lr = 3e-3"))
    other = runner.invoke(app, ["crossval", "--features", str(features), "--run", str(run), "--config",
                                str(changed_config), "--folds", "3", "--steps", "2", "--seeds", "1", "--eval-steps",
                                "2", "--tuning-fraction", "0.2", "--lora-scale", "0.5,1", "--batch-size", "1"])
    assert other.exit_code == 1
    message = " ".join(other.output.split())
    for change in ("lr 0.01 → 0.003", "steps 4 → 2", "tuning_fraction 0.3 → 0.2", "batch_size 2 → 1"):
        assert change in message
    assert "--overwrite" in message and "another --run" in message
    changed_config.unlink()
    assert _tree(run.parent) == tree
    folds = runner.invoke(app, base + ["--folds", "2", "--steps", "4"])
    assert folds.exit_code == 1 and "folds 3 → 2" in " ".join(folds.output.split())
    assert _tree(run.parent) == tree


def test_a_moved_project_continues(crossval_run, features, tmp_path, caplog):
    """The features and the cross-validation copied elsewhere: recognised by content, nothing trained
    or scored again, the new places said and recorded."""
    run, _, _, _ = crossval_run
    moved_features, moved_run = tmp_path / "features", tmp_path / "cv"
    shutil.copytree(features, moved_features)
    shutil.copytree(run, moved_run)
    adapters = [(moved_run / f"fold-{k}" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
                for k in range(3)]
    evaluations = [(moved_run / f"fold-{k}" / "evaluation.json").read_text() for k in range(3)]
    with caplog.at_level("WARNING"):
        result = runner.invoke(app, ["crossval", "--features", str(moved_features), "--run", str(moved_run),
                                     "--config", str(run.parent / "train.toml"), *FOLD_ARGS])
    assert result.exit_code == 0, result.output
    assert any("now at" in r.getMessage() and str(moved_features) in r.getMessage() for r in caplog.records)
    for k in range(3):
        fold = moved_run / f"fold-{k}"
        assert (fold / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapters[k]
        assert (fold / "evaluation.json").read_text() == evaluations[k]
        assert json.loads((fold / "config.json").read_text())["features"] == [str(moved_features)]
    assert json.loads((moved_run / "crossval_plan.json").read_text())["feature_folders"] == [str(moved_features)]


def test_no_fold_chooses_on_the_clips_that_judge_it(features, tmp_path):
    """Early stopping without tuning clips (--tuning-fraction 0, or a fold whose training side is one
    source) is refused before anything is written."""
    from evaluate.crossval import Fold, check_choices
    from train.config import TrainConfig

    config = tmp_path / "train.toml"
    config.write_text('profile = "tiny"\ndevice = "cpu"\nearly_stopping_patience = 2\n')
    result = runner.invoke(app, ["crossval", "--features", str(features), "--run", str(tmp_path / "cv"), "--config",
                                 str(config), "--folds", "3", "--steps", "2", "--tuning-fraction", "0"])
    assert result.exit_code == 1 and "--tuning-fraction is 0" in result.output
    assert not (tmp_path / "cv").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["train.toml"]
    groups = {"a1": "A", "a2": "A", "b1": "B"}
    settings = TrainConfig(early_stopping_patience=2, tuning_fraction=0.5)
    with pytest.raises(Exception, match="its training side is one source \\(A\\)"):
        check_choices(settings, [Fold(0, 0, ["b1"], tmp_path / "f0")], groups)
    check_choices(TrainConfig(tuning_fraction=0.5), [Fold(0, 0, ["b1"], tmp_path / "f0")], groups)  # no choice


def _odd_features(features: Path, folder: Path) -> dict[str, str]:
    """A copy of the feature folder whose ids, captions and sources hold characters that mean
    something in TeX, HTML or a TSV ($, <, &, quotes, newlines, non-ASCII)."""
    shutil.copytree(features, folder)
    with open(features / "clips.tsv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    names = ["promo_$5_off_$10", "<b>bold</b> & co", 'say "hi" \'there\'', "two\nlines", "café_über_日本", "x$^{2}$"]
    groups = {}
    with open(folder / "clips.tsv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "label", "group"])
        for n, row in enumerate(rows):
            clip = f"{row['id']}_$<&'é"
            groups[clip] = names[n % len(names)]
            writer.writerow([clip, f"caption {n} $x$ <i>&amp;", groups[clip]])
    return groups


def test_names_are_text_everywhere_and_repeats_average_their_judges(features, tmp_path):
    """Source names, ids and captions with $, <, &, quotes, newlines and non-ASCII go through crossval
    (two repeats) and evaluate to the end, and the pages show them as given; each clip's number is
    the mean of its two judges; --overwrite starts a new experiment in the folder."""
    import html

    odd = tmp_path / "odd"
    groups = _odd_features(features, odd)
    run = tmp_path / "cv"
    config = tmp_path / "train.toml"
    config.write_text('profile = "tiny"\ndevice = "cpu"\nbatch_size = 2\nwarmup_steps = 1\nval_every = 1\n')
    args = ["crossval", "--features", str(odd), "--run", str(run), "--config", str(config), "--folds", "2",
            "--steps", "1", "--seeds", "1", "--eval-steps", "1", "--tuning-fraction", "0"]
    result = runner.invoke(app, args + ["--repeats", "2"])
    assert result.exit_code == 0, result.output
    assert not [p for p in run.rglob("*.tmp")]
    page = (run / "crossval" / "index.html").read_text()
    for name in groups.values():
        assert html.escape(name) in page
    numbers = json.loads((run / "crossval.json").read_text())
    assert numbers["repeats"] == 2 and len(numbers["folds"]) == 4 and "speaks of the recipe" in numbers["verdict"]
    assert (run / "repeat-1" / "fold-0" / "adapter").is_dir()
    first, second = [json.loads((Path(f["run"]) / "evaluation.json").read_text()) for f in numbers["folds"]
                     if f["repeat"] == 0], [json.loads((Path(f["run"]) / "evaluation.json").read_text())
                                            for f in numbers["folds"] if f["repeat"] == 1]
    clip = next(iter(numbers["per_clip"]["flow_loss"]))
    judged = [e["per_clip"]["flow_loss"][clip]["tuned"] for e in first + second if clip in e["per_clip"]["flow_loss"]]
    assert len(judged) == 2 and numbers["per_clip"]["flow_loss"][clip]["tuned"] == pytest.approx(sum(judged) / 2)
    assert any("chose nothing" in note for note in numbers["notes"])  # no tuning clips: the last adapter
    fold_page = (run / "fold-0" / "evaluation" / "index.html").read_text()
    evaluated = runner.invoke(app, ["evaluate", "--run", str(run / "fold-0"), "--steps", "1", "--seeds", "1",
                                    "--out", str(tmp_path / "e" / "evaluation.json")])
    assert evaluated.exit_code == 0, evaluated.output
    page = (tmp_path / "e" / "evaluation" / "index.html").read_text()
    assert "caption" in fold_page and html.escape("$x$ <i>&amp;") in page
    assert any(html.escape(clip) in page for clip in groups)
    again = runner.invoke(app, args + ["--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads((run / "crossval.json").read_text())["repeats"] == 1 and not (run / "repeat-1").exists()


def test_evaluate_refuses_clips_the_adapter_trained_on(trained_run, features, tmp_path):
    split = json.loads((trained_run / "split.json").read_text())
    trained = split["train_ids"][0]
    result = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--features", str(features), "--id", trained,
                                 "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 1
    assert f"trained on (or chose on) 1 clip(s) ({trained})" in result.output and "--allow-trained" in result.output
    held = split["val_ids"][0]
    allowed = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--features", str(features), "--id", held,
                                  "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "e.json")])
    assert allowed.exit_code == 0, allowed.output  # a held-out clip of the run passes


def test_evaluate_without_the_passt_weights_leaves_kl_passt_out(trained_run, tmp_path, monkeypatch, caplog):
    """The PaSST file is optional: evaluate runs, and says once what it left out and how to fetch it."""
    _no_passt(monkeypatch, tmp_path)
    with caplog.at_level("WARNING"):
        result = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--steps", "1", "--seeds", "1",
                                     "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert "kl_passt" not in numbers["metrics"] and numbers["kad_passt"] == {} and numbers["kl_passt"] == {}
    assert "KL_PaSST and KAD left out" in result.output and "mmaudio-lora download" in result.output
    assert sum("KL_PaSST left out" in r.getMessage() for r in caplog.records) == 1
    assert not math.isnan(numbers["metrics"]["flow_loss"]["delta"])


def test_output_folders_never_nest(trained_run, features, tmp_path):
    """A cross-validation, run or feature folder inside another folder of ours is refused; a run
    holding anything training did not write for it is not deleted by --overwrite; make's derived
    names drop a trailing slash."""
    import subprocess

    inside = runner.invoke(app, ["crossval", "--features", str(features), "--run", str(trained_run / "-crossval"),
                                 "--folds", "2", "--steps", "1"])
    assert inside.exit_code == 1 and "is inside the training run" in inside.output
    assert not (trained_run / "-crossval").exists()
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "my_notes.txt").write_text("mine")
    config = tmp_path / "t.toml"
    config.write_text('profile = "tiny"\ndevice = "cpu"\n')
    refused = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--config", str(config),
                                  "--steps", "1", "--overwrite"])
    assert refused.exit_code == 1 and "my_notes.txt" in refused.output and (run / "my_notes.txt").read_text() == "mine"
    (run / "my_notes.txt").unlink()
    (run / "-crossval").mkdir()
    (run / "-crossval" / ".mmaudio-lora").write_text('{"tool": "mmaudio-lora", "kind": "crossval"}')
    nested = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--config", str(config),
                                 "--steps", "1", "--overwrite"])
    assert nested.exit_code == 1 and "holds a cross-validation" in nested.output and (run / "-crossval").is_dir()
    assert (run / "adapter").is_dir()
    made = subprocess.run(["make", "-n", "crossval", "RUN=data/runs/x/"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert "--run data/runs/x-crossval" in made.stdout


def test_the_table_s_columns_never_run_together():
    from evaluate.verdict import Evaluation, PairedTest

    result = Evaluation("v", "here", ["a"], {"steps": 25, "cfg_strength": 4.5, "seed": 42})
    result.metrics["flow_loss"] = PairedTest(-0.000711, [-0.000764123, -0.000659123], 0.0312, 12, 40, p_holm=0.0312,
                                             assessment="no clear difference")
    line = next(line for line in result.table().splitlines() if line.startswith("validation flow loss"))
    assert "]  0.0312" in line


def test_the_sign_flip_test_refuses_what_is_not_finite():
    from evaluate.verdict import sign_flip_p_value

    with pytest.raises(ValueError, match="finite"):
        sign_flip_p_value([1.0, math.nan, 2.0])


def test_kad_interval_contains_its_estimate_under_no_difference():
    """Resampled sources never pair a clip with its own copy: under no difference the interval holds
    its point estimate in at least 90 % of cases (pairing copies missed it 19 times in 20)."""
    import numpy as np
    import torch

    from evaluate.kad import kad_by_source

    rng = np.random.default_rng(3)
    inside, cases = 0, 30
    for _ in range(cases):
        clips = [f"c{i}" for i in range(18)]
        group_of = {c: f"s{i // 3}" for i, c in enumerate(clips)}
        real = {c: torch.tensor(rng.standard_normal((1, 6))) for c in clips}
        generated = {c: torch.tensor(rng.standard_normal((2, 6))) for c in clips}
        value, (low, high) = kad_by_source(real, generated, group_of)
        inside += low <= value <= high
    assert inside >= 0.9 * cases


def test_a_report_that_fails_leaves_no_staging_folder(tmp_path, monkeypatch):
    """The report is staged in a folder of its own and put in place whole; when writing it fails,
    neither the staging folder nor a half report is left."""
    import evaluate.report as report
    from evaluate.verdict import CrossValidation

    def broken(*args):
        raise RuntimeError("a plot failed")

    monkeypatch.setattr(report, "_listening", broken)
    result = CrossValidation("v", "here", [], {"steps": 1, "cfg_strength": 4.5, "seed": 42})
    with pytest.raises(RuntimeError):
        report.write_crossval_report(tmp_path / "crossval", result)
    assert list(tmp_path.iterdir()) == []
