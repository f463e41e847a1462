"""Loading official network checkpoints (plain state dicts) with clear errors.

Files are read with `torch.load(weights_only=True)` or safetensors only, never unpickled freely.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from shared.errors import UserError
from shared.models.network import VARIANTS, MMAudio, build_network

# Older official files also hold these non-persistent tables; they are rebuilt from lengths.
LEGACY_KEYS = ("t_embed.freqs", "latent_rot", "clip_rot")


class CheckpointError(UserError):
    """A weight file that cannot be used, with a message a user can act on."""


def read_checkpoint(path: str | os.PathLike):
    """The content of a `.pth`/`.pt` (weights_only: tensors and containers only) or `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix != ".safetensors" and not _torch_file_start(path):
        raise CheckpointError(f"{path}: not a checkpoint: neither a PyTorch weight file nor safetensors (it does not "
                              "start as either does)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"{path}: {_why_unreadable(error)}") from None
    return state


def _torch_file_start(path: Path) -> bool:
    """Whether a file starts as torch.save writes: a zip archive, or a pickle (the legacy format)."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    return start.startswith(b"PK\x03\x04") or start[:1] == b"\x80"


def _why_unreadable(error: Exception) -> str:
    """One line for a file torch or safetensors would not load. torch's own message for a pickle
    with code in it advises the unsafe load; we never repeat that advice, and we call a file
    'code' only when it names something to call."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        detail = re.search(r"(?:unsupported GLOBAL|Unsupported global:?) (?:GLOBAL )?([\w.]+)", text)
        if detail or "GLOBAL" in text:
            called = f" (it calls {detail.group(1)})" if detail else ""
            return (f"refused: a pickle that would run code or build arbitrary objects when loaded{called}; "
                    "only plain weight files are read")
        return "not a readable weight file: a pickle that holds no plain tensors (damaged, or not a checkpoint)"
    reason = text.splitlines()[0] if text else type(error).__name__
    return f"not a readable weight file (truncated or corrupt?): {reason}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weight file that holds a plain state dict."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a plain state dict of tensors, found {type(state).__name__}"
                              " with other entries")
    return state


def infer_variant(state_dict: dict[str, torch.Tensor]) -> str:
    """The official variant whose shapes these are (network.md's rule)."""
    try:
        latent_dim = state_dict["latent_mean"].shape[-1]
        hidden_dim = state_dict["clip_cond_proj.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"not an MMAudio network state dict (no {missing} key)") from None
    joint_blocks = {key.split(".")[1] for key in state_dict if key.startswith("joint_blocks.")}
    if latent_dim == 20:
        return "small_16k"
    if hidden_dim == 448:
        return "small_44k"
    if len(joint_blocks) == 4:
        return "medium_44k"
    return "large_44k_v2" if "clip_input_proj.2.w1.weight" in state_dict else "large_44k"


def describe_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], limit: int = 5) -> str:
    """The first missing, unexpected and differently shaped keys, for an error message."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {tuple(found[k].shape)} != {tuple(expected[k].shape)}"
                for k in expected if k in found and found[k].shape != expected[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)):
        if keys:
            more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
            parts.append(f"{label}: {', '.join(keys[:limit])}{more}")
    return "; ".join(parts)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                what: str, assign: bool = False) -> None:
    """Load a state dict strictly, or raise one line naming the file, the model and the first mismatches."""
    expected = module.state_dict()
    mismatch = describe_mismatch(expected, state)
    if mismatch:
        raise CheckpointError(f"{path}: does not fit {what}: {mismatch}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=assign)


def load_network(path: str | os.PathLike, variant: str | None = None,
                 device: torch.device | str = "cpu", **hyperparameters) -> MMAudio:
    """An official network file → MMAudio, strictly loaded, variant inferred when not given.

    Extra hyper-parameters (e.g. other sequence lengths) are passed to `build_network`.
    """
    state = {k: v for k, v in read_state_dict(path).items() if k not in LEGACY_KEYS}
    inferred = variant is None
    if inferred:
        try:
            variant = infer_variant(state)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
    elif variant not in VARIANTS:
        raise CheckpointError(f"{path}: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    with torch.device("meta"):
        network = build_network(variant, **hyperparameters)
    how = "inferred" if inferred else "given"
    load_strict(network, state, path, f"network variant {variant} ({how})", assign=True)
    network.rebuild_buffers()
    # Statistics and null text features are data, not trainable weights.
    for name in ("latent_mean", "latent_std", "empty_string_feat"):
        getattr(network, name).requires_grad_(False)
    return network.to(device)


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a plain state dict atomically: `.safetensors` (with `metadata` in its header) by
    suffix, else torch's format."""
    from shared.outputs import atomic_path

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as temporary:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(temporary), metadata=dict(metadata or {}, format="pt"))
        else:
            torch.save(tensors, temporary)
