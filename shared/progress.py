"""Progress on long loops: a tqdm bar on a terminal; in a log (a pipe, a file, CI, nohup) a plain
line every few percent or seconds instead of a carriage-return frame per update."""
from __future__ import annotations

import sys

LOG_EVERY_SECONDS = 5.0
LOG_EVERY_FRACTION = 0.1


class _Lines:
    """A stream for tqdm that turns its carriage-return frames into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
             **options):
    """A tqdm bar over `iterable` (or for `total` steps) of `unit`; written as lines when stderr is not
    a terminal."""
    from tqdm import tqdm

    stream = sys.stderr
    if disable or stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, **options)
    count = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else 0)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=LOG_EVERY_SECONDS,
                miniters=max(1, int(count * LOG_EVERY_FRACTION)), ascii=True, ncols=100, **options)
