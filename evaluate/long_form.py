"""Long audio judged on the user's own commercials (`evaluate --long`).

The run's held-out sources are whole commercials: when the clip list names them (`original_video`,
the file each segment was cut from) and the files are there, each is voiced whole by the base
model and by the fine-tune (continued windows, generate/long.py), and scored against its real
track per window of the plan (DeSync against the window's picture, KL_PaSST against the real
window), plus a seam score: the spectral flux of the log-mel across each join over the median
flux of the whole track, beside the same score of the real track at the same times (1: a join
changes the sound no more than the track does anyway). Per source the fine-tune − base
differences are tested over sources as every verdict is (evaluate/verdict.py).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from evaluate.held_out import Judges, check_evaluation_target
from evaluate.report import check_report_folder
from evaluate.verdict import PairedTest, aligned, cells_of, judge, number, verdict_sentence
from generate.long import LongSettings, Picture, frame_period, overlap_frames, plan_windows, voice_windows, \
    window_conditions
from generate.model import ModelSource, resolve_source
from generate.run import VideoEncoders
from shared.clip_list import read_clip_list
from shared.errors import UserError
from shared.lora import check_adapter_file, merge_adapter
from shared.outputs import atomic_write_text, check_not_nested, mark_folder
from shared.run_record import Split, finite_or_none
from shared.synthesis import AudioDecoder, SamplingSettings

log = logging.getLogger(__name__)
LONG_METRICS = {"desync": "DeSync per window (s)", "kl_passt": "KL_PaSST per window (real ‖ generated)",
                "seam": "seam: flux at the joins / median flux"}
MODELS = ("base", "tuned")


@dataclass
class LongEvaluation:
    variant: str
    sampling: dict
    seeds: int
    tracks: dict[str, dict] = field(default_factory=dict)  # source → video, seconds, windows, joins (s)
    per_source: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric → source → model
    metrics: dict[str, PairedTest] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def verdict(self) -> str:
        return verdict_sentence(self.metrics, LONG_METRICS)

    def table(self) -> str:
        rows = [("metric (lower is better)", "base", "tuned", "real", "tuned - base [95 % interval]", "p (Holm)",
                 "clips/src", "assessment")]
        for metric, name in LONG_METRICS.items():
            values = self.per_source.get(metric, {})

            def mean(model: str) -> str:
                found = [v[model] for v in values.values() if math.isfinite(v.get(model, math.nan))]
                return number(sum(found) / len(found)) if found else "n/a"
            rows.append((name, mean("base"), mean("tuned"), mean("real"), *cells_of(self.metrics.get(metric))))
        return "\n".join(aligned(rows) + self.notes)

    def to_json(self) -> str:
        data = asdict(self)
        data["verdict"] = self.verdict()
        return json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"


def held_out_originals(run: Path, tsv: Path, video_root: Path, originals: Path) -> dict[str, tuple[Path, str]]:
    """{source: (its whole video, the caption of its longest held-out segment)} for the run's
    held-out sources, from the clip list's `original_video` column; one line naming every file
    that is needed and missing."""
    split = Split.load(run)
    if split is None or not split.val_ids:
        raise UserError(f"{run}: no recorded validation split: evaluate --long judges the run's held-out sources")
    entries = {entry.id: entry for entry in read_clip_list(tsv, video_root)}
    held = [entries[i] for i in split.val_ids if i in entries]
    if not held:
        raise UserError(f"{tsv}: none of the run's held-out clips ({', '.join(split.val_ids[:3])}, ...) is in this "
                        "list; give the list the features were made from")
    unnamed = [entry.id for entry in held if not entry.original]
    if unnamed:
        raise UserError(f"{tsv}: evaluate --long needs the whole commercials: an `original_video` column naming the "
                        f"file each segment was cut from (with original_start_time/original_end_time); "
                        f"{len(unnamed)} held-out clip(s) have none, e.g. {unnamed[0]}")
    sources: dict[str, list] = {}
    for entry in held:
        sources.setdefault(entry.original, []).append(entry)
    found, missing = {}, []
    for original, segments in sorted(sources.items()):
        path = Path(original) if Path(original).is_absolute() else originals / original
        if not path.is_file() and not path.suffix and path.with_suffix(".mp4").is_file():
            path = path.with_suffix(".mp4")
        if not path.is_file():
            missing.append(str(path))
            continue
        longest = max(segments, key=lambda e: (e.end_sec or 0) - e.start_sec)
        found[original] = (path, longest.caption)
    if missing:
        raise UserError(f"evaluate --long needs the held-out commercials whole; missing: {', '.join(missing[:5])}"
                        + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                        + f"; put them in {originals} (or pass --originals DIR)")
    return found


def spectral_flux(mel: torch.Tensor) -> torch.Tensor:
    """Per frame (from the second on), the RMS change of the log-mel from the frame before."""
    return (mel[:, 1:] - mel[:, :-1]).pow(2).mean(0).sqrt()


def seam_scores(mel: torch.Tensor, joins_sec: list[float], frames_per_sec: float) -> float:
    """Mean over the joins of the largest flux within a frame of the join, over the track's median flux."""
    flux = spectral_flux(mel)
    typical = float(flux.median())
    if not joins_sec or typical <= 0:
        return math.nan
    peaks = []
    for join in joins_sec:
        at = round(join * frames_per_sec) - 1  # flux[i] is the change into frame i + 1
        peaks.append(float(flux[max(0, at - 1):at + 2].max()))
    return statistics.fmean(peaks) / typical


def evaluate_long(run: Path, tsv: Path, video_root: Path, originals: Path, out: Path,
                  sampling: SamplingSettings = SamplingSettings(), seeds: int = 1, lora_scale: float = 1.0,
                  settings: LongSettings = LongSettings(), source: ModelSource | None = None,
                  show_progress: bool = True) -> LongEvaluation:
    """Voice every held-out commercial whole with the base model and the fine-tune; score per
    window and at the joins; test over sources; write `out` (JSON) and the first seed's audio
    beside it (OUT/<source>_{real,base,tuned}.wav)."""
    from shared.media import load_track, picture_duration, write_wav
    from shared.synthesis import check_seed

    started = time.perf_counter()
    check_seed(sampling.seed + seeds - 1, "--seed + --seeds - 1 (the last seed scored)")
    run = Path(run)
    source = source or resolve_source(run=run)
    runtime = source.runtime
    runtime.torch_device
    check_adapter_file(source.adapter)
    commercials = held_out_originals(run, tsv, video_root, originals)
    out = check_evaluation_target(out)
    audio_folder = check_report_folder(out.with_suffix(""))  # new, or an earlier report of ours
    check_not_nested(audio_folder, "report")
    window_seq = runtime.sequence()
    settings.check(window_seq)
    base = ModelSource(runtime).load()
    tuned = merge_adapter(copy.deepcopy(base), source.adapter, lora_scale,  # the runtime keeps one base network
                          {"variant": runtime.variant, "profile": runtime.profile})
    decoder, judges, encoders = AudioDecoder(runtime), Judges(runtime), VideoEncoders(runtime)
    mark_folder(audio_folder, "report")
    rate, mel = decoder.sampling_rate, runtime.mel_converter()
    result = LongEvaluation(runtime.variant, asdict(sampling), seeds, notes=list(judges.left_out))
    values = {metric: {} for metric in LONG_METRICS}
    for name, (video, caption) in commercials.items():
        seconds = min(picture_duration(video) or window_seq.window_sec, settings.max_duration)
        windows = plan_windows(seconds, window_seq, overlap_frames(settings.overlap_sec, window_seq))
        joins = [(w.start + w.held) * frame_period(window_seq) for w in windows[1:]]
        result.tracks[name] = {"video": str(video), "seconds": seconds, "windows": len(windows), "joins": joins}
        real = load_track(video, rate)
        real = torch.nn.functional.pad(real, (0, max(0, round(seconds * rate) - real.shape[0])))[:round(seconds * rate)]
        conditions = {}  # each window's picture features, once per commercial
        for window in windows:
            seq = runtime.sequence(window.seconds)
            conditions[window.start] = window_conditions(runtime, base, window, seq, Picture(video, 0.0), encoders)[1]
        base.update_seq_lengths(window_seq.latent_seq_len, window_seq.clip_seq_len, window_seq.sync_seq_len)
        text = encoders.text([caption])

        def scores(audio: torch.Tensor) -> dict[str, float]:
            desync, kl = [], []
            for window in windows:
                first = round(window.start * frame_period(window_seq) * rate)
                piece = audio[first:first + round(window.seconds * rate)]
                desync.append(judges.desync(conditions[window.start][0], piece, rate, window.seconds))
                if judges.passt is not None:
                    from shared.models.passt import kl_per_clip

                    real_piece = real[first:first + round(window.seconds * rate)]
                    real_logits, _ = judges.passt_outputs(real_piece, rate, window.seconds)
                    logits, _ = judges.passt_outputs(piece, rate, window.seconds)
                    kl.append(float(kl_per_clip(real_logits[None], logits[None])[0]))
            log_mel = decoder_mel(mel, audio)
            return {"desync": _finite_mean(desync), "kl_passt": _finite_mean(kl),
                    "seam": seam_scores(log_mel, joins, rate / window_seq.hop_length)}

        per_model = {}
        for model, network in (("base", base), ("tuned", tuned)):
            network.to(runtime.torch_device)
            runs = []
            for k in range(seeds):
                track = voice_windows(runtime, network, decoder, Picture(video, 0.0), text, seconds,
                                      replace(sampling, seed=sampling.seed + k), settings, encoders,
                                      show_progress=show_progress, name=f"{name} ({model})")
                runs.append(scores(track.audio))
                if k == 0:
                    write_wav(audio_folder / f"{_file_name(name)}_{model}.wav", track.audio, rate)
            network.to("cpu")
            per_model[model] = {metric: _finite_mean([r[metric] for r in runs]) for metric in LONG_METRICS}
        write_wav(audio_folder / f"{_file_name(name)}_real.wav", real, rate)
        real_scores = scores(real)
        for metric in LONG_METRICS:
            values[metric][name] = {**{m: per_model[m][metric] for m in MODELS},
                                    **({"real": real_scores[metric]} if metric != "kl_passt" else {})}
    if judges.passt is None:
        values.pop("kl_passt")
    result.per_source = values
    result.metrics = judge({metric: {s: v["tuned"] - v["base"] for s, v in by_source.items()}
                            for metric, by_source in values.items()}, {s: s for s in commercials})
    result.notes.append(f"{len(commercials)} held-out commercial(s) voiced whole ({', '.join(commercials)}); "
                        "the real track's own seam score at the same times is the floor.")
    result.seconds = time.perf_counter() - started
    atomic_write_text(out, result.to_json())
    return result


def decoder_mel(mel_converter, audio: torch.Tensor) -> torch.Tensor:
    """The log-mel of a waveform (bins, frames), as training computes it."""
    with torch.no_grad():
        return mel_converter(audio[None].float().to(mel_converter.mel_basis.device))[0].float().cpu()


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _file_name(source: str) -> str:
    from shared.clip_list import safe_id

    return safe_id(Path(source).stem)
