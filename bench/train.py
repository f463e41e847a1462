"""Training cost: LoRA against full fine-tuning of the same network and batch, the loader's speed
against what a step consumes, contiguous q/k/v against the strided v the attention used to get,
length buckets against the fixed 8 s window on clips of 2-8 s, and peak memory with and without
gradient checkpointing. One run, one machine; read the ratios.

    .venv/bin/python bench/train.py                         # tiny network, CPU
    .venv/bin/python bench/train.py --variant small_16k     # real size (filled weights), GPU if present
    .venv/bin/python bench/train.py --variant small_16k --compile --json F   # compiled blocks against eager
    PYTHONPATH=UPSTREAM:EINOPS .venv/bin/python bench/train.py --variant small_16k --upstream   # against MMAudio
"""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

# This file is named like the package it measures: keep its folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import shared.models.layers
from shared.device import mixed_precision, resolve_device
from shared.models.network import build_network
from shared.profiles import fill_deterministically, network_config
from shared.models.sequence import SequenceConfig
from train.config import DEFAULT_TARGETS
from shared.features import FeatureSet
from shared.lora import add_lora, count_parameters, lora_config
from train.buckets import bucket_lengths, epoch_plan
from train.loop import cut_to_length
from train.objective import training_loss
from shared.synthesis import use_duration


def _config(variant: str):
    return network_config("small_16k", "tiny") if variant == "tiny" else network_config(variant, "real")


def synthetic_features(count: int, net, seq: SequenceConfig, durations: torch.Tensor | None = None) -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    tensors = {"a_mean": torch.randn(count, seq.latent_seq_len, net.latent_dim, generator=g),
               "a_std": torch.rand(count, seq.latent_seq_len, net.latent_dim, generator=g) * 0.1,
               "clip_features": torch.randn(count, seq.clip_seq_len, net.clip_dim, generator=g),
               "sync_features": torch.randn(count, seq.sync_seq_len, net.sync_dim, generator=g),
               "text_features": torch.randn(count, 77, net.text_dim, generator=g),
               "duration_sec": torch.full((count,), 8.0) if durations is None else durations}
    ids = [str(i) for i in range(count)]
    return FeatureSet(ids, tensors, ids)


def optimizer_step(network, model, optimizer, batch: dict, seq: SequenceConfig, generator, device) -> float:
    """Seconds of one training step as the trainer takes it (its autocast), GPU work included."""
    start = time.perf_counter()
    with mixed_precision(device, "auto"):
        loss = training_loss(network, batch, seq, generator, forward=model)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bucket_throughput(variant: str, batch_size: int, steps: int, device) -> dict[str, float]:
    """LoRA samples/s on clips of 2-8 s (uniform): length buckets against the fixed window."""
    net = _config(variant)
    window = SequenceConfig(net.mode)
    durations = torch.empty(64).uniform_(2.0, 8.0, generator=torch.Generator().manual_seed(1))
    data = synthetic_features(64, net, window, durations)
    network = fill_deterministically(build_network(None, **asdict(net))).to(device)
    model = add_lora(network, lora_config(16, 16, 0.0, DEFAULT_TARGETS))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rates = {}
    for name, bucket_sec in (("fixed 8 s window", 0.0), ("1 s buckets", 1.0), ("0.5 s buckets", 0.5)):
        plan = epoch_plan(bucket_lengths(durations.tolist(), bucket_sec, 8.0), batch_size, seed=0, epoch=0)
        count = steps or len(plan)  # default: one whole epoch, so every bucket is represented
        generator, elapsed = torch.Generator().manual_seed(0), 0.0
        for position in range(count + 1):
            batch = plan[(position - 1) % len(plan)]  # position 0 warms up on the epoch's last batch
            seq = SequenceConfig(net.mode, batch.seconds)
            start = time.perf_counter()
            use_duration(network, seq)
            tensors = {k: v.to(device) for k, v in cut_to_length(data.batch(batch.indices), seq).items()}
            optimizer_step(network, model, optimizer, tensors, seq, generator, device)
            if position:  # the first step warms up
                elapsed += time.perf_counter() - start
        rates[name] = count * batch_size / elapsed
    use_duration(network, window)
    return rates


@contextlib.contextmanager
def strided_v():
    """The attention inputs as they were before q, k, v were made contiguous: v a view with a
    stride of 3 in its last dimension (what SDPA's fused kernels refuse)."""
    contiguous = shared.models.layers.split_heads

    def split_heads(qkv, num_heads, q_norm, k_norm, rot):
        q, k, _ = contiguous(qkv, num_heads, q_norm, k_norm, rot)
        batch, tokens, _ = qkv.shape
        return q, k, qkv.view(batch, tokens, num_heads, -1, 3).permute(4, 0, 2, 1, 3)[2]

    shared.models.layers.split_heads = split_heads
    try:
        yield
    finally:
        shared.models.layers.split_heads = contiguous


def attention_layout(variant: str, batch_size: int, steps: int, device) -> tuple[float, float]:
    """Seconds per LoRA step (forward and backward, the trainer's autocast) with the strided v of
    before and the contiguous q, k, v of now, alternating so both see the same machine load."""
    net = _config(variant)
    seq = SequenceConfig(net.mode)
    data = synthetic_features(batch_size, net, seq)
    network = fill_deterministically(build_network(None, **asdict(net))).to(device)
    model = add_lora(network, lora_config(16, 16, 0.0, DEFAULT_TARGETS))
    batch = {k: v.to(device) for k, v in data.batch(list(range(batch_size))).items()}
    autocast, times = mixed_precision(device, "auto"), {"strided": [], "contiguous": []}
    for step in range(2 * steps + 2):
        layout = "strided" if step % 2 else "contiguous"
        with strided_v() if layout == "strided" else contextlib.nullcontext():
            start = time.perf_counter()
            with autocast:
                loss = training_loss(network, batch, seq, torch.Generator().manual_seed(0), forward=model)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 2:  # one warm-up step of each
                times[layout].append(time.perf_counter() - start)
    return min(times["strided"]), min(times["contiguous"])


def compiled_against_eager(variant: str, batch_size: int, steps: int, device) -> dict[str, float]:
    """The same LoRA step (forward, backward) of the same network and batch, eager and with its
    blocks compiled (train.loop.compile_blocks, inductor), alternating after one warm-up step of
    each: best ms of each, the compiled network's first call (it compiles), and the largest
    relative difference of the loss and the LoRA gradients."""
    import copy

    from train.loop import compile_blocks

    net = _config(variant)
    seq = SequenceConfig(net.mode)
    network = fill_deterministically(build_network(None, **asdict(net))).to(device)
    eager = add_lora(network, lora_config(16, 16, 0.0, DEFAULT_TARGETS))
    for parameter in eager.parameters():  # LoRA's B starts at zero: make the gradients of A count too
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(1))
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled.base_model.model)
    batch = {k: v.to(device) for k, v in synthetic_features(batch_size, net, seq).batch(list(range(batch_size))).items()}

    def step(model) -> tuple[float, float, list[torch.Tensor]]:
        start = time.perf_counter()
        with mixed_precision(device, "auto"):
            loss = training_loss(model.base_model.model, batch, seq, torch.Generator().manual_seed(0), forward=model)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return seconds, loss.item(), grads

    compile_s, compiled_loss, compiled_grads = step(compiled)
    _, eager_loss, eager_grads = step(eager)
    difference = max([abs(compiled_loss - eager_loss) / abs(eager_loss)]
                     + [((c - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                        for c, e in zip(compiled_grads, eager_grads)])
    times = {"eager": [], "compiled": []}
    for n in range(2 * steps):
        name = "compiled" if n % 2 else "eager"
        times[name].append(step(compiled if name == "compiled" else eager)[0])
    return {"eager_ms": 1000 * min(times["eager"]), "compiled_ms": 1000 * min(times["compiled"]),
            "compile_s": compile_s, "max_rel_diff": difference}


def against_upstream(variant: str, batch_size: int, steps: int, device) -> dict[str, float]:
    """Our network against MMAudio's own (hkchengrex/MMAudio's `mmaudio` package on the path, with
    einops), the same weights and inputs, each with peft LoRA on the same modules: forward and
    backward of the velocity loss, eager, alternating after one warm-up step of each. The objective's
    extras (condition dropout, the per-frame mask) are left out on both sides: the networks are
    compared. Best ms of each and the largest relative difference of the loss."""
    from mmaudio.model.networks import get_my_mmaudio

    ours = fill_deterministically(build_network(variant)).to(device)
    upstream = get_my_mmaudio(variant).to(device)
    upstream.load_state_dict(ours.state_dict(), strict=True)
    models = {"ours": add_lora(ours, lora_config(16, 16, 0.0, DEFAULT_TARGETS)),
              "upstream": add_lora(upstream, lora_config(16, 16, 0.0, DEFAULT_TARGETS))}
    net, g = _config(variant), torch.Generator().manual_seed(0)
    seq = SequenceConfig(net.mode)
    inputs = [torch.randn(batch_size, seq.latent_seq_len, net.latent_dim, generator=g),
              torch.randn(batch_size, seq.clip_seq_len, net.clip_dim, generator=g),
              torch.randn(batch_size, seq.sync_seq_len, net.sync_dim, generator=g),
              torch.randn(batch_size, 77, net.text_dim, generator=g), torch.rand(batch_size, generator=g)]
    inputs = [x.to(device) for x in inputs]
    target = torch.randn(batch_size, seq.latent_seq_len, net.latent_dim, generator=g).to(device)
    times, losses = {"ours": [], "upstream": []}, {}
    for n in range(2 * steps + 2):
        name = "upstream" if n % 2 else "ours"
        start = time.perf_counter()
        with mixed_precision(device, "auto"):
            loss = (models[name](*inputs) - target).pow(2).mean()
        loss.backward()
        models[name].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        losses[name] = loss.item()
        if n >= 2:
            times[name].append(time.perf_counter() - start)
    return {"ours_ms": 1000 * min(times["ours"]), "upstream_ms": 1000 * min(times["upstream"]),
            "loss_rel_diff": abs(losses["ours"] - losses["upstream"]) / abs(losses["upstream"])}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_probe(variant: str, batch_size: int, checkpointing: bool) -> None:
    """In a fresh process: one LoRA step; print the peak resident memory during the step and its
    rise over the memory held before it (GiB). Linux: the peak is reset through clear_refs."""
    net = _config(variant)
    seq = SequenceConfig(net.mode)
    data = synthetic_features(batch_size, net, seq)
    network = fill_deterministically(build_network(None, **asdict(net)))
    model = add_lora(network, lora_config(16, 16, 0.0, DEFAULT_TARGETS))
    network.gradient_checkpointing = checkpointing
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    training_loss(network, data.batch(list(range(batch_size))), seq, torch.Generator().manual_seed(0),
                  forward=model).backward()
    peak = _status_kib("VmHWM")
    print(f"{peak / 2**20:.3f} {(peak - before) / 2**20:.3f}")


def peak_memory(variant: str, batch_size: int, checkpointing: bool) -> tuple[float, float]:
    """(peak RSS during a step, its rise over the memory held before the step) in GiB, each
    configuration in its own process."""
    result = subprocess.run([sys.executable, __file__, "--variant", variant, "--batch-size", str(batch_size),
                             "--memory-probe", "checkpointing" if checkpointing else "plain"],
                            capture_output=True, text=True, check=True)
    peak, growth = map(float, result.stdout.split())
    return peak, growth


def measure(lora: bool, args, device, data: FeatureSet, seq) -> tuple[float, float, int]:
    network = fill_deterministically(build_network(None, **asdict(_config(args.variant)))).to(device)
    model = add_lora(network, lora_config(16, 16, 0.0, DEFAULT_TARGETS)) if lora else network
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.steps + 1):
        batch = {k: v.to(device) for k, v in data.batch(list(range(args.batch_size))).items()}
        seconds = optimizer_step(network, model, optimizer, batch, seq, generator, device)
        if step:  # the first step warms up
            times.append(seconds)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # weights + gradients + two AdamW moments of what trains, in GiB
        memory = (sum(p.numel() for p in model.parameters()) + 3 * sum(p.numel() for p in parameters)) * 4 / 2**30
    return sum(times) / len(times), memory, count_parameters(model)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", help="tiny, or an official variant name")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--buckets-variant", default="small_16k", help="network for the bucket comparison "
                        "and the memory probe (real size, filled weights)")
    parser.add_argument("--bucket-steps", type=int, default=0, help="steps per configuration [default: one epoch]")
    parser.add_argument("--memory-probe", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help="only: eager against compiled blocks (--variant)")
    parser.add_argument("--upstream", action="store_true", help="only: our LoRA step against MMAudio's own "
                        "network (its `mmaudio` package on PYTHONPATH, with einops), side by side")
    parser.add_argument("--json", type=Path, help="with --compile: write the numbers here too")
    args = parser.parse_args()
    if args.memory_probe:
        peak_memory_probe(args.variant, args.batch_size, args.memory_probe == "checkpointing")
        return
    device = resolve_device(args.device)
    if args.upstream:
        numbers = against_upstream(args.variant, args.batch_size, args.steps, device)
        print(f"{args.variant} LoRA forward + backward, batch {args.batch_size}, {device}: ours "
              f"{numbers['ours_ms']:.0f} ms, MMAudio's {numbers['upstream_ms']:.0f} ms "
              f"({numbers['ours_ms'] / numbers['upstream_ms']:.2f}x; best of {args.steps} each, alternating); "
              f"loss relative difference {numbers['loss_rel_diff']:.1e}")
        return
    if args.compile:
        numbers = compiled_against_eager(args.variant, args.batch_size, args.steps, device)
        print(f"{args.variant} LoRA step (forward + backward), batch {args.batch_size}, {device}: eager "
              f"{numbers['eager_ms']:.0f} ms, compiled {numbers['compiled_ms']:.0f} ms "
              f"({numbers['compiled_ms'] / numbers['eager_ms']:.2f}x; best of {args.steps} each, alternating); "
              f"first compiled call {numbers['compile_s']:.1f} s; largest relative difference of the loss and "
              f"the LoRA gradients {numbers['max_rel_diff']:.1e}")
        if args.json:
            import json

            args.json.write_text(json.dumps(numbers, indent=1) + "\n")
        return
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

    strided, contiguous = attention_layout(args.buckets_variant, args.batch_size, args.steps, device)
    print(f"{args.buckets_variant} LoRA step (forward + backward), batch {args.batch_size}: strided v "
          f"{strided * 1000:.0f} ms, contiguous q/k/v {contiguous * 1000:.0f} ms ({contiguous / strided:.2f}x; "
          f"best of {args.steps} each, alternating)")

    rates = bucket_throughput(args.buckets_variant, args.batch_size, args.bucket_steps, device)
    fixed = rates.pop("fixed 8 s window")
    print(f"{args.buckets_variant} LoRA on clips of 2-8 s, batch {args.batch_size}, one epoch each: fixed window "
          f"{fixed:.2f} samples/s; " + ", ".join(f"{name} {rate:.2f} ({rate / fixed:.2f}x)"
                                                 for name, rate in rates.items()))
    if device.type == "cpu":
        plain = peak_memory(args.buckets_variant, args.batch_size, False)
        checkpointed = peak_memory(args.buckets_variant, args.batch_size, True)
        print(f"{args.buckets_variant} LoRA step, batch {args.batch_size}, peak RSS: {plain[0]:.2f} GiB without "
              f"gradient checkpointing, {checkpointed[0]:.2f} GiB with it (the step itself: {plain[1]:.2f} vs "
              f"{checkpointed[1]:.2f} GiB, {checkpointed[1] / plain[1]:.2f}x)")


if __name__ == "__main__":
    main()
