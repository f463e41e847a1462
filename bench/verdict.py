"""How often a verdict calls chance a finding, at the first user's scale: 67 clips from 16
commercials, segments of one commercial correlated (a shared offset per commercial), and no real
difference between the models. One run, fixed seeds; read the rates.

- the old rule: a single split holding out ~10 % of the sources, a 95 % percentile bootstrap over
  its clips, "better"/"worse" when the interval excludes zero, each metric on its own;
- the verdict now: every source judged once (cross-validation), per-source means, an exact
  sign-flip test over the 16 sources, Holm across the metrics;
- the recipe's question: each fold's adapter has its own luck (its data, its seed), a shift shared
  by every source that fold judges. Under "the recipe changes nothing" those shifts are zero on
  average but not in any one cross-validation: with R repeats (other folds, other seeds) each
  source's difference is averaged over R adapters' luck before the test.

    .venv/bin/python bench/verdict.py [--datasets N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from evaluate.verdict import judge  # noqa: E402
from shared.features import split  # noqa: E402

SOURCES, CLIPS, METRICS, FOLDS = 16, 67, 3, 4
FOLD_SHIFTS = (0.3, 0.5)  # a fold adapter's luck, in between-source standard deviations
REPEATS = (1, 2, 3)


def dataset(rng: np.random.Generator) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Clips spread over the commercials, null differences: a per-commercial offset plus clip noise."""
    sizes = rng.multinomial(CLIPS - 2 * SOURCES, np.ones(SOURCES) / SOURCES) + 2  # 2-9 segments each
    names = [f"commercial_{s:02d}_{rng.integers(1 << 30)}" for s in range(SOURCES)]  # one name per commercial
    group_of = {f"s{s}_c{c}": names[s] for s in range(SOURCES) for c in range(sizes[s])}
    sources = sorted(set(group_of.values()))
    differences = {}
    for metric in range(METRICS):
        offset = dict(zip(sources, rng.standard_normal(len(sources))))
        differences[f"m{metric}"] = {clip: offset[g] + 0.5 * rng.standard_normal() for clip, g in group_of.items()}
    return group_of, differences


def with_fold_luck(group_of: dict[str, str], differences: dict[str, dict[str, float]], shift: float, repeats: int,
                   rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Each repeat: the sources dealt into FOLDS folds at random, each fold's adapter a shift of sd
    `shift` on every clip it judges; each clip's difference averaged over the repeats (its R judges)."""
    sources = sorted(set(group_of.values()))
    result = {}
    for metric, values in differences.items():
        luck = {clip: 0.0 for clip in values}
        for _ in range(repeats):
            fold_of = dict(zip(rng.permutation(sources), np.arange(len(sources)) % FOLDS))
            shifts = shift * rng.standard_normal(FOLDS)
            for clip in values:
                luck[clip] += shifts[fold_of[group_of[clip]]] / repeats
        result[metric] = {clip: value + luck[clip] for clip, value in values.items()}
    return result


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


def called(differences: dict[str, dict[str, float]], group_of: dict[str, str]) -> bool:
    return any(t.assessment in ("better", "worse") for t in judge(differences, group_of).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=2000)
    datasets = parser.parse_args().datasets
    rng = np.random.default_rng(0)
    old = new = 0
    recipe = {(shift, r): 0 for shift in FOLD_SHIFTS for r in REPEATS}
    for _ in range(datasets):
        group_of, differences = dataset(rng)
        old += old_rule(group_of, differences, rng)
        new += called(differences, group_of)
        for shift, r in recipe:
            recipe[shift, r] += called(with_fold_luck(group_of, differences, shift, r, rng), group_of)
    print(f"{datasets} datasets of {CLIPS} clips from {SOURCES} commercials, {METRICS} metrics, no real difference:")
    print(f"  old rule (one held-out split, bootstrap over its clips): something called better or worse in "
          f"{100 * old / datasets:.1f} %")
    print(f"  verdict now (every source judged, sign-flip test over sources, Holm): {100 * new / datasets:.1f} % "
          "(at most 5 % by construction for these adapters)")
    print(f"  the recipe's question ({FOLDS} folds, each fold's adapter shifted by its own luck), false calls:")
    for shift in FOLD_SHIFTS:
        print(f"    fold luck {shift:g} sd: " + ", ".join(f"R = {r}: {100 * recipe[shift, r] / datasets:.1f} %"
                                                        for r in REPEATS))


if __name__ == "__main__":
    main()
