"""Precompute throughput: our frame loader against a reference-style reader and bare decoding,
per-clip time by stage, the no-op rerun, clips per second.

    .venv/bin/python bench/precompute.py                      # tiny profile, generated clips, CPU
    .venv/bin/python bench/precompute.py --profile real --device cuda --tsv T --video-root V

The loader comparison reads the example clips (../shared/data/example_videos, 720p) when present,
else the generated ones: medians of 3 runs of each reader on the same files, in one process.

All figures come from one run on one machine; compare them with each other, not across machines.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the package it measures: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from shared.clip_list import read_clip_list
from shared.media import load_segment, load_video
from precompute.run import ENCODER_STAGES, FeatureJob, run_features
from shared.runtime import Runtime
from precompute.demo_clips import ClipSpec, write_clip


def generated_list(folder: Path, count: int) -> tuple[Path, Path]:
    videos = folder / "videos"
    lines = ["video_path\tstart_time\tend_time\tcaption"]
    for index in range(count):
        duration = 2.0 + 6.0 * index / max(count - 1, 1)
        write_clip(videos / f"clip{index}.mp4", ClipSpec(duration, width=640, height=360, seed=index))
        lines.append(f"clip{index}.mp4\t0\t{duration:.2f}\tevent {index}")
    (folder / "clips.tsv").write_text("\n".join(lines) + "\n")
    return folder / "clips.tsv", videos


def reference_style_frames(path: Path, seconds: float = 8.0):
    """MMAudio's way, written here to compare with: PyAV decodes, frames picked at 8 and 25 fps
    (the first frame at or after each target time), then torchvision v2 bicubic transforms on uint8."""
    import av
    import numpy as np
    import torch
    from torchvision.transforms import v2

    picked = {8.0: [], 25.0: []}
    targets = {8.0: 0.0, 25.0: 0.0}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.time is None or frame.time > seconds:
                break
            image = None
            for fps in picked:
                while frame.time >= targets[fps] and len(picked[fps]) < int(seconds * fps):
                    image = frame.to_ndarray(format="rgb24") if image is None else image
                    picked[fps].append(image)
                    targets[fps] += 1.0 / fps
    clip = v2.Compose([v2.Resize((384, 384), interpolation=v2.InterpolationMode.BICUBIC), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True)])
    sync = v2.Compose([v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])
    as_tensor = lambda images: torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # noqa: E731
    return clip(as_tensor(picked[8.0])), sync(as_tensor(picked[25.0]))


def bare_decode(path: Path, seconds: float = 8.0) -> int:
    """Every frame of the first `seconds` to rgb24, nothing else: the floor for any reader."""
    import av

    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.time is not None and frame.time > seconds:
                break
            frame.to_ndarray(format="rgb24")
            count += 1
    return count


def compare_loaders(paths: list[Path], repeats: int = 3) -> None:
    readers = {"ours (load_video)": lambda p: load_video(p, 0.0, 8.0),
               "reference-style reader": reference_style_frames, "bare PyAV decoding": bare_decode}
    seconds = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            started = time.perf_counter()
            for path in paths:
                read(path)
            seconds[name].append((time.perf_counter() - started) / len(paths))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ours = medians["ours (load_video)"]
    print(f"frame loaders on {len(paths)} clip(s), median of {repeats}, s/clip:")
    for name, value in medians.items():
        print(f"  {name:<26}{value:>8.2f}   ours / this = {ours / value:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--mode", default="16k")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clips", type=int, default=8, help="generated clips when no --tsv is given")
    parser.add_argument("--tsv", type=Path)
    parser.add_argument("--video-root", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tsv, videos = (args.tsv, args.video_root) if args.tsv else generated_list(scratch, args.clips)
        clips = read_clip_list(tsv, videos)
        examples = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "example_videos").glob("*.mp4"))
        compare_loaders(examples or sorted({clip.video for clip in clips})[:4])
        # Decoding split on its own, one process, so decode and resize are not hidden by workers.
        split: dict[str, float] = {}
        for clip in clips:
            load_segment(clip.video, clip.start_sec, clip.end_sec, mode=args.mode, timings=split)
        job = FeatureJob(tsv=tsv, video_root=videos, out=scratch / "out",
                         runtime=Runtime(mode=args.mode, profile=args.profile, device=args.device),
                         batch_size=args.batch_size, workers=0)
        summary = run_features(job, show_progress=False)
        started = time.perf_counter()
        noop = run_features(job, show_progress=False)
        noop_seconds = time.perf_counter() - started
        assert noop.up_to_date

    n = summary.encoded_media
    print(f"profile {args.profile}, mode {args.mode}, device {args.device}, {n} clips")
    print(f"{'stage':<22}{'s/clip':>10}")
    for stage in ("decode", "resize"):
        print(f"{stage:<22}{split.get(stage, 0.0) / len(clips):>10.3f}")
    for stage in (*ENCODER_STAGES, "write", "load models"):
        print(f"{stage:<22}{summary.timings.get(stage, 0.0) / max(n, 1):>10.3f}")
    print(f"whole run: {summary.seconds:.1f} s, {summary.clips_per_second:.2f} clips/s "
          f"(decode {split.get('decode', 0) + split.get('resize', 0):.1f} s : encode {summary.encoding_seconds:.1f} s)")
    print(f"no-op rerun: {noop_seconds:.3f} s")


if __name__ == "__main__":
    main()
