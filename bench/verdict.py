"""How often a verdict calls chance a finding, at the first user's scale: 67 clips from 16
commercials, segments of one commercial correlated (a shared offset per commercial), and no real
difference between the models. One run, fixed seeds; read the rates.

- the old rule: a single split holding out ~10 % of the sources, a 95 % percentile bootstrap over
  its clips, "better"/"worse" when the interval excludes zero, each metric on its own;
- the verdict now: every source judged once (cross-validation), per-source means, an exact
  sign-flip test over the 16 sources, Holm across the metrics.

    .venv/bin/python bench/verdict.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from evaluate.verdict import judge  # noqa: E402
from shared.features import split  # noqa: E402

SOURCES, CLIPS, METRICS, DATASETS = 16, 67, 3, 2000


def dataset(rng: np.random.Generator) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Clips spread over the commercials, null differences: a per-commercial offset plus clip noise."""
    sizes = rng.multinomial(CLIPS - 2 * SOURCES, np.ones(SOURCES) / SOURCES) + 2  # 2-9 segments each
    group_of = {f"s{s}_c{c}": f"commercial_{s:02d}_{rng.integers(1 << 30)}" for s in range(SOURCES) for c in range(sizes[s])}
    sources = sorted(set(group_of.values()))
    differences = {}
    for metric in range(METRICS):
        offset = dict(zip(sources, rng.standard_normal(len(sources))))
        differences[f"m{metric}"] = {clip: offset[g] + 0.5 * rng.standard_normal() for clip, g in group_of.items()}
    return group_of, differences


def old_rule(group_of: dict[str, str], differences: dict[str, dict[str, float]], rng) -> bool:
    ids = list(group_of)
    _, held = split(ids, [group_of[i] for i in ids], 0.1)
    held_ids = [ids[n] for n in held]
    for values in differences.values():
        clip_values = np.array([values[i] for i in held_ids])
        if len(clip_values) < 2:
            continue
        means = clip_values[rng.integers(0, len(clip_values), (2000, len(clip_values)))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        if low > 0 or high < 0:
            return True
    return False


def main() -> None:
    rng = np.random.default_rng(0)
    old = new = 0
    for _ in range(DATASETS):
        group_of, differences = dataset(rng)
        old += old_rule(group_of, differences, rng)
        new += any(t.assessment in ("better", "worse") for t in judge(differences, group_of).values())
    print(f"{DATASETS} datasets of {CLIPS} clips from {SOURCES} commercials, {METRICS} metrics, no real difference:")
    print(f"  old rule (one held-out split, bootstrap over its clips): something called better or worse in "
          f"{100 * old / DATASETS:.1f} %")
    print(f"  verdict now (every source judged, sign-flip test over sources, Holm): {100 * new / DATASETS:.1f} % "
          "(at most 5 % by construction)")


if __name__ == "__main__":
    main()
