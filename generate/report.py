"""The evaluation report: RUN/evaluation/index.html, a page that opens offline in any browser.

Per held-out clip: id and caption, a strip of its picture, players for the real audio (decoded
from the stored latent, as the metrics see it), the base model and the fine-tune, its log-mel L1
and DeSync, and the three log-mel spectrograms on one colour scale. Then the training curves (best
step marked, kept checkpoints when evaluated), the metric table with the intervals, the verdict and
what it rests on. Plots by matplotlib, audio as wav files beside the page, every link URL-encoded
(clip ids may hold `#` or `?`), no script and nothing fetched from the network.

It reads the evaluation's result as given (generate/evaluate.py calls it; it imports nothing back).
"""
from __future__ import annotations

import html
import json
import logging
import math
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import torch

from shared.outputs import replace_folder

log = logging.getLogger(__name__)
STRIP_FRAMES = 4
STRIP_HEIGHT = 96


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _spectrograms(path: Path, mels: dict[str, torch.Tensor], rate: int, hop: int) -> None:
    """Real, base and tuned log-mels side by side on one colour scale."""
    plt = _pyplot()
    low = min(float(m.min()) for m in mels.values())
    high = max(float(m.max()) for m in mels.values())
    figure, axes = plt.subplots(1, len(mels), figsize=(4 * len(mels), 2.6), sharey=True, constrained_layout=True)
    for axis, (name, mel) in zip(axes, mels.items()):
        seconds = mel.shape[1] * hop / rate
        image = axis.imshow(mel.numpy(), origin="lower", aspect="auto", vmin=low, vmax=high, cmap="magma",
                            extent=(0, seconds, 0, mel.shape[0]))
        axis.set_title(name)
        axis.set_xlabel("seconds")
    axes[0].set_ylabel("mel bin")
    figure.colorbar(image, ax=list(axes), label="log-mel", shrink=0.9)
    figure.savefig(path, dpi=80)
    plt.close(figure)


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


def _curves(path: Path, run: Path, checkpoints: dict[str, float]) -> bool:
    """Training and validation loss over steps, the best step marked; False without metrics."""
    metrics_file = run / "metrics.jsonl"
    if not metrics_file.is_file():
        return False
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.2), constrained_layout=True)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        axis.plot(*zip(*train), label="training loss", color="tab:blue", alpha=0.6)
    if val:
        axis.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o", markersize=3)
        best_step, best_loss = min(val, key=lambda point: point[1])
        axis.axvline(best_step, color="tab:green", linestyle="--", label=f"best: step {best_step} ({best_loss:.4f})")
    points = [(int(m.group(1)), loss) for name, loss in checkpoints.items()
              if (m := re.search(r"step[- ](\d+)", name))]
    if points:
        axis.scatter(*zip(*points), color="tab:red", zorder=3, label="kept adapters (held-out clips)")
    axis.set_xlabel("step")
    axis.set_ylabel("flow-matching loss")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def number(value: float | None) -> str:
    """A metric as the table and the page print it: 'n/a' where it has no finite value."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def change(base: float | None, tuned: float | None) -> str:
    if base is None or tuned is None or not (math.isfinite(base) and math.isfinite(tuned)) or not base:
        return "n/a"
    return f"{100 * (tuned - base) / base:+.1f}%"


def _link(name: str) -> str:
    """A relative link to a file of ours, safe in an attribute whatever the clip id holds."""
    return html.escape(quote(name), quote=True)


def _metric_rows(result) -> str:
    return "\n".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                     for row in result.rows())


def _scale_rows(result) -> str:
    if not result.scales:
        return ""
    rows = "\n".join(
        f"<tr class=failed><td>{html.escape(scale)}</td><td colspan=3>failed: not finite</td></tr>" if v.get("failed")
        else f"<tr{' class=best' if float(scale) == result.lora_scale else ''}><td>{html.escape(scale)}</td>"
             f"<td>{number(v['val_flow_loss'])}</td><td>{number(v['mel_l1'])}</td><td>{number(v['desync'])}</td></tr>"
        for scale, v in result.scales.items())
    best = ("none: every strength failed" if result.lora_scale is None
            else f"<b>{result.lora_scale:g}</b> (the 'tuned' model everywhere on this page)")
    return (f"<h2>Adapter strength</h2><p>Best by validation flow loss: {best}.</p>"
            "<table><tr><th>scale</th><th>validation flow loss</th><th>log-mel L1</th><th>DeSync (s)</th></tr>"
            f"{rows}</table>")


def _checkpoint_rows(result) -> str:
    if not result.checkpoints:
        return ""
    rows = "\n".join(f"<tr><td>{html.escape(name)}</td><td>{number(loss)}</td></tr>"
                     for name, loss in result.checkpoints.items())
    return ("<h2>Kept adapters</h2><p>Validation flow loss on the held-out clips.</p>"
            f"<table><tr><th>adapter</th><th>validation flow loss</th></tr>{rows}</table>")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {title}</title>
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
<h1>Base model against the fine-tune</h1>
<p><b>{verdict}</b></p>
<p>It rests on {basis}.</p>
<p>{variant}; clips from {held_out}; {sampling}.</p>
<table><tr><th>metric (lower is better)</th><th>base</th><th>tuned</th><th>change</th>
<th>tuned − base [95 % interval]</th><th>assessment</th></tr>
{metrics}
</table>
{scales}
<h2>Training</h2>
{curves}
{checkpoints}
<h2>Clips</h2>
{clips}
</body></html>
"""


def write_report(folder: Path, result, real: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
                 generated: dict, rate: int, hop: int, sources: dict[str, dict], captions: dict[str, str]) -> Path:
    """Write the report folder (replaced whole, atomically) and return its index.html.

    `real`: each clip's real log-mel and waveform; `generated`: base and tuned, each with `.mels`
    and `.audio` by clip; `sources`: where each clip came from (video, start_sec, end_sec), when
    its folder records it."""
    from shared.media import write_wav

    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's files never reach the new report
    for sub in ("audio", "images"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    real_mels, real_audio = real
    sections = []
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
                players.append(f'<div><span>{label}</span><audio controls preload="none" src="{_link(name)}"></audio></div>')
            else:
                players.append(f'<div><span>{label}</span><span class="note">not finite: no audio</span></div>')
        _spectrograms(staging / "images" / f"{clip_id}_mel.png", {k: torch.nan_to_num(m) for k, m in mels.items()},
                      rate, hop)
        source = sources.get(clip_id)
        if source is not None and _strip(staging / "images" / f"{clip_id}_frames.png", source):
            picture = (f'<img alt="frames of {html.escape(clip_id)}" '
                       f'src="{_link(f"images/{clip_id}_frames.png")}">')
        else:
            picture = '<p class="note">No picture: the feature folder does not point to a readable source video.</p>'
        distances, offsets = result.per_clip["mel_l1"][clip_id], result.per_clip["desync"][clip_id]
        sections.append(
            f'<div class="clip"><h3>{html.escape(clip_id)}</h3><p>{html.escape(captions.get(clip_id, ""))}</p>'
            f"{picture}<div class=players>{''.join(players)}</div>"
            f'<p>log-mel L1: base {number(distances["base"])}, tuned {number(distances["tuned"])}. '
            f'DeSync (s): real {number(offsets["real"])}, base {number(offsets["base"])}, '
            f'tuned {number(offsets["tuned"])}{" (the clip is under 4.8 s)" if math.isnan(offsets["real"]) else ""}.</p>'
            f'<img alt="log-mel spectrograms of {html.escape(clip_id)}" src="{_link(f"images/{clip_id}_mel.png")}"></div>')
    run = folder.parent
    curves = ('<img alt="training curves" src="images/curves.png">' if _curves(staging / "images" / "curves.png", run,
                                                                              result.checkpoints)
              else '<p class="note">No metrics.jsonl in the run folder.</p>')
    sampling = result.sampling
    page = PAGE.format(
        title=html.escape(str(run)), verdict=html.escape(result.verdict()), basis=html.escape(result.basis()),
        variant=html.escape(result.variant), held_out=html.escape(result.held_out),
        sampling=f"{sampling['steps']} Euler steps, CFG {sampling['cfg_strength']:g}, seeds from {sampling['seed']}",
        metrics=_metric_rows(result), scales=_scale_rows(result), curves=curves,
        checkpoints=_checkpoint_rows(result), clips="\n".join(sections))
    (staging / "index.html").write_text(page, encoding="utf-8")
    replace_folder(staging, folder)
    return folder / "index.html"
