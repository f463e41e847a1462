"""The evaluation report: RUN/evaluation/index.html, a page that opens offline in any browser.

Per held-out clip: id and caption, a strip of its picture, players for the real audio (decoded
from the stored latent, as the metric sees it), the base model and the fine-tune, and the three
log-mel spectrograms on one colour scale. Then the training curves (best step marked, kept
checkpoints when evaluated), the metric table and a one-line verdict. Plots by matplotlib, audio
as wav files beside the page, no script and nothing fetched from the network.
"""
from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path

import torch

from shared.outputs import replace_folder
from shared.synthesis import AudioDecoder

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

    from shared.media import MediaError, load_video

    try:
        frames = load_video(source["video"], source.get("start_sec") or 0.0, source.get("end_sec"))
    except (MediaError, OSError) as error:
        log.warning("%s: no picture strip (%s)", source["video"], error)
        return False
    count = max(1, round(frames.duration_sec * 8))  # CLIP frames are taken at 8 fps
    picked = frames.clip_frames[[round(k * (count - 1) / max(STRIP_FRAMES - 1, 1)) for k in range(STRIP_FRAMES)]]
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


def _metric_rows(result) -> str:
    from generate.evaluate import change

    rows = []
    for name, values in (("validation flow loss", result.val_flow_loss), ("log-mel L1 to the real audio", result.mel_l1)):
        rows.append(f"<tr><td>{name}</td><td>{values['base']:.4f}</td><td>{values['tuned']:.4f}</td>"
                    f"<td>{change(values['base'], values['tuned'])}</td></tr>")
    return "\n".join(rows)


def _scale_rows(result) -> str:
    if not result.scales:
        return ""
    rows = "\n".join(f"<tr{' class=best' if float(scale) == result.lora_scale else ''}><td>{scale}</td>"
                     f"<td>{v['val_flow_loss']:.4f}</td><td>{v['mel_l1']:.4f}</td></tr>"
                     for scale, v in result.scales.items())
    return (f"<h2>Adapter strength</h2><p>Best by validation flow loss: <b>{result.lora_scale:g}</b> "
            "(the 'tuned' model everywhere on this page).</p>"
            f"<table><tr><th>scale</th><th>validation flow loss</th><th>log-mel L1</th></tr>{rows}</table>")


def _checkpoint_rows(result) -> str:
    if not result.checkpoints:
        return ""
    rows = "\n".join(f"<tr><td>{html.escape(name)}</td><td>{loss:.4f}</td></tr>" for name, loss in result.checkpoints.items())
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
.clip {{ border-top: 1px solid #ddd; padding: 1em 0; }}
.players {{ display: flex; gap: 2em; flex-wrap: wrap; }}
.players div {{ display: flex; flex-direction: column; }}
.note {{ color: #777; font-style: italic; }}
</style></head><body>
<h1>Base model against the fine-tune</h1>
<p><b>{verdict}</b></p>
<p>{variant}; {count} held-out clip(s) from {held_out}; {sampling}.</p>
<table><tr><th>metric (lower is better)</th><th>base</th><th>tuned</th><th>change</th></tr>
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


def write_report(folder: Path, result, real: dict[str, torch.Tensor], generated: dict[str, dict],
                 decoder: AudioDecoder, sources: dict[str, dict], captions: dict[str, str]) -> Path:
    """Write the report folder (replaced whole, atomically) and return its index.html.

    `sources`: where each clip came from (video, start_sec, end_sec), when its folder records it."""
    from shared.media import write_wav

    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp")
    for sub in ("audio", "images"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    rate, hop = decoder.sampling_rate, decoder.runtime.sequence().hop_length
    sections = []
    for clip_id in result.clips:
        mels = {"real (stored latent)": real[clip_id], "base": generated["base"][clip_id].mel,
                "tuned": generated["tuned"][clip_id].mel}
        players = []
        for (label, mel), key in zip(mels.items(), ("real", "base", "tuned")):
            audio = decoder.vocode(mel[None])[0]
            write_wav(staging / "audio" / f"{clip_id}_{key}.wav", audio, rate)
            players.append(f'<div><span>{label}</span><audio controls preload="none" '
                           f'src="audio/{html.escape(clip_id)}_{key}.wav"></audio></div>')
        _spectrograms(staging / "images" / f"{clip_id}_mel.png", mels, rate, hop)
        source = sources.get(clip_id)
        if source is not None and _strip(staging / "images" / f"{clip_id}_frames.png", source):
            picture = f'<img alt="frames of {html.escape(clip_id)}" src="images/{html.escape(clip_id)}_frames.png">'
        else:
            picture = '<p class="note">No picture: the feature folder does not point to a readable source video.</p>'
        distances = result.per_clip_mel_l1[clip_id]
        sections.append(
            f'<div class="clip"><h3>{html.escape(clip_id)}</h3><p>{html.escape(captions.get(clip_id, ""))}</p>'
            f"{picture}<div class=players>{''.join(players)}</div>"
            f'<p>log-mel L1: base {distances["base"]:.4f}, tuned {distances["tuned"]:.4f}</p>'
            f'<img alt="log-mel spectrograms of {html.escape(clip_id)}" src="images/{html.escape(clip_id)}_mel.png"></div>')
    run = folder.parent
    curves = ('<img alt="training curves" src="images/curves.png">' if _curves(staging / "images" / "curves.png", run,
                                                                              result.checkpoints)
              else '<p class="note">No metrics.jsonl in the run folder.</p>')
    sampling = result.sampling
    page = PAGE.format(
        title=html.escape(str(run)), verdict=html.escape(result.verdict()), variant=html.escape(result.variant),
        count=len(result.clips), held_out=html.escape(result.held_out),
        sampling=f"{sampling['steps']} Euler steps, CFG {sampling['cfg_strength']:g}, seed {sampling['seed']}",
        metrics=_metric_rows(result), scales=_scale_rows(result), curves=curves,
        checkpoints=_checkpoint_rows(result), clips="\n".join(sections))
    (staging / "index.html").write_text(page, encoding="utf-8")
    replace_folder(staging, folder)
    return folder / "index.html"
