"""Generation cost: why the adapter is merged before sampling, and what batching buys.

Times Euler sampling (CFG, so two network passes a step) with the base network, with the adapter
left as peft layers, and with the adapter merged; then batch B against batch 1 per clip, and the
decoders' share. One run, one machine; read the ratios.

    .venv/bin/python bench/generate.py                               # tiny network, CPU
    .venv/bin/python bench/generate.py --variant large_44k_v2        # real size (filled weights), GPU if present
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

# This file is named like the package it measures: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from shared.lora import add_lora, lora_config
from shared.models.network import build_network
from shared.profiles import fill_deterministically, network_config
from shared.runtime import Runtime
from shared.synthesis import AudioDecoder, SamplingSettings, sample_latents
from train.config import DEFAULT_TARGETS


def _profile(variant: str) -> tuple[str, str]:
    return ("small_16k", "tiny") if variant == "tiny" else (variant, "real")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(runtime: Runtime, network, batch: int, settings: SamplingSettings, repeats: int) -> float:
    """Seconds per call of sample_latents for `batch` clips (after one warm-up call)."""
    config = network.config
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(batch, config.clip_seq_len, config.clip_dim, generator=g)
    sync = torch.randn(batch, config.sync_seq_len, config.sync_dim, generator=g)
    text = torch.randn(batch, config.text_seq_len, config.text_dim, generator=g)
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        sample_latents(runtime, network, clip, sync, text, settings)
        _synchronize(runtime.torch_device)
        if repeat:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", help="tiny, or an official variant name")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="Euler steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    variant, profile = _profile(args.variant)
    runtime = Runtime(variant=variant, profile=profile, device=args.device)
    device = runtime.torch_device
    settings = SamplingSettings(steps=args.steps)

    base = fill_deterministically(build_network(None, **asdict(network_config(variant, profile)))).eval()
    lora = add_lora(copy.deepcopy(base), lora_config(16, 16, 0.0, DEFAULT_TARGETS))
    for name, parameter in lora.named_parameters():  # peft starts B at zero; make the adapter real
        if "lora_B" in name:
            parameter.data.normal_(0, 0.01)
    unmerged = lora.base_model.model
    merged = copy.deepcopy(lora).merge_and_unload()

    timings = {}
    for name, network in (("base", base), ("peft layers", unmerged), ("merged", merged)):
        network.to(device)
        timings[name] = time_sampling(runtime, network, 1, settings, args.repeats)
        network.to("cpu")
    merged.to(device)
    batched = time_sampling(runtime, merged, args.batch_size, settings, args.repeats) / args.batch_size

    decoder = AudioDecoder(runtime)
    latents = torch.randn(args.batch_size, merged.latent_seq_len, merged.config.latent_dim)
    decoder.waveform(latents)  # loads and warms up
    start = time.perf_counter()
    decoder.waveform(latents)
    _synchronize(device)
    decoding = (time.perf_counter() - start) / args.batch_size

    print(f"variant {args.variant}, {args.steps} Euler steps with CFG, device {device}")
    for name, seconds in timings.items():
        print(f"{name:<12} {seconds:.3f} s/clip (batch 1)")
    print(f"peft layers / merged: {timings['peft layers'] / timings['merged']:.2f}x  "
          f"(merged / base: {timings['merged'] / timings['base']:.2f}x)")
    print(f"batch {args.batch_size}: {batched:.3f} s/clip, {timings['merged'] / batched:.2f}x the clips/s of batch 1")
    print(f"VAE decoder + vocoder: {decoding:.3f} s/clip, {decoding / (batched + decoding):.0%} of a clip's time")


if __name__ == "__main__":
    main()
