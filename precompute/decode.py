"""Decoding clips in DataLoader workers, so the encoders never wait on one clip's decoding.

A worker marks the clip it is decoding (`<markers>/<pid>`), so that when a file crashes the
decoder itself (a segmentation fault in a media library) the clips that were being decoded are
known and can be tried again one by one, and the culprit skipped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from torch.utils.data import Dataset, get_worker_info

from shared.clip_list import ClipEntry
from shared.media import MediaError, Segment, load_segment

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
