"""The prepared device check: one command that measures the CUDA path and prints one table.

    python bench/gpu_check.py                     # real sizes on CUDA (one H200: about 5 minutes)
    python bench/gpu_check.py --smoke --device cpu  # the same code at tiny sizes, in seconds

Sections (each one's failure is recorded and the others still run):
  precision   bf16-vs-float32 relative error: network (large_44k_v2), CLIP ViT-H-14-378,
              Synchformer, VAE 44k, 44k vocoder; all filled by the reference's fill.py
  weights     official-layout weight files written under the official names into a temporary
              --weights-dir (what a user downloads), filled by fill.py
  precompute  `features` on the example clips and generated ones: clips/s, decode wait vs encode,
              batch size, peak GPU memory, and the time projected for 67 clips
  training    LoRA on large_44k_v2, batch 8, bf16: steps/s, model FLOP utilisation, peak memory;
              the same with gradient checkpointing; full fine-tuning for the ratio
  generation  one 8 s clip, 25 Euler steps with CFG: sampling and decoding seconds
  collectives all_reduce in a one-process group (NCCL on CUDA)
  user path   the real-profile commands as a user runs them (the CLI, in this process): features
              → train (20 steps) → generate → export, each timed
The table goes to stdout and everything to one JSON (--json, default $OUT/gpu_check.json or
./gpu_check.json). On the device machine, carry `../shared/reference/fill.py` and the example
clips into the checkout and point --reference / --examples at them.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
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

from shared.device import mixed_precision, resolve_device  # noqa: E402

VARIANT = "large_44k_v2"
PEAK_BF16_TFLOPS = 790.0  # one H200, dense bf16


@dataclass
class Check:
    device: torch.device
    smoke: bool
    fill: object  # the reference's fill_state_dict
    examples: list[Path]
    workdir: Path
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
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        self.table.append((section, metric, text, goal))
        self.results.setdefault(section, {})[metric] = value

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | str:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else "n/a (CPU)"


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
    from shared.network import build_network
    from shared.profiles import network_config

    return filled(build_network(None, **asdict(network_config(VARIANT, check.profile))), check.fill)


def vocoder_hyperparameters(check: Check) -> dict:
    from shared.vocoder import BIGVGAN_16K, BIGVGAN_44K_SHAPES, vocoder_hyperparameters as tiny

    if check.smoke:
        return tiny("44k", "tiny")
    # the official 44k generator's shapes, with the audio fields of its config.json
    return dict(BIGVGAN_16K, **BIGVGAN_44K_SHAPES, sampling_rate=44100, hop_size=512, n_fft=2048,
                win_size=2048, fmin=0, fmax=None)


def vocoder_generator(check: Check):
    """The generator in weight-norm form, as its file stores it."""
    from shared.vocoder import bigvgan_generator

    return filled(bigvgan_generator(vocoder_hyperparameters(check)), check.fill, keep=is_filter)


# -- sections --------------------------------------------------------------------------------------------

def precision(check: Check) -> None:
    from shared.clip import build_clip
    from shared.sequence import SequenceConfig
    from shared.synchformer import build_synchformer, encode_sync_frames
    from shared.vae import build_vae
    from shared.vocoder import build_vocoder

    device, generator = check.device, torch.Generator().manual_seed(0)
    kept = "(runs in fp32)"

    def compare(name: str, run, goal: str = "≤ 2e-2") -> None:
        with torch.no_grad():
            full = run()
            with mixed_precision(device, "bf16"):
                mixed = run()
        check.row("precision", f"{name} bf16 vs fp32", relative_error(mixed, full), goal)

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
    compare("VAE 44k encode", lambda: vae.encode(mel)[0], kept)

    generator_module = vocoder_generator(check)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.json"
        config.write_text(json.dumps(vocoder_hyperparameters(check)))
        vocoder = build_vocoder("44k", generator_module.state_dict(), check.profile, config).to(device).eval()
    compare("vocoder 44k", lambda: vocoder(torch.randn(1, 128, 32, generator=generator).to(device)), kept)


def weights(check: Check) -> None:
    """Official-layout files under the official names, as `mmaudio-lora download` leaves them."""
    from shared.clip import build_clip
    from shared.network import build_network
    from shared.synchformer import build_synchformer
    from shared.vae import build_vae
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


def clip_list(check: Check) -> tuple[Path, Path]:
    """The example clips and generated ones, as a segment list."""
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
    for index in range(2 if check.smoke else 6):
        name = f"generated{index}.mp4"
        write_clip(videos / name, ClipSpec(8.0, width=size[0], height=size[1], seed=index))
        rows.append(f"{name}\t0\t8\tgenerated {index}")
    tsv = check.workdir / "clips.tsv"
    tsv.write_text("video_path\tstart_time\tend_time\tcaption\n" + "\n".join(rows) + "\n")
    return tsv, videos


def precompute(check: Check) -> None:
    from precompute.run import FeatureJob, default_workers, run_features

    tsv, videos = clip_list(check)
    check.reset_peak()
    job = FeatureJob(tsv=tsv, video_root=videos, out=check.workdir / "features-bench", runtime=check.runtime(),
                     batch_size=8, allow_symlinks=True)
    summary = run_features(job, show_progress=False)
    encode = summary.encoding_seconds
    loading = summary.timings.get("load models", 0.0)
    per_clip = (summary.seconds - loading) / max(summary.encoded_media, 1)
    check.row("precompute", "clips", summary.encoded_media)
    check.row("precompute", "clips/s (models loaded)", 1 / per_clip if per_clip else 0.0)
    check.row("precompute", "67 clips, projected s", 67 * per_clip + loading, "≤ 60")
    check.row("precompute", "encode s", encode)
    check.row("precompute", "decode waited s", summary.timings.get("decode (waited for)", 0.0))
    check.row("precompute", "model loading s", loading)
    check.row("precompute", "batch size / workers", f"{job.batch_size} / {default_workers()}")
    check.row("precompute", "peak GPU GiB", check.peak_gib())


def _training_step_seconds(check: Check, state: dict, lora: bool, checkpointing: bool, steps: int,
                           batch_size: int) -> tuple[float, float | str, float]:
    """(seconds per step, peak GiB, forward FLOPs) of `steps` steps after two warm-up steps."""
    from shared.lora import add_lora, lora_config
    from shared.network import build_network
    from shared.profiles import network_config
    from shared.sequence import SequenceConfig
    from train.config import DEFAULT_TARGETS
    from train.objective import training_loss

    with torch.device("meta"):  # no time spent on a random init that the filled weights replace
        net = build_network(None, **asdict(network_config(VARIANT, check.profile)))
    net = net.to_empty(device=check.device)
    net.load_state_dict(state)
    net.update_seq_lengths(net.latent_seq_len, net.clip_seq_len, net.sync_seq_len)  # the non-persistent tables
    model = add_lora(net, lora_config(16, 16, 0.0, DEFAULT_TARGETS)) if lora else net
    net.gradient_checkpointing = checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seq, c, g = SequenceConfig(net.config.mode), net.config, torch.Generator().manual_seed(0)
    batch = {"a_mean": torch.randn(batch_size, seq.latent_seq_len, c.latent_dim, generator=g),
             "a_std": torch.rand(batch_size, seq.latent_seq_len, c.latent_dim, generator=g) * 0.1,
             "clip_features": torch.randn(batch_size, seq.clip_seq_len, c.clip_dim, generator=g),
             "sync_features": torch.randn(batch_size, seq.sync_seq_len, c.sync_dim, generator=g),
             "text_features": torch.randn(batch_size, 77, c.text_dim, generator=g),
             "duration_sec": torch.full((batch_size,), 8.0)}
    batch = {k: v.to(check.device) for k, v in batch.items()}
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), mixed_precision(check.device), FlopCounterMode(display=False) as counter:
        training_loss(net, batch, seq, g, forward=model)
    check.reset_peak()
    elapsed = 0.0
    for step in range(steps + 2):
        check.synchronize()
        started = time.perf_counter()
        with mixed_precision(check.device):
            loss = training_loss(net, batch, seq, g, forward=model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        check.synchronize()
        if step >= 2:
            elapsed += time.perf_counter() - started
    return elapsed / steps, check.peak_gib(), float(counter.get_total_flops())


def training(check: Check) -> None:
    batch_size, steps = (2, 2) if check.smoke else (8, 5)
    state = network(check).state_dict()
    results = {}
    for name, lora, checkpointing in (("LoRA", True, False), ("LoRA + gradient checkpointing", True, True),
                                      ("full fine-tuning", False, False)):
        seconds, peak, forward_flops = _training_step_seconds(check, state, lora, checkpointing, steps, batch_size)
        results[name] = seconds
        check.row("training", f"{name}: steps/s (batch {batch_size})", 1 / seconds)
        check.row("training", f"{name}: peak GiB", peak, "≤ 24" if checkpointing else "")
        if name == "LoRA":
            # model FLOPs of a training step: forward + backward = 3x the forward (the usual convention)
            utilisation = 3 * forward_flops / seconds / (PEAK_BF16_TFLOPS * 1e12)
            check.row("training", "LoRA: model FLOP utilisation",
                      utilisation if check.device.type == "cuda" else "n/a (CPU)", "≥ 0.30")
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


def user_path(check: Check) -> None:
    """The commands a user with downloaded weights runs, each timed."""
    tsv, videos = clip_list(check)
    weights_dir = check.workdir / "weights"
    run, out = check.workdir / "run", check.workdir / "generated"
    common = ["--profile", check.profile]
    real_only = ["--weights-dir", str(weights_dir)] if not check.smoke else []
    checkpoint = ["--checkpoint", str(weights_dir / f"mmaudio_{VARIANT}.pth")] if not check.smoke else []
    video = check.examples[0] if check.examples else videos / "generated0.mp4"
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
        if check.device.type == "cuda":
            torch.cuda.empty_cache()


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
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--reference", type=Path, default=default_reference, help="folder holding fill.py")
    parser.add_argument("--examples", type=Path, default=default_reference.parent / "data" / "example_videos",
                        help="folder of example clips (the two VGGSound clips)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: "
                        + ", ".join(SECTIONS))
    parser.add_argument("--json", type=Path, help="where the results go [default: $OUT/gpu_check.json]")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    # smoke: generated clips only (the 720p examples cost seconds of decoding each on a CPU)
    examples = sorted(args.examples.glob("*.mp4")) if args.examples.is_dir() and not args.smoke else []
    out = args.json or Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        check = Check(device, args.smoke, load_fill(args.reference), examples, Path(workdir))
        check.results["machine"] = {"device": str(device), "torch": torch.__version__, "smoke": args.smoke,
                                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
        failures = 0
        for name in args.sections.split(","):
            started = time.perf_counter()
            try:
                SECTIONS[name.strip()](check)
            except Exception as error:  # record it and go on: one short run must tell as much as it can
                failures += 1
                check.row(name, "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                          if str(error) else type(error).__name__)
                check.results[name]["traceback"] = traceback.format_exc()
            check.results.setdefault(name, {})["section seconds"] = time.perf_counter() - started
            if device.type == "cuda":
                torch.cuda.empty_cache()
    width = max(len(metric) for _, metric, _, _ in check.table)
    print(f"{'section':<12} {'metric':<{width}} {'value':>14}  goal")
    for section, metric, value, goal in check.table:
        print(f"{section:<12} {metric:<{width}} {value:>14}  {goal}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(check.results, indent=1, default=str) + "\n")
    print(f"results: {out}" + (f"; {failures} section(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
