"""Decoding clips in DataLoader workers, so the encoders never wait on one clip's decoding."""
from __future__ import annotations

import logging

from torch.utils.data import Dataset

from shared.clips import Clip
from shared.media import MediaError, Segment, load_segment

log = logging.getLogger(__name__)


class SegmentDataset(Dataset):
    """Item i: (i, Segment, None) when clip i decodes, else (i, None, the reason it was skipped)."""

    def __init__(self, clips: list[Clip], window_sec: float, mode: str):
        self.clips = clips
        self.window_sec = window_sec
        self.mode = mode

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[int, Segment | None, str | None]:
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
