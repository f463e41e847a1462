"""Synthetic audio-visual clips, written as real mp4 files: for the tests and the offline demo.

Each clip shows a square that flashes when a tone sounds, so picture and sound share events.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    duration_sec: float
    fps: float = 25.0
    width: int = 96
    height: int = 64
    sample_rate: int = 44100
    channels: int = 2
    audio: bool = True  # False: no audio track at all
    silent: bool = False  # an audio track of zeros
    tone_hz: float = 440.0
    events_per_sec: float = 1.5
    seed: int = 0


def _event_times(spec: ClipSpec) -> np.ndarray:
    rng = np.random.default_rng(spec.seed)
    count = max(1, int(spec.duration_sec * spec.events_per_sec))
    return np.sort(rng.uniform(0, max(spec.duration_sec - 0.3, 0.01), count))


def _active(times: np.ndarray, t: np.ndarray, length: float = 0.25) -> np.ndarray:
    """Whether each time in `t` falls within `length` after an event (`times` sorted): the latest
    event at or before it decides, since every earlier one ends sooner."""
    latest = np.searchsorted(times, t, side="right") - 1
    return (latest >= 0) & (t < times[np.maximum(latest, 0)] + length)


def write_clip(path: str | Path, spec: ClipSpec) -> Path:
    """Write an H.264/AAC mp4 following `spec`."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    events = _event_times(spec)
    rate = Fraction(spec.fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = spec.width, spec.height, "yuv420p"
        video.options = {"preset": "ultrafast"}
        audio = None
        if spec.audio:
            audio = container.add_stream("aac", rate=spec.sample_rate)
            audio.layout = "stereo" if spec.channels == 2 else "mono"

        frame_count = int(round(spec.duration_sec * spec.fps))
        frame_times = np.arange(frame_count) / spec.fps
        lit = _active(events, frame_times)
        for index in range(frame_count):
            image = np.full((spec.height, spec.width, 3), 30, dtype=np.uint8)
            image[:, :, 2] = int(255 * index / max(frame_count - 1, 1))  # a slow colour drift
            if lit[index]:
                h, w = spec.height // 4, spec.width // 4
                image[h:3 * h, w:3 * w] = (250, 240, 60)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)

        if audio is not None:
            samples = int(spec.duration_sec * spec.sample_rate)
            t = np.arange(samples) / spec.sample_rate
            wave = 0.6 * np.sin(2 * math.pi * spec.tone_hz * t) * _active(events, t)
            wave += 0.01 * np.random.default_rng(spec.seed + 1).standard_normal(samples)
            if spec.silent:
                wave[:] = 0.0
            planar = np.repeat(wave[None].astype(np.float32), spec.channels, axis=0)
            block = 1024
            for start in range(0, samples, block):
                chunk = np.ascontiguousarray(planar[:, start:start + block])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=audio.layout.name)
                frame.sample_rate = spec.sample_rate
                frame.pts = start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path
