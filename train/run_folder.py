"""The run folder: when a command may use it, its checkpoints (written atomically, read with a
fall-back past a damaged one) and its metrics log.

    .mmaudio-lora          marks the folder as a run of ours
    config.json            the resolved configuration, paths absolute (shared/run_record.py)
    split.json             the run's clips: train_ids, val_ids, group_of, feature folders' fingerprints
    metrics.jsonl          one JSON object per logged step (step, train_loss, lr, val_loss)
    tensorboard/           the same curves for TensorBoard
    checkpoints/step-N/    adapter/ + trainer_state.pt (the last `keep_last`)
    best/adapter/          the adapter with the lowest validation loss (best/step.json: when)
    adapter/               the final adapter (the best one after early stopping)
    samples/step-N/        generated audio of a few held-out clips (with sample_every)
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from shared.errors import UserError
from shared.outputs import MARKER, atomic_write_text, check_output_folder, folder_kind, mark_folder, ours
from shared.run_record import (CONFIG_FILE, EMBEDDINGS_FILE, EVALUATION_FILE, LONG_EVALUATION_FILE, METRICS_FILE,
                               SPLIT_FILE, Split, checkpoint_folders, finite_or_none, read_metrics_log)
from train.config import TrainConfig

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
# What a run folder holds when only mmaudio-lora wrote it for that run (train; evaluate's numbers and
# report; a cross-validation fold's embeddings), besides our temporary files (.NAME.*.tmp, locks).
RUN_ENTRIES = frozenset({MARKER, CONFIG_FILE, SPLIT_FILE, METRICS_FILE, "tensorboard", "checkpoints", "best",
                         "adapter", "samples", EVALUATION_FILE, "evaluation", EMBEDDINGS_FILE, LONG_EVALUATION_FILE,
                         Path(LONG_EVALUATION_FILE).stem})
TEMPORARY = re.compile(r"^\..+\.(tmp|lock|old)$")


def foreign_entries(run: Path) -> list[str]:
    """What a run folder holds that the project did not write there for that run."""
    return sorted(entry.name for entry in run.iterdir() if entry.name not in RUN_ENTRIES
                  and not TEMPORARY.match(entry.name))


def previous_run(run: Path) -> Path:
    """Where `--overwrite` keeps the earlier run until the new one has written its first adapter."""
    return run.with_name(f".{run.name}.previous")


def complete_checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints that finished writing, newest first."""
    return [folder for _, folder in reversed(checkpoint_folders(run))
            if (folder / STATE_FILE).is_file() and (folder / "adapter").is_dir()]


class DamagedCheckpoint(Exception):
    """One file of a checkpoint cannot be read; the message names it."""


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(adapter tensors, trainer state) of one checkpoint."""
    from safetensors.torch import load_file

    adapter_file, state_file = folder / "adapter" / "adapter_model.safetensors", folder / STATE_FILE
    try:
        adapter = load_file(str(adapter_file))
    except Exception as error:  # missing, truncated, not safetensors
        raise DamagedCheckpoint(f"{adapter_file} is unreadable ({type(error).__name__})") from None
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, foreign objects
        raise DamagedCheckpoint(f"{state_file} is unreadable ({type(error).__name__})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpoint(f"{state_file} is not a trainer state")
    return adapter, state


def newest_readable_checkpoint(run: Path) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that loads; a damaged one is reported and the previous one used."""
    for folder in complete_checkpoints(run):
        try:
            return (folder, *read_checkpoint(folder))
        except DamagedCheckpoint as damage:
            log.warning("%s; resuming from the checkpoint before it", damage)
    return None


def check_run_folder(config: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """Whether the run folder may be used as asked (nothing is written): new, empty, or a run of
    ours, continued only with --resume (and the same data and settings), replaced only with
    --overwrite. Anything else is refused before any work."""
    run = check_output_folder(config.run, "run", protected=tuple(Path(f) for f in config.features))
    is_run = folder_kind(run) == "run"
    started = is_run and (bool(complete_checkpoints(run)) or (run / "adapter").is_dir())
    if is_run and resume:
        check_resumable(run, config)
    elif started and not overwrite:
        raise UserError(f"{run}: already holds a training run; pass --resume to continue it "
                        "or --overwrite to replace it")
    if is_run and not resume:
        foreign = foreign_entries(run)
        if foreign:
            raise UserError(f"{run}: holds {', '.join(foreign[:5])}, which training did not write for this run; "
                            "--overwrite would delete it: move it out of the run folder (or give a new --run)")
        previous = previous_run(run)
        if previous.exists() and not ours(previous):
            raise UserError(f"{previous}: a folder mmaudio-lora did not make is where --overwrite keeps the earlier "
                            "run; move or rename it")
    return run


def prepare_run_folder(config: TrainConfig, resume: bool) -> Path:
    """The run folder made ready to write, once everything the new run needs has been checked: an
    earlier run of ours (unless it is continued) is set aside as `.RUN.previous`, kept until the new
    run writes its first adapter (then deleted) and put back if the new run fails before that."""
    run = Path(config.run)
    if folder_kind(run) == "run" and not resume:
        previous = previous_run(run)
        if previous.exists():  # ours (checked): left by a run killed before its first adapter
            shutil.rmtree(previous)
        os.replace(run, previous)
        log.warning("%s: the earlier run is kept at %s until the new one has written its first adapter", run, previous)
    return mark_folder(run, "run")


def release_previous(run: Path) -> None:
    """The new run has an adapter: the earlier one it replaces goes."""
    previous = previous_run(run)
    if previous.exists():
        shutil.rmtree(previous)


def restore_previous(run: Path) -> None:
    """The new run failed before its first adapter: the earlier run is put back as it was."""
    previous = previous_run(run)
    if previous.exists():
        shutil.rmtree(run, ignore_errors=True)
        os.replace(previous, run)
        log.warning("%s: the new run wrote no adapter; the earlier run is back in place", run)


def check_resumable(run: Path, config: TrainConfig) -> None:
    """Refuse to continue a run with other data or settings than it recorded, naming each difference."""
    if not (run / CONFIG_FILE).is_file():
        return  # stopped before it recorded anything: nothing to mix, it starts at step 0
    recorded = TrainConfig.from_recorded(run).resolved()
    split = Split.load(run)
    if split is not None:  # a moved project: the same features (by content) at another path are the same data
        moved = split.relocation(config.features)
        for old, new in moved.items():
            log.info("%s: the run's features %s are now at %s; recorded there from now on", run, old, new)
        recorded.features = [moved.get(folder, folder) for folder in recorded.features]
    if (recorded.checkpoint and config.checkpoint and recorded.checkpoint != config.checkpoint
            and not Path(recorded.checkpoint).exists() and Path(recorded.checkpoint).name == Path(config.checkpoint).name):
        log.info("%s: the base checkpoint %s is now at %s", run, recorded.checkpoint, config.checkpoint)
        recorded.checkpoint = config.checkpoint
    changes = config.changes_from(recorded)
    if split is None and complete_checkpoints(run):
        raise UserError(f"{run}: made by an older version that did not record its split (split.json): which clips "
                        "it validated on cannot be recovered from today's features, and continuing could train on "
                        "them; start a new run (a new --run, or --overwrite)")
    if split is not None:
        changes += split.changes(config.features)
    if changes:
        raise UserError(f"{run}: --resume would mix two runs: {'; '.join(changes)}. Continue with the recorded "
                        "settings, or start a new --run (or --overwrite this one)")


class MetricsLog:
    """metrics.jsonl plus TensorBoard (when the tensorboard package is importable)."""

    def __init__(self, run: Path, resume_step: int):
        self.path = run / METRICS_FILE
        if self.path.exists():  # drop what a killed run logged after its last checkpoint (and a torn line)
            kept = [record for record in read_metrics_log(run) if record["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(record, allow_nan=False) + "\n" for record in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tensorboard = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
