"""Training configuration: defaults chosen for a few dozen clips, a TOML file, CLI overrides.

Why these defaults (67 clips of 2-8 s, one GPU):
- rank 16, alpha 16: enough capacity to move the sound towards a small domain, few enough
  parameters (~3.6 M on small_16k) not to memorise 67 clips in a few hundred steps.
- lr 1e-4 with 100 warm-up steps, then cosine: the usual LoRA range; warm-up keeps the first
  updates from wrecking the pretrained flow.
- batch 8, 2000 steps: ~240 epochs over 67 clips; validation every 100 steps and the best
  checkpoint kept, because small sets overfit (see peft_and_training_notes).
- weight decay 0 on LoRA factors, gradient clipping at 1.0 (the reference's value).
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from shared.device import check_precision
from shared.errors import UserError
from shared.runtime import Runtime

DEFAULT_TARGETS = r"(joint_blocks\.\d+\.(latent|clip|text)_block|fused_blocks\.\d+)\.(attn\.qkv|linear1|ffn\.w[123])"


@dataclass
class TrainConfig:
    features: list[str] = field(default_factory=list)
    run: str = "data/runs/default"
    profile: str = "real"
    checkpoint: str | None = None  # official network file (real profile)
    variant: str | None = None  # default: read from the checkpoint, else the features' mode's default
    weights_dir: str | None = None
    # LoRA
    rank: int = 16
    alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str = DEFAULT_TARGETS
    use_rslora: bool = False
    use_dora: bool = False
    # optimisation
    steps: int = 2000
    batch_size: int = 8
    grad_accumulation: int = 1
    lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # or "constant"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    null_condition_probability: float = 0.1
    # Each batch trains at one clip length: durations rounded up to this many seconds (0: every
    # clip at the full window, padded). 1 s costs little padding and makes ~2.3x fewer tokens on
    # clips of 2-8 s than the fixed window (bench/train.py); generation samples clips at their length.
    length_bucket_sec: float = 1.0
    # Recompute each transformer block's activations in the backward pass: far less memory
    # (large_44k_v2 LoRA at batch 8 on a 24 GB card) for about a third more time per step.
    gradient_checkpointing: bool = False
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on the CPU; or bf16, fp32
    # validation and checkpoints
    val_fraction: float = 0.1
    val_ids: list[str] = field(default_factory=list)
    val_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 250
    keep_last: int = 2
    # Stop after this many validations without a new best (0: never); the best adapter is the result.
    early_stopping_patience: int = 0
    # audio samples (0: off): the first `sample_clips` validation clips (training clips without a
    # validation split), written to RUN/samples/ and TensorBoard
    sample_every: int = 0
    sample_clips: int = 2
    sample_steps: int = 25
    sample_cfg: float = 4.5

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        data = tomllib.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}")
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def validate(self) -> "TrainConfig":
        if not self.features:
            raise UserError("no --features folder given")
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"schedule must be cosine or constant, not {self.schedule!r}")
        if not 0 <= self.val_fraction < 1:
            raise UserError("val_fraction must be in [0, 1)")
        if self.sample_every < 0 or self.sample_clips < 1 or self.sample_steps < 1:
            raise UserError("sample_every must be ≥ 0, sample_clips and sample_steps positive")
        check_precision(self.precision)
        if self.length_bucket_sec < 0 or self.early_stopping_patience < 0:
            raise UserError("length_bucket_sec and early_stopping_patience must be ≥ 0")
        if min(self.steps, self.batch_size, self.grad_accumulation, self.rank) < 1:
            raise UserError("steps, batch_size, grad_accumulation and rank must be positive")
        return self

    def runtime(self) -> Runtime:
        """The network's runtime, in the audio mode of the features (a variant of another is refused)."""
        from shared.features import FeatureFormatError, feature_mode
        from shared.sequence import mode_of

        mode = feature_mode(self.features[0])
        if self.variant is not None and mode_of(self.variant) != mode:
            raise FeatureFormatError(f"{self.features[0]}: features of another mode ({mode}) than variant "
                                     f"{self.variant} takes ({mode_of(self.variant)}); recompute them with "
                                     f"`mmaudio-lora features --variant {self.variant}` or train a {mode} variant")
        return Runtime(variant=self.variant, mode=mode, profile=self.profile, weights_dir=self.weights_dir,
                       network_file=self.checkpoint, device=self.device, precision=self.precision)

    def save(self, path: Path) -> None:
        from shared.outputs import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(self), indent=1))
