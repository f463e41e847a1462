"""Seams of continued windows, measured where the truth is known, and the cost of long audio.

1. A reference flow whose data distribution is known: per channel, a Gaussian process over latent
   frames (squared-exponential kernel, length scale 10 frames, jitter 1e-4). For noise x0 ~ N(0, I)
   and Sigma = U diag(l) U^T its exact flow-matching velocity is
   v(x, t) = U diag((t l - (1 - t)) / ((1 - t)^2 + t^2 l)) U^T x. Two windows of 250 frames (8 s at
   16k) with an overlap of 62 frames (2 s) are joined by each method; the join statistic whitens
   the joined sequence from 16 frames before the overlap to 16 after it with that region's GP
   covariance (z = L^-1 x) and takes mean(z^2): about 1 for one exact long draw, far more for a
   jump, less for a blur. Median and range over 12 seeds, for the methods of the issue and the
   sweep (Euler steps 10/25/50, length scales 5/10/20). Also, relative to the sampler itself: the
   same statistic of one long draw by the same Euler sampler (no join), which is below 1 (Euler
   under-disperses the fine directions), so "excess" = join statistic / that one says how much a
   join adds to what the sampler makes anyway.
2. The tiny profile: seconds per generated second for one window, independent windows and the
   chosen method (continued windows), the best of three alternating rounds, and the largest latent
   difference on each overlap at t = 1.

    .venv/bin/python bench/long.py [--json FILE] [--seeds 12] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from shared.models.flow import integrate  # noqa: E402

WINDOW, OVERLAP, CHANNELS, CONTEXT = 250, 62, 20, 16
LENGTH_SCALE, JITTER, STEPS = 10.0, 1e-4, 25
SWEEP = [(10, 10.0), (25, 10.0), (50, 10.0), (25, 5.0), (25, 20.0)]  # (Euler steps, length scale)


def covariance(frames: int, length_scale: float) -> torch.Tensor:
    position = torch.arange(frames, dtype=torch.float64)
    return torch.exp(-0.5 * ((position[:, None] - position[None]) / length_scale) ** 2) + JITTER * torch.eye(
        frames, dtype=torch.float64)


class GaussianProcessFlow:
    """The exact flow-matching velocity towards a Gaussian process over `frames` latent frames."""

    def __init__(self, frames: int, length_scale: float):
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(covariance(frames, length_scale))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # x (B, frames, C)
        t = float(t)
        scale = (t * self.eigenvalues - (1 - t)) / ((1 - t) ** 2 + t ** 2 * self.eigenvalues)
        return self.eigenvectors @ (scale[:, None] * (self.eigenvectors.T @ x))


def join_statistic(joined: torch.Tensor, overlap_start: int, length_scale: float) -> float:
    """mean(z^2) of the whitened frames from CONTEXT before the overlap to CONTEXT after it."""
    first, last = overlap_start - CONTEXT, overlap_start + OVERLAP + CONTEXT
    region = joined[0, first:last]
    z = torch.linalg.solve_triangular(torch.linalg.cholesky(covariance(last - first, length_scale)), region,
                                      upper=False)
    return float((z ** 2).mean())


def _held_path(flow, noise: torch.Tensor, steps: int, known: torch.Tensor, passes: int,
               generator: torch.Generator) -> torch.Tensor:
    """The alternatives to the chosen method: the overlap set on the straight path from the step's
    noise to `known` before every step, with `passes` resampling passes per step (step forward,
    re-noise back to t along the path)."""
    times = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    x, held = noise.clone(), known.shape[1]
    for t_now, t_next in zip(times[:-1], times[1:]):
        for attempt in range(passes + 1):
            x[:, :held] = (1 - t_now) * noise[:, :held] + t_now * known
            ahead = x + (t_next - t_now) * flow(x, t_now)
            if attempt == passes:
                x = ahead
            else:  # back from t_next to t_now: keep the marginal of the straight path
                spread = ((1 - t_now) ** 2 - (t_now * (1 - t_next) / t_next) ** 2).clamp(min=0).sqrt()
                x = t_now / t_next * ahead + spread * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    x[:, :held] = known
    return x


def join(method: str, seed: int, steps: int, length_scale: float) -> float:
    """The join statistic of two windows joined by `method`."""
    generator = torch.Generator().manual_seed(seed)

    def noise(frames: int) -> torch.Tensor:
        return torch.randn((1, frames, CHANNELS), generator=generator, dtype=torch.float64)

    total = 2 * WINDOW - OVERLAP
    if method == "one_draw":  # an exact long draw: the statistic's reference
        return join_statistic(torch.linalg.cholesky(covariance(total, length_scale)) @ noise(total),
                              WINDOW - OVERLAP, length_scale)
    if method == "one_euler_draw":  # a long draw by the same sampler, no join
        return join_statistic(integrate(GaussianProcessFlow(total, length_scale), noise(total), steps),
                              WINDOW - OVERLAP, length_scale)
    flow = GaussianProcessFlow(WINDOW, length_scale)
    first_noise = noise(WINDOW)
    first = integrate(flow, first_noise, steps)
    known = first[:, WINDOW - OVERLAP:]
    second_noise = noise(WINDOW)
    if method == "independent":
        second = integrate(flow, second_noise, steps)
        return join_statistic(torch.cat([first, second[:, OVERLAP:]], 1), WINDOW - OVERLAP, length_scale)
    if method == "crossfade":
        second = integrate(flow, second_noise, steps)
        fade = torch.linspace(0, 1, OVERLAP, dtype=torch.float64)[None, :, None]
        middle = (1 - fade) * known + fade * second[:, :OVERLAP]
        return join_statistic(torch.cat([first[:, :WINDOW - OVERLAP], middle, second[:, OVERLAP:]], 1),
                              WINDOW - OVERLAP, length_scale)
    if method in ("straight_path", "straight_path_resampled"):
        second = _held_path(flow, second_noise, steps, known, 3 if method.endswith("resampled") else 0, generator)
    elif method == "endpoint":
        second = integrate(flow, second_noise, steps, known)
    elif method == "continued":  # the chosen method: endpoint replacement, the overlap from its own noise
        second_noise[:, :OVERLAP] = first_noise[:, WINDOW - OVERLAP:]
        second = integrate(flow, second_noise, steps, known)
    else:
        raise ValueError(method)
    return join_statistic(torch.cat([first, second[:, OVERLAP:]], 1), WINDOW - OVERLAP, length_scale)


NETWORK_CALLS = {"one_draw": "-", "one_euler_draw": "1x", "independent": "1x", "crossfade": "1x",
                 "straight_path": "1x", "straight_path_resampled": "4x", "endpoint": "1x", "continued": "1x"}
TABLE = ("one_draw", "independent", "crossfade", "straight_path", "straight_path_resampled", "endpoint", "continued")


def summary(values: list[float]) -> dict:
    return {"join_stat_median": statistics.median(values), "join_stat_range": [min(values), max(values)]}


def gaussian_process(seeds: int, sweep_too: bool = True) -> dict:
    table = {method: summary([join(method, seed, STEPS, LENGTH_SCALE) for seed in range(seeds)]) for method in TABLE}
    sweep = {}
    for steps, length_scale in SWEEP if sweep_too else ():
        reference = statistics.median(join("one_euler_draw", seed, steps, length_scale) for seed in range(seeds))
        for method in ("endpoint", "continued", "independent", "crossfade"):
            values = summary([join(method, seed, steps, length_scale) for seed in range(seeds)])
            values["excess_over_one_euler_draw"] = values["join_stat_median"] / reference
            sweep[f"{method} steps={steps} length_scale={length_scale:g}"] = values
        sweep[f"one_euler_draw steps={steps} length_scale={length_scale:g}"] = {"join_stat_median": reference}
    return {**table, "sweep": sweep}


def tiny_profile(quick: bool) -> dict:
    """Seconds per generated second on the tiny profile (this machine's CPU): one 8 s window, the
    same long track as independent windows (each from its own noise, joined where the next one
    starts), and as continued windows; the overlap's largest latent difference at t = 1."""
    from generate.long import LongSettings, decode_track, overlap_frames, plan_windows, voice_windows
    from generate.model import ModelSource
    from shared.runtime import Runtime
    from shared.synthesis import AudioDecoder, SamplingSettings, sample_normalized, use_duration

    runtime = Runtime(mode="16k", profile="tiny", device="cpu")
    network = ModelSource(runtime).load()
    decoder = AudioDecoder(runtime)
    text = runtime.clip().encode_text(["a steady hum"]).float()
    seconds = 12.0 if quick else 60.0
    sampling = SamplingSettings(steps=2 if quick else 25)
    window = runtime.sequence()

    def sample(seq, noise):
        use_duration(network, seq)
        return sample_normalized(runtime, network, network.get_empty_clip_sequence(1).detach(),
                                 network.get_empty_sync_sequence(1).detach(), text, sampling, noise).float()

    def one_window() -> None:
        decoder.waveform(network.unnormalize(sample(window, torch.randn(1, window.latent_seq_len, 20))))

    def independent() -> None:
        windows = plan_windows(seconds, window, overlap_frames(None, window))
        track = torch.zeros(1, windows[-1].start + windows[-1].frames, 20)
        for w in windows:  # each window from its own noise; a later one overwrites the overlap
            track[:, w.start:w.start + w.frames] = sample(runtime.sequence(w.seconds), torch.randn(1, w.frames, 20))
        decode_track(decoder, network.unnormalize(track), window.latent_seq_len)

    continued = {}

    def continued_windows() -> None:
        continued["track"] = voice_windows(runtime, network, decoder, None, text, seconds, sampling, LongSettings())

    one_window()  # warm-up: the first call of a network pays for its allocations
    best = {}
    for _ in range(1 if quick else 3):  # the best of alternating rounds: the machine's noise is one-sided
        for name, function, length in (("single", one_window, window.window_sec),
                                        ("independent", independent, seconds), ("continued", continued_windows, seconds)):
            started = time.perf_counter()
            function()
            best[name] = min(best.get(name, math.inf), (time.perf_counter() - started) / length)
    results = {name: {"seconds_per_generated_second": value} for name, value in best.items()}
    results["continued"].update(overlap_max_abs=continued["track"].overlap_max_abs,
                                windows=len(continued["track"].windows))
    network.update_seq_lengths(window.latent_seq_len, window.clip_seq_len, window.sync_seq_len)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="no sweep; a 12 s track at 2 steps on the tiny profile")
    parser.add_argument("--skip-tiny", action="store_true", help="the Gaussian-process part only")
    args = parser.parse_args()
    gp = gaussian_process(args.seeds, sweep_too=not args.quick)
    print(f"Gaussian-process flow, {args.seeds} seeds, windows of {WINDOW} frames, overlap {OVERLAP}, {STEPS} "
          "Euler steps: join statistic median [range] (1 = one exact long draw)")
    for method in TABLE:
        values = gp[method]
        low, high = values["join_stat_range"]
        print(f"  {method:<25} {NETWORK_CALLS[method]:>3}  {values['join_stat_median']:7.2f} [{low:.2f}, {high:.2f}]")
    print("sweep (median [range]; excess = over one long Euler draw of the same steps, 1 = no trace of a join):")
    for name, values in gp["sweep"].items():
        if "join_stat_range" in values:
            low, high = values["join_stat_range"]
            print(f"  {name:<42} {values['join_stat_median']:7.2f} [{low:.2f}, {high:.2f}]  excess "
                  f"{values['excess_over_one_euler_draw']:.1f}")
        else:
            print(f"  {name:<42} {values['join_stat_median']:7.2f}")
    result = {"gp": {"one_draw": gp["one_draw"], "independent": gp["independent"], "crossfade": gp["crossfade"],
                     "continued": gp["continued"], "straight_path": gp["straight_path"],
                     "straight_path_resampled": gp["straight_path_resampled"], "endpoint": gp["endpoint"],
                     "sweep": gp["sweep"]}}
    if not args.skip_tiny:
        result["tiny"] = tiny_profile(args.quick)
        print("tiny profile (CPU): seconds per generated second")
        for name, values in result["tiny"].items():
            extra = f", overlap max |difference| {values['overlap_max_abs']:.2g}" if "overlap_max_abs" in values else ""
            print(f"  {name:<12} {values['seconds_per_generated_second']:.3f}{extra}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
