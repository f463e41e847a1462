"""Cross-validation by source: every source judged by an adapter that never saw it (nor chose on it),
pooled over sources, resumable; and evaluate never passes trained clips off as held out."""
from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from mmaudio_lora.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def crossval_run(features, tmp_path_factory):
    """Three folds of the six one-clip sources, a tuning set inside each fold."""
    run = tmp_path_factory.mktemp("crossval") / "cv"
    config = run.parent / "train.toml"
    config.write_text('profile = "tiny"\ndevice = "cpu"\nbatch_size = 2\nlr = 1e-2\nwarmup_steps = 1\n'
                      'val_every = 2\ncheckpoint_every = 2\n')
    result = runner.invoke(app, ["crossval", "--features", str(features), "--run", str(run), "--config", str(config),
                                 "--folds", "3", "--steps", "4", "--seeds", "1", "--eval-steps", "2",
                                 "--tuning-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    return run, result.output


def test_every_clip_is_judged_by_a_fold_that_never_saw_its_source(crossval_run, features):
    run, output = crossval_run
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
    assert isinstance(numbers["best_step"], int) and f"--steps {numbers['best_step']}" in output
    page = (run / "crossval" / "index.html").read_text()
    assert "Per source" in page and "fold-2.png" in page and (run / "crossval" / "images" / "fold-0.png").is_file()


def test_a_finished_cross_validation_is_neither_trained_nor_scored_again(crossval_run, features):
    run, _ = crossval_run
    watched = [run / "fold-1" / "adapter" / "adapter_model.safetensors", run / "fold-1" / "evaluation.json",
               run / "fold-2" / "metrics.jsonl"]
    before = [path.stat().st_mtime_ns for path in watched]
    config = run.parent / "train.toml"
    again = runner.invoke(app, ["crossval", "--features", str(features), "--run", str(run), "--config", str(config),
                                "--folds", "3", "--steps", "4", "--seeds", "1", "--eval-steps", "2",
                                "--tuning-fraction", "0.3"])
    assert again.exit_code == 0, again.output
    assert [path.stat().st_mtime_ns for path in watched] == before
    other = runner.invoke(app, ["crossval", "--features", str(features), "--run", str(run), "--config", str(config),
                                "--folds", "2", "--steps", "4"])
    assert other.exit_code == 1 and "other folds or features" in other.output


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
    from shared.runtime import Runtime
    from shared.weights import PASST_WEIGHTS, require

    monkeypatch.setattr(Runtime, "passt", lambda self: require(PASST_WEIGHTS, tmp_path / "no-weights"))
    with caplog.at_level("WARNING"):
        result = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--steps", "1", "--seeds", "1",
                                     "--out", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert "kl_passt" not in numbers["metrics"] and numbers["kad_passt"] == {} and numbers["kl_passt"] == {}
    assert "KL_PaSST and KAD left out" in result.output and "mmaudio-lora download" in result.output
    assert sum("KL_PaSST left out" in r.getMessage() for r in caplog.records) == 1
    assert not math.isnan(numbers["metrics"]["flow_loss"]["delta"])
