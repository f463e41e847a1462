"""What the evaluation's numbers say, at the scale users have: a few source videos, each cut into
several correlated segments.

The unit of evidence is the source video, not the clip: segments of one commercial share its music
and its voice, so their differences are not independent, and an interval over clips calls chance a
finding (25-50 % of the time at 1-3 held-out commercials). So, per metric:
- each clip's difference tuned − base (averaged over seeds) is averaged within its source (a clip
  without a value, e.g. DeSync under 4.8 s, is left out and counted);
- the mean over sources is tested with an exact sign-flip permutation test, two-sided (under no
  difference each source's mean is as likely positive as negative): all 2^G sign patterns up to
  G = 20 sources, a seeded Monte Carlo of 50 000 patterns beyond;
- the 95 % interval is Student's t over the source means (a bootstrap over 6-16 sources is too
  narrow);
- the p-values of the metrics of one verdict are adjusted by Holm's step-down method, so the chance
  of calling any metric better or worse when none differs stays at or below 5 %;
- a metric is "better" or "worse" only where its Holm-adjusted p < 0.05, "no clear difference"
  otherwise, and "too few sources" where no outcome could be called: the smallest two-sided p an
  exact sign-flip test can reach over G sources is 2/2^G (0.0625 at 5, so at least 6 sources for
  one metric), and Holm multiplies the smallest of m p-values by m (with four metrics, 4·2/2^7 =
  0.0625: at least 8 sources).
Every metric is lower-is-better. The result: tests, a verdict sentence, a table and strict JSON (a
value that is not finite is null, never a bare NaN).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from shared.run_record import finite_or_none


ALPHA = 0.05
MIN_SOURCES = 6  # fewer: an exact two-sided test at ALPHA cannot reject (2 / 2^5 = 0.0625)


def sources_needed(family: int) -> int:
    """The fewest sources at which one of `family` Holm-adjusted sign-flip tests can reach p < ALPHA."""
    sources = MIN_SOURCES
    while max(family, 1) * 2.0 ** (1 - sources) >= ALPHA:
        sources += 1
    return sources
EXACT_UP_TO = 20  # sources: all 2^G sign patterns; beyond, a seeded Monte Carlo
MONTE_CARLO_DRAWS = 50_000
MONTE_CARLO_SEED = 0

MODELS = ("base", "tuned")
METRICS = {"flow_loss": "validation flow loss", "mel_l1": "log-mel L1 to the real audio", "desync": "DeSync (s)",
           "kl_passt": "KL_PaSST (real ‖ generated)"}
# What each metric measures, in one sentence (the report and the README say it under the table).
MEANINGS = {
    "flow_loss": "the training objective on held-out clips, with fixed noise and times",
    "mel_l1": "how far the generated spectrogram is from the real one, frame by frame",
    "desync": "sync: how far the audio is out of step with the picture (av-benchmark's DeSync)",
    "kl_passt": "the kind of sound: how differently PaSST's 527 AudioSet classes read the generated and the "
                "real audio of each clip (av-benchmark's KL_PaSST)",
}


def number(value: float | None) -> str:
    """A metric as the table and the page print it: 'n/a' where it has no finite value."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"  # KL_PaSST can be ~1e-5


def change(base: float | None, tuned: float | None) -> str:
    if base is None or tuned is None or not (math.isfinite(base) and math.isfinite(tuned)) or not base:
        return "n/a"
    return f"{100 * (tuned - base) / base:+.1f}%"


# -- the test over sources ---------------------------------------------------------------------------

def sign_flip_p_value(values: list[float] | np.ndarray) -> float:
    """Two-sided p of the mean of `values` under sign symmetry: the share of sign patterns whose
    |sum| is at least the observed one (exact up to EXACT_UP_TO values; the observed pattern counts)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():  # a NaN would compare false everywhere and read as p = 0
        raise ValueError(f"the sign-flip test needs finite values, got {values[~np.isfinite(values)][:3].tolist()}")
    count = len(values)
    observed = abs(values.sum())
    slack = 1e-9 * max(np.abs(values).sum(), 1e-300)  # ties in floating point count as ties
    if count <= EXACT_UP_TO:
        bits = np.arange(count)
        extreme, chunk = 0, 1 << 16
        for start in range(0, 1 << count, chunk):
            patterns = np.arange(start, min(start + chunk, 1 << count))[:, None]
            signs = 1.0 - 2.0 * ((patterns >> bits) & 1)
            extreme += int((np.abs(signs @ values) >= observed - slack).sum())
        return extreme / (1 << count)
    signs = np.random.default_rng(MONTE_CARLO_SEED).choice([-1.0, 1.0], size=(MONTE_CARLO_DRAWS, count))
    extreme = int((np.abs(signs @ values) >= observed - slack).sum())
    return (extreme + 1) / (MONTE_CARLO_DRAWS + 1)


def t_interval(values: list[float] | np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean; None below two values."""
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    half = t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


@dataclass
class PairedTest:
    """One metric's paired comparison over sources (differences are tuned − base)."""

    delta: float | None  # the mean over sources of each source's mean difference
    ci95: list[float] | None  # 95 % t interval over sources
    p_value: float | None  # sign-flip test over sources, two-sided
    groups: int  # sources with a finite difference
    clips: int  # clips with a finite difference
    left_out: int = 0  # clips without a value (n/a)
    p_holm: float | None = None  # adjusted across the metrics of one verdict
    assessment: str = "n/a"


def paired_test(differences: dict[str, float], group_of: dict[str, str]) -> PairedTest:
    """The test of `differences` ({clip: tuned − base}) over the sources `group_of` names
    ({clip: source}; a clip it lacks is its own source). Not-finite values are left out and counted.
    The assessment is set from the unadjusted p; `judge` sets it from Holm's."""
    finite = {clip: value for clip, value in differences.items() if math.isfinite(value)}
    by_source: dict[str, list[float]] = {}
    for clip, value in finite.items():
        by_source.setdefault(group_of.get(clip, clip), []).append(value)
    means = np.array([np.mean(values) for values in by_source.values()])
    test = PairedTest(float(means.mean()) if len(means) else None,
                      list(interval) if (interval := t_interval(means)) else None,
                      sign_flip_p_value(means) if len(means) else None,
                      len(means), len(finite), len(differences) - len(finite))
    test.assessment = assessment(test, test.p_value)
    return test


def holm(p_values: dict[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjustment of the p-values of one family (None stays None)."""
    known = sorted((p, name) for name, p in p_values.items() if p is not None)
    adjusted, running = {}, 0.0
    for rank, (p, name) in enumerate(known):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[name] = running
    return {name: adjusted.get(name) for name in p_values}


def assessment(test: PairedTest, p: float | None, family: int = 1) -> str:
    """`family`: how many p-values share the Holm adjustment (the metrics of one verdict)."""
    if test.groups == 0 or test.delta is None:
        return "n/a"
    if test.groups < sources_needed(family) and test.groups <= EXACT_UP_TO:
        return "too few sources"
    if p is not None and p < ALPHA and test.delta != 0:
        return "better" if test.delta < 0 else "worse"
    return "no clear difference"


def judge(differences: dict[str, dict[str, float]], group_of: dict[str, str]) -> dict[str, PairedTest]:
    """Every metric's test ({metric: {clip: tuned − base}}), Holm-adjusted across the metrics."""
    tests = {metric: paired_test(values, group_of) for metric, values in differences.items()}
    family = sum(test.p_value is not None for test in tests.values())
    for metric, p in holm({metric: test.p_value for metric, test in tests.items()}).items():
        tests[metric].p_holm = p
        tests[metric].assessment = assessment(tests[metric], p, family)
    return tests


def differences_of(per_clip: dict[str, dict[str, float]], tuned: str = "tuned") -> dict[str, float]:
    """{clip: tuned − base} from {clip: {model: value}} (NaN where either is missing)."""
    return {clip: values.get(tuned, math.nan) - values.get("base", math.nan) for clip, values in per_clip.items()}


# -- what a set of tests says --------------------------------------------------------------------------

def verdict_sentence(tests: dict[str, PairedTest], names: dict[str, str]) -> str:
    found = {names[metric]: test.assessment for metric, test in tests.items()}
    better = [name for name, verdict in found.items() if verdict == "better"]
    worse = [name for name, verdict in found.items() if verdict == "worse"]
    unclear = [name for name, verdict in found.items() if verdict == "no clear difference"]
    few = [name for name, verdict in found.items() if verdict == "too few sources"]
    if few and not (better or worse or unclear):
        sources = max(test.groups for test in tests.values())
        family = sum(test.p_value is not None for test in tests.values())
        return (f"Too few source videos to tell: the clips come from {sources} source"
                f"{'s' if sources != 1 else ''}, and with {family} metric{'s' if family != 1 else ''} tested at 5 % "
                f"(Holm) a verdict needs at least {sources_needed(family)}. The numbers are descriptive; "
                "`mmaudio-lora crossval` judges every source with an adapter that never saw it.")
    if better and worse:
        head = f"Mixed: the fine-tune is better in {', '.join(better)} and worse in {', '.join(worse)}"
    elif better or worse:
        head = f"The fine-tune is {'better' if better else 'worse'} in {', '.join(better or worse)}"
    elif unclear:
        head, unclear = "No clear difference between the fine-tune and the base model", []
    else:
        return "No metric could be compared (no finite values)."
    return head + "".join(f"; {label} in {', '.join(found_here)}" for label, found_here in (
        ("no clear difference", unclear), ("too few sources to tell", few)) if found_here) + "."


def basis_sentence(clips: int, sources: int, seeds: int) -> str:
    """What a verdict rests on, and how it decides."""
    return (f"{clips} clip{'s' if clips != 1 else ''} from {sources} source video{'s' if sources != 1 else ''}, "
            f"{seeds} seed{'s' if seeds != 1 else ''} each. Each clip's difference (averaged over the seeds) is "
            "averaged within its source video, and the mean over sources is tested with an exact sign-flip test; "
            f"a metric is better or worse only where its p-value, adjusted across the metrics (Holm), is below "
            f"{ALPHA:g}; with fewer sources than that can reach (6 for one metric, 8 for four) a metric has too few. "
            "Each row counts its own clips and sources (DeSync leaves out clips under 4.8 s)")


def cells_of(test: PairedTest | None) -> tuple[str, str, str, str]:
    """(tuned − base [interval], p (Holm), clips / sources, assessment) as the table shows them."""
    if test is None:
        return "n/a", "n/a", "0 / 0", "n/a"
    spread = (f"{number(test.delta)} [{number(test.ci95[0])}, {number(test.ci95[1])}]" if test.ci95
              else number(test.delta))
    p = "n/a" if test.p_value is None else f"{test.p_value:.3g} ({_number_p(test.p_holm)})"
    return spread, p, f"{test.clips} / {test.groups}", test.assessment


def _number_p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


# -- one evaluation ------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    variant: str
    held_out: str  # where the clips came from
    clips: list[str]
    sampling: dict
    seeds: int = 1
    sources: int = 0  # source videos the clips come from
    group_of: dict[str, str] = field(default_factory=dict)  # clip → its source video
    val_flow_loss: dict[str, float] = field(default_factory=dict)  # base, tuned
    mel_l1: dict[str, float] = field(default_factory=dict)
    desync: dict[str, float] = field(default_factory=dict)  # base, tuned, real (the floor)
    kl_passt: dict[str, float] = field(default_factory=dict)  # base, tuned (empty: PaSST's weights were missing)
    kad_passt: dict = field(default_factory=dict)  # base, tuned, their intervals over sources (descriptive)
    per_clip_mel_l1: dict[str, dict[str, float]] = field(default_factory=dict)
    per_clip: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # metric → clip → model → value
    metrics: dict[str, PairedTest] = field(default_factory=dict)  # metric → its test over sources
    lora_scale: float | None = 1.0  # the strength the verdict is for (None: it failed)
    scales: dict[str, dict] = field(default_factory=dict)  # several strengths: each one's numbers (exploratory)
    per_clip_scales: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # scale → metric → clip
    checkpoints: dict[str, float] = field(default_factory=dict)  # adapter folder → validation flow loss
    notes: list[str] = field(default_factory=list)  # what the reader must know (choices made on these clips)
    seconds: float = 0.0

    def summary(self, metric: str) -> dict[str, float]:
        return {"flow_loss": self.val_flow_loss, "mel_l1": self.mel_l1, "desync": self.desync,
                "kl_passt": self.kl_passt}[metric]

    @property
    def failed(self) -> bool:
        return self.lora_scale is None

    @property
    def delta(self) -> dict[str, float | None]:
        return {metric: test.delta for metric, test in self.metrics.items()}

    @property
    def ci95(self) -> dict[str, list[float] | None]:
        return {metric: test.ci95 for metric, test in self.metrics.items()}

    def assessment(self, metric: str) -> str:
        return self.metrics[metric].assessment if metric in self.metrics else "n/a"

    def basis(self) -> str:
        return basis_sentence(len(self.clips), self.sources, self.seeds)

    def verdict(self) -> str:
        if self.failed:
            return ("The fine-tune failed: its output is not finite at the strength judged (a diverged adapter or an "
                    "extreme --lora-scale).")
        return verdict_sentence(self.metrics, METRICS)

    def rows(self) -> list[tuple[str, ...]]:
        """Per metric: (name, base, tuned, change, tuned − base [interval], p (Holm), clips / sources,
        assessment), as the table and the report show them."""
        rows = []
        for metric, name in METRICS.items():
            values = self.summary(metric)
            label = f"{name}, real audio {number(values.get('real'))}" if metric == "desync" else name
            rows.append((label, number(values.get("base")), number(values.get("tuned")),
                         change(values.get("base"), values.get("tuned")), *cells_of(self.metrics.get(metric))))
        return rows

    def table(self) -> str:
        lines = aligned([TABLE_HEADER, *self.rows()])
        if self.scales:
            lines.append(f"adapter strengths (exploratory; the verdict is for {self.lora_scale:g}, and picking the best "
                         "of several is optimistic):" if not self.failed else "adapter strengths (exploratory):")
            lines += [f"  scale {scale:<6}" + ("failed (not finite)" if v.get("failed") else "  ".join(
                f"{METRICS[m].split(' to ')[0]} {number(v['mean'].get(m))} (Δ {short_cells(v['tests'].get(m))})"
                for m in METRICS)) for scale, v in self.scales.items()]
        if self.kad_passt:
            lines.append(kad_line(self.kad_passt))
        if self.checkpoints:
            lines.append("validation flow loss of the kept adapters (exploratory: chosen on these clips):")
            lines += [f"  {name:<28}{number(loss):>10}" for name, loss in self.checkpoints.items()]
        lines += self.notes
        return "\n".join(lines)

    def to_json(self) -> str:
        """The numbers as strict JSON: a value that is not finite is null, never a bare NaN. The
        earlier keys `delta` and `ci95` stay (now over sources), beside `metrics` and `verdict`."""
        data = asdict(self)
        data.update(delta=self.delta, ci95=self.ci95, verdict=self.verdict())
        return json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"


@dataclass
class CrossValidation(Evaluation):
    """The pooled verdict of a cross-validation: every clip scored by the adapter of the fold that
    held its source out (with repeats, by one such adapter per repeat, averaged), tested over all
    sources."""

    folds: list[dict] = field(default_factory=list)  # each {run, repeat, val_groups, val_ids}: its held-out sources
    steps: int = 0  # the steps each fold trained
    best_step: int | None = None  # where the folds' pooled held-out (judging) loss was lowest
    pooled_val_loss: dict[int, float] = field(default_factory=dict)  # step → clip-weighted mean over the folds
    repeats: int = 1  # cross-validations with other folds and training seeds, averaged per source
    settings: dict = field(default_factory=dict)  # the experiment: training as trained, judging, features, folds
    train_command: str = ""  # how to train the adapter you keep (a new run; filled by the caller)

    def claim(self) -> str:
        """What the test answers: these adapters, or (with repeats) the recipe."""
        folds = len(self.folds) // max(self.repeats, 1)
        if self.repeats == 1:
            return (f"The test is about these {folds} adapters (one per fold, each with its own data and luck) on the "
                    "sources each never saw; whether the recipe helps in general is a broader claim: "
                    "`--repeats 3` averages each source over three adapters trained on other folds with other seeds.")
        return (f"The test speaks of the recipe more than of particular adapters: each source is judged by "
                f"{self.repeats} adapters (one per repeat, {folds} folds each, other folds and seeds), averaged "
                f"before the test, so that one adapter's luck weighs 1/{self.repeats}; it is not exact for the "
                "recipe (bench/verdict.py: with 16 sources and each fold's luck 0.3-0.5 of the between-source spread, "
                "6-10 % false calls at 5 % with 2-3 repeats, 8-14 % with one).")

    def verdict(self) -> str:
        return f"{super().verdict()} {self.claim()}"

    def basis(self) -> str:
        repeats = f" × {self.repeats} repeats" if self.repeats > 1 else ""
        return (f"{len(self.folds) // max(self.repeats, 1)} folds{repeats}; every clip judged by an adapter that never "
                "saw its source. " + basis_sentence(len(self.clips), self.sources, self.seeds))

    def steps_advice(self) -> str:
        if self.best_step is None:
            return "The folds logged no validation loss: no step count to suggest."
        return (f"The folds' pooled held-out loss was lowest at step {self.best_step} of {self.steps} "
                f"({number(self.pooled_val_loss.get(self.best_step))}). That step count was chosen on the clips that "
                f"judged the folds, so it is optimistic: confirm it with a second cross-validation at --steps "
                f"{self.best_step} (another --run) before relying on it. To train the adapter you keep on all clips: "
                f"{self.train_command or f'mmaudio-lora train ... --steps {self.best_step}'}")


def kad_line(kad: dict) -> str:
    """The set-level distance, descriptive (no verdict): base and tuned with their intervals."""
    def one(model: str) -> str:
        interval = kad.get(f"{model}_ci95")
        return f"{model} {number(kad.get(model))}" + (f" [{number(interval[0])}, {number(interval[1])}]"
                                                       if interval else "")
    return (f"KAD_PaSST (x100, generated set against the real set; descriptive, intervals over sources): "
            f"{one('base')}, {one('tuned')}")


TABLE_HEADER = ("metric (lower is better)", "base", "tuned", "change", "tuned - base [95 % interval]", "p (Holm)",
                "clips/src", "assessment")


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as lines of columns as wide as their widest cell, two spaces apart (numbers right-aligned),
    so that no two columns ever run together whatever the numbers' widths."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    right = {1, 2, 3}  # base, tuned, change
    return ["  ".join(cell.rjust(width) if column in right else cell.ljust(width)
                      for column, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]


def short_cells(test: PairedTest | None) -> str:
    if test is None:
        return "n/a"
    spread, p, _, _ = cells_of(test)
    return f"{spread}, p {p.split(' ')[0]}"
