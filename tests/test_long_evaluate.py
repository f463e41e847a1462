"""evaluate --long: whole held-out commercials judged per window and at the seams."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from helpers import audio_samples
from mmaudio_lora.cli import app

runner = CliRunner()


def test_evaluate_long_judges_whole_held_out_commercials(tmp_path):
    """The clip list names the commercials the segments were cut from: evaluate --long voices the
    held-out ones whole with the base model and the fine-tune, scores DeSync and KL_PaSST per window
    and the seams (beside the real track's), tests over sources; without the files it names them."""
    from precompute.demo_clips import ClipSpec, write_clip
    from precompute.run import FeatureJob, run_features
    from shared.runtime import Runtime
    from train.config import TrainConfig
    from train.loop import train

    originals = tmp_path / "originals"
    lines = ["video_path\tstart_time\tend_time\tcaption\toriginal_video\toriginal_start_time\toriginal_end_time"]
    for n in range(3):
        write_clip(originals / f"ad{n}.mp4", ClipSpec(10.0, width=64, height=48, seed=n, tone_hz=300 + 200 * n))
        for start, end in ((0.0, 4.0), (5.0, 9.0)):
            lines.append(f"ad{n}.mp4\t{start}\t{end}\tad {n}\tad{n}.mp4\t{start}\t{end}")
    tsv = tmp_path / "segmented_clips.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    features = tmp_path / "features"
    run_features(FeatureJob(tsv=tsv, video_root=originals, out=features, runtime=Runtime(mode="16k", profile="tiny"),
                            workers=0), show_progress=False)
    run = tmp_path / "run"
    train(TrainConfig(features=[str(features)], run=str(run), profile="tiny", steps=2, batch_size=2, device="cpu",
                      val_fraction=0.3, val_every=2, lr=1e-2, warmup_steps=1), show_progress=False)
    result = runner.invoke(app, ["evaluate", "--run", str(run), "--long", "--tsv", str(tsv), "--video-root",
                                 str(originals), "--steps", "1", "--seeds", "1"])
    assert result.exit_code == 0, result.output
    numbers = json.loads((run / "long_evaluation.json").read_text())
    held = sorted(numbers["tracks"])
    assert held and all(numbers["tracks"][name]["windows"] == 2 for name in held)
    for metric in ("desync", "kl_passt", "seam"):
        assert set(numbers["per_source"][metric]) == set(held) and metric in numbers["metrics"]
    assert "real" in numbers["per_source"]["seam"][held[0]] and numbers["verdict"] in result.output
    audio = run / "long_evaluation"
    assert audio_samples(audio / f"{Path(held[0]).stem}_tuned.wav") == 10 * 16000
    assert (audio / f"{Path(held[0]).stem}_base.wav").read_bytes() != (audio / f"{Path(held[0]).stem}_tuned.wav"
                                                                       ).read_bytes()  # two models, not one
    (originals / held[0]).rename(tmp_path / "elsewhere.mp4")
    missing = runner.invoke(app, ["evaluate", "--run", str(run), "--long", "--tsv", str(tsv), "--video-root",
                                  str(originals), "--steps", "1", "--seeds", "1", "--out", str(tmp_path / "again.json")])
    assert missing.exit_code == 1 and f"missing: {originals / held[0]}" in missing.output
