"""Generation: audio for videos, a clip list, precomputed features or a prompt alone.

Each input becomes a request; each request is prepared (its video decoded and encoded, or its
stored features read), requests of equal duration are sampled together in batches, decoded by the
VAE decoder and the vocoder, and written as `<out>/<name>.wav` (+ `<name>.mp4` with the source
picture). Requests from precomputed features load no encoder at all (only for a new --prompt).
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generate.long import LongSettings, Picture, voice_windows
from generate.model import ModelSource
from shared.clip_list import safe_id
from shared.errors import UserError, is_plain_file_name
from shared.media import MediaError
from shared.outputs import check_output_folder, folder_kind, mark_output_folder
from shared.progress import progress as progress_bar
from shared.runtime import Runtime
from shared.models.sequence import DEFAULT_WINDOW_SEC, MIN_CLIP_SEC
from shared.synthesis import (AudioDecoder, SamplingSettings, crop_video_features, duration_batches, sample_latents,
                              use_duration)

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


@dataclass
class GenerateJob:
    out: Path
    source: ModelSource = field(default_factory=ModelSource)  # the runtime (device, precision too) and adapter
    videos: list[Path] = field(default_factory=list)  # files or folders of videos
    tsv: Path | None = None  # a clip list (as for `features`), with --video-root
    video_root: Path | None = None
    features: Path | None = None  # a folder written by `features`: no encoder needed
    ids: list[str] = field(default_factory=list)  # with features: only these clips
    prompt: str | None = None  # replaces captions; alone (no video) it is text-to-audio
    negative_prompt: str = ""
    duration: float | None = None  # default: each clip's own length (up to the window with long off)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    lora_scale: float = 1.0
    batch_size: int = 4
    write_video: bool = True
    long: LongSettings = field(default_factory=LongSettings)  # past the window: continued windows, or off

    @property
    def longest(self) -> float:
        """The longest track asked for: the window with --long off, else --max-duration."""
        return DEFAULT_WINDOW_SEC if self.long.mode == "off" else self.long.max_duration

    def validate(self) -> None:
        """Every argument checked before anything loads."""
        if self.source.runtime.mode is not None:  # else the network file tells it: checked once loaded
            self.long.check(self.source.runtime.sequence())
        if self.duration is not None and not (math.isfinite(self.duration)
                                              and MIN_CLIP_SEC <= self.duration <= self.longest):
            limit = ("the networks' window; --long windows goes further" if self.long.mode == "off" else
                     "--max-duration")
            raise UserError(f"--duration must be between {MIN_CLIP_SEC:g} s (one Synchformer window) and "
                            f"{self.longest:g} s ({limit}), not {self.duration:g}")
        if not math.isfinite(self.lora_scale):
            raise UserError(f"--lora-scale must be a finite number, not {self.lora_scale}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size}")


@dataclass(frozen=True)
class Request:
    name: str  # output file stem
    video: Path | None = None
    start_sec: float = 0.0
    end_sec: float | None = None
    caption: str = ""
    feature_row: int | None = None  # row in the features folder


@dataclass
class Prepared:
    request: Request
    duration: float
    clip_features: torch.Tensor | None  # (≥ clip_seq_len, D) on the CPU; None: no video (or a long one)
    sync_features: torch.Tensor | None
    text_features: torch.Tensor | None  # stored caption features; None: encode the caption
    long: bool = False  # longer than the window: continued windows, each encoding its own part of the picture


@dataclass
class GenerationSummary:
    out: Path
    variant: str
    written: list[Path] = field(default_factory=list)
    replaced: list[Path] = field(default_factory=list)  # earlier outputs of the same name, now replaced
    skipped: list[str] = field(default_factory=list)
    models_loaded: list[str] = field(default_factory=list)
    seconds: float = 0.0


def prompt_name(prompt: str) -> str:
    """The output name of a text-to-audio prompt: its words where they are ASCII, and a digest of
    the whole prompt, so prompts in any script (and the empty one) never share a file."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:50]
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    return f"{words}_{digest}" if words else f"prompt_{digest}"


def _video_files(paths: list[Path], out: Path) -> list[tuple[str, Path]]:
    """(output name, file) of the video files named and of those in the folders named (recursively,
    sorted). A file in a folder is named by its path in that folder (`TitleA/seg_001.mp4` →
    `TitleA__seg_001`, as `features` names it); the output folder and other folders we wrote are
    not read as input."""
    out = out.resolve()
    found = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                           and not _in_generated_folder(p, path, out))
            if not files:
                raise UserError(f"{path}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
            found.extend((safe_id(str(p.relative_to(path).with_suffix("")).replace("/", "__")), p) for p in files)
        elif not path.exists():
            raise UserError(f"{path}: no such video file or folder")
        else:
            found.append((path.stem, path))
    return found


def _in_generated_folder(file: Path, root: Path, out: Path) -> bool:
    for folder in file.parents:
        if folder == root:
            return False
        if folder.resolve() == out or folder_kind(folder) == "generated":
            return True
    return False


def collect_requests(job: GenerateJob) -> list[Request]:
    """The job's inputs as requests with unique output names."""
    caption = job.prompt or ""
    requests: list[Request] = []
    for name, file in _video_files(job.videos, job.out):
        requests.append(Request(name, file, caption=caption))
    if job.tsv is not None:
        from shared.clip_list import read_clip_list

        for clip in read_clip_list(job.tsv, job.video_root or job.tsv.parent):
            requests.append(Request(clip.id, clip.video, clip.start_sec, clip.end_sec,
                                    caption if job.prompt is not None else clip.caption))
    if job.features is not None:
        from shared.features import feature_ids

        ids = feature_ids(job.features)
        unknown = sorted(set(job.ids) - set(ids))
        if unknown:
            raise UserError(f"{job.features}: no clip with id {', '.join(unknown[:5])}")
        requests.extend(Request(clip_id, caption=caption, feature_row=row)
                        for row, clip_id in enumerate(ids) if not job.ids or clip_id in job.ids)
    if not requests:
        if job.prompt is None:
            raise UserError("nothing to generate: give --video, --tsv, --features or --prompt")
        requests.append(Request(prompt_name(job.prompt), caption=job.prompt))
    names = [r.name for r in requests]
    unsafe = [n for n in names if not is_plain_file_name(n)]
    if unsafe:
        raise UserError(f"output names must be plain file names (no /, \\ or leading .): {', '.join(unsafe[:5])}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"several inputs would write the same output name: {', '.join(repeated[:5])}; "
                         "generate them into separate --out folders")
    return requests


class VideoEncoders:
    """The runtime's CLIP (frames and text) and Synchformer, for one clip at a time."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    @torch.no_grad()
    def video(self, clip_frames: torch.Tensor, sync_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from shared.media import clip_pixels, sync_pixels
        from shared.models.synchformer import encode_sync_frames

        device = self.runtime.torch_device
        with self.runtime.autocast():
            clip_features = self.runtime.clip().encode_frames(clip_pixels(clip_frames.to(device)))
            sync_features = encode_sync_frames(self.runtime.synchformer(), sync_pixels(sync_frames[None].to(device)))[0]
        return clip_features.float().cpu(), sync_features.float().cpu()

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        with self.runtime.autocast():
            return self.runtime.clip().encode_text(captions).float().cpu()


def _prepare(request: Request, job: GenerateJob, encoders: VideoEncoders, stored) -> Prepared:
    """Decode and encode one request's video (or read its stored features); raises MediaError."""
    if request.feature_row is not None:
        row = request.feature_row
        stored_duration = DEFAULT_WINDOW_SEC if stored.duration_sec is None else float(stored.duration_sec[row])
        text = stored.text_features[row].clone() if job.prompt is None else None
        prepared = Prepared(request, job.duration or stored_duration, stored.clip_features[row].clone(),
                            stored.sync_features[row].clone(), text)
    elif request.video is not None:
        from shared.media import load_video, picture_duration

        picture = picture_duration(request.video, request.start_sec, request.end_sec)
        if picture is None and job.long.mode == "windows" and not job.duration:
            log.warning("%s: the container does not say how long its picture is; voicing its first %g s",
                        request.video.name, DEFAULT_WINDOW_SEC)
        wanted = job.duration or picture or DEFAULT_WINDOW_SEC
        if job.long.mode == "windows" and wanted > DEFAULT_WINDOW_SEC:
            if wanted > job.long.max_duration:
                raise MediaError(f"{wanted:.1f} s is longer than --max-duration {job.long.max_duration:g} s; "
                                 "raise it, or cut the video")
            if job.duration and picture is not None and job.duration > picture + 0.05:
                log.warning("%s: the picture lasts %.2f s; its last frame is held to fill %.2f s",
                            request.video.name, picture, job.duration)
            return Prepared(request, wanted, None, None, None, long=True)
        frames = load_video(request.video, request.start_sec, request.end_sec, window_sec=DEFAULT_WINDOW_SEC)
        if job.duration and job.duration > frames.duration_sec + 0.05:
            log.warning("%s: the picture lasts %.2f s; its last frame is held to fill %.2f s", request.video.name,
                        frames.duration_sec, job.duration)
        clip_features, sync_features = encoders.video(frames.clip_frames, frames.sync_frames)
        prepared = Prepared(request, job.duration or frames.duration_sec, clip_features, sync_features, None)
    else:
        duration = job.duration or DEFAULT_WINDOW_SEC
        prepared = Prepared(request, duration, None, None, None, long=duration > DEFAULT_WINDOW_SEC)
        if prepared.long:
            return prepared
    try:  # a duration the network or the features cannot serve
        seq = job.source.runtime.sequence(prepared.duration)
        if prepared.clip_features is not None:
            crop_video_features(prepared.clip_features[None], prepared.sync_features[None], seq)
    except ValueError as error:
        raise MediaError(str(error)) from None
    return prepared


def check_weights(runtime: Runtime, encoders_needed: bool) -> None:
    """Fail before any work when a real weight file generation will need is missing (all named at once)."""
    from shared.weights import CLIP_WEIGHTS, NETWORK_WEIGHTS, SYNCHFORMER_WEIGHTS, MissingWeightsError, check_files

    variant = runtime.variant
    skip = {NETWORK_WEIGHTS[variant]} if runtime.network_file else set()
    if not encoders_needed:
        skip |= {CLIP_WEIGHTS, SYNCHFORMER_WEIGHTS}
    missing = [status.weight_file for status in check_files(variant, runtime.weights_dir)
               if "generate" in status.commands and not status.found and status.weight_file not in skip]
    if missing:
        names = ", ".join(str(f.relative_path) for f in missing)
        raise MissingWeightsError(f"missing weight file(s) for {variant}: {names}; run `mmaudio-lora download "
                                  f"--variant {variant}` (or `mmaudio-lora doctor` to see where they go)")


def _open_stored(job: GenerateJob):
    if job.features is None:
        return None
    from shared.features import feature_window, open_feature_dir

    return open_feature_dir(job.features, job.source.runtime.data_dim(feature_window(job.features)))


def generate(job: GenerateJob, show_progress: bool = True) -> GenerationSummary:
    """Audio for every request of the job. Everything that can refuse (arguments, the output
    folder, weight files, the device, the adapter) is checked before the output folder is made."""
    started = time.perf_counter()
    job.validate()
    requests = collect_requests(job)
    inputs = tuple(job.videos) + tuple(p for p in (job.tsv, job.features) if p is not None)
    out = check_output_folder(job.out, "generated", protected=inputs)
    runtime = job.source.runtime
    real = runtime.profile == "real"
    encoders_needed = bool(job.negative_prompt) or any(r.feature_row is None or job.prompt is not None
                                                       for r in requests)
    if real and runtime.variant:  # known before loading: check before the (slow) network load
        check_weights(runtime, encoders_needed)
    inferred = runtime.variant is None
    network = job.source.load(job.lora_scale)
    if real and inferred:
        check_weights(runtime, encoders_needed)
    job.long.check(runtime.sequence())
    network.to(runtime.torch_device)
    mark_output_folder(out, "generated")
    summary = GenerationSummary(out, runtime.variant)
    stored = _open_stored(job)
    encoders = VideoEncoders(runtime)
    decoder = AudioDecoder(runtime)

    prepared: list[Prepared] = []
    for request in progress_bar(requests, desc="reading inputs", unit="clip", disable=not show_progress):
        try:
            prepared.append(_prepare(request, job, encoders, stored))
        except MediaError as error:
            summary.skipped.append(f"{request.video or request.name}: {error}")
    negative = encoders.text([job.negative_prompt]) if job.negative_prompt else None

    one_window = [p for p in prepared if not p.long]
    batches = duration_batches([p.duration for p in one_window], job.batch_size)
    for batch in progress_bar(batches, desc="generating", unit="batch", disable=not show_progress or not batches):
        members = [one_window[n] for n in batch]
        audio = _generate_batch(members, job, network, encoders, decoder, negative)
        for member, samples in zip(members, audio):
            _write(member.request, samples, decoder.sampling_rate, out, job.write_video, summary)
    for member in (p for p in prepared if p.long):  # windows of one track are sequential; tracks one by one
        request = member.request
        text = member.text_features[None] if member.text_features is not None else encoders.text([request.caption])
        track = voice_windows(runtime, network, decoder,
                              Picture(request.video, request.start_sec) if request.video is not None else None,
                              text, member.duration, job.sampling, job.long, encoders, negative, show_progress,
                              request.name)
        _write(request, track.audio, decoder.sampling_rate, out, job.write_video, summary)
    summary.models_loaded = runtime.loaded_models
    summary.seconds = time.perf_counter() - started
    return summary


def _generate_batch(batch: list[Prepared], job: GenerateJob, network, encoders: VideoEncoders,
                    decoder: AudioDecoder, negative: torch.Tensor | None) -> torch.Tensor:
    """Audio (B, samples at the clips' duration) for a batch of equal duration."""
    duration = batch[0].duration
    runtime = job.source.runtime
    seq = runtime.sequence(duration)
    use_duration(network, seq)
    if batch[0].clip_features is None:
        clip_features = network.get_empty_clip_sequence(len(batch)).detach().cpu()
        sync_features = network.get_empty_sync_sequence(len(batch)).detach().cpu()
    else:
        clip_features, sync_features = crop_video_features(torch.stack([p.clip_features for p in batch]),
                                                           torch.stack([p.sync_features for p in batch]), seq)
    if all(p.text_features is not None for p in batch):
        text_features = torch.stack([p.text_features for p in batch])
    else:
        text_features = encoders.text([p.request.caption for p in batch])
    latents = sample_latents(runtime, network, clip_features, sync_features, text_features, job.sampling, negative)
    return decoder.waveform(latents)[:, :round(duration * seq.sampling_rate)]


def _write(request: Request, audio: torch.Tensor, rate: int, out: Path, write_video: bool,
           summary: GenerationSummary) -> None:
    """The wav, then the mp4; a clip whose audio is not finite (a diverged model) is skipped and
    named, a clip whose mp4 cannot be written is reported, the others go on."""
    from shared.media import write_video_with_audio, write_wav

    if not bool(torch.isfinite(audio).all()):
        summary.skipped.append(f"{request.video or request.name}: the generated audio is not finite (NaN or inf: "
                               "the adapter or --lora-scale made the model diverge); nothing written")
        return
    targets = [out / f"{request.name}.wav"] + ([out / f"{request.name}.mp4"]
                                                if request.video is not None and write_video else [])
    summary.replaced.extend(path for path in targets if path.exists())
    summary.written.append(write_wav(out / f"{request.name}.wav", audio, rate))
    if request.video is not None and write_video:
        try:
            summary.written.append(write_video_with_audio(request.video, out / f"{request.name}.mp4", audio, rate,
                                                          request.start_sec))
        except MediaError as error:
            summary.skipped.append(f"{request.video}: wav written, mp4 not: {error}")
