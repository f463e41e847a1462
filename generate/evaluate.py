"""Did the fine-tune help? The base model against base + adapter on held-out clips.

Two numbers per model, each on the same clips, noise and times:
- validation flow loss: the training objective with fixed noise and times (as during training);
- log-mel L1: generate each clip (Euler, CFG, its own duration) from its stored conditions, then
  the mean absolute difference between the generated and the real log-mel spectrogram over the
  clip's real frames. Both spectrograms come out of the same VAE decoder (the real one from the
  clip's stored latent), so the distance measures the generated audio, not the VAE.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from generate.model import load_model, resolve_source, run_settings
from shared.errors import UserError
from shared.features import FeatureSet, data_dim, split
from shared.flow import valid_frames, validation_loss
from shared.lora import merge_adapter
from shared.sequence import SequenceConfig
from shared.synthesis import AudioDecoder, SamplingSettings, sample_stored_clips

MODELS = ("base", "tuned")


@dataclass
class Evaluation:
    variant: str
    held_out: str  # where the clips came from
    clips: list[str]
    sampling: dict
    val_flow_loss: dict[str, float] = field(default_factory=dict)
    mel_l1: dict[str, float] = field(default_factory=dict)
    per_clip_mel_l1: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [("validation flow loss", self.val_flow_loss), ("log-mel L1 to the real audio", self.mel_l1)]
        lines = [f"{'metric (lower is better)':<30}{'base':>10}{'tuned':>10}{'change':>10}"]
        for name, values in rows:
            base, tuned = values["base"], values["tuned"]
            change = f"{100 * (tuned - base) / base:+.1f}%" if base else "n/a"
            lines.append(f"{name:<30}{base:>10.4f}{tuned:>10.4f}{change:>10}")
        return "\n".join(lines)


def held_out_clips(run: Path, features: Path | None, ids: list[str], seq: SequenceConfig, dims) -> tuple[FeatureSet, str]:
    """`features` (all clips, or `ids`), else the run's own validation split."""
    if features is not None:
        clips = FeatureSet.load([str(features)], data_dim(seq, dims), seq.duration_sec)
        where = str(features)
    else:
        settings = run_settings(run)
        clips = FeatureSet.load(settings["features"], data_dim(seq, dims), seq.duration_sec)
        _, val_index = split(clips.ids, settings["val_fraction"], settings["val_ids"])
        if not val_index:
            raise UserError(f"{run} trained without a validation split; pass --features with held-out clips")
        clips, where = clips.subset(val_index), f"validation split of {run}"
    if ids:
        unknown = sorted(set(ids) - set(clips.ids))
        if unknown:
            raise UserError(f"clip id(s) not among the held-out clips: {', '.join(unknown[:5])}")
        clips = clips.subset([n for n, i in enumerate(clips.ids) if i in ids])
    return clips, where


def _mel_l1(network, clips: FeatureSet, decoder: AudioDecoder, sampling: SamplingSettings,
            batch_size: int) -> dict[str, float]:
    """Per clip: generate at the clip's duration, decode both spectrograms, L1 over real frames."""
    distances: dict[str, float] = {}
    for rows, seq, latents in sample_stored_clips(network, clips.tensors, sampling, batch_size):
        tensors = clips.batch(rows)
        generated = decoder.mel(latents)
        real = decoder.mel(tensors["a_mean"][:, :seq.latent_seq_len])
        frames = 2 * valid_frames(tensors["duration_sec"], seq)
        for row, n in enumerate(rows):
            distance = (generated[row, :, :frames[row]] - real[row, :, :frames[row]]).abs().mean()
            distances[clips.ids[n]] = float(distance)
    return distances


def evaluate(run: Path, features: Path | None = None, ids: list[str] | None = None,
             sampling: SamplingSettings = SamplingSettings(), lora_scale: float = 1.0, batch_size: int = 4,
             device: str = "auto", profile: str | None = None, checkpoint: str | None = None,
             weights_dir: str | os.PathLike | None = None, out: Path | None = None) -> Evaluation:
    """Evaluate base and tuned on the same held-out clips; write the JSON (default RUN/evaluation.json)."""
    from shared.device import mixed_precision, resolve_device
    from shared.profiles import FeatureDims

    started = time.perf_counter()
    source = resolve_source(run=run, profile=profile, checkpoint=checkpoint,
                            weights_dir=str(weights_dir) if weights_dir else None)
    compute = resolve_device(device)
    base, variant = load_model(replace(source, adapter=None))
    tuned = merge_adapter(copy.deepcopy(base), source.adapter, lora_scale,
                          expected={"variant": variant, "profile": source.profile})
    config = base.config
    seq = SequenceConfig(config.mode)
    clips, where = held_out_clips(Path(run), features, ids or [], seq,
                                  FeatureDims(config.clip_dim, config.sync_dim, config.text_dim))
    decoder = AudioDecoder(config.mode, source.profile, source.weights_dir, compute)
    result = Evaluation(variant, where, list(clips.ids), asdict(sampling))
    for name, network in zip(MODELS, (base, tuned)):
        network.to(compute)
        batches = ({k: v.to(compute) for k, v in clips.batch(list(range(i, min(i + batch_size, len(clips))))).items()}
                   for i in range(0, len(clips), batch_size))
        with mixed_precision(compute, sampling.precision):
            result.val_flow_loss[name] = validation_loss(network, batches, seq)
        distances = _mel_l1(network, clips, decoder, sampling, batch_size)
        result.mel_l1[name] = sum(distances.values()) / len(distances)
        for clip_id, distance in distances.items():
            result.per_clip_mel_l1.setdefault(clip_id, {})[name] = distance
        network.to("cpu")
    result.seconds = time.perf_counter() - started
    out = Path(out) if out is not None else Path(run) / "evaluation.json"
    temporary = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(asdict(result), indent=2) + "\n")
    temporary.replace(out)
    return result
