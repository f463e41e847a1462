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
import shutil
from pathlib import Path

import torch

from shared.errors import UserError
from shared.outputs import atomic_write_text, check_output_folder, folder_kind, mark_folder
from shared.run_record import CONFIG_FILE, METRICS_FILE, Split, finite_or_none, read_metrics_log
from train.config import TrainConfig

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"


def complete_checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints that finished writing, newest first."""
    checkpoints = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    return [c for c in checkpoints if (c / STATE_FILE).is_file() and (c / "adapter").is_dir()]


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


def prepare_run_folder(config: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """The run folder, checked and marked: new, empty, or a run of ours, continued only with
    --resume (and the same data and settings), replaced whole only with --overwrite. A run of ours
    that never saved a checkpoint (it failed early) starts afresh. Anything else is refused
    before any work."""
    run = check_output_folder(config.run, "run", protected=tuple(Path(f) for f in config.features))
    ours = folder_kind(run) == "run"
    started = ours and (bool(complete_checkpoints(run)) or (run / "adapter").is_dir())
    if ours and resume:
        check_resumable(run, config)
    elif started and not overwrite:
        raise UserError(f"{run}: already holds a training run; pass --resume to continue it "
                        "or --overwrite to replace it")
    elif ours:
        shutil.rmtree(run)
    return mark_folder(run, "run")


def check_resumable(run: Path, config: TrainConfig) -> None:
    """Refuse to continue a run with other data or settings than it recorded, naming each difference."""
    if not (run / CONFIG_FILE).is_file():
        return  # stopped before it recorded anything: nothing to mix, it starts at step 0
    changes = config.changes_from(TrainConfig.from_recorded(run).resolved())
    split = Split.load(run)
    if split is not None:
        changes += split.changes()
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
