"""Decoding clips in DataLoader workers, so the encoders never wait on one clip's decoding.

A worker marks the clip it is decoding (`<markers>/<pid>`, one marker folder per torchrun rank),
so that when a file crashes the decoder itself (a segmentation fault in a media library) the clips
that were being decoded are known and can be tried again one by one, and the culprit skipped.

Decoded clips travel to the main process through shared memory (/dev/shm), which containers
often keep small: the workers and their prefetching are bounded by what is free there.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, get_worker_info

from shared.clip_list import ClipEntry
from shared.media import CLIP_SIZE, SYNC_SIZE, MediaError, Segment, load_segment
from shared.models.sequence import SequenceConfig

log = logging.getLogger(__name__)


class SegmentDataset(Dataset):
    """Item i: (i, Segment, None) when clip i decodes, else (i, None, the reason it was skipped)."""

    def __init__(self, clips: list[ClipEntry], window_sec: float, mode: str, markers: Path | None = None):
        self.clips = clips
        self.window_sec = window_sec
        self.mode = mode
        self.markers = markers

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[int, Segment | None, str | None]:
        marker = None
        if self.markers is not None and get_worker_info() is not None:
            marker = self.markers / str(os.getpid())
            marker.write_text(str(index))
        try:
            return self._decode(index)
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)

    def _decode(self, index: int) -> tuple[int, Segment | None, str | None]:
        clip = self.clips[index]
        try:
            return index, load_segment(clip.video, clip.start_sec, clip.end_sec,
                                       window_sec=self.window_sec, mode=self.mode), None
        except MediaError as error:
            return index, None, str(error)
        except Exception as error:  # a broken file must not stop the other clips
            log.debug("unexpected error decoding %s", clip.video, exc_info=True)
            return index, None, f"cannot decode ({type(error).__name__}: {error})"


def collate_segments(batch: list) -> list:
    return batch


def clips_in_flight(markers: Path) -> list[int]:
    """Indices of the clips that workers were decoding when they stopped (their markers remain)."""
    found = []
    for marker in markers.glob("*"):
        try:
            found.append(int(marker.read_text()))
        except (OSError, ValueError):
            pass
        marker.unlink(missing_ok=True)
    return sorted(set(found))


SHARED_MEMORY = Path("/dev/shm")
PREFETCH = 2  # batches each worker decodes ahead


@dataclass(frozen=True)
class DecodingPlan:
    workers: int
    prefetch: int | None  # None with no workers (decoding in the main process)
    free_bytes: int | None  # shared memory free when planned (None: unknown)


def clip_bytes(mode: str, window_sec: float) -> int:
    """What one decoded clip weighs in transit: uint8 frames for both encoders and float32 audio."""
    seq = SequenceConfig(mode, window_sec)
    return 3 * (seq.clip_seq_len * CLIP_SIZE ** 2 + seq.sync_frames * SYNC_SIZE ** 2) + 4 * seq.num_audio_samples


def free_shared_memory() -> int | None:
    """What decoded clips in transit can take: the free space of /dev/shm, and no more than the
    memory available (a tmpfs lives in it); None where neither can be read."""
    figures = []
    try:
        stat = os.statvfs(SHARED_MEMORY)
        figures.append(stat.f_bavail * stat.f_frsize)
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return min(figures) if figures else None


def plan_decoding(workers: int, batch_size: int, mode: str, window_sec: float,
                  free_bytes: int | None = None) -> DecodingPlan:
    """At most `workers` workers, fewer (and less prefetching) when their batches in flight
    (workers x prefetch x batch x clip) would take more than half the free shared memory."""
    free_bytes = free_shared_memory() if free_bytes is None else free_bytes
    if workers == 0:
        return DecodingPlan(0, None, free_bytes)
    if free_bytes is None:
        return DecodingPlan(workers, PREFETCH, None)
    per_batch = batch_size * clip_bytes(mode, window_sec)
    budget = free_bytes // 2
    for prefetch in (PREFETCH, 1):
        fitting = min(workers, budget // (prefetch * per_batch))
        if fitting >= 1:
            break
    else:  # not one batch fits: a worker would fail to hand it over (and wait forever); decode here instead
        log.warning("decoding in the main process: a batch of %d clips takes %.0f MB in transit between processes, "
                    "and only %.0f MB of shared memory (%s) is free; give the container more (docker run "
                    "--shm-size=8g) to decode in parallel", batch_size, per_batch / 1e6, free_bytes / 1e6,
                    SHARED_MEMORY)
        return DecodingPlan(0, None, free_bytes)
    planned = DecodingPlan(fitting, prefetch, free_bytes)
    if (planned.workers, planned.prefetch) != (workers, PREFETCH):
        log.warning("decoding with %d worker(s), %d batch(es) ahead each: %.0f MB of shared memory (%s) is free and "
                    "a batch of %d clips takes %.0f MB", planned.workers, planned.prefetch, free_bytes / 1e6,
                    SHARED_MEMORY, batch_size, per_batch / 1e6)
    return planned


def out_of_shared_memory(error: Exception) -> bool:
    """Whether a DataLoader worker died of a full /dev/shm (torch says so; the signal is a bus error)."""
    text = str(error)
    return "shared memory" in text or "Bus error" in text or "No space left on device" in text
