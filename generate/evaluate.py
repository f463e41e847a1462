"""Did the fine-tune help, on clips it has never seen? The base model against base + adapter on
the run's held-out clips (whole source videos no segment of which was trained on), at one or
several adapter strengths, optionally for every kept checkpoint too.

Three numbers per clip and model, all lower-is-better, on the same clips, noise and times:
- validation flow loss: the training objective with fixed noise and times;
- log-mel L1: generate the clip (Euler, CFG, its own duration) from its stored conditions, then
  the mean absolute difference from the real log-mel over the clip's real frames; both
  spectrograms come out of the same VAE decoder, so the distance measures the generated audio;
- DeSync (shared/models/desync.py): how far the generated audio is out of step with the clip's video,
  in seconds, for clips of 4.8 s or more; the real audio's (through the VAE decoder and vocoder,
  as the models' audio is made) is the floor.
Each clip is generated with several seeds per model. What the numbers say (intervals, verdict,
JSON) is generate/verdict.py; the report (generate/report.py) shows it all with the audio,
spectrograms and training curves.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from generate.model import ModelSource, resolve_source
from generate.report import write_report
from generate.verdict import METRICS, MODELS, Evaluation, bootstrap_interval
from shared.errors import UserError
from shared.feature_files import MANIFEST_NAME
from shared.features import FeatureSet, feature_labels, folders_window, split
from shared.models.flow import validation_losses
from shared.lora import merge_adapter
from shared.outputs import OutputError, atomic_write_text
from shared.models.resample import resample
from shared.run_record import RunRecordError, Split, read_run_config
from shared.runtime import Runtime
from shared.synthesis import AudioDecoder, SamplingSettings, duration_batches, sample_stored_clips

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """One model's scores on the clips: metric → clip → value (mean over seeds; NaN where the
    metric does not apply, e.g. DeSync of a clip under 4.8 s)."""

    per_clip: dict[str, dict[str, float]]
    mels: dict[str, torch.Tensor]  # the first seed's log-mel per clip (bins, real frames), for the report
    audio: dict[str, torch.Tensor]  # the first seed's waveform per clip, for the report

    def mean(self, metric: str) -> float:
        values = [v for v in self.per_clip[metric].values() if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    @property
    def failed(self) -> bool:
        """Not finite where a value is due (a diverged adapter, an extreme strength)."""
        return any(math.isinf(v) or math.isnan(v) for metric in ("flow_loss", "mel_l1")
                   for v in self.per_clip[metric].values())


# -- the clips -------------------------------------------------------------------------------------------

def held_out_clips(run: Path, features: Path | None, ids: list[str], runtime: Runtime) -> tuple[FeatureSet, str]:
    """`features` (all clips, or `ids`), else exactly the validation clips the run recorded."""
    folders = [str(features)] if features is not None else read_run_config(run)["features"]
    split_record = Split.load(run) if features is None else None
    if features is None and not all(Path(folder).is_absolute() for folder in folders):
        log.warning("%s: recorded its features as relative paths (an older version): they are read from the "
                    "current folder, %s", run, Path.cwd())
    for line in split_record.changes() if split_record else []:
        log.warning("%s", line)
    gone = [folder for folder in folders if not Path(folder).is_dir()]
    if gone:
        raise RunRecordError(f"{run}: its features {gone[0]} are gone (moved or deleted); pass --features with the "
                             "held-out clips")
    window = folders_window(folders)
    clips = FeatureSet.load(folders, runtime.data_dim(window), window)
    if features is not None:
        where = str(features)
    elif split_record is not None:
        missing = sorted(set(split_record.val_ids) - set(clips.ids))
        if missing:
            raise RunRecordError(f"{run}: validation clip(s) {', '.join(missing[:5])} are no longer in the run's "
                                 "features; pass --features with the held-out clips")
        clips, where = clips.select(split_record.val_ids), f"validation split of {run}"
    else:  # a run made before splits were recorded: its split, re-derived from its settings
        settings = read_run_config(run)
        log.warning("%s: no split.json (made by an older version); the validation split is derived again from the "
                    "current features", run)
        _, val_index = split(clips.ids, clips.groups, settings.get("val_fraction", 0.1), settings.get("val_ids", []),
                             settings.get("val_groups", []))
        clips, where = clips.subset(val_index), f"validation split of {run}"
    if not clips.ids:
        raise UserError(f"{run} trained without a validation split; pass --features with held-out clips")
    if ids:
        unknown = sorted(set(ids) - set(clips.ids))
        if unknown:
            raise UserError(f"clip id(s) not among the held-out clips: {', '.join(unknown[:5])}")
        clips = clips.select(ids)
    return clips, where


# -- scoring ---------------------------------------------------------------------------------------------

def clip_desync(scorer, sync_features: torch.Tensor, audio: torch.Tensor, rate: int, seconds: float,
                runtime: Runtime) -> float:
    """DeSync of one clip's audio against its stored video features, both cut to its real length.
    In float32, as av-benchmark scores it: a bf16 argmax could pick another offset class."""
    from shared.models.desync import SAMPLE_RATE

    seq = runtime.sequence(seconds)
    wave = resample(audio[:round(seconds * rate)].float().cpu(), rate, SAMPLE_RATE)
    device = runtime.torch_device
    value = scorer.desync(sync_features[None, :seq.sync_seq_len].float().to(device), wave[None].to(device))
    return float(value[0])


def score(network, clips: FeatureSet, decoder: AudioDecoder, sampling: SamplingSettings, seeds: int,
          batch_size: int, real: dict[str, torch.Tensor], progress=None) -> Scores:
    """Every metric of one network on every clip, averaged over `seeds` seeds (`progress`: a
    tqdm bar advanced once per seed)."""
    runtime = decoder.runtime
    scorer = runtime.sync_scorer()
    network.to(runtime.torch_device)
    sums = {metric: {clip_id: 0.0 for clip_id in clips.ids} for metric in METRICS}
    mels, audio = {}, {}
    for k in range(seeds):
        seed = sampling.seed + k
        for clip_id, loss in zip(clips.ids, _flow_losses(runtime, network, clips, batch_size, seed).tolist()):
            sums["flow_loss"][clip_id] += loss
        for rows, seq, latents in sample_stored_clips(runtime, network, clips.tensors, replace(sampling, seed=seed),
                                                      batch_size):
            mel = decoder.mel(latents).cpu()  # at the clips' own length: every frame is real
            waves = decoder.vocode(mel)
            for row, n in enumerate(rows):
                clip_id, seconds = clips.ids[n], float(clips.tensors["duration_sec"][n])
                ours = mel[row]
                sums["mel_l1"][clip_id] += float((ours - real[clip_id]).abs().mean())
                sums["desync"][clip_id] += clip_desync(scorer, clips.tensors["sync_features"][n], waves[row],
                                                       decoder.sampling_rate, seconds, runtime)
                if k == 0:
                    mels[clip_id], audio[clip_id] = ours, waves[row, :round(seconds * decoder.sampling_rate)]
        if progress is not None:
            progress.update(1)
    network.to("cpu")
    return Scores({m: {c: v / seeds for c, v in values.items()} for m, values in sums.items()}, mels, audio)


def _flow_losses(runtime: Runtime, network, clips: FeatureSet, batch_size: int, seed: int) -> torch.Tensor:
    device = runtime.torch_device
    batches = ({k: v.to(device) for k, v in clips.batch(list(range(i, min(i + batch_size, len(clips))))).items()}
               for i in range(0, len(clips), batch_size))
    with runtime.autocast():
        return validation_losses(network, batches, runtime.sequence(clips.window_sec), seed)


def real_audio(clips: FeatureSet, decoder: AudioDecoder, batch_size: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each clip's real log-mel, decoded from its stored latent at the clip's own length (as its
    generated audio is decoded), and its waveform through the vocoder: what the metrics compare with."""
    durations = clips.tensors["duration_sec"].tolist()
    mels, waves = {}, {}
    for rows in duration_batches(durations, batch_size):
        seq = decoder.runtime.sequence(durations[rows[0]])
        decoded = decoder.mel(clips.tensors["a_mean"][rows, :seq.latent_seq_len])
        audio = decoder.vocode(decoded)
        for row, n in enumerate(rows):
            mels[clips.ids[n]] = decoded[row].cpu()
            waves[clips.ids[n]] = audio[row, :round(durations[n] * decoder.sampling_rate)]
    return mels, waves


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
    """The JSON to write: a new file in a folder we can write, or an earlier evaluation of ours;
    anything else is refused before the evaluation starts."""
    out = Path(out)
    if out.exists():
        try:
            ours = out.is_file() and "val_flow_loss" in json.loads(out.read_text())
        except (ValueError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise OutputError(f"{out}: a file mmaudio-lora did not write is in the way; choose another --out")
    folder = out.parent if str(out.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise OutputError(f"{out}: cannot write there ({error.strerror or error}); choose another --out") from None
    return out


def evaluate(run: Path, source: ModelSource | None = None, features: Path | None = None, ids: list[str] | None = None,
             sampling: SamplingSettings = SamplingSettings(), lora_scales: tuple[float, ...] = (1.0,),
             batch_size: int = 4, out: Path | None = None, checkpoints: bool = False,
             report: bool = True, seeds: int = 3, show_progress: bool = True) -> Evaluation:
    """Evaluate base and tuned on the same held-out clips; write the JSON (default RUN/evaluation.json)
    and the report (RUN/evaluation/index.html). `source`: the run's runtime and adapter, by default
    as the run recorded them. Every argument and output is checked before any model loads."""
    if not lora_scales or not all(math.isfinite(s) for s in lora_scales):
        raise UserError(f"--lora-scale needs finite numbers, not {list(lora_scales)}")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {seeds}")
    started = time.perf_counter()
    run = Path(run)
    out = check_evaluation_target(Path(out) if out is not None else run / "evaluation.json")
    adapters = kept_adapters(run) if checkpoints else {}
    if checkpoints and not adapters:
        raise UserError(f"--checkpoints: {run} keeps no checkpoint or best adapter to score")
    if report and not os.access(run, os.W_OK):
        raise OutputError(f"{run}: cannot write the report folder there")
    source = source or resolve_source(run=run)
    runtime = source.runtime
    clips, where = held_out_clips(run, features, ids or [], runtime)
    base = ModelSource(runtime).load()
    decoder = AudioDecoder(runtime)
    expected = {"variant": runtime.variant, "profile": runtime.profile}
    result = Evaluation(runtime.variant, where, list(clips.ids), asdict(sampling), seeds, len(set(clips.groups)))
    real_mels, real_waves = real_audio(clips, decoder, batch_size)

    from tqdm import tqdm

    with tqdm(total=(1 + len(lora_scales)) * seeds, desc="scoring models x seeds", unit="seed",
              disable=not show_progress) as progress:
        outputs = {"base": score(base, clips, decoder, sampling, seeds, batch_size, real_mels, progress)}
        for scale in lora_scales:
            network = merge_adapter(copy.deepcopy(base), source.adapter, scale, expected)
            outputs[f"scale {scale:g}"] = score(network, clips, decoder, sampling, seeds, batch_size, real_mels,
                                                progress)
    working = [s for s in lora_scales if not outputs[f"scale {s:g}"].failed]
    if len(lora_scales) > 1:
        result.scales = {f"{s:g}": ({"failed": True} if outputs[f"scale {s:g}"].failed else
                                    {"val_flow_loss": outputs[f"scale {s:g}"].mean("flow_loss"),
                                     "mel_l1": outputs[f"scale {s:g}"].mean("mel_l1"),
                                     "desync": outputs[f"scale {s:g}"].mean("desync")}) for s in lora_scales}
    result.lora_scale = min(working, key=lambda s: outputs[f"scale {s:g}"].mean("flow_loss")) if working else None
    outputs["tuned"] = outputs[f"scale {(result.lora_scale if working else lora_scales[0]):g}"]
    _summarise(result, outputs, real_waves, clips, decoder)
    for name, folder in adapters.items():
        network = merge_adapter(copy.deepcopy(base), folder, 1.0, expected).to(runtime.torch_device)
        result.checkpoints[name] = float(_flow_losses(runtime, network, clips, batch_size, sampling.seed).mean())
    if report:
        folders = [features] if features is not None else read_run_config(run)["features"]
        write_report(run / "evaluation", result, (real_mels, real_waves), {name: outputs[name] for name in MODELS},
                     decoder.sampling_rate, runtime.sequence().hop_length, _source_videos(clips, folders),
                     {k: v for folder in folders for k, v in feature_labels(folder).items()})
    result.seconds = time.perf_counter() - started
    atomic_write_text(out, result.to_json())
    return result


def _summarise(result: Evaluation, outputs: dict[str, Scores], real_waves: dict[str, torch.Tensor],
               clips: FeatureSet, decoder: AudioDecoder) -> None:
    """Means, per-clip values, paired differences and their intervals, the real audio's DeSync."""
    runtime, scorer = decoder.runtime, decoder.runtime.sync_scorer()
    real_desync = {clip_id: clip_desync(scorer, clips.tensors["sync_features"][n], real_waves[clip_id],
                                        decoder.sampling_rate, float(clips.tensors["duration_sec"][n]), runtime)
                   for n, clip_id in enumerate(clips.ids)}
    for metric in METRICS:
        summary = result.summary(metric)
        per_clip = {clip_id: {name: outputs[name].per_clip[metric][clip_id] for name in MODELS} for clip_id in clips.ids}
        if metric == "desync":
            for clip_id in clips.ids:
                per_clip[clip_id]["real"] = real_desync[clip_id]
            values = [v for v in real_desync.values() if not math.isnan(v)]
            summary["real"] = sum(values) / len(values) if values else math.nan
        for name in MODELS:
            summary[name] = math.nan if name == "tuned" and result.failed else outputs[name].mean(metric)
        result.per_clip[metric] = per_clip
        differences = [v["tuned"] - v["base"] for v in per_clip.values()
                       if math.isfinite(v["tuned"]) and math.isfinite(v["base"])]
        result.delta[metric] = sum(differences) / len(differences) if differences and not result.failed else math.nan
        interval = None if result.failed else bootstrap_interval(differences)
        result.ci95[metric] = list(interval) if interval else None
    result.per_clip_mel_l1 = result.per_clip["mel_l1"]


def _source_videos(clips: FeatureSet, folders: list) -> dict[str, dict]:
    """Where each held-out clip came from (video, start, end), from the feature folders' manifests."""
    sources = {}
    for folder in folders:
        manifest = Path(folder) / MANIFEST_NAME
        if manifest.is_file():
            for clip in json.loads(manifest.read_text()).get("clips", []):
                sources[clip["id"]] = clip
    return {clip_id: sources[clip_id] for clip_id in clips.ids if clip_id in sources}
