"""The run folder: what marks it as ours, its checkpoints (written atomically, read with a
fall-back past a damaged one) and its metrics log.

    config.json            the resolved configuration (marks the folder as a run)
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
from shared.outputs import check_output_folder

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"  # also what marks a folder as a run of ours


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


def prepare_run_folder(run: Path, features: list[str], resume: bool, overwrite: bool, is_main: bool) -> Path:
    """The run folder, checked: new, empty, or a run of ours (continued only with --resume,
    replaced whole only with --overwrite); anything else is refused before any work."""
    run = check_output_folder(run, CONFIG_FILE, "training run", protected=tuple(Path(f) for f in features))
    holds_run = (run / CONFIG_FILE).exists()
    if holds_run and not resume and not overwrite:
        raise UserError(f"{run}: already holds a training run; pass --resume to continue it "
                        "or --overwrite to replace it")
    if holds_run and overwrite and not resume and is_main:
        shutil.rmtree(run)
    return run


class MetricsLog:
    """metrics.jsonl plus TensorBoard (when the tensorboard package is importable)."""

    def __init__(self, run: Path, resume_step: int):
        self.path = run / "metrics.jsonl"
        if self.path.exists():  # drop what a killed run logged after its last checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tensorboard = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
