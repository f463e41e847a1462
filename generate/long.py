"""Audio past the network's window: windows that continue each other.

A track of D seconds (a video's picture, or `--duration` of text) longer than the window is sampled
as overlapping windows of the window's length (the last one shorter), each conditioned on the CLIP
and Synchformer features of its own time range of the picture (decoded and encoded as `features`
does a segment of that range) and on the caption. From the second window on, the overlap's latent
frames are held to the previous window's final latents (shared/models/flow.py: `integrate`): at
every step the predicted endpoint's overlap is replaced by them, and the overlap starts from the
noise that made those frames in the previous window. At t = 1 the overlap equals the previous
window's latents exactly, so the windows join in latent space. Why this way, and what it costs:
bench/long.py and docs/generate.md.

The joined latents go through the VAE decoder whole (it attends over its whole input, so decoding
in pieces would change every frame a little; past about two minutes it runs in chunks with context,
crossfaded) and through the vocoder, which is convolutional, a window of mel frames at a time with
context on both sides, crossfaded over a few frames where two chunks meet: no step at a join. The
picture is decoded per window: memory stays within a window's whatever the length.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import UserError
from shared.models.network import MMAudio
from shared.models.sequence import MIN_CLIP_SEC, SequenceConfig
from shared.progress import progress as progress_bar
from shared.runtime import Runtime
from shared.synthesis import AudioDecoder, SamplingSettings, crop_video_features, sample_normalized, use_duration

log = logging.getLogger(__name__)

LONG_MODES = ("windows", "off")
DEFAULT_OVERLAP_SEC = 2.0  # rounded to whole latent frames (bench/long.py measured this overlap)
DEFAULT_MAX_DURATION_SEC = 600.0
DECODE_CONTEXT_FRAMES = 32  # latent frames decoded on each side of a chunk
DECODE_FADE_FRAMES = 16  # latent frames over which two chunks' audio is crossfaded
# Longer tracks decode their log-mel in chunks too (bounded memory), above ~2 minutes at 44k.
WHOLE_MEL_FRAMES = 5400


@dataclass(frozen=True)
class LongSettings:
    mode: str = "windows"  # windows: the whole length; off: trimmed to the window, as before
    overlap_sec: float | None = None  # default: DEFAULT_OVERLAP_SEC in whole latent frames
    max_duration: float = DEFAULT_MAX_DURATION_SEC

    def check(self, seq: SequenceConfig) -> None:
        """Every value checked before anything is made (the overlap against the mode's frame period)."""
        if self.mode not in LONG_MODES:
            raise UserError(f"--long must be windows or off, not {self.mode!r}")
        if not (math.isfinite(self.max_duration) and self.max_duration >= seq.window_sec):
            raise UserError(f"--max-duration must be at least the {seq.window_sec:g} s window, not {self.max_duration}")
        overlap_frames(self.overlap_sec, seq)


def frame_period(seq: SequenceConfig) -> float:
    """Seconds of audio per latent frame (2 mel frames)."""
    return 2 * seq.hop_length / seq.sampling_rate


def overlap_frames(overlap_sec: float | None, seq: SequenceConfig) -> int:
    """--overlap in latent frames: a whole number of them, from one Synchformer window (0.64 s) to
    half the window; refused with the nearest valid values."""
    period = frame_period(seq)
    if overlap_sec is None:
        return round(DEFAULT_OVERLAP_SEC / period)
    low, high = math.ceil(MIN_CLIP_SEC / period), seq.latent_seq_len // 2
    frames = overlap_sec / period
    if not (math.isfinite(frames) and abs(frames - round(frames)) < 1e-6 and low <= round(frames) <= high):
        nearest = sorted({min(max(n, low), high) for n in (math.floor(frames), math.ceil(frames))}
                         if math.isfinite(frames) else {low, high})
        raise UserError(f"--overlap must be a whole number of latent frames ({period * 1000:.4g} ms at "
                        f"{seq.sampling_rate} Hz) from {low * period:.4g} s to {high * period:.4g} s, not "
                        f"{overlap_sec}: nearest {' or '.join(f'{n * period:.6g}' for n in nearest)}")
    return round(frames)


@dataclass(frozen=True)
class Window:
    start: int  # its first latent frame in the track
    frames: int  # its latent frames
    held: int  # leading frames held to the previous window's (0 for the first)
    seconds: float  # the picture it covers, from its start

    def start_sec(self, seq: SequenceConfig) -> float:
        return self.start * frame_period(seq)


def plan_windows(duration: float, seq: SequenceConfig, overlap: int) -> list[Window]:
    """Windows of the network's length every `latent_seq_len - overlap` frames, the last one
    shorter, covering `duration` seconds (a duration within one window: one window, as before)."""
    if duration <= seq.window_sec:
        return [Window(0, seq.latent_frames(duration), 0, duration)]
    period, stride = frame_period(seq), seq.latent_seq_len - overlap
    windows = [Window(0, seq.latent_seq_len, 0, seq.window_sec)]
    while windows[-1].start + windows[-1].frames < seq.latent_frames(duration):
        start = windows[-1].start + stride
        seconds = min(seq.window_sec, duration - start * period)
        windows.append(Window(start, seq.latent_frames(seconds), windows[-1].start + windows[-1].frames - start,
                              seconds))
    return windows


@dataclass(frozen=True)
class Picture:
    """The video a track is made for: its file and where the track starts in it."""

    video: Path
    start_sec: float


@dataclass
class LongTrack:
    audio: torch.Tensor  # (samples,) at the mode's rate, exactly round(duration * rate) long
    windows: list[Window]
    overlap_max_abs: float  # the largest difference between a window's held frames and the previous window's


def window_conditions(runtime: Runtime, network: MMAudio, window: Window, seq: SequenceConfig,
                      picture: Picture | None, encoders) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and Synchformer features of the window's time range of the picture (decoded there and
    encoded as a segment of that range), or the network's 'no video' features."""
    if picture is None:
        return (network.get_empty_clip_sequence(1).detach().cpu(), network.get_empty_sync_sequence(1).detach().cpu())
    from shared.media import load_video

    start = picture.start_sec + window.start_sec(seq)
    frames = load_video(picture.video, start, start + window.seconds, window_sec=runtime.sequence().window_sec)
    clip_features, sync_features = encoders.video(frames.clip_frames, frames.sync_frames)
    return crop_video_features(clip_features[None], sync_features[None], seq)


@torch.no_grad()
def voice_windows(runtime: Runtime, network: MMAudio, decoder: AudioDecoder, picture: Picture | None,
                  text_features: torch.Tensor, duration: float, sampling: SamplingSettings, settings: LongSettings,
                  encoders=None, negative: torch.Tensor | None = None, show_progress: bool = False,
                  name: str = "") -> LongTrack:
    """The whole track of `duration` seconds, window after window, each continuing the one before."""
    window_seq = runtime.sequence()
    windows = plan_windows(duration, window_seq, overlap_frames(settings.overlap_sec, window_seq))
    total = windows[-1].start + windows[-1].frames
    track = torch.zeros(1, total, network.config.latent_dim)
    generator = torch.Generator().manual_seed(sampling.seed)  # the first window's noise is a single window's
    previous_noise, differences = None, [0.0]
    lengths = (network.latent_seq_len, network.clip_seq_len, network.sync_seq_len)
    try:
        for window in progress_bar(windows, desc=f"{name or 'track'}: windows", unit="window",
                                   disable=not show_progress):
            seq = runtime.sequence(window.seconds)
            if seq.latent_seq_len != window.frames:
                raise RuntimeError(f"window of {window.seconds} s: {seq.latent_seq_len} latent frames, "
                                   f"{window.frames} planned")
            use_duration(network, seq)
            clip_features, sync_features = window_conditions(runtime, network, window, seq, picture, encoders)
            noise = torch.randn((1, window.frames, network.config.latent_dim), generator=generator)
            known = None
            if window.held:
                noise[:, :window.held] = previous_noise[:, -window.held:]  # the overlap from the noise that made it
                known = track[:, window.start:window.start + window.held]
            latents = sample_normalized(runtime, network, clip_features, sync_features, text_features, sampling,
                                        noise, negative, known).float().cpu()
            if window.held:
                differences.append(float((latents[:, :window.held] - known).abs().max()))
            track[:, window.start:window.start + window.frames] = latents
            previous_noise = noise
    finally:
        network.update_seq_lengths(*lengths)
    audio = decode_track(decoder, network.unnormalize(track.to(next(network.parameters()).device)),
                         window_seq.latent_seq_len)
    return LongTrack(audio[0, :round(duration * window_seq.sampling_rate)], windows, max(differences))


@torch.no_grad()
def decode_track(decoder: AudioDecoder, latents: torch.Tensor, window_frames: int) -> torch.Tensor:
    """(1, N, latent_dim) unnormalized latents → audio (1, N * 2 * hop). The VAE decoder attends
    over its whole input, so the log-mel is decoded whole up to WHOLE_MEL_FRAMES latent frames (then
    in chunks); the vocoder is convolutional and runs a window of mel frames at a time."""
    total = latents.shape[1]
    if total <= WHOLE_MEL_FRAMES:
        mel = decoder.mel(latents)
    else:
        mel = in_chunks(lambda first, last: decoder.mel(latents[:, first:last]), total, window_frames, 2)
    hop = decoder.runtime.sequence().hop_length
    return in_chunks(lambda first, last: decoder.vocode(mel[..., first:last]), mel.shape[-1], 2 * window_frames, hop,
                     context=2 * DECODE_CONTEXT_FRAMES, fade=2 * DECODE_FADE_FRAMES)


def in_chunks(decode, total: int, chunk: int, per_frame: int, context: int = DECODE_CONTEXT_FRAMES,
              fade: int = DECODE_FADE_FRAMES) -> torch.Tensor:
    """`decode(first, last)` (the output of input frames [first, last), `per_frame` outputs each, on
    the last axis) over `total` frames, `chunk` at a time with `context` frames on each side; where
    two chunks meet their outputs are crossfaded linearly over `fade` frames centred on the
    boundary, so no step is left. One chunk: a plain decode."""
    if total <= chunk:
        return decode(0, total).cpu()
    starts = list(range(0, total - fade, chunk))  # a tail shorter than a fade joins the chunk before it
    out = None
    for start, end in zip(starts, [*starts[1:], total]):
        first, last = max(0, start - context), min(total, end + context)
        piece = decode(first, last).cpu()
        if out is None:
            out = torch.zeros(*piece.shape[:-1], total * per_frame)
        # what this chunk gives: its own frames and half a fade into each neighbour
        low = (start - fade // 2 if start else 0) * per_frame
        high = (end + fade // 2 if end < total else total) * per_frame
        weight = torch.ones(high - low)
        if start and fade:
            weight[:fade * per_frame] = torch.linspace(0, 1, fade * per_frame)
        if end < total and fade:
            weight[-fade * per_frame:] = torch.linspace(1, 0, fade * per_frame)
        out[..., low:high] += piece[..., low - first * per_frame:high - first * per_frame] * weight
    return out
