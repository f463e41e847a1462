"""The reports: pages that open offline in any browser, no script and nothing fetched.

- evaluate: RUN/evaluation/index.html. The verdict and what it rests on, the metric table (each row
  with its interval over sources, its Holm-adjusted p, its own clip and source counts), what each
  metric measures, KAD, the strengths explored; the training curves (the kept adapters' flow loss
  drawn as the different measure it is); per held-out clip its id and caption, a strip of its
  picture, players for the real audio (decoded from the stored latent, as the metrics see it), the
  base model and the fine-tune, its metrics and the three log-mel spectrograms on one colour scale.
- crossval: RUN/crossval/index.html. The pooled verdict and table, the strengths explored, the
  suggested step count, the per-source values, every held-out clip by source with its players and
  spectrograms (from the report of the fold that held it out), and each fold's curves and links.
Plots by matplotlib, audio as wav files beside the page, every link URL-encoded (clip ids may
hold `#` or `?`). It reads the results as given (evaluate/verdict.py's types; it imports nothing
of the evaluation itself).
"""
from __future__ import annotations

import html
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import torch

from evaluate.verdict import MEANINGS, METRICS, MODELS, kad_line, number, short_cells
from shared.outputs import OutputError, folder_kind, mark_folder, replace_folder
from shared.run_record import read_metrics_log

log = logging.getLogger(__name__)
STRIP_FRAMES = 4
STRIP_HEIGHT = 96


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


class _Spectrograms:
    """Real, base and tuned log-mels side by side on one colour scale, a file per clip. One figure,
    drawn again for each clip: making it anew cost as much as drawing it. Fixed margins, not a
    layout engine: the layout is the same for every clip, and solving it cost as much again."""

    def __init__(self, names: list[str]):
        import numpy as np

        self.plt = _pyplot()
        width = 4 * len(names)
        self.figure, axes = self.plt.subplots(1, len(names), figsize=(width, 2.6), sharey=True, squeeze=False)
        self.axes = list(axes[0])
        self.figure.subplots_adjust(left=0.7 / width, right=1 - 1.1 / width, bottom=0.19, top=0.88, wspace=0.06)
        self.images = [axis.imshow(np.zeros((1, 1)), origin="lower", aspect="auto", cmap="magma")
                       for axis in self.axes]
        for axis, name in zip(self.axes, names):
            axis.set_title(name)
            axis.set_xlabel("seconds")
        self.axes[0].set_ylabel("mel bin")
        colorbar_axis = self.figure.add_axes((1 - 0.9 / width, 0.19, 0.12 / width, 0.69))
        self.figure.colorbar(self.images[0], cax=colorbar_axis, label="log-mel")

    def draw(self, path: Path, mels: list[torch.Tensor], rate: int, hop: int) -> None:
        low, high = min(float(m.min()) for m in mels), max(float(m.max()) for m in mels)
        for axis, image, mel in zip(self.axes, self.images, mels):
            seconds = mel.shape[1] * hop / rate
            image.set_data(mel.numpy())
            image.set_extent((0, seconds, 0, mel.shape[0]))
            image.set_clim(low, high)
            axis.set_xlim(0, seconds)
            axis.set_ylim(0, mel.shape[0])
        self.figure.savefig(path, dpi=80)

    def close(self) -> None:
        self.plt.close(self.figure)


def _strip(path: Path, source: dict) -> bool:
    """A few frames of the clip's picture in a row; False when the video cannot be read."""
    import numpy as np

    from shared.media import MediaError, clip_pixels, load_video

    try:
        frames = load_video(source["video"], source.get("start_sec") or 0.0, source.get("end_sec"))
    except (MediaError, OSError) as error:
        log.warning("%s: no picture strip (%s)", source["video"], error)
        return False
    count = max(1, round(frames.duration_sec * 8))  # CLIP frames are taken at 8 fps
    picked = clip_pixels(frames.clip_frames[[round(k * (count - 1) / max(STRIP_FRAMES - 1, 1))
                                             for k in range(STRIP_FRAMES)]])
    small = torch.nn.functional.interpolate(picked, size=(STRIP_HEIGHT, STRIP_HEIGHT), mode="bilinear",
                                            antialias=True)
    row = torch.cat(list(small), dim=2).permute(1, 2, 0).clamp(0, 1).numpy()
    _pyplot().imsave(path, (row * 255).astype(np.uint8))
    return True


def _curves(path: Path, run: Path, checkpoints: dict[str, float], title: str = "") -> bool:
    """Training, validation (and tuning) loss over steps, the best step marked, the kept adapters'
    flow loss as its own series; False without metrics."""
    records = read_metrics_log(run)
    if not records:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.2))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.91)  # fixed, as the spectrograms

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    train, val, tuning = series("train_loss"), series("val_loss"), series("tuning_loss")
    if train:
        axis.plot(*zip(*train), label="training loss", color="tab:blue", alpha=0.6)
    if val:
        axis.plot(*zip(*val), label="validation loss (held-out sources)", color="tab:orange", marker="o",
                  markersize=3)
    if tuning:
        axis.plot(*zip(*tuning), label="tuning loss (the run's choices)", color="tab:purple", marker="s",
                  markersize=3)
    chosen = tuning or val
    if chosen:
        best_step, best_loss = min(chosen, key=lambda point: point[1])
        axis.axvline(best_step, color="tab:green", linestyle="--", label=f"best: step {best_step} ({best_loss:.4f})")
    points = [(int(m.group(1)), loss) for name, loss in checkpoints.items()
              if (m := re.search(r"step[- ](\d+)", name))]
    if points:
        axis.scatter(*zip(*points), color="tab:red", marker="x", zorder=3,
                     label="kept adapters: evaluate's flow loss at the full window (another measure)")
    axis.set_xlabel("step")
    axis.set_ylabel("flow-matching loss")
    if title:  # names shown as given: a `$` in a source name is not TeX
        axis.set_title(title, fontsize=9, parse_math=False)
    axis.legend(fontsize=7)
    with warnings.catch_warnings():  # a name in a script the font lacks draws boxes; the page shows it as text
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def _link(name: str) -> str:
    """A relative link to a file of ours, safe in an attribute whatever the clip id holds."""
    return html.escape(quote(name), quote=True)


def _table(header: list[str], rows: list[tuple], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "\n".join(f"<tr{f' class={css}' if css else ''}>" + "".join(f"<td>{html.escape(str(cell))}</td>"
                                                                       for cell in row) + "</tr>"
                     for row, css in zip(rows, classes or [""] * len(rows)))
    return f"<table><tr>{head}</tr>\n{body}</table>"


METRIC_HEADER = ["metric (lower is better)", "base", "tuned", "change", "tuned − base [95 % interval]",
                 "p (Holm)", "clips / sources", "assessment"]


def _summary(result) -> str:
    """The verdict, what it rests on, the notes, the table, what each metric measures and KAD."""
    notes = "".join(f'<p class="note">{html.escape(note)}</p>' for note in result.notes)
    meanings = "".join(f"<li><b>{html.escape(METRICS[metric])}</b>: {html.escape(text)}.</li>"
                       for metric, text in MEANINGS.items())
    kad = f"<p>{html.escape(kad_line(result.kad_passt))}</p>" if result.kad_passt else ""
    return (f"<p><b>{html.escape(result.verdict())}</b></p><p>It rests on {html.escape(result.basis())}.</p>{notes}"
            f"{_table(METRIC_HEADER, result.rows())}<ul>{meanings}</ul>{kad}{_scale_rows(result)}")


def _scale_rows(result) -> str:
    if not result.scales:
        return ""
    rows, classes = [], []
    for scale, values in result.scales.items():
        if values.get("failed"):
            rows.append((scale, *["failed: not finite"] + [""] * (len(METRICS) - 1)))
            classes.append("failed")
        else:
            rows.append((scale, *[f"{number(values['mean'].get(m))} (Δ {short_cells(values['tests'].get(m))})"
                                  for m in METRICS]))
            classes.append("best" if float(scale) == result.lora_scale else "")
    judged = ("none: the strength judged failed" if result.lora_scale is None
              else f"the verdict above is for {result.lora_scale:g} (the 'tuned' model on this page)")
    return ("<h2>Adapter strengths (exploratory)</h2><p>Each strength with its own interval and p-value against "
            f"the base; {judged}. Picking the best of several strengths on these clips is optimistic: its interval "
            "no longer means what it says.</p>"
            + _table(["scale", *[METRICS[m] for m in METRICS]], rows, classes))


def _checkpoint_rows(result) -> str:
    if not result.checkpoints:
        return ""
    return ("<h2>Kept adapters (exploratory)</h2><p>Evaluate's validation flow loss on the held-out clips at the "
            "full window; choosing a checkpoint by it makes the comparison above optimistic.</p>"
            + _table(["adapter", "validation flow loss"], [(name, number(loss))
                                                            for name, loss in result.checkpoints.items()]))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{heading}: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
tr.best {{ font-weight: bold; }}
tr.failed {{ color: #a00; }}
.clip {{ border-top: 1px solid #ddd; padding: 1em 0; }}
.players {{ display: flex; gap: 2em; flex-wrap: wrap; }}
.players div {{ display: flex; flex-direction: column; }}
.note {{ color: #777; font-style: italic; }}
</style></head><body>
<h1>{heading}</h1>
<p>{context}</p>
{body}
</body></html>
"""


def _context(result) -> str:
    sampling = result.sampling
    return (f"{html.escape(result.variant)}; clips from {html.escape(result.held_out)}; {sampling['steps']} Euler "
            f"steps, CFG {sampling['cfg_strength']:g}, seeds from {sampling['seed']}.")


@contextmanager
def _staging(folder: Path, subfolders: tuple[str, ...]) -> Iterator[Path]:
    """A new folder of this report's own beside `folder` (two evaluations never share one), marked,
    put in place of `folder` when the block succeeds and removed when it fails."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        mark_folder(staging, "report")
        for sub in subfolders:
            (staging / sub).mkdir(parents=True, exist_ok=True)
        yield staging
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def report_folder(json_path: Path) -> Path:
    """Where a report goes: beside its JSON, named after it (RUN/evaluation.json → RUN/evaluation/)."""
    json_path = Path(json_path)
    return json_path.with_suffix("") if json_path.suffix == ".json" else json_path.with_name(json_path.name + "_report")


def check_report_folder(folder: Path) -> Path:
    """A report may replace only an earlier report of ours (or, from before reports were marked, a
    run's own evaluation/ folder); anything else there is refused before any work."""
    folder = Path(folder)
    if folder.exists():
        legacy = folder.name in ("evaluation", "crossval") and folder_kind(folder.parent) in ("run", "crossval")
        if not folder.is_dir() or not (folder_kind(folder) == "report" or legacy):
            raise OutputError(f"{folder}: the report would replace it, and it is not a report of mmaudio-lora; "
                              "choose another --out")
    return folder


def write_report(folder: Path, run: Path, result, real: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
                 generated: dict, rate: int, hop: int, sources: dict[str, dict], captions: dict[str, str]) -> Path:
    """Write the evaluation's report folder (replaced whole, atomically) and return its index.html.

    `real`: each clip's real log-mel and waveform; `generated`: base and tuned, each with `.mels`
    and `.audio` by clip; `sources`: where each clip came from (video, start_sec, end_sec), when
    its folder records it."""
    folder = Path(folder)
    with _staging(folder, ("audio", "images")) as staging:
        _write_evaluation_page(staging, run, result, real, generated, rate, hop, sources, captions)
    return folder / "index.html"


def _write_evaluation_page(staging: Path, run: Path, result, real: tuple[dict, dict], generated: dict, rate: int,
                           hop: int, sources: dict[str, dict], captions: dict[str, str]) -> None:
    from shared.media import write_wav

    real_mels, real_audio = real
    sections = []
    with closing(_Spectrograms(["real (stored latent)", "base", "tuned"])) as spectrograms:  # one figure, every clip
        for clip_id in result.clips:
            mels = {"real (stored latent)": real_mels[clip_id], "base": generated["base"].mels[clip_id],
                    "tuned": generated["tuned"].mels[clip_id]}
            audio = {"real": real_audio[clip_id], "base": generated["base"].audio[clip_id],
                     "tuned": generated["tuned"].audio[clip_id]}
            players = []
            for label, key in zip(mels, audio):
                name = f"audio/{clip_id}_{key}.wav"
                if bool(torch.isfinite(audio[key]).all()):
                    write_wav(staging / name, audio[key], rate)
                    players.append(f'<div><span>{label}</span>'
                                   f'<audio controls preload="none" src="{_link(name)}"></audio></div>')
                else:
                    players.append(f'<div><span>{label}</span><span class="note">not finite: no audio</span></div>')
            spectrograms.draw(staging / "images" / f"{clip_id}_mel.png", [torch.nan_to_num(m) for m in mels.values()],
                              rate, hop)
            source = sources.get(clip_id)
            if source is not None and _strip(staging / "images" / f"{clip_id}_frames.png", source):
                picture = (f'<img alt="frames of {html.escape(clip_id)}" '
                           f'src="{_link(f"images/{clip_id}_frames.png")}">')
            else:
                picture = ('<p class="note">No picture: the feature folder does not point to a readable source '
                           'video.</p>')
            sections.append(
                f'<div class="clip"><h3>{html.escape(clip_id)}</h3><p>{html.escape(captions.get(clip_id, ""))}</p>'
                f"{picture}<div class=players>{''.join(players)}</div><p>{_clip_values(result, clip_id)}</p>"
                f'<img alt="log-mel spectrograms of {html.escape(clip_id)}" '
                f'src="{_link(f"images/{clip_id}_mel.png")}"></div>')
    curves = ('<img alt="training curves" src="images/curves.png">' if _curves(staging / "images" / "curves.png", run,
                                                                              result.checkpoints)
              else '<p class="note">No metrics.jsonl in the run folder.</p>')
    body = (f"{_summary(result)}<h2>Training</h2>{curves}{_checkpoint_rows(result)}<h2>Clips</h2>"
            + "\n".join(sections))
    page = PAGE.format(heading="Base model against the fine-tune", title=html.escape(str(run)),
                       context=_context(result), body=body)
    (staging / "index.html").write_text(page, encoding="utf-8")


def _clip_values(result, clip_id: str) -> str:
    """One clip's metrics, base and tuned (DeSync with the real audio's floor)."""
    parts = []
    for metric, name in METRICS.items():
        values = result.per_clip.get(metric, {}).get(clip_id)
        if values is None:
            continue
        real = f"real {number(values['real'])}, " if "real" in values else ""
        short = " (the clip is under 4.8 s)" if metric == "desync" and math.isnan(values.get("real", 0.0)) else ""
        parts.append(f"{html.escape(name)}: {real}base {number(values['base'])}, tuned {number(values['tuned'])}"
                     f"{short}")
    return ". ".join(parts) + "."


def write_crossval_report(folder: Path, result) -> Path:
    """The cross-validation's page (replaced whole, atomically): the pooled verdict and table, the
    strengths explored, the step advice, values per source, then every held-out clip grouped by
    source with its real audio and the base and tuned generations (first seed) and their
    spectrograms, from the report of the fold that held it out (linked, with the fold's run), and
    each fold's curves."""
    folder = Path(folder)
    with _staging(folder, ("images",)) as staging:
        folds = []
        for k, fold in enumerate(result.folds):
            image = f"images/fold-{k}.png"
            title = f"{fold['name']}: held out {', '.join(fold['val_groups'])}"
            drawn = _curves(staging / image, Path(fold["run"]), {}, title)
            links = (f'<p><a href="{_relative(fold["run"], folder)}">{html.escape(fold["name"])}: its run</a> · '
                     f'<a href="{_relative(Path(fold["report"]) / "index.html", folder)}">its evaluation</a></p>')
            folds.append(links + (f'<img alt="{html.escape(title)}" src="{_link(image)}">' if drawn
                                  else f'<p class="note">{html.escape(title)}: no metrics.jsonl.</p>'))
        per_source = _table(["source", "clips", *[f"{METRICS[m]}: tuned − base" for m in result.metrics]],
                            _source_rows(result))
        body = (f"{_summary(result)}<p>{html.escape(result.steps_advice())}</p><h2>Per source</h2>{per_source}"
                f"<h2>Listen: every held-out clip, by source</h2>{_listening(result, folder)}"
                f"<h2>Folds</h2>{''.join(folds)}")
        page = PAGE.format(heading="Cross-validation by source: base model against the fine-tune",
                           title=html.escape(str(folder.parent)), context=_context(result), body=body)
        (staging / "index.html").write_text(page, encoding="utf-8")
    return folder / "index.html"


def _relative(path: str | Path, page_folder: Path) -> str:
    """A link from a page in `page_folder` to `path`, relative (the folder can be moved whole)."""
    return html.escape(quote(os.path.relpath(Path(path), page_folder)), quote=True)


def _listening(result, folder: Path) -> str:
    """Per source, per clip: players for the real, base and tuned audio and the spectrograms, from
    the report of the (first) fold that held the clip out."""
    report_of = {}
    for fold in reversed(result.folds):  # the first repeat's fold wins
        report_of.update({clip: Path(fold["report"]) for clip in fold["val_ids"]})
    sources: dict[str, list[str]] = {}
    for clip in result.clips:
        sources.setdefault(result.group_of.get(clip, clip), []).append(clip)
    sections = []
    for source, clips in sorted(sources.items()):
        parts = [f"<h3>{html.escape(source)}</h3>"]
        for clip in clips:
            report = report_of.get(clip)
            players = []
            for key in ("real", "base", "tuned"):
                audio = report / "audio" / f"{clip}_{key}.wav" if report else None
                players.append(f'<div><span>{key}</span><audio controls preload="none" '
                               f'src="{_relative(audio, folder)}"></audio></div>' if audio and audio.is_file() else
                               f'<div><span>{key}</span><span class="note">no audio kept</span></div>')
            mel = report / "images" / f"{clip}_mel.png" if report else None
            picture = (f'<img alt="log-mel spectrograms of {html.escape(clip)}" src="{_relative(mel, folder)}">'
                       if mel and mel.is_file() else "")
            values = ". ".join(f"{html.escape(METRICS[m])}: {_pair(result.per_clip[m].get(clip, {}))}"
                               for m in result.metrics)
            parts.append(f'<div class="clip"><h4>{html.escape(clip)}</h4><div class=players>{"".join(players)}</div>'
                         f"<p>{values}.</p>{picture}</div>")
        sections.append("".join(parts))
    return "\n".join(sections)


def _pair(values: dict) -> str:
    return f"{number(values.get('base'))} → {number(values.get('tuned'))}"


def _source_rows(result) -> list[tuple]:
    """Per source: its clip count and, per metric, the mean difference of its clips (what the test uses)."""
    sources: dict[str, list[str]] = {}
    for clip in result.clips:
        sources.setdefault(result.group_of.get(clip, clip), []).append(clip)
    rows = []
    for source, clips in sorted(sources.items()):
        cells = []
        for metric in result.metrics:
            values = [result.per_clip[metric][c][MODELS[1]] - result.per_clip[metric][c][MODELS[0]] for c in clips]
            finite = [v for v in values if math.isfinite(v)]
            cells.append(number(sum(finite) / len(finite)) if finite else "n/a")
        rows.append((source, len(clips), *cells))
    return rows
