"""What the evaluation's numbers say: per metric, the mean of the per-clip differences (tuned -
base, each clip averaged over the seeds) with a 95 % bootstrap interval over the clips, and a
verdict that calls a metric better or worse only when its interval excludes zero. Every metric is
lower-is-better. The result, as a table, a verdict and strict JSON (a value that is not finite is
null, never a bare NaN).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from generate.report import change, number as _number

MODELS = ("base", "tuned")
METRICS = {"flow_loss": "validation flow loss", "mel_l1": "log-mel L1 to the real audio", "desync": "DeSync (s)"}
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def bootstrap_interval(differences: list[float]) -> tuple[float, float] | None:
    """95 % percentile-bootstrap interval of the mean over clips (fixed resampling seed); None
    below two clips, where an interval says nothing."""
    values = np.asarray(differences, dtype=np.float64)
    if len(values) < 2:
        return None
    draws = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))
    low, high = np.percentile(values[draws].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def assessment(interval: tuple[float, float] | None) -> str:
    """Lower is better for every metric: 'better' only when the whole interval is below zero."""
    if interval is None:
        return "n/a"
    low, high = interval
    return "better" if high < 0 else "worse" if low > 0 else "no clear difference"


@dataclass
class Evaluation:
    variant: str
    held_out: str  # where the clips came from
    clips: list[str]
    sampling: dict
    seeds: int = 1
    sources: int = 0  # source videos the clips come from
    val_flow_loss: dict[str, float] = field(default_factory=dict)  # base, tuned
    mel_l1: dict[str, float] = field(default_factory=dict)
    desync: dict[str, float] = field(default_factory=dict)  # base, tuned, real (the floor)
    per_clip_mel_l1: dict[str, dict[str, float]] = field(default_factory=dict)
    per_clip: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric → clip → model → value
    delta: dict[str, float] = field(default_factory=dict)  # metric → mean over clips of (tuned - base)
    ci95: dict[str, list[float] | None] = field(default_factory=dict)  # metric → its 95 % interval
    lora_scale: float | None = 1.0  # the strength "tuned" was evaluated at (the best one; None: all failed)
    scales: dict[str, dict] = field(default_factory=dict)  # several strengths: each one's metrics, or failed
    checkpoints: dict[str, float] = field(default_factory=dict)  # adapter folder → validation flow loss
    seconds: float = 0.0

    def summary(self, metric: str) -> dict[str, float]:
        return {"flow_loss": self.val_flow_loss, "mel_l1": self.mel_l1, "desync": self.desync}[metric]

    @property
    def failed(self) -> bool:
        return self.lora_scale is None

    def assessment(self, metric: str) -> str:
        interval = self.ci95.get(metric)
        return assessment(tuple(interval) if interval else None)

    def basis(self) -> str:
        """What the verdict rests on."""
        return (f"{len(self.clips)} held-out clip{'s' if len(self.clips) != 1 else ''} from {self.sources} source "
                f"video{'s' if self.sources != 1 else ''}, {self.seeds} seed{'s' if self.seeds != 1 else ''} each; "
                "better or worse only where the 95 % interval of the per-clip differences excludes zero")

    def verdict(self) -> str:
        if self.failed:
            return ("The fine-tune failed: its output is not finite at any strength tried (a diverged adapter or an "
                    "extreme --lora-scale).")
        found = {METRICS[metric]: self.assessment(metric) for metric in METRICS}
        better = [name for name, verdict in found.items() if verdict == "better"]
        worse = [name for name, verdict in found.items() if verdict == "worse"]
        unclear = [name for name, verdict in found.items() if verdict == "no clear difference"]
        rest = f"; no clear difference in {', '.join(unclear)}" if unclear else ""
        if better and worse:
            return f"Mixed: the fine-tune is better in {', '.join(better)} and worse in {', '.join(worse)}{rest}."
        if better or worse:
            return f"The fine-tune is {'better' if better else 'worse'} in {', '.join(better or worse)}{rest}."
        return "No clear difference between the fine-tune and the base model on these clips."

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """Per metric: (name, base, tuned, change, tuned - base with its interval, assessment), as
        the table and the report show them."""
        rows = []
        for metric, name in METRICS.items():
            values, interval, delta = self.summary(metric), self.ci95.get(metric), self.delta.get(metric)
            spread = f"{_number(delta)} [{_number(interval[0])}, {_number(interval[1])}]" if interval else _number(delta)
            label = f"{name}, real audio {_number(values.get('real'))}" if metric == "desync" else name
            rows.append((label, _number(values.get("base")), _number(values.get("tuned")),
                         change(values.get("base"), values.get("tuned")), spread, self.assessment(metric)))
        return rows

    def table(self) -> str:
        lines = [f"{'metric (lower is better)':<38}{'base':>9}{'tuned':>9}{'change':>9}  "
                 f"{'tuned - base [95 % interval]':<32}assessment"]
        lines += [f"{label:<38}{base:>9}{tuned:>9}{changed:>9}  {spread:<32}{verdict}"
                  for label, base, tuned, changed, spread, verdict in self.rows()]
        if self.scales:
            chosen = "none: every strength failed" if self.failed else f"{self.lora_scale:g}, the lowest flow loss"
            lines.append(f"adapter strengths (tuned = {chosen}):")
            lines += [f"  scale {scale:<6}" + ("failed (not finite)" if v.get("failed") else
                                                f"{_number(v['val_flow_loss']):>10} flow loss{_number(v['mel_l1']):>10} "
                                                f"log-mel L1{_number(v['desync']):>8} DeSync")
                      for scale, v in self.scales.items()]
        if self.checkpoints:
            lines.append("validation flow loss of the kept adapters:")
            lines += [f"  {name:<28}{_number(loss):>10}" for name, loss in self.checkpoints.items()]
        return "\n".join(lines)

    def to_json(self) -> str:
        """The numbers as strict JSON: a value that is not finite is null, never a bare NaN."""
        return json.dumps(_finite_or_none(asdict(self)), indent=2, allow_nan=False) + "\n"


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
