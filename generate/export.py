"""Merge a run's adapter into its base network and write the official checkpoint layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from generate.model import ModelSource, resolve_source
from shared.lora import AdapterError
from shared.outputs import OutputError


@dataclass
class ExportResult:
    pth: Path
    safetensors: Path
    variant: str
    tensors: int


def _official_dtypes(runtime) -> dict[str, torch.dtype]:
    from shared.checkpoint import read_state_dict
    from shared.weights import NETWORK_WEIGHTS, require

    path = runtime.network_file or require(NETWORK_WEIGHTS[runtime.variant], runtime.weights_dir)
    return {key: value.dtype for key, value in read_state_dict(path).items()}


def merged_state_dict(run: Path, source: ModelSource | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The base network's state dict with the run's LoRA merged in: the same keys, shapes, dtypes.
    `source`: the run's runtime and adapter, by default as the run recorded them."""
    source = source or resolve_source(run=run)
    network = source.load()
    runtime = source.runtime
    merged = network.state_dict()
    if any("lora" in key for key in merged):
        raise AdapterError(f"{run}: merging left LoRA tensors in the network; refusing to write a checkpoint")
    dtypes = {key: value.dtype for key, value in merged.items()}
    if runtime.profile == "real":  # keep the official file's own dtypes
        dtypes.update({k: v for k, v in _official_dtypes(runtime).items() if k in dtypes})
    return {key: value.detach().to(dtypes[key]).contiguous() for key, value in merged.items()}, runtime.variant


EXPORT_MARKER = {"writer": "mmaudio-lora export"}  # in the .safetensors header: a file we may replace


def _is_our_export(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # not a safetensors file at all
        return False
    return all(metadata.get(k) == v for k, v in EXPORT_MARKER.items())


def check_export_target(out: Path) -> tuple[Path, Path]:
    """(.pth, .safetensors) paths to write: new files, or an earlier export of ours (its
    .safetensors carries our marker); anything else is refused before the merge starts."""
    out = Path(out)
    companion = out.with_suffix(".safetensors")
    if out.suffix == ".safetensors":
        raise OutputError(f"{out}: give the .pth name; the .safetensors copy is written beside it")
    for path in (out, companion):
        if path.exists() and not path.is_file():
            raise OutputError(f"{path}: exists and is not a file; give a file name for the merged checkpoint")
    if (out.exists() or companion.exists()) and not _is_our_export(companion):
        raise OutputError(f"{out}: a file mmaudio-lora did not export is in the way; choose another name")
    if not out.parent.is_dir() and out.parent.exists():
        raise OutputError(f"{out.parent}: is not a folder")
    return out, companion


def export_checkpoint(run: Path, out: Path, source: ModelSource | None = None) -> ExportResult:
    """Write `out` (.pth, a plain state dict) and the same tensors as `.safetensors` beside it."""
    from shared.checkpoint import save_state_dict

    out, companion = check_export_target(out)
    state, variant = merged_state_dict(Path(run), source)
    save_state_dict(state, out)
    save_state_dict(state, companion, metadata=EXPORT_MARKER)
    return ExportResult(out, companion, variant, len(state))
