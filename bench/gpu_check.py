"""The prepared device check: one command that measures the CUDA path and prints one table.

    python bench/gpu_check.py                     # real sizes on CUDA (one H200: about 5 minutes)
    python bench/gpu_check.py --smoke --device cpu  # the same code at tiny sizes, in seconds

Sections (each one's failure is recorded and the others still run):
  precision   bf16-vs-float32 relative error: network (large_44k_v2), CLIP ViT-H-14-378,
              Synchformer, VAE 44k, 44k vocoder; all filled by the reference's fill.py
  weights     official-layout weight files written under the official names into a temporary
              --weights-dir (what a user downloads), filled by fill.py
  precompute  `features` after a warm-up run (models loaded, CUDA started): the example clips and
              enough generated ones that every decoding worker has a batch; steady-state clips/s,
              decode wait vs encode, peak GPU memory, and the time projected for 67 clips
  training    LoRA on large_44k_v2, batch 8, bf16: steps/s, the FLOPs of a step (forward and
              backward, counted), model FLOP utilisation against the GPU's dense bf16 peak,
              memory (allocated, reserved, the device's own figure); with gradient checkpointing;
              full fine-tuning for the ratio
  generation  one 8 s clip, 25 Euler steps with CFG: sampling and decoding seconds
  collectives all_reduce in a one-process group (NCCL on CUDA), then the trainer through DDP in a
              one-rank torchrun-style group (device_ids, set_device, NCCL barrier)
  user path   the real-profile commands as a user runs them (the CLI, in this process): features
              → train (20 steps) → generate → export, each timed
Each row is printed as soon as its section ends and the JSON (--json, default $OUT/gpu_check.json
or ./gpu_check.json) is rewritten after every section, so a run cut short keeps what it measured.
On the device machine, carry `../shared/reference/fill.py` and the example clips into the checkout
and point --reference at the folder holding fill.py (the examples are its sibling data folder).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import runpy
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

# This file sits beside others named like the packages they measure: keep its folder off the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from shared.device import full_precision, mixed_precision, resolve_device  # noqa: E402

VARIANT = "large_44k_v2"
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device name, most specific first.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
                    ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name; None for a device not in the table."""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in device_name), None)


@dataclass
class Check:
    device: torch.device
    smoke: bool
    fill: object  # the reference's fill_state_dict
    examples: list[Path]
    workdir: Path
    workers: int = 1  # decoding workers the precompute section plans for
    results: dict = field(default_factory=dict)
    table: list[tuple[str, str, str, str]] = field(default_factory=list)  # section, metric, value, goal

    @property
    def profile(self) -> str:
        return "tiny" if self.smoke else "real"

    def runtime(self, mode: str = "44k"):
        """The runtime of the user's commands on this machine: official-layout files in the workdir."""
        from shared.runtime import Runtime

        return Runtime(mode=mode, profile=self.profile, weights_dir=self.workdir / "weights", device=str(self.device))

    def row(self, section: str, metric: str, value, goal: str = "") -> None:
        """Record a result and print it at once (flushed): a run cut short has printed what it measured."""
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.table.append((section, metric, text, goal))
        self.results.setdefault(section, {})[metric] = value
        print(f"{section:<12} {metric:<48} {text:>14}  {goal}", flush=True)

    def save(self, path: Path) -> None:
        """The results so far, rewritten after every section (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        os.replace(temporary, path)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fresh_memory(self) -> None:
        """Before a measurement: what earlier sections left is freed and the peaks start anew (on
        CUDA only: the CPU reports no peaks, and a collection costs 0.3 s each time there)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def memory_rows(self, section: str, label: str, goal: str = "") -> None:
        """Peak memory since `fresh_memory`: allocated by tensors, reserved by the allocator (what a
        card must hold), and the device's own used figure (the CUDA context included)."""
        if self.device.type != "cuda":
            self.row(section, f"{label}peak GiB", "n/a (CPU)")
            return
        free, total = torch.cuda.mem_get_info(self.device)
        self.row(section, f"{label}peak allocated GiB", torch.cuda.max_memory_allocated(self.device) / 2**30)
        self.row(section, f"{label}peak reserved GiB", torch.cuda.max_memory_reserved(self.device) / 2**30, goal)
        self.row(section, f"{label}device used GiB (now)", (total - free) / 2**30)
        self.results[section].setdefault("memory_reserved_gib", {})[label.strip(": ") or section] = \
            torch.cuda.max_memory_reserved(self.device) / 2**30


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def filled(module: torch.nn.Module, fill, keep=lambda key: False) -> torch.nn.Module:
    """`module` with every tensor from fill.py, except those `keep` names (constructed filters)."""
    state = module.state_dict()
    values = fill({k: v for k, v in state.items() if not keep(k)})
    module.load_state_dict(dict(state, **values), strict=True)
    return module


def is_filter(key: str) -> bool:
    return key.endswith(".filter")  # BigVGAN's anti-aliasing filters: constructed, not learned


# -- the modules, at real or tiny size ------------------------------------------------------------------

def network(check: Check):
    from shared.models.network import build_network
    from shared.profiles import network_config

    return filled(build_network(None, **asdict(network_config(VARIANT, check.profile))), check.fill)


def vocoder_hyperparameters(check: Check) -> dict:
    from shared.models.vocoder import BIGVGAN_16K, BIGVGAN_44K
    from shared.pretrained import vocoder_hyperparameters as of_profile

    if check.smoke:
        return of_profile("44k", "tiny")
    # the official 44k generator (its shapes, no final tanh or bias), with the audio fields of its config.json
    return dict(BIGVGAN_16K, **BIGVGAN_44K, sampling_rate=44100, hop_size=512, n_fft=2048,
                win_size=2048, fmin=0, fmax=None)


def vocoder_generator(check: Check):
    """The generator in weight-norm form, as its file stores it."""
    from shared.models.vocoder import bigvgan_generator

    return filled(bigvgan_generator(vocoder_hyperparameters(check)), check.fill, keep=is_filter)


# -- sections --------------------------------------------------------------------------------------------

def precision(check: Check) -> None:
    from shared.models.sequence import SequenceConfig
    from shared.models.synchformer import encode_sync_frames
    from shared.pretrained import build_clip, build_synchformer, build_vae, vocoder_from_state_dict

    device, generator = check.device, torch.Generator().manual_seed(0)

    def compare(name: str, run, goal: str = "≤ 2e-2") -> None:
        """`run` (inputs drawn once, outside it) in float32, then inside a bf16 autocast region."""
        with torch.no_grad():
            full = run()
            with mixed_precision(device, "bf16"):
                mixed = run()
        check.row("precision", f"{name} bf16 vs fp32", relative_error(mixed, full), goal)

    def kept_float32(module, *inputs):
        """As the pipeline runs the VAE and the vocoder: float32 even inside a bf16 region."""
        with full_precision(device):
            return module(*inputs)

    net = network(check).to(device).eval()
    seq = SequenceConfig(net.config.mode)
    c = net.config
    inputs = [torch.randn(2, seq.latent_seq_len, c.latent_dim, generator=generator),
              torch.randn(2, seq.clip_seq_len, c.clip_dim, generator=generator),
              torch.randn(2, seq.sync_seq_len, c.sync_dim, generator=generator),
              torch.randn(2, 77, c.text_dim, generator=generator), torch.rand(2, generator=generator)]
    inputs = [x.to(device) for x in inputs]
    compare(f"network {VARIANT}", lambda: net(*inputs))

    clip = build_clip(check.profile)
    filled(clip.model, check.fill)
    clip = clip.to(device).eval()
    frames = torch.rand(8, 3, 384, 384, generator=generator).to(device)
    compare("CLIP frames", lambda: clip.encode_frames(frames))
    compare("CLIP text", lambda: clip.encode_text(["rain on a tin roof", "a dog barks twice"]))

    synchformer = filled(build_synchformer(check.profile), check.fill).to(device).eval()
    sync_frames = (torch.rand(1, 16, 3, 224, 224, generator=generator) * 2 - 1).to(device)
    compare("Synchformer", lambda: encode_sync_frames(synchformer, sync_frames))

    vae = filled(build_vae("44k", check.profile), check.fill).to(device).eval()
    mel = torch.randn(1, vae.config.mel_bins, 64, generator=generator).to(device)
    compare("VAE 44k encode (kept float32)", lambda: kept_float32(vae.encode, mel)[0], "0 (runs in fp32)")

    generator_module = vocoder_generator(check)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.json"
        config.write_text(json.dumps(vocoder_hyperparameters(check)))
        vocoder = vocoder_from_state_dict("44k", generator_module.state_dict(), check.profile, config).to(device)
    vocoder_mel = torch.randn(1, 128, 32, generator=generator).to(device)
    compare("vocoder 44k (kept float32)", lambda: kept_float32(vocoder, vocoder_mel), "0 (runs in fp32)")


def weights(check: Check) -> None:
    """Official-layout files under the official names, as `mmaudio-lora download` leaves them."""
    from shared.models.network import build_network
    from shared.pretrained import build_clip, build_synchformer, build_vae
    from shared.weights import CLIP_WEIGHTS, NETWORK_WEIGHTS, SYNCHFORMER_WEIGHTS, VAE_WEIGHTS, VOCODER_WEIGHTS

    if check.smoke:
        check.row("weights", "files", "none: the tiny profile builds its weights")
        return
    started, folder = time.perf_counter(), check.workdir / "weights"

    def save(weight_file, state: dict) -> None:
        path = folder / weight_file.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)

    save(NETWORK_WEIGHTS[VARIANT], filled(build_network(VARIANT), check.fill).state_dict())
    save(VAE_WEIGHTS["44k"], filled(build_vae("44k"), check.fill).state_dict())
    save(SYNCHFORMER_WEIGHTS, filled(build_synchformer("real"), check.fill).state_dict())
    save(CLIP_WEIGHTS, filled(build_clip("real").model, check.fill).state_dict())
    save(VOCODER_WEIGHTS["44k"], {"generator": vocoder_generator(check).state_dict()})
    (folder / VOCODER_WEIGHTS["44k"].relative_path.parent / "config.json").write_text(
        json.dumps(vocoder_hyperparameters(check)))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    check.row("weights", "written (GB)", size / 1e9)
    check.row("weights", "seconds", time.perf_counter() - started)


def clip_list(check: Check, name: str, generated: int) -> tuple[Path, Path]:
    """A segment list of the example clips and `generated` generated ones: a few distinct files,
    each listed under names of its own (links), so every row is a clip of its own to encode."""
    from precompute.demo_clips import ClipSpec, write_clip

    videos = check.workdir / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in check.examples:
        target = videos / path.name
        if not target.exists():
            target.symlink_to(path.resolve())
        rows.append(f"{path.name}\t0\t8\texample clip")
    size = (96, 64) if check.smoke else (640, 360)
    distinct = min(generated, 2 if check.smoke else 6)
    for index in range(distinct):
        source = videos / f"generated{index}.mp4"
        if not source.exists():
            write_clip(source, ClipSpec(8.0, width=size[0], height=size[1], seed=index))
    for index in range(generated):
        link = videos / f"{name}-{index}.mp4"
        if not link.exists():
            link.symlink_to(f"generated{index % distinct}.mp4")
        rows.append(f"{link.name}\t0\t8\tgenerated {index}")
    tsv = check.workdir / f"{name}.tsv"
    tsv.write_text("video_path\tstart_time\tend_time\tcaption\n" + "\n".join(rows) + "\n")
    return tsv, videos


def precompute(check: Check) -> None:
    """Steady state: a warm-up run loads the models and starts CUDA, then the measured run (the
    same runtime, models kept) gives every decoding worker at least one batch."""
    from precompute.decode import plan_decoding
    from precompute.run import FeatureJob, default_workers, run_features

    batch_size = 2 if check.smoke else 8
    runtime = check.runtime()
    plan = plan_decoding(default_workers(), batch_size, "44k", 8.0)
    check.workers = plan.workers
    if not check.smoke:  # the smoke form checks the code, not the speed: no warm-up to pay for
        warm_tsv, videos = clip_list(check, "warm-up", 2)
        run_features(FeatureJob(tsv=warm_tsv, video_root=videos, out=check.workdir / "features-warm-up",
                                runtime=runtime, batch_size=batch_size, allow_symlinks=True), show_progress=False)
    measured = max(plan.workers, 1) * batch_size - len(check.examples)
    tsv, videos = clip_list(check, "measured", measured)
    check.fresh_memory()
    loaded = runtime.load_seconds
    summary = run_features(FeatureJob(tsv=tsv, video_root=videos, out=check.workdir / "features-bench",
                                      runtime=runtime, batch_size=batch_size, allow_symlinks=True), show_progress=False)
    per_clip = summary.seconds / max(summary.encoded_media, 1)
    check.row("precompute", "clips measured", summary.encoded_media)
    check.results["precompute"]["examples"] = len(check.examples)  # of them, the real example clips
    check.row("precompute", "clips/s (steady state)", 1 / per_clip if per_clip else 0.0)
    check.row("precompute", "67 clips, projected s (+ model loading)", 67 * per_clip, "≤ 60")
    check.row("precompute", "model loading s (once per command)", loaded)
    check.row("precompute", "encode s", summary.encoding_seconds)
    check.row("precompute", "decode waited s", summary.timings.get("decode (waited for)", 0.0))
    check.row("precompute", "batch size / workers / prefetch", f"{batch_size} / {plan.workers} / {plan.prefetch}")
    check.memory_rows("precompute", "")


def _training_step(check: Check, state: dict, lora: bool, checkpointing: bool, steps: int,
                   batch_size: int, compiled: bool = False) -> tuple[float, float]:
    """(seconds per step, FLOPs of one step: forward and backward, counted) over `steps` steps
    after two warm-up steps (the compiled network's first one compiles it); memory rows follow
    the caller's `fresh_memory`."""
    from torch.utils.flop_counter import FlopCounterMode

    from shared.lora import add_lora, lora_config
    from shared.models.network import build_network
    from shared.profiles import network_config
    from shared.models.sequence import SequenceConfig
    from train.config import DEFAULT_TARGETS
    from train.objective import training_loss

    with torch.device("meta"):  # no time spent on a random init that the filled weights replace
        net = build_network(None, **asdict(network_config(VARIANT, check.profile)))
    net = net.to_empty(device=check.device)
    net.load_state_dict(state)
    net.update_seq_lengths(net.latent_seq_len, net.clip_seq_len, net.sync_seq_len)  # the non-persistent tables
    model = add_lora(net, lora_config(16, 16, 0.0, DEFAULT_TARGETS)) if lora else net
    net.gradient_checkpointing = checkpointing
    if compiled:
        from train.loop import compile_blocks

        compile_blocks(net)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seq, c, g = SequenceConfig(net.config.mode), net.config, torch.Generator().manual_seed(0)
    batch = {"a_mean": torch.randn(batch_size, seq.latent_seq_len, c.latent_dim, generator=g),
             "a_std": torch.rand(batch_size, seq.latent_seq_len, c.latent_dim, generator=g) * 0.1,
             "clip_features": torch.randn(batch_size, seq.clip_seq_len, c.clip_dim, generator=g),
             "sync_features": torch.randn(batch_size, seq.sync_seq_len, c.sync_dim, generator=g),
             "text_features": torch.randn(batch_size, 77, c.text_dim, generator=g),
             "duration_sec": torch.full((batch_size,), 8.0)}
    batch = {k: v.to(check.device) for k, v in batch.items()}

    def step() -> None:
        with mixed_precision(check.device):
            loss = training_loss(net, batch, seq, g, forward=model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if compiled:  # FLOPs are counted on the eager network; the first step compiles
        started = time.perf_counter()
        step()
        check.synchronize()
        check.row("training", "compiled: first step (compiles the blocks) s", time.perf_counter() - started)
        counter = None
    else:
        with FlopCounterMode(display=False) as counter:  # also the first warm-up step
            step()
    step()
    check.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    check.synchronize()
    return (time.perf_counter() - started) / steps, float(counter.get_total_flops()) if counter else math.nan


def training(check: Check) -> None:
    batch_size, steps = (2, 2) if check.smoke else (8, 5)
    state = network(check).state_dict()
    peak = peak_tflops(torch.cuda.get_device_name(check.device)) if check.device.type == "cuda" else None
    results = {}
    # compiled: the blocks through inductor, as `train` does on CUDA (on the CPU smoke it would only
    # measure inductor's C++ build, minutes on two cores)
    variants = [("LoRA", True, False, False), ("LoRA compiled", True, False, True),
                ("LoRA + gradient checkpointing", True, True, False), ("full fine-tuning", False, False, False)]
    for name, lora, checkpointing, compiled in variants:
        if compiled and check.smoke:
            check.row("training", f"{name}", "not in the smoke (inductor's build is the cost there)")
            continue
        check.fresh_memory()
        seconds, flops = _training_step(check, state, lora, checkpointing, steps, batch_size, compiled)
        results[name] = seconds
        check.row("training", f"{name}: steps/s (batch {batch_size})", 1 / seconds)
        check.memory_rows("training", f"{name}: ", "≤ 24" if checkpointing else "")
        if name == "LoRA compiled":
            check.row("training", "LoRA compiled: model FLOP utilisation",
                      results["LoRA flops"] / seconds / (peak * 1e12) if peak else "n/a (no known peak)", "≥ 0.30")
            check.row("training", "compiled / eager LoRA step time", seconds / results["LoRA"])
        if name == "LoRA":
            results["LoRA flops"] = flops
            check.row("training", "LoRA: FLOPs per step (forward + backward)", flops)
            check.results["training"]["flops_per_step"] = flops
            check.results["training"]["peak_tflops"] = peak
            check.row("training", "peak bf16 TFLOP/s used", peak if peak else
                      f"n/a ({torch.cuda.get_device_name(check.device) if check.device.type == 'cuda' else 'CPU'} "
                      "not in the table)")
            check.row("training", "LoRA: model FLOP utilisation",
                      flops / seconds / (peak * 1e12) if peak else "n/a (no known peak)", "≥ 0.30")
    check.row("training", "LoRA / full fine-tuning step time", results["LoRA"] / results["full fine-tuning"])
    check.row("training", "checkpointing / plain LoRA step time",
              results["LoRA + gradient checkpointing"] / results["LoRA"])


def generation(check: Check) -> None:
    from shared.synthesis import AudioDecoder, SamplingSettings, sample_latents

    net = network(check).to(check.device).eval()
    runtime = check.runtime(net.config.mode)
    seq, c, g = runtime.sequence(), net.config, torch.Generator().manual_seed(0)
    clip = torch.randn(1, seq.clip_seq_len, c.clip_dim, generator=g)
    sync = torch.randn(1, seq.sync_seq_len, c.sync_dim, generator=g)
    text = torch.randn(1, 77, c.text_dim, generator=g)
    settings = SamplingSettings(steps=25, cfg_strength=4.5)
    sample_latents(runtime, net, clip, sync, text, SamplingSettings(steps=2))  # warm-up
    check.synchronize()
    started = time.perf_counter()
    latents = sample_latents(runtime, net, clip, sync, text, settings)
    check.synchronize()
    check.row("generation", "8 s clip, 25 steps + CFG: sampling s", time.perf_counter() - started)
    decoder = AudioDecoder(runtime)
    decoder.waveform(latents)  # loads the VAE decoder and the vocoder
    check.synchronize()
    started = time.perf_counter()
    audio = decoder.waveform(latents)
    check.synchronize()
    check.row("generation", "VAE decoder + vocoder s", time.perf_counter() - started)
    check.row("generation", "audio samples", audio.shape[-1])


def collectives(check: Check) -> None:
    import torch.distributed as dist

    from shared.distributed import Ranks

    backend = "nccl" if check.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{check.workdir / 'process-group'}", rank=0, world_size=1)
    try:
        ranks = Ranks(0, 1, check.device, grouped=True)
        ok = ranks.total(3) == 3 and ranks.mean(0.5) == 0.5
        ranks.barrier()
    finally:
        dist.destroy_process_group()
    check.row("collectives", f"all_reduce ({backend})", "ok" if ok else "WRONG")
    check.row("collectives", "trainer through DDP, one rank (s)", _train_in_a_process_group(check))


def _train_in_a_process_group(check: Check) -> float:
    """The trainer as torchrun starts it, in a group of one: DDP with device_ids, set_device, the
    barriers and collectives of a real multi-GPU run (nothing else here runs them)."""
    from train.config import TrainConfig
    from train.loop import train

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                   "LOCAL_RANK": str(check.device.index or 0), "WORLD_SIZE": "1"}
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    started = time.perf_counter()
    try:
        train(TrainConfig(features=[str(check.workdir / "features-bench")], run=str(check.workdir / "ddp-run"),
                          profile=check.profile, variant=VARIANT, steps=2, batch_size=2, device=str(check.device),
                          weights_dir=str(check.workdir / "weights"),
                          checkpoint=None if check.smoke else str(check.workdir / "weights" / f"mmaudio_{VARIANT}.pth")),
              show_progress=False)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return time.perf_counter() - started


def user_path(check: Check) -> None:
    """The commands a user with downloaded weights runs, each timed."""
    tsv, videos = clip_list(check, "user", 2 if check.smoke else 6)
    weights_dir = check.workdir / "weights"
    run, out = check.workdir / "run", check.workdir / "generated"
    common = ["--profile", check.profile]
    real_only = ["--weights-dir", str(weights_dir)] if not check.smoke else []
    checkpoint = ["--checkpoint", str(weights_dir / f"mmaudio_{VARIANT}.pth")] if not check.smoke else []
    video = check.examples[0] if check.examples else videos / "user-0.mp4"
    commands = {
        "features": ["features", "--tsv", str(tsv), "--video-root", str(videos), "--out",
                     str(check.workdir / "features"), "--variant", VARIANT, "--allow-symlinks", "--device",
                     str(check.device), *common, *real_only],
        "train (20 steps)": ["train", "--features", str(check.workdir / "features"), "--run", str(run),
                             "--variant", VARIANT, "--steps", "20", "--batch-size", "2", "--device",
                             str(check.device), *common, *checkpoint],
        "generate": ["generate", "--run", str(run), "--video", str(video), "--out", str(out), "--device",
                     str(check.device), *real_only],
        "export": ["export", "--run", str(run), "--out", str(check.workdir / "export" / "merged.pth")],
    }
    from typer.testing import CliRunner

    from mmaudio_lora.cli import app

    for name, arguments in commands.items():  # in this process: the time is the command's work
        started = time.perf_counter()
        finished = CliRunner().invoke(app, arguments)
        seconds = time.perf_counter() - started
        lines = (finished.output or "").strip().splitlines() or [""]
        check.row("user path", f"{name} s", seconds if finished.exit_code == 0 else
                  f"FAILED ({finished.exit_code}): {lines[-1][:160]}")
        check.results["user path"][f"{name} output"] = lines[-1][:200]
        if finished.exception is not None and not isinstance(finished.exception, SystemExit):
            check.results["user path"][f"{name} traceback"] = "".join(
                traceback.format_exception(finished.exception))
        if finished.exit_code != 0:
            break
        check.fresh_memory()


SECTIONS = {"precision": precision, "weights": weights, "precompute": precompute, "training": training,
            "generation": generation, "collectives": collectives, "user path": user_path}


def load_fill(reference: Path):
    """The reference's fill_state_dict: the same keys and shapes get the same weights."""
    path = reference / "fill.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass --reference (the folder holding fill.py)")
    return runpy.run_path(str(path))["fill_state_dict"]


def main(argv: list[str] | None = None) -> int:
    default_reference = Path(os.environ.get("MMAUDIO_LORA_REFERENCE", REPO.parent / "shared" / "reference"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the same code in seconds, on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--reference", type=Path, default=default_reference, help="folder holding fill.py")
    parser.add_argument("--examples", type=Path, help="folder of example clips (the two VGGSound clips) "
                        "[default: data/example_videos beside --reference]")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: "
                        + ", ".join(SECTIONS))
    parser.add_argument("--json", type=Path, help="where the results go [default: $OUT/gpu_check.json]")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    examples_folder = args.examples or args.reference.parent / "data" / "example_videos"
    # smoke: generated clips only (the 720p examples cost seconds of decoding each on a CPU)
    examples = sorted(examples_folder.glob("*.mp4")) if examples_folder.is_dir() and not args.smoke else []
    print(f"examples: {len(examples)} ({examples_folder})", flush=True)
    if not examples and not args.smoke:
        print(f"error: no example clips in {examples_folder}; pass --reference (or --examples)", file=sys.stderr)
        return 2
    out = args.json or Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        check = Check(device, args.smoke, load_fill(args.reference), examples, Path(workdir))
        check.results["machine"] = {"device": str(device), "torch": torch.__version__, "smoke": args.smoke,
                                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                    "examples": len(examples)}
        check.save(out)
        print(f"{'section':<12} {'metric':<48} {'value':>14}  goal", flush=True)
        failures = 0
        for name in args.sections.split(","):
            started = time.perf_counter()
            check.fresh_memory()
            try:
                SECTIONS[name.strip()](check)
            except Exception as error:  # record it and go on: one short run must tell as much as it can
                failures += 1
                check.row(name, "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                          if str(error) else type(error).__name__)
                check.results[name]["traceback"] = traceback.format_exc()
            check.results.setdefault(name, {})["section seconds"] = time.perf_counter() - started
            check.save(out)
    print(f"results: {out}" + (f"; {failures} section(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
