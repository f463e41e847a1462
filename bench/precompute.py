"""Precompute throughput: per-clip time by stage, the no-op rerun, clips per second.

    .venv/bin/python bench/precompute.py                      # tiny profile, generated clips, CPU
    .venv/bin/python bench/precompute.py --profile real --device cuda --tsv T --video-root V

All figures come from one run on one machine; compare them with each other, not across machines.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# This file is named like the package it measures: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from shared.clips import read_clip_list
from shared.media import load_segment
from precompute.run import FeatureJob, run_features
from precompute.synthetic import ClipSpec, write_clip


def generated_list(folder: Path, count: int) -> tuple[Path, Path]:
    videos = folder / "videos"
    lines = ["video_path\tstart_time\tend_time\tcaption"]
    for index in range(count):
        duration = 2.0 + 6.0 * index / max(count - 1, 1)
        write_clip(videos / f"clip{index}.mp4", ClipSpec(duration, width=640, height=360, seed=index))
        lines.append(f"clip{index}.mp4\t0\t{duration:.2f}\tevent {index}")
    (folder / "clips.tsv").write_text("\n".join(lines) + "\n")
    return folder / "clips.tsv", videos


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
        # Decoding split on its own, one process, so decode and resize are not hidden by workers.
        split: dict[str, float] = {}
        for clip in clips:
            load_segment(clip.video, clip.start_sec, clip.end_sec, mode=args.mode, timings=split)
        job = FeatureJob(tsv=tsv, video_root=videos, out=scratch / "out", profile=args.profile, mode=args.mode,
                         device=args.device, batch_size=args.batch_size, workers=0)
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
    for stage in ("clip frames", "synchformer", "vae", "clip text", "write", "load models"):
        print(f"{stage:<22}{summary.timings.get(stage, 0.0) / max(n, 1):>10.3f}")
    encode = sum(summary.timings.get(s, 0.0) for s in ("clip frames", "synchformer", "vae", "clip text"))
    print(f"whole run: {summary.seconds:.1f} s, {summary.clips_per_second:.2f} clips/s "
          f"(decode {split.get('decode', 0) + split.get('resize', 0):.1f} s : encode {encode:.1f} s)")
    print(f"no-op rerun: {noop_seconds:.3f} s")


if __name__ == "__main__":
    main()
