"""The offline demo: synthetic clips → features → LoRA training → generated audio → evaluation
report, with the tiny profile.

Needs no weights and no GPU. It runs the same code as the real pipeline, only with small
deterministic models, so it shows the whole flow in a few minutes on two CPU cores.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_CLIPS = [  # (duration, tone) per clip: short ones are padded to the 8 s window
    (2.0, 330.0), (3.5, 440.0), (5.3, 550.0), (8.0, 660.0), (4.2, 770.0), (6.7, 880.0), (2.8, 990.0),
    (7.5, 500.0), (4.8, 600.0), (3.0, 700.0), (6.0, 800.0), (5.0, 900.0),
]
SCENES = 8  # source videos: clip i is a segment of scene i % 8 (its title folder)
COMMERCIAL_SEC = 20.0  # a whole new commercial, longer than the window: voiced by continued windows
# The demo's training settings, as a file a user can read and pass on (crossval --config).
DEMO_CONFIG = """\
# The offline demo's training settings (tiny profile, CPU): `mmaudio-lora train --config` takes any
# field of train/config.py.
profile = "tiny"
device = "cpu"
steps = 200
batch_size = 4
lr = 1e-3
warmup_steps = 20
val_fraction = 0.2  # holds out 2 of the 8 scenes
val_every = 50
checkpoint_every = 100
"""


@dataclass
class DemoResult:
    tsv: Path
    features: Path
    run: Path
    feature_summary: object
    train_result: object
    generated: list[Path]  # the wav and mp4 of one demo clip, made with the trained adapter
    commercial: list[Path]  # the wav and mp4 of a 20 s commercial, voiced by continued windows
    evaluation: object  # base against tuned on the validation clips
    report: Path  # RUN/evaluation/index.html


def write_demo_clips(root: Path) -> Path:
    """The synthetic dataset in the user's layout: title folders (the source videos) and a segment TSV."""
    from precompute.demo_clips import ClipSpec, write_clip

    lines = ["video_path\tstart_time\tend_time\tcaption"]
    for index, (duration, tone) in enumerate(DEMO_CLIPS):
        relative = f"scene{index % SCENES}/clip{index}.mp4"
        path = root / "segmented_videos" / relative
        if not path.exists():
            write_clip(path, ClipSpec(duration, width=96, height=64, tone_hz=tone, seed=index))
        lines.append(f"{relative}\t0\t{duration}\ta flashing square beeps at {tone:.0f} Hz")
    tsv = root / "segmented_clips.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    commercial = root / "new_commercial" / "commercial.mp4"
    if not commercial.exists():
        write_clip(commercial, ClipSpec(COMMERCIAL_SEC, width=96, height=64, tone_hz=550.0, seed=99))
    return tsv


def run_demo(root: Path = Path("data/demo"), steps: int = 200, seeds: int = 3, sampling_steps: int = 10) -> DemoResult:
    """The whole flow on generated clips; `seeds`: the evaluation's seeds per clip and model;
    `sampling_steps`: Euler steps of the evaluation and of the long commercial. The training
    settings are written to ROOT/train.toml (a cross-validation of the demo reads them)."""
    from evaluate.held_out import evaluate
    from generate.model import resolve_source
    from generate.run import GenerateJob, generate
    from precompute.run import FeatureJob, run_features
    from shared.outputs import atomic_write_text, claim_output_folder
    from shared.runtime import Runtime
    from shared.synthesis import SamplingSettings
    from train.config import TrainConfig, read_toml
    from train.loop import train

    root = claim_output_folder(root, "demo")  # new, empty or an earlier demo's: never the user's data/
    tsv = write_demo_clips(root)
    features = root / "features"
    summary = run_features(FeatureJob(tsv=tsv, video_root=root / "segmented_videos", out=features,
                                      runtime=Runtime(mode="16k", profile="tiny", device="cpu"), workers=0,
                                      batch_size=4))
    atomic_write_text(root / "train.toml", DEMO_CONFIG)
    config = TrainConfig(features=[str(features)], run=str(root / "run"), steps=steps).updated(
        {k: v for k, v in read_toml(root / "train.toml").items() if k != "steps"}, str(root / "train.toml"))
    result = train(config, overwrite=True)  # the demo's own run: a rerun starts it afresh
    source = resolve_source(run=Path(config.run), device="cpu")
    generated = generate(GenerateJob(out=root / "generated", source=source,
                                     videos=[root / "segmented_videos" / "scene1/clip1.mp4"]))
    commercial = generate(GenerateJob(out=root / "generated_commercial", source=source,
                                      videos=[root / "new_commercial" / "commercial.mp4"],
                                      sampling=SamplingSettings(steps=sampling_steps)))
    evaluation = evaluate(Path(config.run), resolve_source(run=Path(config.run), device="cpu"),
                          sampling=SamplingSettings(steps=sampling_steps), lora_scales=(0.5, 1.0), seeds=seeds)
    return DemoResult(tsv, features, Path(config.run), summary, result, generated.written, commercial.written,
                      evaluation, Path(config.run) / "evaluation" / "index.html")
