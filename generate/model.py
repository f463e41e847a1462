"""Which network to generate with: a base checkpoint, plus a run's or a folder's LoRA adapter."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError
from shared.lora import AdapterError, adapter_info, base_network, merge_adapter
from shared.network import MMAudio

RUN_CONFIG = "config.json"


@dataclass(frozen=True)
class ModelSource:
    profile: str = "real"
    checkpoint: str | None = None  # base network file; real profile (default: the variant's official file)
    variant: str | None = None
    adapter: Path | None = None  # None: the base model
    weights_dir: str | None = None


def run_settings(run: str | Path) -> dict:
    """The resolved configuration a training run saved."""
    path = Path(run) / RUN_CONFIG
    if not path.is_file():
        raise AdapterError(f"{run}: not a training run folder (no {RUN_CONFIG})")
    return json.loads(path.read_text())


def _enclosing_run(adapter: Path) -> dict:
    """The settings of the run an adapter folder sits in (adapter/, best/adapter/, checkpoints/step-N/adapter/)."""
    for folder in list(adapter.resolve().parents)[:3]:
        if (folder / RUN_CONFIG).is_file():
            return run_settings(folder)
    return {}


def resolve_source(run: Path | None = None, adapter: Path | None = None, profile: str | None = None,
                   checkpoint: str | None = None, variant: str | None = None,
                   weights_dir: str | None = None) -> ModelSource:
    """Explicit options win; then the run's settings; then what the adapter recorded."""
    if run is not None and adapter is not None:
        raise UserError("give --run or --adapter, not both")
    if run is not None:
        settings, adapter = run_settings(run), Path(run) / "adapter"
        if not adapter.is_dir():
            raise AdapterError(f"{run}: the run has no final adapter yet (no {adapter}); pass --adapter "
                               f"{run}/checkpoints/step-N/adapter or {run}/best/adapter")
    elif adapter is not None:
        adapter = Path(adapter)
        settings = _enclosing_run(adapter) if adapter.is_dir() else {}
    else:
        settings = {}
    recorded = adapter_info(adapter) if adapter is not None and adapter.is_dir() else {}
    return ModelSource(
        profile=profile or settings.get("profile") or recorded.get("profile") or "real",
        checkpoint=checkpoint or settings.get("checkpoint"),
        variant=variant or settings.get("variant") or recorded.get("variant"),
        adapter=adapter,
        weights_dir=weights_dir or settings.get("weights_dir"),
    )


def load_model(source: ModelSource, lora_scale: float = 1.0) -> tuple[MMAudio, str]:
    """The network with the adapter merged in (on the CPU, eval mode) and its variant."""
    network, variant = base_network(source.profile, source.checkpoint, source.variant,
                                    weights_dir=source.weights_dir)
    if source.adapter is not None:
        network = merge_adapter(network, source.adapter, lora_scale,
                                expected={"variant": variant, "profile": source.profile})
    return network.eval(), variant
