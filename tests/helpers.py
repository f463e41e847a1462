"""Small helpers the tests share."""
from __future__ import annotations

import torch


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|, the tolerance measure of the reference README."""
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
