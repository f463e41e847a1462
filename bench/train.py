"""Training cost: LoRA against full fine-tuning of the same network and batch, and the loader's
speed against what a step consumes. One run, one machine; read the ratios.

    .venv/bin/python bench/train.py                         # tiny network, CPU
    .venv/bin/python bench/train.py --variant small_16k     # real size (filled weights), GPU if present
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

# This file is named like the package it measures: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from shared.device import resolve_device
from shared.network import build_network
from shared.profiles import fill_deterministically, network_config
from shared.sequence import SequenceConfig
from train.config import DEFAULT_TARGETS
from shared.features import FeatureSet
from shared.lora import add_lora, count_parameters, lora_config
from train.objective import training_loss


def _config(variant: str):
    return network_config("small_16k", "tiny") if variant == "tiny" else network_config(variant, "real")


def synthetic_features(count: int, net, seq: SequenceConfig) -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    tensors = {"a_mean": torch.randn(count, seq.latent_seq_len, net.latent_dim, generator=g),
               "a_std": torch.rand(count, seq.latent_seq_len, net.latent_dim, generator=g) * 0.1,
               "clip_features": torch.randn(count, seq.clip_seq_len, net.clip_dim, generator=g),
               "sync_features": torch.randn(count, seq.sync_seq_len, net.sync_dim, generator=g),
               "text_features": torch.randn(count, 77, net.text_dim, generator=g),
               "duration_sec": torch.full((count,), 8.0)}
    return FeatureSet([str(i) for i in range(count)], tensors)


def measure(lora: bool, args, device, data: FeatureSet, seq) -> tuple[float, float, int]:
    network = fill_deterministically(build_network(None, **asdict(_config(args.variant)))).to(device)
    model = add_lora(network, lora_config(16, 16, 0.0, DEFAULT_TARGETS)) if lora else network
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):
        batch = {k: v.to(device) for k, v in data.batch(list(range(args.batch_size))).items()}
        start = time.perf_counter()
        with autocast:
            loss = training_loss(network, batch, seq, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**30
    else:  # weights + gradients + two AdamW moments of what trains, in GiB
        memory = (sum(p.numel() for p in model.parameters()) + 3 * sum(p.numel() for p in parameters)) * 4 / 2**30
    return sum(times) / len(times), memory, count_parameters(model)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", help="tiny, or an official variant name")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    net = _config(args.variant)
    seq = SequenceConfig(net.mode)
    data = synthetic_features(64, net, seq)

    start, batches = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        data.batch(torch.randint(0, len(data), (args.batch_size,)))
        batches += 1
    loader_rate = batches * args.batch_size / (time.perf_counter() - start)

    lora_time, lora_memory, lora_params = measure(True, args, device, data, seq)
    full_time, full_memory, full_params = measure(False, args, device, data, seq)
    memory_note = "peak allocated" if device.type == "cuda" else "weights+grads+AdamW state"
    print(f"variant {args.variant}, batch {args.batch_size}, device {device}")
    print(f"LoRA: {lora_time * 1000:.0f} ms/step, {lora_memory:.2f} GiB ({memory_note}), {lora_params:,} trained")
    print(f"full: {full_time * 1000:.0f} ms/step, {full_memory:.2f} GiB, {full_params:,} trained")
    print(f"LoRA/full: step time {lora_time / full_time:.2f}x, memory {lora_memory / full_memory:.2f}x")
    consumed = args.batch_size / lora_time
    print(f"loader {loader_rate:.0f} samples/s vs {consumed:.1f} samples/s consumed by a LoRA step "
          f"({loader_rate / consumed:.0f}x headroom)")


if __name__ == "__main__":
    main()
