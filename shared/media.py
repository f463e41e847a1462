"""Media through PyAV: decoding a segment (frames for CLIP and Synchformer, and the audio), and
writing generated audio as wav or muxed with the source picture as mp4.

Frames are picked as MMAudio's reader picks them; audio is prepared as its training extractor
prepares it. A segment shorter than the window is padded (last frame repeated, silence) and its
true duration recorded; a longer one is truncated to the window.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import UserError
from shared.outputs import atomic_path
from shared.models.resample import resample
from shared.models.sequence import CLIP_FPS, SYNC_FPS, SequenceConfig

log = logging.getLogger(__name__)

CLIP_SIZE = 384
SYNC_SIZE = 224
PEAK = 0.95
SILENCE = 1e-6
OUTPUT_TIME_BASE = Fraction(1, 90000)  # the mp4 picture clock: MPEG's 90 kHz
RESIZE_CHUNK = 16  # frames resized together: bounded memory whatever the source resolution
IN_FLIGHT = 4  # chunks decoded ahead of the resizing thread


class MediaError(UserError):
    """A file that cannot give a training segment; the message says why."""


@dataclass
class Segment:
    """Frames stay uint8 until they reach the encoders' device (`clip_pixels`, `sync_pixels`): a
    quarter of float32's size through the decoding workers' shared memory (58 MB per 8 s clip)."""
    clip_frames: torch.Tensor  # (clip_seq_len, 3, 384, 384) uint8
    sync_frames: torch.Tensor  # (sync_frames, 3, 224, 224) uint8
    audio: torch.Tensor  # (num_audio_samples,) mono at the mode's rate
    duration_sec: float  # real content, ≤ the window; the rest is padding


class _FramePicker:
    """Emits the first decoded frame at or after each target time (target += 1/fps, in float)."""

    def __init__(self, fps: float, count: int):
        self.step = 1.0 / fps
        self.count = count
        self.target = 0.0
        self.picked: list[int] = []  # index into the kept source frames

    def offer(self, time: float, index: int) -> bool:
        used = False
        while len(self.picked) < self.count and time >= self.target:
            self.picked.append(index)
            self.target += self.step
            used = True
        return used

    @property
    def full(self) -> bool:
        return len(self.picked) >= self.count


def _resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic, antialiased, on uint8: torch's own uint8 kernel, the one torchvision's v2 resize
    runs for uint8 on the CPU (called directly: torchvision's import costs seconds per process)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames, size=[height, width], mode="bicubic", align_corners=False, antialias=True)


def _resize_clip(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → uint8 (N, 3, 384, 384); aspect ratio not kept. Resized on uint8
    exactly as the reference does, and 5x faster than resizing in float (bench/precompute.py)."""
    return _resize_uint8(frames, CLIP_SIZE, CLIP_SIZE)


def _resize_sync(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → short side 224 (bicubic, antialiased), center crop 224, uint8."""
    height, width = frames.shape[-2:]
    short, long = min(height, width), max(height, width)
    scaled_long = int(SYNC_SIZE * long / short)  # torchvision's rounding of the long side
    resized = _resize_uint8(frames, *((SYNC_SIZE, scaled_long) if height <= width else (scaled_long, SYNC_SIZE)))
    top = int(round((resized.shape[-2] - SYNC_SIZE) / 2.0))
    left = int(round((resized.shape[-1] - SYNC_SIZE) / 2.0))
    return resized[..., top:top + SYNC_SIZE, left:left + SYNC_SIZE].contiguous()


def clip_pixels(frames: torch.Tensor) -> torch.Tensor:
    """Decoded CLIP frames (uint8) → float in [0, 1], the CLIP encoder's input."""
    return frames.float().div_(255.0)


def sync_pixels(frames: torch.Tensor) -> torch.Tensor:
    """Decoded Synchformer frames (uint8) → float in [-1, 1], the Synchformer's input."""
    return frames.float().div_(255.0).sub_(0.5).div_(0.5)


def _pad_frames(frames: torch.Tensor, count: int) -> torch.Tensor:
    if frames.shape[0] >= count:
        return frames[:count]
    return torch.cat([frames, frames[-1:].expand(count - frames.shape[0], *frames.shape[1:])])


def upright(frame) -> np.ndarray:
    """The frame as rgb24 (H, W, 3), turned as its display matrix says (phone clips are stored
    sideways with a rotation to apply); the encoders see what a player shows."""
    quarter_turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, as np.rot90 turns
    image = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(image, quarter_turns)) if quarter_turns else image


def _read_frames(container, start_sec: float, length_sec: float, clip_count: int, sync_count: int,
                 timings: dict[str, float]):
    """Decode [start, start + length], pick frames for both rates, resize them in chunks."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    if start_sec > 0:
        container.seek(int(start_sec / stream.time_base), stream=stream, backward=True, any_frame=False)
    pickers = {"clip": _FramePicker(CLIP_FPS, clip_count), "sync": _FramePicker(SYNC_FPS, sync_count)}
    pending: list[np.ndarray] = []  # (H, W, 3) source frames some picker still refers to, not yet resized
    resized = {"clip": [], "sync": []}
    first_pending = 0  # index of pending[0] among kept frames
    kept = 0
    last_time = None

    # Resizing runs in a helper thread while decoding goes on (both release the GIL); results are
    # collected in order, so the frames come out exactly as a serial loop gives them.
    resizing = ThreadPoolExecutor(max_workers=1)
    jobs = []

    def resize_chunk(chunk: list[np.ndarray], wanted: dict[str, list[int]]) -> dict[str, list[torch.Tensor]]:
        out = {}
        for name, resize in (("clip", _resize_clip), ("sync", _resize_sync)):
            unique = sorted(set(wanted[name]))
            if unique:
                # (N, 3, H, W) as a channels-last view of the stacked frames: no transposing copy,
                # and the layout torch's uint8 resize kernel is fastest on
                batch = resize(torch.from_numpy(np.stack([chunk[i] for i in unique])).permute(0, 3, 1, 2))
                position = {source: row for row, source in enumerate(unique)}
                out[name] = [batch[position[i]] for i in wanted[name]]
            else:
                out[name] = []
        return out

    emitted = {"clip": 0, "sync": 0}

    def flush() -> None:
        nonlocal pending, first_pending
        if not pending:
            return
        wanted = {}
        for name in ("clip", "sync"):
            # only frames a picker emitted get resized, once each, in emission order
            wanted[name] = [i - first_pending for i in pickers[name].picked[emitted[name]:]]
            emitted[name] = len(pickers[name].picked)
        if len(jobs) >= IN_FLIGHT:  # a bounded number of source-frame chunks in memory, whatever the resolution
            jobs[-IN_FLIGHT].result()
        jobs.append(resizing.submit(resize_chunk, pending, wanted))
        first_pending += len(pending)
        pending = []

    for frame in container.decode(stream):
        if frame.time is None:
            continue
        frame_time = frame.time - start_sec
        if frame_time < -1e-6:  # before the segment (after a seek to a keyframe)
            continue
        if frame_time > length_sec + 1e-6 or all(p.full for p in pickers.values()):
            break
        used = [p.offer(frame_time, kept) for p in pickers.values()]
        if any(used):
            pending.append(upright(frame))
            kept += 1
        last_time = frame_time
        if len(pending) >= RESIZE_CHUNK:
            flush()
    flush()
    waited = time.perf_counter()
    for job in jobs:
        for name, frames in job.result().items():
            resized[name].extend(frames)
    resizing.shutdown()
    timings["resize"] = timings.get("resize", 0.0) + time.perf_counter() - waited  # resizing not hidden by decoding
    if not resized["clip"] or not resized["sync"]:
        raise MediaError("no video frames in the requested time range")
    frame_rate = float(stream.average_rate) if stream.average_rate else SYNC_FPS
    video_extent = (last_time or 0.0) + 1.0 / frame_rate
    return torch.stack(resized["clip"]), torch.stack(resized["sync"]), video_extent


def _read_audio(container) -> tuple[np.ndarray, float, int]:
    """The whole audio track, mono float32 at its own rate, with the time of its first sample.

    The whole track, because the reference extractor peak-normalizes by the whole file's peak.
    """
    import av

    if not container.streams.audio:
        raise MediaError("no audio track (the audio is the training target)")
    stream = container.streams.audio[0]
    rate = stream.rate or stream.codec_context.sample_rate
    # Packed float at the native rate and layout: one plane whatever the channel count (PyAV's
    # planar conversion crashes on 8 channels); the channels are then averaged, as the reference does.
    resampler = av.AudioResampler(format="flt")
    chunks, first_time = [], None

    def add(packed) -> None:
        channels = packed.layout.nb_channels
        chunks.append(packed.to_ndarray().reshape(-1, channels).mean(axis=1))

    for frame in container.decode(stream):
        for packed in resampler.resample(frame):
            if first_time is None:
                first_time = packed.time if packed.time is not None else 0.0
            add(packed)
    for packed in resampler.resample(None):
        add(packed)
    if not chunks:
        raise MediaError("the audio track holds no samples")
    return np.concatenate(chunks).astype(np.float32), first_time or 0.0, rate


def _resample_segment(track: np.ndarray, offset: int, count: int, rate: int, target_rate: int) -> torch.Tensor:
    """Resample track[offset:offset + count] with real samples around it, so the segment's edges
    come out as if the whole track had been resampled (the reference resamples whole files)."""
    if rate == target_rate:
        return torch.from_numpy(track[offset:offset + count].copy())
    unit = rate // math.gcd(rate, target_rate)  # source samples that map to a whole target count
    margin = unit * math.ceil(0.05 * rate / unit)
    head = min(offset, margin) // unit * unit
    window = torch.from_numpy(track[offset - head:offset + count + margin].copy())
    resampled = resample(window, rate, target_rate)
    skip = head * target_rate // rate
    return resampled[skip:skip + math.ceil(count * target_rate / rate)]


@dataclass
class VideoFrames:
    clip_frames: torch.Tensor  # (clip_seq_len, 3, 384, 384) uint8
    sync_frames: torch.Tensor  # (sync_frames, 3, 224, 224) uint8
    duration_sec: float  # the picture's real extent inside the window; later frames repeat the last


def _segment_length(path: Path, start_sec: float, end_sec: float | None, window_sec: float) -> float:
    """Seconds to decode: the requested segment, at most the window; raises for unusable input."""
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MediaError("empty file (0 bytes)")
    requested = window_sec if end_sec is None else end_sec - start_sec
    if requested <= 0:
        raise MediaError(f"end time {end_sec} is not after start time {start_sec}")
    if requested > window_sec + 1e-6:
        log.warning("%s: segment of %.2f s is longer than the %.1f s window; keeping the first %.1f s",
                    path.name, requested, window_sec, window_sec)
    return min(requested, window_sec)


def _floor_ms(seconds: float) -> float:
    return math.floor(seconds * 1000) / 1000


def _decode_frames(path: Path, start_sec: float, length: float, window_sec: float,
                   timings: dict[str, float]) -> VideoFrames:
    """Frames of [start, start + length] for both encoders, padded to the window."""
    import av

    seq = SequenceConfig("16k", window_sec)  # frame counts do not depend on the audio mode
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            clip, sync, video_extent = _read_frames(container, start_sec, length, seq.clip_seq_len,
                                                    seq.sync_frames, timings)
    except av.error.FFmpegError as error:
        raise MediaError(f"cannot decode: {error}") from None
    return VideoFrames(_pad_frames(clip, seq.clip_seq_len), _pad_frames(sync, seq.sync_frames),
                       _floor_ms(min(length, video_extent)))


def load_video(path: str | Path, start_sec: float = 0.0, end_sec: float | None = None, *,
               window_sec: float = 8.0) -> VideoFrames:
    """The picture of a segment for generation: frames for both encoders, padded to the window.

    Frames are picked at fixed times from the segment's start, so the first k frames of a longer
    window are the frames of a shorter one: one decode serves any duration up to the window.
    """
    path = Path(path)
    return _decode_frames(path, start_sec, _segment_length(path, start_sec, end_sec, window_sec), window_sec, {})


def load_segment(path: str | Path, start_sec: float = 0.0, end_sec: float | None = None, *,
                 window_sec: float = 8.0, mode: str = "16k", timings: dict[str, float] | None = None) -> Segment:
    """Decode `path` from `start_sec` to `end_sec` (None: to the end) into one training window.

    `timings`, when given, accumulates seconds spent resizing frames and decoding the rest.
    """
    timings = {} if timings is None else timings
    started, resized_before = time.perf_counter(), timings.get("resize", 0.0)
    import av

    seq = SequenceConfig(mode, window_sec)
    path = Path(path)
    length = _segment_length(path, start_sec, end_sec, window_sec)
    video = _decode_frames(path, start_sec, length, window_sec, timings)
    try:
        with av.open(str(path)) as container:
            track, first_time, rate = _read_audio(container)
    except av.error.FFmpegError as error:
        raise MediaError(f"cannot decode: {error}") from None

    if first_time > 0:  # sound starts after the picture: silence until its first sample
        track = np.concatenate([np.zeros(int(round(first_time * rate)), np.float32), track])
        first_time = 0.0
    peak = float(np.abs(track).max())
    offset = max(0, int(round((start_sec - first_time) * rate)))
    samples = track[offset:offset + int(round(length * rate))]
    if peak <= SILENCE or not samples.size or float(np.abs(samples).max()) <= SILENCE:
        raise MediaError("the audio is silent (the audio is the training target)")
    audio_extent = samples.shape[0] / rate
    audio = _resample_segment(track / peak * PEAK, offset, samples.shape[0], rate, seq.sampling_rate)
    audio = F.pad(audio, (0, max(0, seq.num_audio_samples - audio.shape[0])))[: seq.num_audio_samples]

    resizing = timings.get("resize", 0.0) - resized_before
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - started - resizing
    return Segment(video.clip_frames, video.sync_frames, audio.float(),
                   duration_sec=_floor_ms(min(video.duration_sec, audio_extent)))


def load_track(path: str | Path, rate: int) -> torch.Tensor:
    """A file's whole sound track, mono float32 at `rate`, placed at its timestamp (silence before
    a track that starts after the picture), as it is (not normalized)."""
    import av

    path = Path(path)
    _segment_length(path, 0.0, None, math.inf)
    try:
        with av.open(str(path)) as container:
            track, first_time, source_rate = _read_audio(container)
    except av.error.FFmpegError as error:
        raise MediaError(f"cannot decode: {error}") from None
    if first_time > 0:
        track = np.concatenate([np.zeros(int(round(first_time * source_rate)), np.float32), track])
    return _resample_segment(track, 0, track.shape[0], source_rate, rate).float()


def picture_duration(path: str | Path, start_sec: float = 0.0, end_sec: float | None = None) -> float | None:
    """Seconds of picture from `start_sec` to `end_sec` (None: to the end of the video stream),
    read from the container without decoding (None when it does not say); raises MediaError for
    unusable input."""
    import av

    path = Path(path)
    _segment_length(path, start_sec, end_sec, math.inf)  # the file's own checks
    if end_sec is not None:
        return end_sec - start_sec
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                total = float(stream.duration * stream.time_base)
            elif container.duration:
                total = container.duration / av.time_base
            else:
                return None
    except av.error.FFmpegError as error:
        raise MediaError(f"cannot decode: {error}") from None
    if total - start_sec <= 0:
        raise MediaError(f"the picture ends at {total:.2f} s, before the start {start_sec:g} s")
    return total - start_sec


def probe_duration(path: str | Path) -> float | None:
    """The container's duration in seconds, without decoding (None when unknown or unreadable)."""
    import av

    try:
        with av.open(str(path)) as container:
            return container.duration / av.time_base if container.duration else None
    except (av.error.FFmpegError, OSError):
        return None


def _encode_audio(container, stream, audio: np.ndarray, rate: int) -> None:
    """Mono float audio through `stream`, in encoder-sized frames."""
    import av

    block = stream.codec_context.frame_size or 4096  # PCM codecs take any size (0)
    for start in range(0, audio.shape[0], block):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, start:start + block]), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = rate, start
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def write_wav(path: str | Path, audio: torch.Tensor, rate: int) -> Path:
    """Mono audio in [-1, 1] as 16-bit PCM wav (clipped), written atomically."""
    import av

    path = Path(path)
    samples = audio.detach().float().clamp(-1, 1).cpu().numpy()
    with atomic_path(path) as temporary, av.open(str(temporary), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        _encode_audio(container, stream, samples, rate)
    return path


def write_video_with_audio(source: str | Path, path: str | Path, audio: torch.Tensor, rate: int,
                           start_sec: float = 0.0) -> Path:
    """An mp4 with the source's picture from `start_sec` for the audio's length, and `audio` (AAC).

    The picture is re-encoded (H.264), so any segment start works, not only keyframes. Each frame
    keeps its source timestamp (variable frame rates stay in sync with the audio) and the source's
    rotation is carried over as the output's display matrix.
    """
    import av

    path = Path(path)
    samples = audio.detach().float().clamp(-1, 1).cpu().numpy()
    duration = samples.shape[0] / rate
    try:
        with atomic_path(path) as temporary, av.open(str(source)) as reader, \
                av.open(str(temporary), "w", format="mp4") as writer:
            video_in = reader.streams.video[0]
            frame_rate = Fraction(video_in.average_rate or SYNC_FPS).limit_denominator(1001)
            video_out = writer.add_stream("libx264", rate=frame_rate)
            video_out.codec_context.time_base = OUTPUT_TIME_BASE  # fine enough for any source timing
            # yuv420p needs even sizes
            video_out.width = video_in.codec_context.width // 2 * 2
            video_out.height = video_in.codec_context.height // 2 * 2
            video_out.pix_fmt = "yuv420p"
            video_out.options = {"preset": "veryfast", "crf": "20"}
            audio_out = writer.add_stream("aac", rate=rate, layout="mono")
            if start_sec > 0:
                reader.seek(int(start_sec / video_in.time_base), stream=video_in, backward=True, any_frame=False)
            last_pts = None
            for frame in reader.decode(video_in):
                if frame.time is None or frame.time < start_sec - 1e-6:
                    continue
                if frame.time - start_sec >= duration - 1e-6:
                    break
                if last_pts is None and frame.rotation:
                    video_out.set_display_rotation(frame.rotation)
                pts = round((frame.time - start_sec) / OUTPUT_TIME_BASE)
                if last_pts is not None and pts <= last_pts:  # a repeated timestamp: keep the first frame
                    continue
                picture = frame.reformat(width=video_out.width, height=video_out.height, format="yuv420p")
                picture.pts, picture.time_base = pts, OUTPUT_TIME_BASE
                writer.mux(video_out.encode(picture))
                last_pts = pts
            writer.mux(video_out.encode())
            _encode_audio(writer, audio_out, samples, rate)
    except av.error.FFmpegError as error:
        raise MediaError(f"{source}: cannot write {path.name}: {error}") from None
    return path
