"""The training run: a `Trainer` holding the model, optimizer and explicit state (step, best
validation loss, random generators), with one short method per thing a step does.

Data flow of a step: the epoch plan (train/buckets.py) gives the batch and its length → the
network's sequence lengths are set to that length and the stored features cut to it → masked
flow-matching loss (train/objective.py) → AdamW step. Validation, checkpoints, samples and early
stopping follow at their intervals. The run folder's layout: train/run_folder.py.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.distributed import Ranks
from shared.errors import UserError
from shared.features import FeatureSet, feature_fingerprint, folders_window, split
from shared.models.flow import validation_losses
from shared.lora import add_lora, adapter_bytes, count_parameters, lora_config, save_adapter
from shared.outputs import atomic_path, atomic_write_text, folder_lock, replace_folder, require_space
from shared.progress import progress as progress_bar
from shared.run_record import CONFIG_FILE, Split, checkpoint_folders
from shared.runtime import Runtime
from shared.models.sequence import SequenceConfig
from shared.synthesis import crop_video_features, use_duration
from train.buckets import Batch, bucket_lengths, epoch_plan
from train.card import model_card
from train.choices import Choices
from train.config import TrainConfig
from train.objective import training_loss
from train.run_folder import (STATE_FILE, MetricsLog, check_run_folder, complete_checkpoints,
                              newest_readable_checkpoint, prepare_run_folder, release_previous, restore_previous)

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite; the message says when and what is kept."""


@dataclass
class RunResult:
    run: Path
    steps: int  # the run's step count when this invocation ended
    steps_this_run: int  # steps this invocation trained (fewer than `steps` after --resume)
    trainable_parameters: int
    total_parameters: int
    last_train_loss: float
    best_val_loss: float | None
    best_step: int | None  # when the best validation loss was measured
    stopped_early: bool  # early stopping ended the run before `steps`
    seconds: float
    skipped_steps: int = 0  # steps whose loss was not finite: they updated nothing
    validation: str = ""  # e.g. "validation: 8 clips from 2 source videos (none of their segments in training)"
    main_process: bool = True  # False on the other ranks of a torchrun job: rank 0 reports


def _schedule(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def compile_blocks(network, backend: str = "inductor") -> None:
    """torch.compile each joint and fused block in place (regional compilation: a block's graph is
    compiled once and shared by every block of its structure, so it takes seconds rather than the
    minutes of the whole network). Shapes are dynamic from the start, so every length bucket runs
    the same graphs; works under peft (its LoRA layers are inside the blocks), gradient
    checkpointing and DDP (both wrap the compiled blocks)."""
    for block in [*network.joint_blocks, *network.fused_blocks]:
        block.compile(backend=backend, dynamic=True)


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the device: through pinned memory, without waiting, on CUDA."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}


def cut_to_length(batch: dict[str, torch.Tensor], seq: SequenceConfig) -> dict[str, torch.Tensor]:
    """Features stored for the full window, cut to `seq`'s shorter one (latents and video)."""
    clip_features, sync_features = crop_video_features(batch["clip_features"], batch["sync_features"], seq)
    return dict(batch, a_mean=batch["a_mean"][:, :seq.latent_seq_len], a_std=batch["a_std"][:, :seq.latent_seq_len],
                clip_features=clip_features, sync_features=sync_features)


def choose_split(features: FeatureSet, config: TrainConfig) -> Split:
    """A new run's split, by source video, with the feature folders' fingerprints: validation
    sources, then (with `tuning_fraction`) the tuning sources among the rest by the same rule."""
    train_index, val_index = split(features.ids, features.groups, config.val_fraction, config.val_ids,
                                   config.val_groups)
    train_ids = [features.ids[n] for n in train_index]
    tuning_ids: list[str] = []
    if config.tuning_fraction > 0:
        kept, tuning = split(train_ids, [features.groups[n] for n in train_index], config.tuning_fraction)
        train_ids, tuning_ids = [train_ids[n] for n in kept], [train_ids[n] for n in tuning]
    return Split(train_ids, [features.ids[n] for n in val_index], dict(zip(features.ids, features.groups)),
                 {folder: feature_fingerprint(folder) for folder in config.features}, tuning_ids)


class Trainer:
    def __init__(self, config: TrainConfig, run: Path, ranks: Ranks, runtime: Runtime, split: Split | None = None):
        """`split`: the run's recorded split when it is continued; a new run chooses one."""
        self.config, self.run, self.ranks, self.runtime = config, run, ranks, runtime
        self.device = runtime.torch_device
        self.main_process = ranks.is_main
        torch.manual_seed(config.seed)
        random.seed(config.seed)

        self.network = runtime.network()
        config.variant = runtime.variant
        self.window = runtime.sequence(folders_window(config.features))
        features = FeatureSet.load(config.features, runtime.data_dim(self.window.window_sec), self.window.window_sec)
        self.split = split or choose_split(features, config)
        if len(self.split.train_ids) < ranks.world_size:
            raise UserError(f"{len(self.split.train_ids)} training clip(s) cannot feed {ranks.world_size} processes")
        self.train_set = features.select(self.split.train_ids)
        self.val_set = features.select(self.split.val_ids) if self.split.val_ids else None
        # the run's choices (best adapter, early stopping) are made on these: the tuning clips when
        # the split has them, so the validation clips judge an adapter chosen without them
        self.tuning_set = features.select(self.split.tuning_ids) if self.split.tuning_ids else None
        self.train_buckets = self._buckets(self.train_set)
        self.batches_per_epoch = len(epoch_plan(self.train_buckets, config.batch_size, config.seed, 0))

        self.model = add_lora(self.network, lora_config(config.rank, config.alpha, config.lora_dropout,
                                                        config.target_modules, config.use_rslora, config.use_dora))
        self.network.gradient_checkpointing = config.gradient_checkpointing
        self.model.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the conv-MLPs see a few fixed shapes (one per bucket)
        if config.compile == "on" or (config.compile == "auto" and self.device.type == "cuda"):
            compile_blocks(self.network)
        self.forward = self.model
        if ranks.grouped:  # a process group is up (torchrun; the device check's group of one)
            from torch.nn.parallel import DistributedDataParallel

            # No buffer broadcast at each forward: the rotary tables are rebuilt for each bucket's length
            # on every rank alike (MMAudio's trainer: broadcast_buffers=False; torch 2.14 names it
            # forward_sync_buffers)
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                              inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_buffer_sync)
        self.trainable, self.total = count_parameters(self.model)
        log.info("LoRA: %d trainable parameters of %d (%.2f%%)", self.trainable, self.total,
                 100 * self.trainable / self.total)
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        self.noise = torch.Generator().manual_seed(config.seed)
        self.info = {"variant": config.variant, "profile": config.profile}
        self._plan: tuple[int, list[Batch]] | None = None  # (epoch, its batches)

        # the state a checkpoint keeps
        self.step = 0
        self.choices = Choices(config.early_stopping_patience)  # best adapter, early stopping
        self.nonfinite_steps = 0  # steps in a row whose loss was not finite
        self.skipped_steps = 0  # steps in all whose loss was not finite (they updated nothing)
        self.weights_finite = True

    # -- data ----------------------------------------------------------------------------------
    def _buckets(self, clips: FeatureSet) -> list[float]:
        durations = clips.tensors["duration_sec"].tolist()
        return bucket_lengths(durations, self.config.length_bucket_sec, self.window.window_sec)

    def batch(self, position: int) -> tuple[SequenceConfig, dict[str, torch.Tensor], int]:
        """Batch number `position` of the run (this rank's rows), at its bucket's length, and the
        size of the whole batch. Every rank gets as many rows: a batch of fewer clips than the
        batch size (a small training set) is cut to a multiple of the ranks."""
        epoch, within = divmod(position, self.batches_per_epoch)
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_plan(self.train_buckets, self.config.batch_size, self.config.seed, epoch))
        planned = self._plan[1][within]
        indices = planned.indices[:len(planned.indices) - len(planned.indices) % self.ranks.world_size]
        seq = self.runtime.sequence(planned.seconds)
        tensors = cut_to_length(self.train_set.batch(self.ranks.shard(indices)), seq)
        return seq, to_device(tensors, self.device), len(indices)

    # -- one step --------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step; a step whose loss (the mean over ranks, the same on every rank) is not
        finite updates nothing, and `max_nonfinite_steps` of them in a row stop the run."""
        config = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for micro in range(config.grad_accumulation):
            seq, batch, size = self.batch(self.step * config.grad_accumulation + micro)
            use_duration(self.network, seq)
            # DDP all-reduces the gradients once per step, at the last micro-step
            last_micro = micro == config.grad_accumulation - 1
            with (contextlib.nullcontext() if last_micro or self.forward is self.model else self.forward.no_sync()):
                with self.runtime.autocast():
                    loss = training_loss(self.network, batch, seq, self.noise, config.null_condition_probability,
                                         self.forward, (self.ranks.rank, self.ranks.world_size), size)
                (loss / config.grad_accumulation).backward()
            total_loss += loss.item() / config.grad_accumulation
        total_loss = self.ranks.from_main(self.ranks.mean(total_loss))  # what every rank decides on
        self.step += 1
        if not math.isfinite(total_loss):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            self.skipped_steps += 1
            return total_loss
        self.nonfinite_steps = 0
        torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.weights_finite = bool(self.ranks.from_main(float(all(bool(torch.isfinite(p).all())
                                                                  for p in self.parameters))))
        return total_loss

    def divergence(self) -> "TrainingDiverged | None":
        """Why the run must stop as diverged, or None (the same answer on every rank)."""
        if not self.weights_finite:
            return self.diverged(f"the adapter's weights stopped being finite at step {self.step}")
        if self.nonfinite_steps >= self.config.max_nonfinite_steps:
            return self.diverged(f"the loss was not finite for {self.nonfinite_steps} steps in a row (up to step "
                                 f"{self.step})")
        return None

    def diverged(self, what: str) -> "TrainingDiverged":
        kept = complete_checkpoints(self.run)
        last = f"its last checkpoint, {kept[0]}, has finite weights" if kept else "it saved no checkpoint"
        return TrainingDiverged(f"{self.run}: training diverged: {what}; {last}. Lower lr (now {self.config.lr:g}) or "
                                "warm up longer, then start again with --overwrite")

    def validate(self, clips: FeatureSet | None) -> float | None:
        """Fixed-noise validation loss of held-out clips, each at its bucket's length as in training."""
        if clips is None:
            return None
        self.model.eval()
        buckets = self._buckets(clips)
        losses = []  # per clip, bucket after bucket
        for length in sorted(set(buckets)):
            rows = [n for n, b in enumerate(buckets) if b == length]
            seq = self.runtime.sequence(length)
            use_duration(self.network, seq)
            batches = (to_device(cut_to_length(clips.batch(rows[i:i + self.config.batch_size]), seq), self.device)
                       for i in range(0, len(rows), self.config.batch_size))
            with self.runtime.autocast():
                losses.append(validation_losses(self.network, batches, seq))
        self.model.train()
        return torch.cat(losses).mean().item()

    # -- what the run keeps ------------------------------------------------------------------------
    def record_validation(self, loss: float) -> None:
        """The loss the run's choices are made on (tuning clips, else validation clips; rank 0's on
        every rank): a new best keeps its adapter; early stopping counts the validations since."""
        if self.choices.record(self.step, loss) and self.main_process:
            save_adapter(self.model, self.run / "best" / "adapter", self.info, self.card())
            atomic_write_text(self.run / "best" / "step.json", json.dumps(
                {"step": self.step, "loss": loss, "on": "tuning" if self.tuning_set is not None else "validation"}))

    def card(self) -> str:
        """The model card of the adapter as it is now."""
        durations = self.train_set.tensors["duration_sec"]
        return model_card(self.config, len(self.train_set), float(durations.sum()),
                          0 if self.val_set is None else len(self.val_set), self.step, self.choices.best,
                          self.choices.best_step, self.skipped_steps)

    def save_checkpoint(self) -> None:
        if not self.main_process:
            return
        folder = self.run / "checkpoints" / f"step-{self.step:06d}"
        # the adapter, and the optimizer's two moments of every LoRA weight beside it
        require_space(self.run, 3 * adapter_bytes(self.model), "a checkpoint")
        folder.mkdir(parents=True, exist_ok=True)
        save_adapter(self.model, folder / "adapter", self.info, self.card())
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "noise_rng": self.noise.get_state(), "torch_rng": torch.get_rng_state(), "step": self.step,
                 # LoRA dropout on a GPU draws from the CUDA generator: without it resume is not exact
                 **({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
                 "best_val_loss": math.nan if self.choices.best is None else self.choices.best,
                 "best_step": -1 if self.choices.best_step is None else self.choices.best_step,
                 "stale_validations": self.choices.stale, "skipped_steps": self.skipped_steps}
        with atomic_path(folder / STATE_FILE) as temporary:
            torch.save(state, temporary)
        kept = [folder for _, folder in checkpoint_folders(self.run)]  # our names only: a user's copy stays
        for old in kept[:-self.config.keep_last]:
            shutil.rmtree(old)
        release_previous(self.run)

    def resume(self) -> None:
        """Continue from the newest readable checkpoint (a damaged one is named and skipped)."""
        found = newest_readable_checkpoint(self.run)
        if found is None:
            log.warning("--resume: no usable checkpoint in %s yet; starting from step 0", self.run)
            return
        from peft import set_peft_model_state_dict

        folder, adapter_state, state = found
        set_peft_model_state_dict(self.model, adapter_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.noise.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step = int(state["step"])
        best = state["best_val_loss"]
        self.choices.best = None if best is None or math.isnan(best) else float(best)
        self.choices.best_step = None if state.get("best_step", -1) < 0 else int(state["best_step"])
        self.choices.stale = int(state.get("stale_validations", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        log.info("resumed from %s at step %d", folder, self.step)

    # -- the run -----------------------------------------------------------------------------------
    def fit(self, show_progress: bool = True) -> tuple[int, float, bool]:
        """Train up to `config.steps`: (steps trained now, last training loss, stopped early)."""
        config, first_step = self.config, self.step
        metrics = MetricsLog(self.run, self.step) if self.main_process else None
        samples = self._training_samples() if config.sample_every and self.main_process else None
        self.model.train()
        last_loss, stopped = math.nan, self.choices.stop  # a resumed run that had stopped early stays stopped
        with progress_bar(total=config.steps, initial=self.step, desc="training", unit="step",
                  disable=not show_progress) as bar:
            while self.step < config.steps and not stopped:
                last_loss = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                last = self.step == config.steps
                diverged = self.divergence()
                record = {"step": self.step, "train_loss": last_loss, "lr": self.scheduler.get_last_lr()[0]} \
                    if self.step % config.log_every == 0 or last or not math.isfinite(last_loss) else None
                if diverged is not None:
                    if metrics is not None:
                        metrics.write(record or {"step": self.step, "train_loss": last_loss})
                        metrics.close()
                    raise diverged
                validating = self.step % config.val_every == 0 or last
                # rank 0's numbers on every rank: the choices below come out the same everywhere
                val_loss = self.ranks.from_main(self.validate(self.val_set)) if validating else None
                tuning_loss = self.ranks.from_main(self.validate(self.tuning_set)) if validating else None
                if val_loss is not None or tuning_loss is not None:
                    record = (record or {"step": self.step, "train_loss": last_loss}) | {
                        key: value for key, value in (("val_loss", val_loss), ("tuning_loss", tuning_loss))
                        if value is not None}
                    self.record_validation(tuning_loss if self.tuning_set is not None else val_loss)
                    stopped = self.choices.stop
                if record is not None and metrics is not None:
                    metrics.write(record)
                if samples is not None and (self.step % config.sample_every == 0 or last or stopped):
                    self.model.eval()
                    samples.write(self.network, self.step, metrics.tensorboard)
                    self.model.train()
                if self.step % config.checkpoint_every == 0 or last or stopped:
                    self.save_checkpoint()
                    self.ranks.barrier()
        use_duration(self.network, self.window)
        if self.main_process:
            self._write_final_adapter(stopped)
            metrics.close()
        return self.step - first_step, last_loss, stopped

    def _write_final_adapter(self, stopped: bool) -> None:
        final = self.run / "adapter"
        best = self.run / "best" / "adapter"
        if stopped and best.is_dir():  # early stopping: the best adapter is the result
            temporary = self.run / ".adapter.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            shutil.copytree(best, temporary)
            replace_folder(temporary, final)
        else:
            save_adapter(self.model, final, self.info, self.card())
        release_previous(self.run)

    def _training_samples(self):
        from shared.synthesis import SamplingSettings
        from train.samples import TrainingSamples

        config = self.config
        sample_set = self.val_set if self.val_set is not None else self.train_set
        return TrainingSamples(self.run, sample_set.subset(list(range(min(config.sample_clips, len(sample_set))))),
                               self.runtime, SamplingSettings(config.sample_steps, config.sample_cfg, config.seed))


def train(config: TrainConfig, resume: bool = False, show_progress: bool = True,
          overwrite: bool = False) -> RunResult:
    """Run (or with `resume`, continue) the LoRA fine-tune `config` describes. Everything is
    checked before the run folder is touched; the folder is locked while the run writes it."""
    if resume and overwrite:
        raise UserError("--resume continues the run and --overwrite deletes it: give one of them")
    config = config.validate().resolved()
    started = time.perf_counter()
    ranks = Ranks.from_environment(config.device)
    if config.batch_size % ranks.world_size:
        raise UserError(f"batch size {config.batch_size} is not divisible by the {ranks.world_size} processes")
    run = Path(config.run)
    with folder_lock(run, "train"), ranks:
        # Every check first (folder, device, features, split, network, checkpoint): an earlier run
        # replaced with --overwrite is deleted only once the new one is sure to start.
        ranks.main_first(lambda: check_run_folder(config, resume, overwrite))
        runtime = config.runtime()
        if ranks.device is not None:
            runtime = runtime.on(ranks.device)
        recorded_split = Split.load(run) if resume else None
        trainer = Trainer(config, run, ranks, runtime,
                          recorded_split.relocated(config.features) if recorded_split else None)
        if resume:
            trainer.resume()
            if trainer.step > config.steps:
                raise UserError(f"{run}: the run is at step {trainer.step}; --steps {config.steps} would train "
                                f"nothing (give more than {trainer.step} steps to continue it)")
        if trainer.tuning_set is None and config.early_stopping_patience and trainer.val_set is not None:
            log.warning("early stopping chooses the adapter on the validation clips, which then judge it: evaluate "
                        "will call its verdict optimistic (tuning_fraction holds out other sources for the choice)")
        ranks.main_first(lambda: prepare_run_folder(config, resume))
        try:
            if ranks.is_main:
                config.save(run / CONFIG_FILE)
                trainer.split.save(run)
            trained, last_loss, stopped = trainer.fit(show_progress)
        except BaseException:
            if ranks.is_main:
                restore_previous(run)
            raise
    return RunResult(run, trainer.step, trained, trainer.trainable, trainer.total, last_loss, trainer.choices.best,
                     trainer.choices.best_step, stopped, time.perf_counter() - started, trainer.skipped_steps,
                     trainer.split.describe_validation(), ranks.is_main)
