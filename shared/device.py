"""Choosing the compute device and its precision, and telling the user what is usable."""
from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the no-op `features` check imports none
    import torch


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA when usable, else CPU; `cuda` fails clearly when CUDA is not usable."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not usable here (no GPU or no CUDA build)")
    return device


PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def mixed_precision(device: torch.device, precision: str = "auto"):
    """The one mixed-precision decision, for the transformers (network, CLIP, Synchformer): `auto`
    is bf16 autocast on CUDA and float32 on the CPU, `bf16` autocast anywhere (the CPU too, which is
    how the tests run the GPU's mixed-precision path), `fp32` never. The VAE, the mel converter and
    the vocoder always run in float32, outside this context."""
    import torch

    check_precision(precision)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def cuda_status() -> str:
    """One line on CUDA: usable or not, which GPU, whether bf16 works, after a real operation."""
    import torch

    if not torch.cuda.is_available():
        return "not usable (no GPU visible to torch); everything runs on the CPU, slowly for the real models"
    try:
        probe = torch.ones(8, device="cuda", dtype=torch.bfloat16).sum().item()
    except RuntimeError as error:
        return f"visible but failing: {error}"
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    bf16 = "bf16 ok" if probe == 8 and torch.cuda.is_bf16_supported() else "no bf16"
    return f"usable: {torch.cuda.device_count()} x {name} ({memory:.0f} GiB, {bf16})"
