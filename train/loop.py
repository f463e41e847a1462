"""The training run: data, LoRA model, optimizer and schedule, validation, checkpoints, resume.

Run folder:
    config.json            the resolved configuration
    metrics.jsonl          one JSON object per logged step (step, train_loss, lr, val_loss)
    tensorboard/           the same curves for TensorBoard
    checkpoints/step-N/    adapter/ + trainer_state.pt (the last `keep_last`)
    best/adapter/          the adapter with the lowest validation loss
    adapter/               the final adapter (written when the run ends)
    samples/step-N/        generated audio of a few held-out clips (with sample_every)
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import UserError
from shared.features import FeatureSet, data_dim, split
from shared.flow import validation_loss
from shared.lora import add_lora, base_network, count_parameters, lora_config, save_adapter
from shared.outputs import check_output_folder
from shared.sequence import SequenceConfig
from train.config import TrainConfig
from train.objective import training_loss

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"  # also what marks a folder as a run of ours


@dataclass
class RunResult:
    run: Path
    steps: int  # the run's step count when this invocation ended
    steps_this_run: int  # steps this invocation trained (fewer than `steps` after --resume)
    trainable_parameters: int
    total_parameters: int
    last_train_loss: float
    best_val_loss: float | None
    seconds: float
    writer: bool = True  # False on the other ranks of a torchrun job: rank 0 reports


def _feature_latent_dim(folder: str) -> int | None:
    meta = Path(folder) / "memmap" / "meta.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text())["mean"]["shape"][-1]


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch: a function of (seed, epoch) only, so resuming repeats it."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _complete_checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints that finished writing, newest first."""
    checkpoints = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    return [c for c in checkpoints if (c / STATE_FILE).is_file() and (c / "adapter").is_dir()]


class DamagedCheckpoint(Exception):
    """One file of a checkpoint cannot be read; the message names it."""


def _read_checkpoint(folder: Path) -> tuple[dict, dict]:
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


def _newest_readable_checkpoint(run: Path) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that loads; a damaged one is reported and the previous one used."""
    for folder in _complete_checkpoints(run):
        try:
            return (folder, *_read_checkpoint(folder))
        except DamagedCheckpoint as damage:
            log.warning("%s; resuming from the checkpoint before it", damage)
    return None


def _prepare_run_folder(run: Path, features: list[str], resume: bool, overwrite: bool, is_writer: bool) -> Path:
    """The run folder, checked: new, empty, or a run of ours (continued only with --resume,
    replaced whole only with --overwrite); anything else is refused before any work."""
    run = check_output_folder(run, CONFIG_FILE, "training run", protected=tuple(Path(f) for f in features))
    holds_run = (run / CONFIG_FILE).exists()
    if holds_run and not resume and not overwrite:
        raise UserError(f"{run}: already holds a training run; pass --resume to continue it "
                        "or --overwrite to replace it")
    if holds_run and overwrite and not resume and is_writer:
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
            self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.writer = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True,
          overwrite: bool = False) -> RunResult:
    from tqdm import tqdm

    from shared.device import mixed_precision, resolve_device
    from shared.profiles import FeatureDims

    from shared.distributed import Ranks

    config.validate()
    started = time.perf_counter()
    ranks = Ranks.from_environment(config.device)
    run = _prepare_run_folder(Path(config.run), config.features, resume, overwrite, ranks.is_writer)
    ranks.barrier()
    run.mkdir(parents=True, exist_ok=True)
    device = ranks.device if ranks.device is not None else resolve_device(config.device)
    if config.batch_size % ranks.world_size:
        raise UserError(f"batch size {config.batch_size} is not divisible by the {ranks.world_size} processes")
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    network, config.variant = base_network(config.profile, config.checkpoint, config.variant,
                                           _feature_latent_dim(config.features[0]), config.weights_dir)
    net = network.config
    seq = SequenceConfig(net.mode)
    if (seq.latent_seq_len, seq.clip_seq_len, seq.sync_seq_len) != (net.latent_seq_len, net.clip_seq_len,
                                                                     net.sync_seq_len):
        raise ValueError("the network's sequence lengths are not the 8 s window's")
    dims = FeatureDims(clip=net.clip_dim, sync=net.sync_dim, text=net.text_dim)
    features = FeatureSet.load(config.features, data_dim(seq, dims), seq.duration_sec)
    train_index, val_index = split(features.ids, config.val_fraction, config.val_ids)
    train_set = features.subset(train_index)
    val_set = features.subset(val_index) if val_index else None

    info = {"variant": config.variant, "profile": config.profile}
    model = add_lora(network, lora_config(config.rank, config.alpha, config.lora_dropout, config.target_modules,
                                          config.use_rslora, config.use_dora))
    model.to(device)
    forward = model
    if ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    trainable, total = count_parameters(model)
    log.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    noise = torch.Generator().manual_seed(config.seed)

    step, best_val = 0, None
    latest = _newest_readable_checkpoint(run) if resume else None
    if resume and latest is None:
        log.warning("--resume: no usable checkpoint in %s yet; starting from step 0", run)
    if latest is not None:
        from peft import set_peft_model_state_dict

        latest, adapter_state, state = latest
        set_peft_model_state_dict(model, adapter_state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        noise.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, best_val = int(state["step"]), state["best_val_loss"]
        best_val = None if best_val is None or math.isnan(best_val) else float(best_val)
        log.info("resumed from %s at step %d", latest, step)
    first_step = step
    writer = ranks.is_writer
    if writer:
        config.save(run / CONFIG_FILE)
    metrics = MetricsLog(run, step) if writer else None
    autocast = mixed_precision(device, config.precision)
    per_epoch = max(1, len(train_set) // config.batch_size) if len(train_set) >= config.batch_size else 1

    def batch_at(position: int) -> dict:
        """Batch number `position` of the run: epochs reshuffled by (seed, epoch), drop-last
        unless the set is smaller than one batch."""
        epoch, within = divmod(position, per_epoch)
        order = epoch_order(len(train_set), config.seed, epoch)
        indices = order[within * config.batch_size:(within + 1) * config.batch_size][ranks.rank::ranks.world_size]
        return {k: v.to(device) for k, v in train_set.batch(indices).items()}

    def validate() -> float | None:
        if val_set is None:
            return None
        model.eval()
        batches = ({k: v.to(device) for k, v in val_set.batch(list(range(i, min(i + config.batch_size,
                                                                                  len(val_set))))).items()}
                   for i in range(0, len(val_set), config.batch_size))
        with autocast:
            value = validation_loss(network, batches, seq)
        model.train()
        return value

    samples = None
    if config.sample_every and writer:
        from shared.synthesis import AudioDecoder, SamplingSettings
        from train.samples import SampleWriter

        sample_set = val_set if val_set is not None else train_set
        samples = SampleWriter(run, sample_set.subset(list(range(min(config.sample_clips, len(sample_set))))),
                               AudioDecoder(net.mode, config.profile, config.weights_dir, device),
                               SamplingSettings(config.sample_steps, config.sample_cfg, config.seed, config.precision))

    def write_samples(current_step: int) -> None:
        model.eval()
        samples.write(network, current_step, metrics.writer)
        model.train()

    def checkpoint(current_step: int) -> None:
        if not writer:
            return
        folder = run / "checkpoints" / f"step-{current_step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(model, folder / "adapter", info)
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "noise_rng": noise.get_state(), "torch_rng": torch.get_rng_state(), "step": current_step,
                 "best_val_loss": float("nan") if best_val is None else best_val}
        temporary = folder / f".{STATE_FILE}.tmp"
        torch.save(state, temporary)
        os.replace(temporary, folder / STATE_FILE)
        for old in sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[
                :-config.keep_last]:
            shutil.rmtree(old)

    model.train()
    last_loss = math.nan
    with tqdm(total=config.steps, initial=step, desc="training", unit="step", disable=not show_progress) as bar:
        while step < config.steps:
            optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for micro in range(config.grad_accumulation):
                batch = batch_at(step * config.grad_accumulation + micro)
                with autocast:
                    loss = training_loss(network, batch, seq, noise, config.null_condition_probability,
                                         forward, (ranks.rank, ranks.world_size))
                (loss / config.grad_accumulation).backward()
                total_loss += loss.item() / config.grad_accumulation
            total_loss = ranks.mean(total_loss)
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            last_loss = total_loss
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss:.4f}")

            record = None
            if step % config.log_every == 0 or step == config.steps:
                record = {"step": step, "train_loss": total_loss, "lr": scheduler.get_last_lr()[0]}
            val_loss = validate() if (step % config.val_every == 0 or step == config.steps) else None
            if val_loss is not None:
                record = (record or {"step": step, "train_loss": total_loss}) | {"val_loss": val_loss}
                if (best_val is None or val_loss < best_val) and writer:
                    best_val = val_loss
                    (run / "best").mkdir(exist_ok=True)
                    save_adapter(model, run / "best" / "adapter", info)
                    (run / "best" / "step.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))
            if record is not None and writer:
                metrics.write(record)
            if samples is not None and (step % config.sample_every == 0 or step == config.steps):
                write_samples(step)
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint(step)
                ranks.barrier()
    if writer:
        save_adapter(model, run / "adapter", info)
        metrics.close()
    return RunResult(run, step, step - first_step, trainable, total, last_loss, best_val,
                     time.perf_counter() - started, writer)
