"""Merge a run's adapter into its base network and write the official checkpoint layout, in
float32, float16 or bfloat16: the same keys and shapes as the official file, so MMAudio's own
loader, ComfyUI-MMAudio and our `--checkpoint` read it strictly.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from generate.model import ModelSource, resolve_source
from shared.errors import UserError
from shared.lora import AdapterError
from shared.outputs import OutputError, atomic_path, atomic_write_text
from shared.runtime import mode_of

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The latent statistics normalize every latent the network sees: rounded to 16 bits they would
# shift all of them, so they stay float32 whatever the export's dtype (as the official files hold them).
KEPT_FLOAT32 = ("latent_mean", "latent_std")
EXPORT_WRITER = "mmaudio-lora export"  # in the .safetensors header: a pair of files we may replace


@dataclass
class ExportResult:
    pth: Path
    safetensors: Path
    variant: str
    tensors: int
    dtype: str


def _official_dtypes(runtime) -> dict[str, torch.dtype]:
    from shared.checkpoint import read_state_dict
    from shared.weights import NETWORK_WEIGHTS, require

    path = runtime.network_file or require(NETWORK_WEIGHTS[runtime.variant], runtime.weights_dir)
    return {key: value.dtype for key, value in read_state_dict(path).items()}


def merged_state_dict(run: Path, source: ModelSource | None = None,
                      dtype: str = "fp32") -> tuple[dict[str, torch.Tensor], str]:
    """The base network's state dict with the run's LoRA merged in: the same keys and shapes. fp32
    keeps the official file's own dtypes; fp16 / bf16 cast every floating tensor but the latent
    statistics. `source`: the run's runtime and adapter, by default as the run recorded them."""
    check_dtype(dtype)
    source = source or resolve_source(run=run)
    network = source.load()
    runtime = source.runtime
    merged = network.state_dict()
    if any("lora" in key for key in merged):
        raise AdapterError(f"{run}: merging left LoRA tensors in the network; refusing to write a checkpoint")
    dtypes = {key: value.dtype for key, value in merged.items()}
    if dtype == "fp32" and runtime.profile == "real":  # keep the official file's own dtypes
        dtypes.update({k: v for k, v in _official_dtypes(runtime).items() if k in dtypes})
    elif dtype != "fp32":
        dtypes.update({k: EXPORT_DTYPES[dtype] for k, v in merged.items()
                       if v.is_floating_point() and k not in KEPT_FLOAT32})
    return {key: value.detach().to(dtypes[key]).contiguous() for key, value in merged.items()}, runtime.variant


def check_dtype(dtype: str) -> str:
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    return dtype


def name_warning(out: Path, variant: str) -> str | None:
    """Tools that pick the sample rate from the file name (ComfyUI-MMAudio) need it in the name."""
    rate = mode_of(variant).removesuffix("k")
    if rate not in Path(out).name:
        return (f"{Path(out).name} does not say {rate} (kHz): tools that take the sample rate from the file name "
                f"(ComfyUI-MMAudio) will misread it; a name like merged_{variant}.pth keeps it")
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _export_metadata(path: Path) -> dict[str, str] | None:
    """The header of a .safetensors file we exported, or None for any other file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # not a safetensors file at all
        return None
    return metadata if metadata.get("writer") == EXPORT_WRITER else None


def check_export_target(out: Path) -> tuple[Path, Path]:
    """(.pth, .safetensors) paths to write: new files, or an earlier export of ours, each file
    checked: the .safetensors by its header, the .pth by the digest that header recorded of it.
    Anything else is refused before the merge starts."""
    out = Path(out)
    companion = out.with_suffix(".safetensors")
    if out.suffix == ".safetensors":
        raise OutputError(f"{out}: give the .pth name; the .safetensors copy is written beside it")
    for path in (out, companion):
        if path.exists() and not path.is_file():
            raise OutputError(f"{path}: exists and is not a file; give a file name for the merged checkpoint")
    metadata = _export_metadata(companion) if companion.exists() else {}
    if metadata is None:
        raise OutputError(f"{companion}: a file mmaudio-lora did not export is in the way; choose another name")
    if out.exists() and _sha256(out) not in (metadata.get("pth_sha256"), _pending(out).get("pth_sha256")):
        raise OutputError(f"{out}: a file mmaudio-lora did not export is in the way (it is not the .pth exported "
                          f"with {companion.name}); choose another name")
    if out.parent.exists() and not out.parent.is_dir():
        raise OutputError(f"{out.parent}: is not a folder")
    if pending_note(out).exists() and not _pending(out):
        raise OutputError(f"{pending_note(out)}: export keeps a note there while it writes, and this file is not one "
                          "of its notes; move it, or choose another name")
    return out, companion


def export_checkpoint(run: Path, out: Path, source: ModelSource | None = None, dtype: str = "fp32") -> ExportResult:
    """Write `out` (.pth, a plain state dict) and the same tensors as `.safetensors` beside it,
    whose header records the writer, the dtype and the .pth's digest."""
    from shared.checkpoint import save_state_dict

    check_dtype(dtype)
    out, companion = check_export_target(out)
    state, variant = merged_state_dict(Path(run), source, dtype)
    # The .pth is recognised as ours by the digest the .safetensors header records of it. Until that
    # header is written, a note beside the pair records the new .pth's digest first, so an export
    # killed between the two files finds its own .pth again.
    pending = pending_note(out)
    with atomic_path(out) as temporary:
        torch.save({k: v.detach().contiguous().cpu() for k, v in state.items()}, temporary)
        digest = _sha256(temporary)
        atomic_write_text(pending, json.dumps({"writer": EXPORT_WRITER, "pth_sha256": digest}) + "\n")
    save_state_dict(state, companion, metadata={"writer": EXPORT_WRITER, "variant": variant, "dtype": dtype,
                                                "pth_sha256": digest})
    pending.unlink()
    return ExportResult(out, companion, variant, len(state), dtype)


def pending_note(out: Path) -> Path:
    return out.with_name(f".{out.name}.export.json")


def _pending(out: Path) -> dict:
    """The note of an export that stopped between its two files, or {} (a file that is not ours: {})."""
    try:
        note = json.loads(pending_note(out).read_text())
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) and note.get("writer") == EXPORT_WRITER else {}
