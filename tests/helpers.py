"""Small helpers the tests share."""
from __future__ import annotations

import torch


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, the tolerance measure of the reference README."""
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


TINY = ["--profile", "tiny", "--variant", "small_16k", "--device", "cpu"]  # generate with the tiny models


def audio_samples(path) -> int:
    """Samples of a file's first audio stream, decoded."""
    import av

    with av.open(str(path)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))
