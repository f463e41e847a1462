"""The evaluation report in a real browser, strengths and checkpoints, and the adapters' model cards."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmaudio_lora.cli import app

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# Loads the report in a frame (file pages may read each other with --allow-file-access-from-files),
# waits for its images, then lists what loaded; --dump-dom prints the result.
CHECKER = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="page" src="{page}" width="1300" height="900"></iframe>
<script>
document.getElementById("page").onload = () => {{
  const page = document.getElementById("page").contentDocument;
  const images = Array.from(page.images);
  const report = () => {{
    if (!images.every(image => image.complete)) {{ setTimeout(report, 50); return; }}
    document.getElementById("result").textContent = JSON.stringify({{
      images: images.map(image => [image.getAttribute("src"), image.naturalWidth]),
      audio: Array.from(page.querySelectorAll("audio")).map(audio => audio.getAttribute("src")),
      title: page.title}});
  }};
  report();
}};
</script></body></html>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Debian's chromium is needed for the report test (.ci/run installs it: apt-get install chromium)"
    return found


def open_in_browser(page: Path, scratch: Path, screenshot: Path) -> dict:
    """What a real browser made of `page`: each image's natural width, each audio source."""
    scratch.mkdir(parents=True, exist_ok=True)
    checker = scratch / "check.html"
    checker.write_text(CHECKER.format(page=page.resolve().as_uri()))
    common = [chromium(), *BROWSER_FLAGS, f"--user-data-dir={scratch / 'profile'}"]
    dumped = subprocess.run([*common, "--allow-file-access-from-files", "--virtual-time-budget=15000", "--dump-dom",
                             checker.as_uri()], capture_output=True, text=True, timeout=600)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    result = dumped.stdout.split('<pre id="result">', 1)[1].split("</pre>", 1)[0]
    assert result != "pending", "the page did not finish loading"
    subprocess.run([*common, "--window-size=1300,2200", f"--screenshot={screenshot}", page.resolve().as_uri()],
                   capture_output=True, timeout=600, check=True)
    return json.loads(result.replace("&quot;", '"').replace("&amp;", "&"))


def decodes(path: Path) -> bool:
    import av

    with av.open(str(path)) as container:
        return sum(frame.samples for frame in container.decode(audio=0)) > 0


def test_report_opens_in_a_browser_with_every_image_and_sound(trained_run, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--run", str(trained_run), "--steps", "2", "--lora-scale", "0,1",
                                      "--checkpoints"])
    assert result.exit_code == 0, result.output
    page = trained_run / "evaluation" / "index.html"
    assert f"report: {page}" in result.output
    numbers = json.loads((trained_run / "evaluation.json").read_text())
    assert set(numbers["scales"]) == {"0", "1"} and numbers["lora_scale"] == 1.0  # the verdict's: as trained
    # strength 0 is the base model: the same loss on the same clips, noise and times
    assert numbers["scales"]["0"]["mean"]["flow_loss"] == pytest.approx(numbers["val_flow_loss"]["base"], rel=1e-5)
    best_step = json.loads((trained_run / "best" / "step.json").read_text())["step"]
    assert set(numbers["checkpoints"]) == {"step-000003", "step-000006", f"best (step {best_step})"}

    seen = open_in_browser(page, tmp_path / "browser", trained_run / "report-screenshot.png")
    images = dict(seen["images"])
    assert "images/curves.png" in images and len(images) == 1 + 2 * len(numbers["clips"])  # curves, strip + mel per clip
    assert all(width > 0 for width in images.values()), images
    assert len(seen["audio"]) == 3 * len(numbers["clips"])
    for source in seen["audio"]:
        assert decodes(page.parent / source), source
    assert (trained_run / "report-screenshot.png").stat().st_size > 10_000
    html = page.read_text()
    assert "Adapter strengths (exploratory)" in html and "Kept adapters (exploratory)" in html and "step-000003" in html
    assert "at the full window; choosing a checkpoint by it" in html  # another measure than training's curve
    assert "Too few source videos to tell" in html and "p (Holm)" in html
    assert f"It rests on {len(numbers['clips'])} clips from {numbers['sources']} source videos, 3 seeds each" in html
    assert "DeSync (s), real audio" in html and "95 % interval" in html and "KL_PaSST" in html
    assert "the kind of sound" in html and "KAD_PaSST" in html


def test_report_without_source_videos_says_so(trained_run, features, tmp_path):
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["clips"] = []  # a folder made elsewhere: no source videos recorded
    (copy / "manifest.json").write_text(json.dumps(manifest))
    held = json.loads((trained_run / "split.json").read_text())["val_ids"][0]
    result = CliRunner().invoke(app, ["evaluate", "--run", str(trained_run), "--features", str(copy), "--id", held,
                                      "--steps", "2", "--out", str(tmp_path / "numbers.json")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "numbers" / "index.html").read_text()  # beside its JSON, not the run's own report
    assert "No picture: the feature folder does not point to a readable source video." in html
    assert "_frames.png" not in html


def test_every_adapter_folder_carries_a_model_card(trained_run):
    folders = [trained_run / "adapter", trained_run / "best" / "adapter",
               *sorted((trained_run / "checkpoints").glob("step-*/adapter"))]
    assert len(folders) == 4
    for folder in folders:
        card = (folder / "README.md").read_text()
        front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
        assert "base_model: hkchengrex/MMAudio" in front and "library_name: peft" in front
        assert "license: cc-by-nc-4.0" in front and "- mmaudio" in front
        assert "small_16k" in body and "rank 16, alpha 16" in body and "CC-BY-NC 4.0" in body
        assert "training clips | 3 (" in body and "3 held out" in body
    assert "| steps | 3 trained (step 3 of 6;" in (trained_run / "checkpoints" / "step-000003" / "adapter" / "README.md").read_text()
