"""Training configuration: defaults chosen for a few dozen clips, a TOML file, CLI overrides.

Why these defaults (67 clips of 2-8 s, one GPU):
- rank 16, alpha 16: enough capacity to move the sound towards a small domain, few enough
  parameters (~3.6 M on small_16k) not to memorise 67 clips in a few hundred steps.
- lr 1e-4 with 100 warm-up steps, then cosine: the usual LoRA range; warm-up keeps the first
  updates from wrecking the pretrained flow.
- batch 8, 2000 steps: ~240 epochs over 67 clips; validation every 100 steps and the best
  checkpoint kept, because small sets overfit (see peft_and_training_notes).
- weight decay 0 on LoRA factors, gradient clipping at 1.0 (the reference's value).
- classifier-free dropout of the conditions, 10 % each (the reference's value). v2 networks
  (large_44k_v2) drop the CLIP and the Synchformer features independently, v1 networks together:
  MMAudio's author says the v2 models were trained with the two null conditions sampled
  independently, while the released v1 recipe drops them jointly (hkchengrex/MMAudio issue #86).
  Text is dropped independently in both.
- validation holds out whole source videos (`group` of the features): segments of one
  commercial on both sides would measure memory of that commercial, not generalisation.
"""
from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from shared.device import check_device, check_precision
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
    # torch.compile of each transformer block (regional: seconds, not minutes; one graph per block
    # structure for every length bucket). auto: on for CUDA (MMAudio's own trainer compiles), off on
    # the CPU, where inductor's code generation costs more than a short run gains.
    compile: str = "auto"  # auto, on, off
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on the CPU; or bf16, fp32
    # validation and checkpoints
    # Validation: each source video whose name hashes below this is held out (about this share of
    # the sources; at least one, never all; adding sources never moves one already there)
    val_fraction: float = 0.1
    val_ids: list[str] = field(default_factory=list)  # these clips instead
    val_groups: list[str] = field(default_factory=list)  # these source videos instead
    # Of the training sources, this share (same rule) is held out for the run's choices (best
    # adapter, early stopping), so the validation sources judge an adapter chosen without them
    # (crossval sets it); 0: the choices use the validation split.
    tuning_fraction: float = 0.0
    val_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 250
    keep_last: int = 2
    # Stop after this many validations without a new best (0: never); the best adapter is the result.
    early_stopping_patience: int = 0
    # A step whose loss is not finite updates nothing; this many in a row stop the run as diverged
    # (non-zero exit; the last checkpoint, whose weights are finite, stays).
    max_nonfinite_steps: int = 5
    # audio samples (0: off): the first `sample_clips` validation clips (training clips without a
    # validation split), written to RUN/samples/ and TensorBoard
    sample_every: int = 0
    sample_clips: int = 2
    sample_steps: int = 25
    sample_cfg: float = 4.5

    @classmethod
    def from_recorded(cls, run: str | Path) -> "TrainConfig":
        """The settings a run recorded (config.json), to continue it with."""
        from shared.run_record import CONFIG_FILE, read_run_config

        known = {f.name for f in fields(cls)}
        recorded = {k: v for k, v in read_run_config(run).items() if k in known}
        return cls().updated(recorded, str(Path(run) / CONFIG_FILE))

    def updated(self, values: dict, source: str) -> "TrainConfig":
        """These settings with `values` (from a TOML file, a run's record or the command line)
        applied, each checked for its type; `source` names where they came from in errors."""
        types = {f.name: f.type for f in fields(self)}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}")
        for name, value in values.items():
            setattr(self, name, _typed(value, types[name], f"{source}: {name}"))
        return self

    def validate(self) -> "TrainConfig":
        """Every value checked (types were checked on the way in), before anything is created."""
        from shared.profiles import check_profile
        from shared.models.sequence import DEFAULT_WINDOW_SEC
        from shared.runtime import mode_of

        if not self.features:
            raise UserError("no --features folder given")
        check_profile(self.profile)
        if self.variant is not None:
            mode_of(self.variant)
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"compile must be auto, on or off, not {self.compile!r}")
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"schedule must be cosine or constant, not {self.schedule!r}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.tuning_fraction < 1:
            raise UserError("val_fraction and tuning_fraction must be in [0, 1)")
        if self.sample_every < 0 or self.sample_clips < 1 or self.sample_steps < 1:
            raise UserError("sample_every must be ≥ 0, sample_clips and sample_steps positive")
        check_precision(self.precision)
        check_device(self.device)
        if not 0 <= self.length_bucket_sec <= DEFAULT_WINDOW_SEC:
            raise UserError(f"length_bucket_sec must be 0 (off) or a length up to the {DEFAULT_WINDOW_SEC:g} s "
                            f"window, not {self.length_bucket_sec}")
        if self.early_stopping_patience < 0 or self.warmup_steps < 0:
            raise UserError("early_stopping_patience and warmup_steps must be ≥ 0")
        if min(self.steps, self.batch_size, self.grad_accumulation, self.rank, self.val_every, self.log_every,
               self.checkpoint_every, self.keep_last, self.max_nonfinite_steps) < 1:
            raise UserError("steps, batch_size, grad_accumulation, rank, val_every, log_every, checkpoint_every, "
                            "keep_last and max_nonfinite_steps must be positive")
        if not 0 <= self.seed < 2 ** 64:
            raise UserError(f"seed must be a whole number from 0 to 2^64 - 1, not {self.seed}")
        for name in ("lr", "alpha", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("lora_dropout", "null_condition_probability"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.weight_decay < 0 or not all(0 <= beta < 1 for beta in self.betas):
            raise UserError(f"weight_decay must be ≥ 0 and betas in [0, 1), not {self.weight_decay}, {self.betas}")
        try:
            re.compile(self.target_modules)
        except re.error as error:
            raise UserError(f"target_modules is not a regular expression ({error}): {self.target_modules!r}") from None
        return self

    def resolved(self) -> "TrainConfig":
        """The same settings with every path absolute, as the run records them: a run evaluated
        or continued from another folder finds its files."""
        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).resolve())

        return replace(self, features=[absolute(f) for f in self.features], run=absolute(self.run),
                       checkpoint=absolute(self.checkpoint), weights_dir=absolute(self.weights_dir))

    def changes_from(self, recorded: "TrainConfig") -> list[str]:
        """What differs from a run's recorded settings in what a resumed run cannot change, one
        'name recorded → now' each. Settings left unset here (None) take the recorded value."""
        for name in ("variant", "checkpoint", "weights_dir"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(recorded, name))
        return [f"{f.name} {getattr(recorded, f.name)!r} → {getattr(self, f.name)!r}" for f in fields(self)
                if f.name not in RESUMABLE and _comparable(getattr(self, f.name)) != _comparable(getattr(recorded, f.name))]

    def runtime(self) -> Runtime:
        """The network's runtime, in the audio mode of the features (a variant of another is refused)."""
        from shared.features import FeatureFormatError, feature_mode
        from shared.runtime import mode_of

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


# What a resumed run may change (and records): how long it runs, how often it reports, where it
# runs. Everything else (data, split, LoRA shape, optimisation, seed) would mix two runs in one.
RESUMABLE = frozenset({"steps", "val_every", "log_every", "checkpoint_every", "keep_last", "early_stopping_patience",
                       "max_nonfinite_steps", "compile",
                       "sample_every", "sample_clips", "sample_steps", "sample_cfg", "device", "precision",
                       "gradient_checkpointing", "weights_dir", "run"})


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


def read_toml(path: str | Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8-sig"))  # a BOM (Windows editors) is fine
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid TOML ({error})") from None


def _typed(value, annotation: str, where: str):
    """`value` as the type a field's annotation names, or one line saying what was expected."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    expected = {
        "int": (lambda x: isinstance(x, int) and not isinstance(x, bool), "a whole number", int),
        "float": (number, "a number", float),
        "bool": (lambda x: isinstance(x, bool), "true or false", bool),
        "str": (lambda x: isinstance(x, str), "a string", str),
        "str | None": (lambda x: x is None or isinstance(x, str), "a string", lambda x: x),
        "list[str]": (lambda x: isinstance(x, (list, tuple)) and all(isinstance(i, str) for i in x),
                      "a list of strings", list),
        "tuple[float, float]": (lambda x: isinstance(x, (list, tuple)) and len(x) == 2 and all(map(number, x)),
                                "two numbers", lambda x: tuple(float(i) for i in x)),
    }[annotation]
    check, description, convert = expected
    if not check(value):
        raise UserError(f"{where} must be {description}, not {value!r}")
    return convert(value)
