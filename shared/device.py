"""Choosing the compute device and its precision, and telling the user what is usable."""
from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from shared.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: the no-op `features` check imports none
    import torch


def check_device(name: str) -> str:
    """auto, cpu, cuda or cuda:N; anything else is refused before torch is imported."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(name)):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → CUDA when usable, else CPU; `cuda` fails clearly when CUDA is not usable. On CUDA,
    float32 stays float32 (see `exact_float32`)."""
    import torch

    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but CUDA is not usable here (no GPU or no CUDA build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
        exact_float32()
    return device


def exact_float32() -> None:
    """No TF32 for float32 matrix products and convolutions. torch runs float32 convolutions on
    CUDA in TF32 by default (10-bit mantissa); what we keep in float32 is meant to be float32: the
    VAE encoder that makes the training targets, the VAE decoder, the vocoder, `--precision fp32`
    and the device check's reference. The transformers' speed comes from bf16 autocast instead."""
    import torch

    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):  # torch ≥ 2.9
        backends.cuda.matmul.fp32_precision = "ieee"
        backends.cudnn.conv.fp32_precision = "ieee"
    else:
        backends.cuda.matmul.allow_tf32 = False
        backends.cudnn.allow_tf32 = False


PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


@functools.cache
def native_bf16() -> bool:
    """Whether the GPU computes bf16 in hardware (Ampere and later), not by emulation."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """`auto` is bf16 on a CUDA device with native bf16, float32 elsewhere; `bf16` anywhere (the CPU
    too, which is how the tests run the GPU's mixed-precision path); `fp32` never."""
    check_precision(precision)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and native_bf16())


def mixed_precision(device: torch.device, precision: str = "auto"):
    """The one mixed-precision decision, for the transformers (network, CLIP, Synchformer): bf16
    autocast where `uses_bf16` says so. The VAE, the mel converter and the vocoder always run in
    float32, outside this context, and without TF32 (`exact_float32`)."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def full_precision(device: torch.device):
    """float32 for what must stay float32 (the VAE, the mel converter, the vocoder), even when called
    inside a bf16 region (the trainer's audio samples, a user's own autocast)."""
    import torch

    return torch.autocast(device.type, enabled=False)


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
    if probe == 8 and native_bf16():
        bf16 = "native bf16: --precision auto trains and generates in bf16"
    else:
        bf16 = "no native bf16: --precision auto runs float32"
    return f"usable: {torch.cuda.device_count()} x {name} ({memory:.0f} GiB, {bf16})"
