"""Cross-validation by source video: the verdict that holds at a user's scale.

With a few commercials a single held-out split judges one to three of them, and its choices
(best adapter, strength) are made on the clips that judge them. Here the sources are split into
K folds of whole sources (balanced by clip count); fold k trains an adapter on the other folds in
RUN/fold-k/ (an ordinary run folder: its split.json holds the fold's sources out), makes its
choices only on tuning sources drawn from its own training side (a fold without them trains to its
last step and chooses nothing), and is scored on exactly its held-out clips. Pooled, every clip has
a paired difference (tuned − base) from an adapter that never saw its source, and the test is over
all sources (evaluate/verdict.py). With `repeats` R > 1, R such cross-validations with other folds
and training seeds judge every source R times, averaged before the test.

    RUN/.mmaudio-lora       marks the folder as a cross-validation of ours
    RUN/crossval_plan.json  the experiment: every setting that changes what is trained or judged,
                            the features' content, the folds of every repeat
    RUN/fold-k/             fold k's run (train), its evaluation.json, its report evaluation/ (the
                            audio of its held-out clips) and embeddings.safetensors;
                            RUN/repeat-r/fold-k/ for the later repeats
    RUN/train.toml          the recipe the folds trained with, for the adapter you keep
    RUN/crossval.json       settings, folds, per_clip, metrics (tests over sources, Holm), verdict, notes
    RUN/crossval/index.html the report

It resumes: a fold whose adapter is written is not trained again, a fold already scored with the
same settings and judges is not scored again (one scored before PaSST's weights arrived is scored
again for KL_PaSST only), and a killed run continues from its checkpoints. Continuing with other
settings is refused, naming each one. This module composes the stages (train, generate), as the
CLI does; the stages stay apart.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from evaluate.held_out import (Judges, RealAudio, Scored, Scores, check_scoring, explore, held_out_clips, mean_of,
                               score_held_out, summarise, write_evaluation_report)
from evaluate.kad import kad_by_source
from evaluate.report import write_crossval_report
from evaluate.verdict import METRICS, MODELS, CrossValidation, Evaluation, differences_of, judge
from generate.model import ModelSource
from shared.errors import UserError
from shared.features import feature_fingerprint, feature_groups, source_folds, source_hash
from shared.outputs import MARKER, atomic_path, atomic_write_text, check_output_folder, folder_lock, mark_output_folder
from shared.run_record import (CONFIG_FILE, EMBEDDINGS_FILE, EVALUATION_FILE, Split, read_json, read_metrics_log,
                               read_run_config)
from shared.synthesis import SamplingSettings
from train.config import TrainConfig
from train.loop import train

log = logging.getLogger(__name__)
PLAN_FILE = "crossval_plan.json"
RESULT_FILE = "crossval.json"
RECIPE_FILE = "train.toml"
REPORT_FOLDER = "crossval"
FOLD_REPORT = "evaluation"
# Training settings that say where or how a fold runs, not what it trains: they may change between
# runs of one cross-validation (the features are identified by content, the checkpoint by name).
HOW_NOT_WHAT = frozenset({"run", "features", "device", "weights_dir", "log_every", "checkpoint_every", "keep_last",
                          "sample_every", "sample_clips", "sample_steps", "sample_cfg", "compile",
                          "gradient_checkpointing", "max_nonfinite_steps", "val_ids"})


@dataclass
class CrossvalJob:
    config: TrainConfig  # what every fold trains with (features, profile, variant, steps, lr, ...)
    run: Path
    folds: int = 4
    tuning_fraction: float = 0.1  # of each fold's training sources, for its choices (0: none, the last adapter)
    seeds: int = 3
    sampling: SamplingSettings = SamplingSettings()
    lora_scales: tuple[float, ...] = (1.0,)
    batch_size: int = 4  # clips per batch when scoring
    repeats: int = 1  # cross-validations with other folds and training seeds, averaged per source
    overwrite: bool = False  # a new experiment in a folder holding another


@dataclass
class Fold:
    repeat: int
    index: int
    val_ids: list[str]
    run: Path

    @property
    def name(self) -> str:
        return f"fold {self.index}" + (f" of repeat {self.repeat}" if self.repeat else "")


def crossval(job: CrossvalJob, show_progress: bool = True) -> CrossValidation:
    """Train and score every fold (resuming what is done), pool, test over sources, write the JSON
    and the report. Everything is checked before anything is written; a cross-validation continued
    with other settings is refused and nothing on disk changes."""
    started = time.perf_counter()
    check_scoring(job.lora_scales, job.seeds, job.sampling)
    if not 0 <= job.tuning_fraction < 1:
        raise UserError(f"--tuning-fraction must be in [0, 1), not {job.tuning_fraction}")
    if job.repeats < 1:
        raise UserError(f"--repeats must be at least 1, not {job.repeats}")
    config = replace(job.config, val_fraction=0.0, val_ids=[], val_groups=[],
                     tuning_fraction=job.tuning_fraction).validate().resolved()
    if config.seed + job.repeats > 2 ** 64:
        raise UserError(f"seed {config.seed} leaves no room for {job.repeats} repeats (each trains with seed + r)")
    groups = {clip: group for folder in config.features for clip, group in feature_groups(folder).items()}
    plans = [repeat_folds(list(groups), list(groups.values()), job.folds, repeat) for repeat in range(job.repeats)]
    run = check_output_folder(job.run, "crossval", protected=tuple(Path(f) for f in config.features))
    folds = [Fold(r, k, fold, fold_folder(run, r, k)) for r, plan in enumerate(plans) for k, fold in enumerate(plan)]
    check_choices(config, folds, groups)
    plan = {"settings": experiment_settings(config, job), "folds": plans, "group_of": groups,
            "feature_folders": list(config.features)}
    with folder_lock(run, "crossval"):
        recorded = _recorded_plan(run, plan, job.overwrite)
        if job.overwrite and recorded is not None:
            _clear(run)
            recorded = None
        mark_output_folder(run, "crossval")
        if recorded != plan:  # new, or the same experiment recorded anew (moved features, an older plan)
            atomic_write_text(run / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
        write_recipe(run / RECIPE_FILE, config)
        runtime = config.runtime()  # for scoring only: each fold's training builds its own
        judges = Judges(runtime)
        scored = []
        for fold in folds:
            log.info("%s (%d of %d): holding out %d clip(s) of %d source(s)", fold.name, len(scored) + 1, len(folds),
                     len(fold.val_ids), len({groups[c] for c in fold.val_ids}))
            _train_fold(replace(config, run=str(fold.run), val_ids=list(fold.val_ids), seed=config.seed + fold.repeat),
                        show_progress)
            scored.append(_score_fold(fold, ModelSource(runtime, fold.run / "adapter"), job, judges, show_progress))
        result = pool(scored, folds, groups, job, plan["settings"], judges)
        result.pooled_val_loss, result.best_step = pooled_validation(folds)
        result.train_command = _train_command(config, run, result.best_step)
        result.seconds = time.perf_counter() - started
        atomic_write_text(run / RESULT_FILE, result.to_json())
        write_crossval_report(run / REPORT_FOLDER, result)
    return result


# -- the experiment ---------------------------------------------------------------------------------------

def repeat_folds(ids: list[str], groups: list[str], folds: int, repeat: int) -> list[list[str]]:
    """The folds of one repeat: repeat 0 balances whole sources by clip count (largest first); a
    later repeat deals the sources in an order drawn from its number, each to the fold with the
    fewest clips so far, so that every repeat judges each source with other companions."""
    if repeat == 0:
        return source_folds(ids, groups, folds)
    assigned = source_folds(ids, groups, folds)  # checks the fold count
    members: dict[str, list[str]] = {}
    for clip_id, group in zip(ids, groups):
        members.setdefault(group, []).append(clip_id)
    assigned = [[] for _ in assigned]
    for group in sorted(members, key=lambda g: source_hash(f"repeat {repeat}: {g}")):
        min(assigned, key=len).extend(members[group])
    return [sorted(fold, key=ids.index) for fold in assigned]


def fold_folder(run: Path, repeat: int, index: int) -> Path:
    return (run if repeat == 0 else run / f"repeat-{repeat}") / f"fold-{index}"


def check_choices(config: TrainConfig, folds: list[Fold], groups: dict[str, str]) -> None:
    """No fold may choose on the clips that judge it: early stopping needs tuning clips in every
    fold. A fold whose training side is one source has none (tuning clips drawn from the sources
    it trains on would measure memory): it trains to its last step and chooses nothing."""
    if not config.early_stopping_patience:
        return
    for fold in folds:
        held = set(fold.val_ids)
        training_sources = {g for clip, g in groups.items() if clip not in held}
        if config.tuning_fraction == 0 or len(training_sources) < 2:
            why = ("--tuning-fraction is 0" if config.tuning_fraction == 0 else
                   f"its training side is one source ({next(iter(training_sources))})")
            raise UserError(f"early stopping (early_stopping_patience {config.early_stopping_patience}) would choose "
                            f"{fold.name}'s adapter on the clips that judge it: {why}, so it has no tuning clips; set "
                            "--tuning-fraction above 0 with fewer --folds, or drop early_stopping_patience")


def experiment_settings(config: TrainConfig, job: CrossvalJob | None) -> dict:
    """Every setting that changes what is trained or judged: the training config after defaults,
    TOML and options (where it runs left out), the judging, the features' content, the folds.
    Without a job: the training part only."""
    training = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in HOW_NOT_WHAT}
    training["checkpoint"] = Path(config.checkpoint).name if config.checkpoint else None
    if job is None:
        return json.loads(json.dumps({"training": training}))
    return json.loads(json.dumps({
        "training": training,
        "judging": {"eval_steps": job.sampling.steps, "cfg": job.sampling.cfg_strength, "eval_seed": job.sampling.seed,
                    "seeds": job.seeds, "lora_scale": list(job.lora_scales)},
        "features": [feature_fingerprint(folder) for folder in config.features],
        "folds": job.folds, "repeats": job.repeats}))


def _flat(settings: dict) -> dict:
    return {**settings["training"], **settings["judging"],
            **{key: settings[key] for key in ("features", "folds", "repeats")}}


def _recorded_plan(run: Path, plan: dict, overwrite: bool) -> dict | None:
    """The plan recorded in `run`, as it is on disk (None: a new cross-validation). Continuing it
    with any other setting is refused, naming each one, old and new; the same features moved
    elsewhere continue (said)."""
    path = run / PLAN_FILE
    if not path.is_file():
        return None
    recorded = read_json(path, "the cross-validation's plan")
    if overwrite:
        _check_only_ours(run)
        return recorded
    settings = recorded["settings"] if "settings" in recorded else _legacy_settings(run, recorded, plan)
    old, new = _flat(settings), _flat(plan["settings"])
    changed = [f"{name} {old.get(name)!r} → {new.get(name)!r}" for name in new if old.get(name) != new[name]]
    if not changed and "settings" in recorded and recorded["folds"] != plan["folds"]:
        changed.append("folds: the sources' grouping of the clips changed")
    if changed:
        raise UserError(f"{run}: holds a cross-validation with other settings ({'; '.join(changed)}); its folds would "
                        "mix two experiments. Continue with the recorded settings, pass --overwrite to start a new "
                        "experiment in this folder, or give another --run")
    if recorded.get("feature_folders", plan["feature_folders"]) != plan["feature_folders"]:
        log.warning("%s: its features are now at %s (recorded at %s): the same clips by content; continuing", run,
                    ", ".join(plan["feature_folders"]), ", ".join(recorded["feature_folders"]))
    return recorded


def _legacy_settings(run: Path, recorded: dict, plan: dict) -> dict:
    """The settings of a plan written before they were recorded: the same folds of the same
    features, trained with what every fold that started recorded (judging is checked per fold)."""
    features = recorded.get("features", {})
    if recorded.get("folds") != plan["folds"][0] or list(features.values()) != plan["settings"]["features"]:
        raise UserError(f"{run}: holds an earlier version's cross-validation of other folds or features; pass "
                        "--overwrite to start a new experiment in this folder, or give another --run")
    settings = json.loads(json.dumps(plan["settings"]))
    for k in range(len(recorded["folds"])):
        fold_run = fold_folder(run, 0, k)
        if (fold_run / CONFIG_FILE).is_file():
            trained = experiment_settings(TrainConfig.from_recorded(fold_run), None)["training"]
            # the variant a fold recorded is the one it resolved (None asked: read from the checkpoint)
            settings["training"].update({name: value for name, value in trained.items() if name != "variant"})
    return settings


CROSSVAL_ENTRIES = frozenset({MARKER, PLAN_FILE, RESULT_FILE, RECIPE_FILE, REPORT_FOLDER})


def _ours_here(name: str) -> bool:
    return (name in CROSSVAL_ENTRIES or re.fullmatch(r"(fold|repeat)-\d+", name) is not None
            or (name.startswith(".") and name.endswith((".tmp", ".lock", ".old"))))


def _check_only_ours(run: Path) -> None:
    foreign = sorted(entry.name for entry in run.iterdir() if not _ours_here(entry.name))
    if foreign:
        raise UserError(f"{run}: holds {', '.join(foreign[:5])}, which the cross-validation did not write; "
                        "--overwrite would delete it: move it out first (or give another --run)")


def _clear(run: Path) -> None:
    """--overwrite: the earlier experiment's files go (only ours: checked before)."""
    for entry in run.iterdir():
        if entry.name != MARKER:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def write_recipe(path: Path, config: TrainConfig) -> None:
    """The folds' training settings as a TOML file for `train --config`: the adapter you keep trains
    with the same recipe (on all clips: no validation split, the same tuning share for its choices)."""
    lines = ["# The recipe every fold of this cross-validation trained with (mmaudio-lora train --config).\n"]
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in ("run", "features", "steps", "val_ids", "val_groups") or value is None:
            continue
        value = 0.0 if f.name == "val_fraction" else value
        lines.append(f"{f.name} = {json.dumps(list(value) if isinstance(value, tuple) else value)}\n")
    atomic_write_text(path, "".join(lines))


def _train_command(config: TrainConfig, run: Path, steps: int | None) -> str:
    """A command that trains the adapter you keep in a new run folder beside the cross-validation."""
    if steps is None:
        return ""
    stem = run.name.removesuffix("-crossval") or "run"
    target = run.parent / f"{stem}-{steps}-steps"
    n = 2
    while target.exists():
        target, n = run.parent / f"{stem}-{steps}-steps-{n}", n + 1
    features = " ".join(f"--features {folder}" for folder in config.features)
    return f"mmaudio-lora train {features} --run {target} --config {run / RECIPE_FILE} --steps {steps}"


# -- the folds --------------------------------------------------------------------------------------------

def _train_fold(config: TrainConfig, show_progress: bool) -> None:
    """Train the fold's adapter, or continue it; nothing when its adapter is written (its settings
    are the plan's: a fold with an adapter has trained them to the end)."""
    run = Path(config.run)
    if (run / "adapter" / "adapter_model.safetensors").is_file():
        _relocate(run, config.features)
        return
    train(config, resume=(run / CONFIG_FILE).is_file(), show_progress=show_progress)


def _relocate(run: Path, features: list[str]) -> None:
    """A finished fold of a moved project: its records point to the features where they are now."""
    recorded = read_run_config(run)
    if recorded.get("features") == features:
        return
    split = Split.load(run)
    if split is None or set(split.relocated(features).feature_folders) != set(features):
        raise UserError(f"{run}: its features are not among {', '.join(features)}; give the folders it trained on")
    split.relocated(features).save(run)
    atomic_write_text(run / CONFIG_FILE, json.dumps({**recorded, "features": features}, indent=1))


def _score_settings(fold: Fold, job: CrossvalJob) -> dict:
    return json.loads(json.dumps({"sampling": asdict(job.sampling), "seeds": job.seeds,
                                  "lora_scales": list(job.lora_scales), "clips": fold.val_ids,
                                  "adapter": (fold.run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns}))


def _score_fold(fold: Fold, source: ModelSource, job: CrossvalJob, judges: Judges, show_progress: bool) -> Scored:
    """The fold's adapter against the base on exactly its held-out clips, with its report (the
    audio), cached with its settings and the judges that scored it; a fold scored before a judge
    arrived is scored again for that judge's metrics only."""
    settings = _score_settings(fold, job)
    cached, judged_by = _cached_fold(fold.run, settings)
    available = judges.available
    if cached is not None and all(judged_by.get(name) or not present for name, present in available.items()):
        return cached
    metrics = tuple(METRICS) if cached is None else ("kl_passt",)
    clips, where, notes, folders = held_out_clips(fold.run, None, [], source.runtime)
    scored = score_held_out(source, clips, where, notes, job.sampling, job.lora_scales, job.seeds, job.batch_size,
                            show_progress, judges, metrics)
    if cached is not None:  # the metrics scored before, and now the new judge's
        for name, scores in scored.outputs.items():
            for metric, values in cached.outputs.get(name, Scores({}, {}, {})).per_clip.items():
                scores.per_clip.setdefault(metric, values)
        scored.real.desync = cached.real.desync
        summarise(scored.result, scored.outputs, scored.real, judges.passt is not None, job.lora_scales)
    write_evaluation_report(fold.run / FOLD_REPORT, fold.run, scored, clips, folders, source.runtime)
    from safetensors.torch import save_file

    tensors = {f"{model}/{clip}": value for model in MODELS for clip, value in scored.outputs[model].embeddings.items()}
    tensors.update({f"real/{clip}": value for clip, value in scored.real.embeddings.items()})
    with atomic_path(fold.run / EMBEDDINGS_FILE) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))
    atomic_write_text(fold.run / EVALUATION_FILE, json.dumps(
        {"crossval": settings, "judges": available, **json.loads(scored.result.to_json())}, indent=1) + "\n")
    return scored


def _cached_fold(fold_run: Path, settings: dict) -> tuple[Scored | None, dict]:
    """A fold scored before with the same settings and adapter, read back (per-clip numbers of
    every output, embeddings), and which judges scored it; (None, {}) when there is none."""
    path, embeddings_path = fold_run / EVALUATION_FILE, fold_run / EMBEDDINGS_FILE
    if not (path.is_file() and embeddings_path.is_file() and (fold_run / FOLD_REPORT / "index.html").is_file()):
        return None, {}
    try:
        data = json.loads(path.read_text())
        if data.get("crossval") != settings:
            return None, {}
        from safetensors.torch import load_file

        tensors = load_file(str(embeddings_path))
    except (OSError, ValueError, RuntimeError):
        return None, {}

    def numbers(values: dict) -> dict:
        return {clip: math.nan if value is None else value for clip, value in values.items()}

    per_clip = {metric: {clip: numbers(models) for clip, models in clips.items()}
                for metric, clips in data["per_clip"].items()}
    result = Evaluation(data["variant"], data["held_out"], data["clips"], data["sampling"], data["seeds"],
                        data["sources"], data["group_of"], per_clip=per_clip, lora_scale=data["lora_scale"],
                        notes=data["notes"],
                        per_clip_scales={scale: {m: numbers(v) for m, v in metrics.items()}
                                         for scale, metrics in data.get("per_clip_scales", {}).items()})

    def embeddings(model: str) -> dict[str, torch.Tensor]:
        return {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{model}/")}

    def output(model: str) -> dict[str, dict[str, float]]:
        return {m: {c: v[model] for c, v in clips.items()} for m, clips in per_clip.items()}

    outputs = {model: Scores(output(model), {}, {}, embeddings(model)) for model in MODELS}
    for scale, values in result.per_clip_scales.items():
        outputs[f"scale {scale}"] = Scores(values, {}, {})
    if not result.per_clip_scales and result.lora_scale is not None:
        outputs[f"scale {result.lora_scale:g}"] = outputs["tuned"]
    real = RealAudio({}, {}, embeddings=embeddings("real"),
                     desync={c: v["real"] for c, v in per_clip.get("desync", {}).items()})
    return Scored(result, outputs, real), data.get("judges", {"desync": True, "passt": "kl_passt" in per_clip})


# -- pooling ----------------------------------------------------------------------------------------------

def _average(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def pool(folds_scored: list[Scored], folds: list[Fold], groups: dict[str, str], job: CrossvalJob, settings: dict,
         judges: Judges) -> CrossValidation:
    """Every clip's numbers from the folds that held it out (one per repeat, averaged), the tests
    over all sources, the strengths explored, KAD and every fold's notes. A metric is pooled only
    where every fold has it."""
    repeats = job.repeats
    clips = [clip for fold in folds if fold.repeat == 0 for clip in fold.val_ids]
    first = folds_scored[0].result
    result = CrossValidation(first.variant, f"{len(folds) // repeats} folds" + (f" × {repeats} repeats" if repeats > 1
                                                                                 else "") + " by source",
                             clips, asdict(job.sampling), job.seeds, len({groups[c] for c in clips}),
                             {c: groups[c] for c in clips}, lora_scale=first.lora_scale,
                             steps=settings["training"]["steps"], repeats=repeats, settings=settings)
    result.folds = [{"run": str(fold.run), "report": str(fold.run / FOLD_REPORT), "name": fold.name,
                     "repeat": fold.repeat, "val_groups": sorted({groups[c] for c in fold.val_ids}),
                     "val_ids": list(fold.val_ids)} for fold in folds]
    if any(scored.result.failed or scored.outputs["tuned"].failed for scored in folds_scored):
        result.lora_scale = None
    metrics = [m for m in METRICS if all(m in scored.result.per_clip for scored in folds_scored)]

    def pooled(output: str, metric: str) -> dict[str, float]:
        """{clip: the mean over its judges (one fold per repeat)} of one output's metric."""
        values: dict[str, list[float]] = {}
        for scored in folds_scored:
            for clip, value in scored.outputs[output].per_clip[metric].items():
                values.setdefault(clip, []).append(value)
        return {clip: _average(values[clip]) for clip in clips}

    differences = {}
    for metric in metrics:
        per_clip = {clip: {} for clip in clips}
        for model in MODELS:
            for clip, value in pooled(model, metric).items():
                per_clip[clip][model] = value
        if metric == "desync":
            real = {clip: value for scored in folds_scored for clip, value in scored.real.desync.items()}
            for clip in clips:
                per_clip[clip]["real"] = real.get(clip, math.nan)
        result.per_clip[metric] = per_clip
        summary = result.summary(metric)
        for model in (*MODELS, "real"):
            summary[model] = mean_of({c: v[model] for c, v in per_clip.items() if model in v})
        if not result.failed:
            differences[metric] = differences_of(per_clip)
    result.metrics = judge(differences, result.group_of)
    result.per_clip_mel_l1 = result.per_clip.get("mel_l1", {})
    if len(job.lora_scales) > 1 and all(f"scale {scale:g}" in scored.outputs for scale in job.lora_scales
                                        for scored in folds_scored):
        base = {metric: pooled("base", metric) for metric in metrics}
        for scale in job.lora_scales:
            name = f"{scale:g}"
            values = {metric: pooled(f"scale {name}", metric) for metric in metrics}
            result.per_clip_scales[name] = values
            result.scales[name] = explore(values, base, result.group_of)
    if "kl_passt" in metrics and not result.failed:
        real = {c: e for scored in folds_scored for c, e in scored.real.embeddings.items()}  # alike in every repeat
        for model in MODELS:
            generated: dict[str, list[torch.Tensor]] = {}
            for scored in folds_scored:
                for clip, rows in scored.outputs[model].embeddings.items():
                    generated.setdefault(clip, []).append(rows)
            if set(generated) == set(clips):
                value, interval = kad_by_source(real, {c: torch.cat(v) for c, v in generated.items()},
                                                result.group_of)
                result.kad_passt[model], result.kad_passt[f"{model}_ci95"] = value, interval
    result.notes = _pooled_notes(folds_scored, folds, "kl_passt" in metrics, judges)
    return result


def _pooled_notes(folds_scored: list[Scored], folds: list[Fold], passt_pooled: bool, judges: Judges) -> list[str]:
    """Every note of the folds' evaluations (one said for all folds when all share it), and what
    was left out of the pooled result."""
    by_note: dict[str, list[str]] = {}
    for scored, fold in zip(folds_scored, folds):
        for note in scored.result.notes:
            if not note.startswith("KL_PaSST and KAD left out"):  # a fold's state; the pooled one is said below
                by_note.setdefault(note, []).append(fold.name)
    notes = [note if len(names) == len(folds) else f"{', '.join(names)}: {note}" for note, names in by_note.items()]
    if not passt_pooled:
        reason = judges.left_out[0] if judges.left_out else "KL_PaSST and KAD left out: not every fold has them."
        notes.append(reason)
    return notes


def pooled_validation(folds: list[Fold]) -> tuple[dict[int, float], int | None]:
    """Per logged step, the folds' held-out (validation) losses weighted by their clips (steps every
    fold logged), and the step where it is lowest: chosen on the judging clips, so advice to confirm."""
    by_step: dict[int, list[tuple[float, int]]] = {}
    for fold in folds:
        for record in read_metrics_log(fold.run):
            if isinstance(record.get("val_loss"), (int, float)) and math.isfinite(record["val_loss"]):
                by_step.setdefault(record["step"], []).append((record["val_loss"], len(fold.val_ids)))
    pooled = {step: sum(loss * n for loss, n in values) / sum(n for _, n in values)
              for step, values in sorted(by_step.items()) if len(values) == len(folds)}
    return pooled, (min(pooled, key=pooled.get) if pooled else None)
