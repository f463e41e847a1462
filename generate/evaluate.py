"""Did the fine-tune help? The base model against base + adapter on held-out clips, at one or
several adapter strengths, optionally for every kept checkpoint too.

Two numbers per model, each on the same clips, noise and times:
- validation flow loss: the training objective with fixed noise and times (as during training);
- log-mel L1: generate each clip (Euler, CFG, its own duration) from its stored conditions, then
  the mean absolute difference between the generated and the real log-mel spectrogram over the
  clip's real frames. Both spectrograms come out of the same VAE decoder (the real one from the
  clip's stored latent), so the distance measures the generated audio, not the VAE.
The report (generate/report.py) shows them with the audio, spectrograms and training curves.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from generate.model import ModelSource, resolve_source, run_settings
from shared.errors import UserError
from shared.feature_files import MANIFEST_NAME
from shared.features import FeatureSet, feature_labels, split
from shared.flow import valid_frames, validation_loss
from shared.lora import merge_adapter
from shared.outputs import OutputError, atomic_write_text
from shared.runtime import Runtime
from shared.synthesis import AudioDecoder, SamplingSettings, sample_stored_clips

MODELS = ("base", "tuned")


@dataclass
class Evaluation:
    variant: str
    held_out: str  # where the clips came from
    clips: list[str]
    sampling: dict
    val_flow_loss: dict[str, float] = field(default_factory=dict)  # base, tuned
    mel_l1: dict[str, float] = field(default_factory=dict)
    per_clip_mel_l1: dict[str, dict[str, float]] = field(default_factory=dict)
    lora_scale: float = 1.0  # the strength "tuned" was evaluated at (the best one, when several)
    scales: dict[str, dict[str, float]] = field(default_factory=dict)  # several strengths: each one's metrics
    checkpoints: dict[str, float] = field(default_factory=dict)  # adapter folder → validation flow loss
    seconds: float = 0.0

    def table(self) -> str:
        rows = [("validation flow loss", self.val_flow_loss), ("log-mel L1 to the real audio", self.mel_l1)]
        lines = [f"{'metric (lower is better)':<30}{'base':>10}{'tuned':>10}{'change':>10}"]
        for name, values in rows:
            lines.append(f"{name:<30}{values['base']:>10.4f}{values['tuned']:>10.4f}"
                         f"{change(values['base'], values['tuned']):>10}")
        if self.scales:
            lines.append(f"adapter strengths (tuned = {self.lora_scale:g}, the lowest validation flow loss):")
            lines += [f"  scale {scale:<6}{v['val_flow_loss']:>10.4f} flow loss{v['mel_l1']:>10.4f} log-mel L1"
                      for scale, v in self.scales.items()]
        if self.checkpoints:
            lines.append("validation flow loss of the kept adapters:")
            lines += [f"  {name:<28}{loss:>10.4f}" for name, loss in self.checkpoints.items()]
        return "\n".join(lines)

    def verdict(self) -> str:
        flow, mel = self.val_flow_loss, self.mel_l1
        better = [name for name, values in (("validation flow loss", flow), ("log-mel L1", mel))
                  if values["tuned"] < values["base"]]
        summary = (f"flow loss {change(flow['base'], flow['tuned'])}, log-mel L1 {change(mel['base'], mel['tuned'])} "
                   f"on {len(self.clips)} held-out clip(s)")
        if len(better) == 2:
            return f"The fine-tune helps: {summary}."
        if better:
            return f"Mixed: the fine-tune improves the {better[0]} only ({summary})."
        return f"The fine-tune does not help on these clips: {summary}."


def change(base: float, tuned: float) -> str:
    return f"{100 * (tuned - base) / base:+.1f}%" if base else "n/a"


def held_out_clips(run: Path, features: Path | None, ids: list[str], runtime: Runtime) -> tuple[FeatureSet, str]:
    """`features` (all clips, or `ids`), else the run's own validation split."""
    window = runtime.sequence().window_sec
    if features is not None:
        clips = FeatureSet.load([str(features)], runtime.data_dim(), window)
        where = str(features)
    else:
        settings = run_settings(run)
        clips = FeatureSet.load(settings["features"], runtime.data_dim(), window)
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


@dataclass
class Generated:
    """One model's output for one clip, over the clip's real frames."""
    mel: torch.Tensor  # (bins, frames)
    distance: float  # log-mel L1 to the real clip


def generate_clips(network, clips: FeatureSet, decoder: AudioDecoder, sampling: SamplingSettings,
                   batch_size: int) -> dict[str, Generated]:
    """Per clip: generate at the clip's duration, decode both spectrograms, L1 over real frames."""
    generated: dict[str, Generated] = {}
    for rows, seq, latents in sample_stored_clips(decoder.runtime, network, clips.tensors, sampling, batch_size):
        tensors = clips.batch(rows)
        mel = decoder.mel(latents)
        real = decoder.mel(tensors["a_mean"][:, :seq.latent_seq_len])
        frames = 2 * valid_frames(tensors["duration_sec"], seq)
        for row, n in enumerate(rows):
            ours = mel[row, :, :frames[row]].cpu()
            distance = (ours - real[row, :, :frames[row]].cpu()).abs().mean()
            generated[clips.ids[n]] = Generated(ours, float(distance))
    return generated


def real_mels(clips: FeatureSet, decoder: AudioDecoder, batch_size: int) -> dict[str, torch.Tensor]:
    """Each clip's real log-mel (bins, real frames), decoded from its stored latent."""
    seq = decoder.runtime.sequence()
    frames = 2 * valid_frames(clips.tensors["duration_sec"], seq)
    mels = {}
    for start in range(0, len(clips), batch_size):
        rows = list(range(start, min(start + batch_size, len(clips))))
        decoded = decoder.mel(clips.batch(rows)["a_mean"])
        for row, n in enumerate(rows):
            mels[clips.ids[n]] = decoded[row, :, :frames[n]].cpu()
    return mels


def _flow_loss(runtime: Runtime, network, clips: FeatureSet, batch_size: int) -> float:
    device = runtime.torch_device
    batches = ({k: v.to(device) for k, v in clips.batch(list(range(i, min(i + batch_size, len(clips))))).items()}
               for i in range(0, len(clips), batch_size))
    with runtime.autocast():
        return validation_loss(network, batches, runtime.sequence())


def kept_adapters(run: Path) -> dict[str, Path]:
    """Every checkpoint's adapter and the best one, by a readable name, in step order."""
    adapters = {folder.name: folder / "adapter"
                for folder in sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
                if (folder / "adapter").is_dir()}
    best = run / "best" / "adapter"
    if best.is_dir():
        step = json.loads((run / "best" / "step.json").read_text())["step"] if (run / "best" / "step.json").is_file() \
            else "?"
        adapters[f"best (step {step})"] = best
    return adapters


def check_evaluation_target(out: Path) -> Path:
    """The JSON to write: a new file, or an earlier evaluation of ours; anything else is refused."""
    out = Path(out)
    if out.exists():
        try:
            ours = out.is_file() and "val_flow_loss" in json.loads(out.read_text())
        except (ValueError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise OutputError(f"{out}: a file mmaudio-lora did not write is in the way; choose another --out")
    return out


def evaluate(run: Path, source: ModelSource | None = None, features: Path | None = None, ids: list[str] | None = None,
             sampling: SamplingSettings = SamplingSettings(), lora_scales: tuple[float, ...] = (1.0,),
             batch_size: int = 4, out: Path | None = None, checkpoints: bool = False,
             report: bool = True) -> Evaluation:
    """Evaluate base and tuned on the same held-out clips; write the JSON (default RUN/evaluation.json)
    and the report (RUN/evaluation/index.html). `source`: the run's runtime and adapter, by default
    as the run recorded them."""
    if not lora_scales or not all(math.isfinite(s) for s in lora_scales):
        raise UserError(f"--lora-scale needs finite numbers, not {list(lora_scales)}")
    started = time.perf_counter()
    run = Path(run)
    out = check_evaluation_target(Path(out) if out is not None else run / "evaluation.json")
    source = source or resolve_source(run=run)
    runtime = source.runtime
    base = ModelSource(runtime).load()
    variant = runtime.variant
    clips, where = held_out_clips(run, features, ids or [], runtime)
    decoder = AudioDecoder(runtime)
    expected = {"variant": variant, "profile": runtime.profile}
    result = Evaluation(variant, where, list(clips.ids), asdict(sampling))

    def scored(network) -> tuple[float, dict[str, Generated]]:
        network.to(runtime.torch_device)
        loss = _flow_loss(runtime, network, clips, batch_size)
        generated = generate_clips(network, clips, decoder, sampling, batch_size)
        network.to("cpu")
        return loss, generated

    outputs = {"base": scored(base)}
    for scale in lora_scales:
        outputs[f"scale {scale:g}"] = scored(merge_adapter(copy.deepcopy(base), source.adapter, scale, expected))
    if len(lora_scales) > 1:
        result.scales = {f"{s:g}": {"val_flow_loss": outputs[f"scale {s:g}"][0],
                                    "mel_l1": _mean_distance(outputs[f"scale {s:g}"][1])} for s in lora_scales}
    result.lora_scale = min(lora_scales, key=lambda s: outputs[f"scale {s:g}"][0])
    outputs["tuned"] = outputs[f"scale {result.lora_scale:g}"]
    for name in MODELS:
        loss, generated = outputs[name]
        result.val_flow_loss[name] = loss
        result.mel_l1[name] = _mean_distance(generated)
        for clip_id, clip in generated.items():
            result.per_clip_mel_l1.setdefault(clip_id, {})[name] = clip.distance
    if checkpoints:
        for name, folder in kept_adapters(run).items():
            network = merge_adapter(copy.deepcopy(base), folder, 1.0, expected).to(runtime.torch_device)
            result.checkpoints[name] = _flow_loss(runtime, network, clips, batch_size)
    if report:
        from generate.report import write_report

        folders = [features] if features is not None else run_settings(run)["features"]
        write_report(run / "evaluation", result, real_mels(clips, decoder, batch_size),
                     {name: outputs[name][1] for name in MODELS}, decoder, _source_videos(clips, folders),
                     {k: v for folder in folders for k, v in feature_labels(folder).items()})
    result.seconds = time.perf_counter() - started
    atomic_write_text(out, json.dumps(asdict(result), indent=2) + "\n")
    return result


def _mean_distance(generated: dict[str, Generated]) -> float:
    return sum(clip.distance for clip in generated.values()) / len(generated)


def _source_videos(clips: FeatureSet, folders: list) -> dict[str, dict]:
    """Where each held-out clip came from (video, start, end), from the feature folders' manifests."""
    sources = {}
    for folder in folders:
        manifest = Path(folder) / MANIFEST_NAME
        if manifest.is_file():
            for clip in json.loads(manifest.read_text()).get("clips", []):
                sources[clip["id"]] = clip
    return {clip_id: sources[clip_id] for clip_id in clips.ids if clip_id in sources}
