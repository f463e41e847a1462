"""Did the fine-tune help, on clips it has never seen? The base model against base + adapter on
the run's held-out clips (whole source videos no segment of which was trained on).

Four numbers per clip and model, all lower-is-better, on the same clips, noise and times:
- validation flow loss: the training objective with fixed noise and times;
- log-mel L1: generate the clip (Euler, CFG, its own duration) from its stored conditions, then
  the mean absolute difference from the real log-mel over the clip's real frames; both
  spectrograms come out of the same VAE decoder, so the distance measures the generated audio;
- DeSync (shared/models/desync.py): how far the generated audio is out of step with the clip's
  video, in seconds, for clips of 4.8 s or more, read as av-benchmark reads it (16 kHz through
  torchaudio's default resampler); the real audio's is the floor;
- KL_PaSST (shared/models/passt.py): KL(real ‖ generated) of PaSST's AudioSet classes, per clip,
  as av-benchmark reads audio (10 s window, the clip's real length). Left out, and said, when the
  PaSST weights are missing. KAD between the generated and the real set on PaSST's embeddings is
  shown beside it, descriptively.
"Real" audio is the clip's stored latent through the VAE decoder and the vocoder, the path the
models' audio takes, so the metrics see the models and not the codec.

Each clip is generated with several seeds per model. The verdict is for one adapter strength
(1.0, or the one given); more strengths are scored as an exploration. What the numbers say (the
test over sources, Holm, the verdict, JSON) is evaluate/verdict.py; the report (evaluate/report.py)
shows it all with the audio, spectrograms and training curves.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from evaluate.kad import kad_by_source
from generate.model import ModelSource, resolve_source
from evaluate.report import check_report_folder, report_folder, write_report
from evaluate.verdict import METRICS, MODELS, Evaluation, differences_of, judge
from shared.errors import UserError
from shared.feature_files import MANIFEST_NAME
from shared.features import FeatureSet, feature_labels, folders_window
from shared.lora import check_adapter_file, merge_adapter
from shared.models.flow import validation_losses
from shared.outputs import OutputError, atomic_write_text, check_not_nested, folder_lock
from shared.progress import progress as progress_bar
from shared.run_record import RunRecordError, Split, checkpoint_folders, read_run_config
from shared.runtime import Runtime
from shared.synthesis import (AudioDecoder, SamplingSettings, check_seed, duration_batches, sample_stored_clips,
                              use_duration)
from shared.checkpoint import CheckpointError
from shared.weights import DamagedWeightsError, MissingWeightsError

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """One model's scores on the clips: metric → clip → value (mean over seeds; NaN where the
    metric does not apply, e.g. DeSync of a clip under 4.8 s)."""

    per_clip: dict[str, dict[str, float]]
    mels: dict[str, torch.Tensor]  # the first seed's log-mel per clip (bins, real frames), for the report
    audio: dict[str, torch.Tensor]  # the first seed's waveform per clip, for the report
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # PaSST embeddings per clip (seeds, D)

    def mean(self, metric: str) -> float:
        return mean_of(self.per_clip[metric])

    @property
    def failed(self) -> bool:
        return failed(self.per_clip)


def mean_of(per_clip: dict[str, float]) -> float:
    """The mean over clips, those without a value (NaN) left out."""
    values = [v for v in per_clip.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def failed(per_clip: dict[str, dict[str, float]]) -> bool:
    """Not finite where a value is due (a diverged adapter, an extreme strength): {metric: {clip: value}}."""
    return any(math.isinf(v) or math.isnan(v) for metric in ("flow_loss", "mel_l1")
               for v in per_clip.get(metric, {}).values())


# -- the clips -------------------------------------------------------------------------------------------

def held_out_clips(run: Path, features: Path | None, ids: list[str], runtime: Runtime,
                   allow_trained: bool = False) -> tuple[FeatureSet, str, list[str], list[str]]:
    """`features` (all clips, or `ids`), else exactly the validation clips the run recorded:
    (clips, where they come from, notes for the reader, the feature folders read). Clips or sources of `features` that the
    run trained on (or made its choices on) are refused unless `allow_trained`."""
    split_record = Split.load(run)
    run_config = read_run_config(run)
    recorded = run_config["features"]
    moved = split_record.relocation([str(Path(features).resolve())]) if features and split_record else {}
    if moved:  # the run's own features, moved elsewhere: its validation split still says what is held out
        log.warning("%s: holds the run's features (recorded at %s); judging the run's validation clips", features,
                    next(iter(moved)))
        recorded, features = [moved.get(folder, folder) for folder in recorded], None
    folders = [str(features)] if features is not None else recorded
    if features is None and not all(Path(folder).is_absolute() for folder in folders):
        log.warning("%s: recorded its features as relative paths (an older version): they are read from the "
                    "current folder, %s", run, Path.cwd())
    for line in split_record.changes(folders) if split_record and features is None else []:
        log.warning("%s", line)
    gone = [folder for folder in folders if not Path(folder).is_dir()]
    if gone:
        raise RunRecordError(f"{run}: its features {gone[0]} are gone (moved or deleted); pass --features with the "
                             "held-out clips (or the run's features where they are now)")
    window = folders_window(folders)
    clips = FeatureSet.load(folders, runtime.data_dim(window), window)
    notes = []
    if features is not None:
        where = str(features)
        if ids:
            clips = _only(clips, ids)
        notes += _trained_on(clips, split_record, allow_trained, run)
    elif split_record is not None:
        missing = sorted(set(split_record.val_ids) - set(clips.ids))
        if missing:
            raise RunRecordError(f"{run}: validation clip(s) {', '.join(missing[:5])} are no longer in the run's "
                                 "features; pass --features with the held-out clips")
        clips, where = clips.select(split_record.val_ids), f"validation split of {run}"
        clips = replace(clips, groups=[split_record.group_of.get(i, g) for i, g in zip(clips.ids, clips.groups)])
    else:
        raise RunRecordError(f"{run}: made by an older version that did not record its split (split.json): its "
                             "validation clips cannot be recovered from today's features; pass --features with clips "
                             "you know it never trained on")
    if not clips.ids:
        raise UserError(f"{run} trained without a validation split; pass --features with held-out clips")
    if features is None:
        clips = _only(clips, ids) if ids else clips
        notes.append(_choice_note(split_record, run_config))
    return clips, where, notes, folders


def _only(clips: FeatureSet, ids: list[str]) -> FeatureSet:
    unknown = sorted(set(ids) - set(clips.ids))
    if unknown:
        raise UserError(f"clip id(s) not among the held-out clips: {', '.join(unknown[:5])}")
    return clips.select(ids)


def _trained_on(clips: FeatureSet, split_record: Split | None, allow_trained: bool, run: Path) -> list[str]:
    """Refuse clips (or clips of sources) the run trained on or chose on; a note when allowed."""
    if split_record is None:
        return [f"{run} recorded no split (an older version): these clips may include clips it trained on."]
    seen = set(split_record.train_ids) | set(split_record.tuning_ids)
    seen_sources = split_record.groups(list(seen))
    trained = [i for i, g in zip(clips.ids, clips.groups) if i in seen or split_record.group_of.get(i, g) in seen_sources]
    if not trained:
        return []
    sources = sorted({split_record.group_of.get(i, g) for i, g in zip(clips.ids, clips.groups) if i in trained})
    listed = f"{len(trained)} clip(s) ({', '.join(trained[:5])}{', ...' if len(trained) > 5 else ''}) of " \
             f"{len(sources)} source(s) ({', '.join(sources[:5])}{', ...' if len(sources) > 5 else ''})"
    if not allow_trained:
        raise UserError(f"--features: the adapter of {run} trained on (or chose on) {listed}: they are not held "
                        "out; pass held-out clips, or --allow-trained to score them knowingly")
    return [f"Not held out (--allow-trained): the adapter trained on (or chose on) {listed}."]


def _choice_note(split_record: Split | None, run_config: dict) -> str:
    """Where the run made its choices, said beside a verdict on its validation clips."""
    if split_record is not None and split_record.tuning_ids:
        return ("The run made its choices (best adapter, early stopping) on separate tuning clips: these clips "
                "judge an adapter chosen without them.")
    if run_config.get("early_stopping_patience"):
        return ("Chosen on the judging clips: the run's early stopping picked its adapter on these same validation "
                "clips, so the comparison is optimistic; give it tuning clips (tuning_fraction) or judge it with "
                "`mmaudio-lora crossval`.")
    return ("These are the run's validation clips and the run chose nothing on them (it trained to its last step); "
            "if the step count or the strength were picked by looking at them, the comparison is optimistic. "
            "`mmaudio-lora crossval` judges every source with an adapter that never saw it.")


# -- scoring ---------------------------------------------------------------------------------------------

class Judges:
    """The metric models beyond the network, loaded on first use: DeSync's scorer and PaSST (None
    when its weights are missing or do not load: KL_PaSST is left out and said once)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    @functools.cached_property
    def sync(self):
        return self.runtime.sync_scorer()

    @functools.cached_property
    def _passt(self) -> tuple[object | None, str]:
        try:
            return self.runtime.passt(), ""
        except DamagedWeightsError as damaged:
            log.warning("KL_PaSST left out: %s", damaged)
            return None, str(damaged)
        except MissingWeightsError as missing:
            log.warning("KL_PaSST left out: %s", missing)
            return None, "the PaSST-S weights are missing (`mmaudio-lora download` fetches them)"
        except CheckpointError as damaged:  # a cut-short file, an HTML page saved under its name
            log.warning("KL_PaSST left out: %s", damaged)
            return None, f"the PaSST-S weights do not load ({damaged}); `mmaudio-lora download --force passt` fetches them again"

    @property
    def passt(self):
        return self._passt[0]

    @property
    def left_out(self) -> list[str]:
        return [f"KL_PaSST and KAD left out: {self._passt[1]}."] if self._passt[1] else []

    @property
    def available(self) -> dict[str, bool]:
        """Which judges score here (a fold scored with fewer is scored again for the missing ones)."""
        return {"desync": True, "passt": self.passt is not None}

    def desync(self, sync_features: torch.Tensor, audio: torch.Tensor, rate: int, seconds: float) -> float:
        """DeSync of one clip's audio against its stored video features, both cut to its real length.
        In float32, as av-benchmark scores it: a bf16 argmax could pick another offset class."""
        from shared.desync import to_16k

        seq = self.runtime.sequence(seconds)
        wave = to_16k(audio[:round(seconds * rate)].float().cpu()[None], rate)
        device = self.runtime.torch_device
        value = self.sync.desync(sync_features[None, :seq.sync_seq_len].float().to(device), wave.to(device))
        return float(value[0])

    @torch.no_grad()
    def passt_outputs(self, audio: torch.Tensor, rate: int, seconds: float) -> tuple[torch.Tensor, torch.Tensor]:
        """PaSST's (logits, embedding) of one clip, read as av-benchmark reads a file of the clip's
        real length (`audio_length` = its duration, then 10 s with zero padding)."""
        from shared.models.passt import frontend, prepare_audio

        wave = prepare_audio(audio[:round(seconds * rate)].float().cpu()[None], rate, seconds)
        logits, embedding = self.passt(frontend(wave[None].to(self.runtime.torch_device)))
        return logits[0].float().cpu(), embedding[0].float().cpu()


def score(network, clips: FeatureSet, decoder: AudioDecoder, judges: Judges, sampling: SamplingSettings, seeds: int,
          batch_size: int, real: RealAudio, progress=None, metrics: tuple[str, ...] = tuple(METRICS)) -> Scores:
    """The `metrics` of one network on every clip, averaged over `seeds` seeds (`progress`: a
    tqdm bar advanced once per seed). KL_PaSST is NaN where PaSST is not available."""
    from shared.models.passt import kl_per_clip

    runtime = decoder.runtime
    network.to(runtime.torch_device)
    sums = {metric: {clip_id: 0.0 for clip_id in clips.ids} for metric in metrics}
    mels, audio, embeddings = {}, {}, {clip_id: [] for clip_id in clips.ids}
    generated = bool(set(metrics) - {"flow_loss"})
    for k in range(seeds):
        seed = sampling.seed + k
        if "flow_loss" in metrics:
            for clip_id, loss in zip(clips.ids, _flow_losses(runtime, network, clips, batch_size, seed).tolist()):
                sums["flow_loss"][clip_id] += loss
        batches = sample_stored_clips(runtime, network, clips.tensors, replace(sampling, seed=seed),
                                      batch_size) if generated else ()
        for rows, seq, latents in batches:
            mel = decoder.mel(latents).cpu()  # at the clips' own length: every frame is real
            waves = decoder.vocode(mel)
            for row, n in enumerate(rows):
                clip_id, seconds = clips.ids[n], float(clips.tensors["duration_sec"][n])
                ours = mel[row]
                if "mel_l1" in metrics:
                    sums["mel_l1"][clip_id] += float((ours - real.mels[clip_id]).abs().mean())
                if "desync" in metrics:
                    sums["desync"][clip_id] += judges.desync(clips.tensors["sync_features"][n], waves[row],
                                                             decoder.sampling_rate, seconds)
                if "kl_passt" in metrics:
                    if judges.passt is not None and bool(torch.isfinite(waves[row]).all()):
                        logits, embedding = judges.passt_outputs(waves[row], decoder.sampling_rate, seconds)
                        sums["kl_passt"][clip_id] += float(kl_per_clip(real.logits[clip_id][None], logits[None])[0])
                        embeddings[clip_id].append(embedding)
                    else:
                        sums["kl_passt"][clip_id] = math.nan
                if k == 0:
                    mels[clip_id], audio[clip_id] = ours, waves[row, :round(seconds * decoder.sampling_rate)]
        if progress is not None:
            progress.update(1)
    network.to("cpu")
    return Scores({m: {c: v / seeds for c, v in values.items()} for m, values in sums.items()}, mels, audio,
                  {clip_id: torch.stack(rows) for clip_id, rows in embeddings.items() if rows})


def _flow_losses(runtime: Runtime, network, clips: FeatureSet, batch_size: int, seed: int) -> torch.Tensor:
    device = runtime.torch_device
    batches = ({k: v.to(device) for k, v in clips.batch(list(range(i, min(i + batch_size, len(clips))))).items()}
               for i in range(0, len(clips), batch_size))
    seq = runtime.sequence(clips.window_sec)  # the features' window: the run's, 8 s or shorter
    use_duration(network, seq)
    with runtime.autocast():
        return validation_losses(network, batches, seq, seed)


@dataclass
class RealAudio:
    """Each clip's real audio as the metrics see it: its log-mel decoded from the stored latent at
    the clip's own length (as generated audio is decoded), its waveform through the vocoder, and
    PaSST's logits and embedding of it."""

    mels: dict[str, torch.Tensor]
    waves: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    desync: dict[str, float] = field(default_factory=dict)  # each clip's real audio against its picture: the floor


def real_audio(clips: FeatureSet, decoder: AudioDecoder, judges: Judges, batch_size: int) -> RealAudio:
    durations = clips.tensors["duration_sec"].tolist()
    real = RealAudio({}, {})
    for rows in duration_batches(durations, batch_size):
        seq = decoder.runtime.sequence(durations[rows[0]])
        decoded = decoder.mel(clips.tensors["a_mean"][rows, :seq.latent_seq_len])
        audio = decoder.vocode(decoded)
        for row, n in enumerate(rows):
            clip_id = clips.ids[n]
            real.mels[clip_id] = decoded[row].cpu()
            real.waves[clip_id] = audio[row, :round(durations[n] * decoder.sampling_rate)]
            if judges.passt is not None:
                real.logits[clip_id], embedding = judges.passt_outputs(real.waves[clip_id], decoder.sampling_rate,
                                                                       durations[n])
                real.embeddings[clip_id] = embedding[None]
    return real


def kept_adapters(run: Path) -> dict[str, Path]:
    """Every checkpoint's adapter and the best one, by a readable name, in step order."""
    adapters = {folder.name: folder / "adapter" for _, folder in checkpoint_folders(run) if (folder / "adapter").is_dir()}
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
            data = json.loads(out.read_text()) if out.is_file() else {}
            ours = isinstance(data, dict) and ("val_flow_loss" in data or "per_source" in data)  # or --long's
        except (ValueError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise OutputError(f"{out}: a file mmaudio-lora did not write is in the way; choose another --out")
    folder = (out.parent if str(out.parent) else Path(".")).resolve()
    while not folder.exists():  # made only when the evaluation writes: a refusal leaves nothing
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise OutputError(f"{out}: cannot write there ({error.strerror or error}); choose another --out") from None
    check_not_nested(report_folder(out), "report")
    return out


def judged_scale(lora_scales: tuple[float, ...]) -> float:
    """The strength the verdict is for: 1.0 (as trained) when it is among those given, else the first."""
    return 1.0 if 1.0 in lora_scales else lora_scales[0]


@dataclass
class Scored:
    """An evaluation's numbers and what they were computed from (each model's scores, the real audio)."""

    result: Evaluation
    outputs: dict[str, Scores]  # base, tuned, and each strength as "scale X"
    real: RealAudio


def score_held_out(source: ModelSource, clips: FeatureSet, where: str, notes: list[str], sampling: SamplingSettings,
                   lora_scales: tuple[float, ...], seeds: int, batch_size: int, show_progress: bool = True,
                   judges: Judges | None = None, metrics: tuple[str, ...] = tuple(METRICS)) -> Scored:
    """Base and base + adapter (at each strength) on `clips`: the `metrics` asked for (all by
    default), and, when all are there, the tests over sources."""
    runtime = source.runtime
    base = ModelSource(runtime).load()
    decoder, judges = AudioDecoder(runtime), judges or Judges(runtime)
    expected = {"variant": runtime.variant, "profile": runtime.profile}
    result = Evaluation(runtime.variant, where, list(clips.ids), asdict(sampling), seeds, len(set(clips.groups)),
                        dict(zip(clips.ids, clips.groups)), lora_scale=judged_scale(lora_scales),
                        notes=notes + judges.left_out)
    real = real_audio(clips, decoder, judges, batch_size)
    with progress_bar(total=(1 + len(lora_scales)) * seeds, desc="scoring models x seeds", unit="seed",
                      disable=not show_progress) as progress:
        outputs = {"base": score(base, clips, decoder, judges, sampling, seeds, batch_size, real, progress, metrics)}
        for scale in lora_scales:
            network = merge_adapter(copy.deepcopy(base), source.adapter, scale, expected)
            outputs[f"scale {scale:g}"] = score(network, clips, decoder, judges, sampling, seeds, batch_size, real,
                                                progress, metrics)
    outputs["tuned"] = outputs[f"scale {result.lora_scale:g}"]
    real.desync = {clip_id: judges.desync(clips.tensors["sync_features"][n], real.waves[clip_id],
                                          decoder.sampling_rate, float(clips.tensors["duration_sec"][n]))
                   for n, clip_id in enumerate(clips.ids)} if "desync" in metrics else {}
    if set(metrics) == set(METRICS):
        summarise(result, outputs, real, judges.passt is not None, lora_scales)
    return Scored(result, outputs, real)


def evaluate(run: Path, source: ModelSource | None = None, features: Path | None = None, ids: list[str] | None = None,
             sampling: SamplingSettings = SamplingSettings(), lora_scales: tuple[float, ...] = (1.0,),
             batch_size: int = 4, out: Path | None = None, checkpoints: bool = False,
             report: bool = True, seeds: int = 3, show_progress: bool = True,
             allow_trained: bool = False) -> Evaluation:
    """Evaluate base and tuned on the same held-out clips; write the JSON (default RUN/evaluation.json)
    and the report beside it (RUN/evaluation/index.html). `source`: the run's runtime and adapter,
    by default as the run recorded them. Every argument and output is checked before any model
    loads; the run is locked against `train` meanwhile (other readers may share it), and the JSON
    and its report against a second evaluation writing them."""
    check_scoring(lora_scales, seeds, sampling)
    run = Path(run)
    source = source or resolve_source(run=run)
    source.runtime.torch_device  # an unusable --device, and a diverged adapter, refused before anything is made
    if source.adapter is not None:
        check_adapter_file(source.adapter)
    out = check_evaluation_target(Path(out) if out is not None else run / "evaluation.json")
    pages = check_report_folder(report_folder(out)) if report else None
    adapters = kept_adapters(run) if checkpoints else {}
    if checkpoints and not adapters:
        raise UserError(f"--checkpoints: {run} keeps no checkpoint or best adapter to score")
    with folder_lock(run, "evaluate", shared=True), folder_lock(out, "evaluate"):
        return _evaluate(run, source, features, ids or [], sampling, lora_scales, batch_size, out, pages, adapters,
                         seeds, show_progress, allow_trained)


def _evaluate(run: Path, source: ModelSource | None, features: Path | None, ids: list[str], sampling: SamplingSettings,
              lora_scales: tuple[float, ...], batch_size: int, out: Path, pages: Path | None, adapters: dict[str, Path],
              seeds: int, show_progress: bool, allow_trained: bool) -> Evaluation:
    started = time.perf_counter()
    source = source or resolve_source(run=run)
    runtime = source.runtime
    clips, where, notes, folders = held_out_clips(run, features, ids, runtime, allow_trained)
    scored = score_held_out(source, clips, where, notes, sampling, lora_scales, seeds, batch_size, show_progress)
    result = scored.result
    if adapters:
        base = ModelSource(runtime).load()
        for name, folder in adapters.items():
            network = merge_adapter(copy.deepcopy(base), folder, 1.0,
                                    {"variant": runtime.variant, "profile": runtime.profile}).to(runtime.torch_device)
            result.checkpoints[name] = float(_flow_losses(runtime, network, clips, batch_size, sampling.seed).mean())
    if pages is not None:
        write_evaluation_report(pages, run, scored, clips, folders, runtime)
    result.seconds = time.perf_counter() - started
    atomic_write_text(out, result.to_json())
    return result


def write_evaluation_report(pages: Path, run: Path, scored: Scored, clips: FeatureSet, folders: list,
                            runtime: Runtime) -> Path:
    """The evaluation's page (audio, spectrograms, picture strips, curves) for `scored` in `pages`."""
    return write_report(pages, run, scored.result, (scored.real.mels, scored.real.waves),
                        {name: scored.outputs[name] for name in MODELS}, AudioDecoder(runtime).sampling_rate,
                        runtime.sequence().hop_length, _source_videos(clips, folders),
                        {k: v for folder in folders for k, v in feature_labels(folder).items()})


def check_scoring(lora_scales: tuple[float, ...], seeds: int, sampling: SamplingSettings) -> None:
    if not lora_scales or not all(math.isfinite(s) for s in lora_scales):
        raise UserError(f"--lora-scale needs finite numbers, not {list(lora_scales)}")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {seeds}")
    check_seed(sampling.seed + seeds - 1, "--seed + --seeds - 1 (the last seed scored)")


def summarise(result: Evaluation, outputs: dict[str, Scores], real: RealAudio, passt: bool,
              lora_scales: tuple[float, ...]) -> None:
    """Means, per-clip values (DeSync with the real audio's), the tests over sources, KAD (`passt`:
    whether KL_PaSST was scored) and the strengths explored, from each output's per-clip scores."""
    if outputs["tuned"].failed:
        result.lora_scale = None
    differences = {}
    for metric in METRICS:
        if metric == "kl_passt" and not passt:
            continue
        summary = result.summary(metric)
        per_clip = {clip_id: {name: outputs[name].per_clip[metric][clip_id] for name in MODELS} for clip_id in result.clips}
        if metric == "desync":
            for clip_id in result.clips:
                per_clip[clip_id]["real"] = real.desync[clip_id]
            values = [v for v in real.desync.values() if not math.isnan(v)]
            summary["real"] = sum(values) / len(values) if values else math.nan
        for name in MODELS:
            summary[name] = math.nan if name == "tuned" and result.failed else outputs[name].mean(metric)
        result.per_clip[metric] = per_clip
        if not result.failed:
            differences[metric] = differences_of(per_clip)
    result.metrics = judge(differences, result.group_of)
    result.per_clip_mel_l1 = result.per_clip["mel_l1"]
    if passt and not result.failed:
        for name in MODELS:
            value, interval = kad_by_source(real.embeddings, outputs[name].embeddings, result.group_of)
            result.kad_passt[name], result.kad_passt[f"{name}_ci95"] = value, interval
    if len(lora_scales) > 1:
        scored = {f"{s:g}": outputs[f"scale {s:g}"].per_clip for s in lora_scales}
        result.per_clip_scales = {scale: {m: v for m, v in values.items() if m in result.per_clip}
                                  for scale, values in scored.items()}
        result.scales = {scale: explore(values, outputs["base"].per_clip, result.group_of)
                         for scale, values in result.per_clip_scales.items()}


def explore(tuned: dict[str, dict[str, float]], base: dict[str, dict[str, float]], group_of: dict[str, str]) -> dict:
    """One strength of a sweep ({metric: {clip: value}} of it and of the base), outside the verdict:
    its means and its own tests against the base (Holm across its metrics), or failed."""
    if failed(tuned):
        return {"failed": True}
    metrics = [m for m in METRICS if m in tuned and any(not math.isnan(v) for v in tuned[m].values())]
    tests = judge({m: {c: tuned[m][c] - base[m][c] for c in tuned[m]} for m in metrics}, group_of)
    return {"mean": {m: mean_of(tuned[m]) for m in metrics}, "tests": tests}


def _source_videos(clips: FeatureSet, folders: list) -> dict[str, dict]:
    """Where each held-out clip came from (video, start, end), from the feature folders' manifests."""
    sources = {}
    for folder in folders:
        manifest = Path(folder) / MANIFEST_NAME
        if manifest.is_file():
            for clip in json.loads(manifest.read_text()).get("clips", []):
                sources[clip["id"]] = clip
    return {clip_id: sources[clip_id] for clip_id in clips.ids if clip_id in sources}
