"""Which network to generate with: a runtime's base network, plus a run's or a folder's LoRA adapter."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import UserError
from shared.lora import AdapterError, adapter_info, merge_adapter
from shared.models.network import MMAudio
from shared.run_record import CONFIG_FILE, read_run_config
from shared.runtime import Runtime


@dataclass
class ModelSource:
    runtime: Runtime = field(default_factory=Runtime)  # the base network (variant, file) and the rest
    adapter: Path | None = None  # None: the base model

    def load(self, lora_scale: float = 1.0) -> MMAudio:
        """The base network with the adapter merged in at `lora_scale` (on the CPU, eval mode)."""
        network = self.runtime.network()
        if self.adapter is not None:
            network = merge_adapter(network, self.adapter, lora_scale,
                                    expected={"variant": self.runtime.variant, "profile": self.runtime.profile})
        return network.eval()


def _enclosing_run(adapter: Path) -> dict:
    """The settings of the run an adapter folder sits in (adapter/, best/adapter/, checkpoints/step-N/adapter/)."""
    for folder in list(adapter.resolve().parents)[:3]:
        if (folder / CONFIG_FILE).is_file():
            return read_run_config(folder)
    return {}


def resolve_source(run: Path | None = None, adapter: Path | None = None, profile: str | None = None,
                   checkpoint: str | None = None, variant: str | None = None, weights_dir: str | None = None,
                   device: str = "auto", precision: str = "auto") -> ModelSource:
    """Explicit options win; then the run's settings; then what the adapter recorded."""
    if run is not None and adapter is not None:
        raise UserError("give --run or --adapter, not both")
    if run is not None:
        settings, adapter = read_run_config(run), Path(run) / "adapter"
        if not adapter.is_dir():
            raise AdapterError(f"{run}: the run has no final adapter yet (no {adapter}); pass --adapter "
                               f"{run}/checkpoints/step-N/adapter or {run}/best/adapter")
    elif adapter is not None:
        adapter = Path(adapter)
        settings = _enclosing_run(adapter) if adapter.is_dir() else {}
    else:
        settings = {}
    recorded = adapter_info(adapter) if adapter is not None and adapter.is_dir() else {}
    runtime = Runtime(variant=variant or settings.get("variant") or recorded.get("variant"),
                      profile=profile or settings.get("profile") or recorded.get("profile") or "real",
                      network_file=checkpoint or settings.get("checkpoint"),
                      weights_dir=weights_dir or settings.get("weights_dir"), device=device, precision=precision)
    return ModelSource(runtime, adapter)
