"""Cross-validation by source video: the verdict that holds at a user's scale.

With a few commercials a single held-out split judges one to three of them, and its choices
(best adapter, strength) are made on the clips that judge them. Here the sources are split into
K folds of whole sources (balanced by clip count); fold k trains an adapter on the other folds in
RUN/fold-k/ (an ordinary run folder: its split.json holds the fold's sources out), makes its
choices on tuning sources drawn from its own training side, and is scored on exactly its held-out
clips. Pooled, every clip has a paired difference (tuned − base) from an adapter that never saw
its source, and the test is over all sources (evaluate/verdict.py).

    RUN/.mmaudio-lora       marks the folder as a cross-validation of ours
    RUN/crossval_plan.json  the folds (sources and clips) and the features' fingerprints
    RUN/fold-k/             fold k's run (train), its evaluation.json and embeddings.safetensors
    RUN/crossval.json       folds, per_clip, metrics (tests over sources, Holm), verdict, step advice
    RUN/crossval/index.html the report

It resumes: a fold whose adapter has all its steps is not trained again, a fold already scored
with the same settings is not scored again, and a killed run continues from its checkpoints.
This module composes the stages (train, generate), as the CLI does; the stages stay apart.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from evaluate.held_out import RealAudio, Scored, Scores, check_scoring, held_out_clips, score_held_out
from evaluate.kad import kad_by_source
from generate.model import ModelSource
from evaluate.report import write_crossval_report
from evaluate.verdict import METRICS, MODELS, CrossValidation, Evaluation, differences_of, judge
from shared.errors import UserError
from shared.features import feature_fingerprint, feature_groups, source_folds
from shared.outputs import atomic_path, atomic_write_text, claim_output_folder, folder_lock
from shared.run_record import CONFIG_FILE, read_json, read_metrics_log
from shared.synthesis import SamplingSettings
from train.config import TrainConfig
from train.loop import train
from train.run_folder import complete_checkpoints

log = logging.getLogger(__name__)
PLAN_FILE = "crossval_plan.json"
RESULT_FILE = "crossval.json"
FOLD_EVALUATION = "evaluation.json"
FOLD_EMBEDDINGS = "embeddings.safetensors"


@dataclass
class CrossvalJob:
    config: TrainConfig  # what every fold trains with (features, profile, variant, steps, lr, ...)
    run: Path
    folds: int = 4
    tuning_fraction: float = 0.1  # of each fold's training sources, for its choices (0: none, the final adapter)
    seeds: int = 3
    sampling: SamplingSettings = SamplingSettings()
    lora_scales: tuple[float, ...] = (1.0,)
    batch_size: int = 4  # clips per batch when scoring


def crossval(job: CrossvalJob, show_progress: bool = True) -> CrossValidation:
    """Train and score every fold (resuming what is done), pool, test over sources, write the JSON
    and the report. Everything is checked before anything is written."""
    started = time.perf_counter()
    check_scoring(job.lora_scales, job.seeds)
    if not 0 <= job.tuning_fraction < 1:
        raise UserError(f"--tuning-fraction must be in [0, 1), not {job.tuning_fraction}")
    config = replace(job.config, val_fraction=0.0, val_ids=[], val_groups=[],
                     tuning_fraction=job.tuning_fraction).validate().resolved()
    groups = {clip: group for folder in config.features for clip, group in feature_groups(folder).items()}
    folds = source_folds(list(groups), list(groups.values()), job.folds)
    run = claim_output_folder(job.run, "crossval", protected=tuple(Path(f) for f in config.features))
    with folder_lock(run, "crossval"):
        _record_plan(run, config, folds, groups)
        runtime = config.runtime()  # for scoring only: each fold's training builds its own
        fold_results = []
        for k, fold in enumerate(folds):
            fold_run = run / f"fold-{k}"
            log.info("fold %d of %d: holding out %d clip(s) of %d source(s)", k + 1, len(folds), len(fold),
                     len({groups[c] for c in fold}))
            _train_fold(replace(config, run=str(fold_run), val_ids=list(fold)), show_progress)
            fold_results.append(_score_fold(fold_run, ModelSource(runtime, fold_run / "adapter"), job, show_progress))
        result = pool(fold_results, folds, groups, run, job, config.steps)
        result.seconds = time.perf_counter() - started
        atomic_write_text(run / RESULT_FILE, result.to_json())
        write_crossval_report(run / "crossval", result)
    return result


def _record_plan(run: Path, config: TrainConfig, folds: list[list[str]], groups: dict[str, str]) -> None:
    """The folds and the data they were drawn from; a cross-validation continued on other data or
    other folds is refused (its finished folds would mix two experiments)."""
    plan = {"folds": folds, "group_of": groups,
            "features": {folder: feature_fingerprint(folder) for folder in config.features}}
    path = run / PLAN_FILE
    if path.is_file():
        recorded = read_json(path, "the cross-validation's folds")
        if recorded != json.loads(json.dumps(plan)):
            raise UserError(f"{run}: holds a cross-validation of other folds or features (--folds, the feature "
                            "folders or their clips changed); give a new --run")
    else:
        atomic_write_text(path, json.dumps(plan, indent=1) + "\n")


def _train_fold(config: TrainConfig, show_progress: bool) -> None:
    """Train the fold's adapter, or continue it; nothing when its adapter has all its steps."""
    run = Path(config.run)
    checkpoints = complete_checkpoints(run) if run.is_dir() else []
    if (run / "adapter").is_dir() and checkpoints and int(checkpoints[0].name.split("-")[1]) >= config.steps:
        return
    train(config, resume=(run / CONFIG_FILE).is_file(), show_progress=show_progress)


def _score_fold(fold_run: Path, source: ModelSource, job: CrossvalJob, show_progress: bool) -> Scored:
    """The fold's adapter against the base on exactly its held-out clips (cached with its settings)."""
    settings = {"sampling": asdict(job.sampling), "seeds": job.seeds, "lora_scales": list(job.lora_scales),
                "adapter": (fold_run / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns}
    cached = _cached_fold(fold_run, settings)
    if cached is not None:
        return cached
    clips, where, _, _ = held_out_clips(fold_run, None, [], source.runtime)
    scored = score_held_out(source, clips, where, [], job.sampling, job.lora_scales, job.seeds, job.batch_size,
                            show_progress)
    from safetensors.torch import save_file

    tensors = {f"{model}/{clip}": value for model, scores in (("base", scored.outputs["base"]),
                                                              ("tuned", scored.outputs["tuned"]))
               for clip, value in scores.embeddings.items()}
    tensors.update({f"real/{clip}": value for clip, value in scored.real.embeddings.items()})
    with atomic_path(fold_run / FOLD_EMBEDDINGS) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary))
    atomic_write_text(fold_run / FOLD_EVALUATION, json.dumps({"crossval": settings, **json.loads(
        scored.result.to_json())}, indent=1) + "\n")
    return scored


def _cached_fold(fold_run: Path, settings: dict) -> Scored | None:
    """A fold scored before with the same settings and adapter, read back (per-clip numbers and embeddings)."""
    path, embeddings_path = fold_run / FOLD_EVALUATION, fold_run / FOLD_EMBEDDINGS
    if not (path.is_file() and embeddings_path.is_file()):
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("crossval") != json.loads(json.dumps(settings)):
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(embeddings_path))
    except (OSError, ValueError, RuntimeError):
        return None
    nan = math.nan
    per_clip = {metric: {clip: {model: nan if value is None else value for model, value in models.items()}
                         for clip, models in clips.items()} for metric, clips in data["per_clip"].items()}
    result = Evaluation(data["variant"], data["held_out"], data["clips"], data["sampling"], data["seeds"],
                        data["sources"], data["group_of"], per_clip=per_clip, lora_scale=data["lora_scale"],
                        notes=data["notes"])

    def embeddings(model: str) -> dict[str, torch.Tensor]:
        return {key.split("/", 1)[1]: value for key, value in tensors.items() if key.startswith(f"{model}/")}

    outputs = {model: Scores({m: {c: v[model] for c, v in clips.items()} for m, clips in per_clip.items()}, {}, {},
                             embeddings(model)) for model in MODELS}
    return Scored(result, outputs, RealAudio({}, {}, embeddings=embeddings("real")))


def pool(folds_scored: list[Scored], folds: list[list[str]], groups: dict[str, str], run: Path, job: CrossvalJob,
         steps: int) -> CrossValidation:
    """Every clip's numbers from the fold that held it out, the tests over all sources, KAD, and the
    step count where the folds' pooled validation loss was lowest."""
    clips = [clip for fold in folds for clip in fold]
    result = CrossValidation(folds_scored[0].result.variant, f"{len(folds)} folds of {run}", clips, asdict(job.sampling), job.seeds,
                             len({groups[c] for c in clips}), {c: groups[c] for c in clips},
                             lora_scale=folds_scored[0].result.lora_scale, steps=steps)
    result.folds = [{"run": str(run / f"fold-{k}"), "val_groups": sorted({groups[c] for c in fold}),
                     "val_ids": list(fold)} for k, fold in enumerate(folds)]
    if any(scored.result.failed for scored in folds_scored):
        result.lora_scale = None
    metrics = [m for m in METRICS if all(m in scored.result.per_clip for scored in folds_scored)]
    differences = {}
    for metric in metrics:
        per_clip = {clip: values for scored in folds_scored for clip, values in scored.result.per_clip[metric].items()}
        result.per_clip[metric] = per_clip
        summary = result.summary(metric)
        for model in (*MODELS, "real"):
            values = [v[model] for v in per_clip.values() if model in v and math.isfinite(v[model])]
            if values:
                summary[model] = sum(values) / len(values)
        if not result.failed:
            differences[metric] = differences_of(per_clip)
    result.metrics = judge(differences, result.group_of)
    result.notes = sorted({note for scored in folds_scored for note in scored.result.notes
                           if note.startswith("KL_PaSST")})
    real = {c: e for scored in folds_scored for c, e in scored.real.embeddings.items()}
    if real and not result.failed:
        for model in MODELS:
            generated = {c: e for scored in folds_scored for c, e in scored.outputs[model].embeddings.items()}
            if set(generated) == set(real):
                value, interval = kad_by_source(real, generated, result.group_of)
                result.kad_passt[model], result.kad_passt[f"{model}_ci95"] = value, interval
    result.pooled_val_loss, result.best_step = pooled_validation(run, folds)
    return result


def pooled_validation(run: Path, folds: list[list[str]]) -> tuple[dict[int, float], int | None]:
    """Per logged step, the folds' validation losses weighted by their held-out clips (steps every
    fold logged), and the step where it is lowest: how long to train the adapter you keep."""
    by_step: dict[int, list[tuple[float, int]]] = {}
    for k, fold in enumerate(folds):
        for record in read_metrics_log(run / f"fold-{k}"):
            if isinstance(record.get("val_loss"), (int, float)) and math.isfinite(record["val_loss"]):
                by_step.setdefault(record["step"], []).append((record["val_loss"], len(fold)))
    pooled = {step: sum(loss * n for loss, n in values) / sum(n for _, n in values)
              for step, values in sorted(by_step.items()) if len(values) == len(folds)}
    return pooled, (min(pooled, key=pooled.get) if pooled else None)
