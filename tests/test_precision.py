"""bf16 mixed precision on the CPU (the same autocast path CUDA takes), and collectives that also
work under NCCL. What a GPU would hit first (dtype mismatches, slow fallbacks) shows up here."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from safetensors.torch import load_file

from helpers import relative_error
from shared.device import mixed_precision

CPU = torch.device("cpu")
# Measured bf16-vs-float32 relative errors (tiny models, CPU): network 1.2e-2 (tiny_v1) and 1.8e-2
# (tiny_v2), CLIP frames 7.8e-3, CLIP text 1.3e-3, Synchformer 9.3e-3. The bounds: the goal of 2e-2
# for the encoders; 3e-2 for the network, whose tiny filled weights sit close to that goal.
ENCODER_BOUND = 2e-2
NETWORK_BOUND = 3e-2


def _no_dtype_fallbacks(caught: list) -> None:
    slow = [str(w.message) for w in caught if "Mismatch dtype" in str(w.message)]
    assert not slow, slow[0]  # torch leaves a fused kernel for a slow path


def test_network_bf16_is_close_to_float32_and_stays_on_fused_kernels(reference_dir, fill_state_dict):
    import json

    from shared.models.network import build_network

    golden = load_file(reference_dir / "mmaudio_tiny_v2.safetensors")
    hyperparameters = dict(json.loads((reference_dir / "mmaudio_goldens.json").read_text())["tiny_v2"])
    hyperparameters.pop("short_seq_lens")
    network = build_network(None, **hyperparameters)
    network.load_state_dict(fill_state_dict(network.state_dict()))
    inputs = [golden[k] for k in ("latent", "clip_f", "sync_f", "text_f", "t")]
    with torch.no_grad():
        full = network(*inputs)
        with warnings.catch_warnings(record=True) as caught, mixed_precision(CPU, "bf16"):
            warnings.simplefilter("always")
            mixed = network(*inputs)
    _no_dtype_fallbacks(caught)
    assert mixed.dtype == torch.bfloat16 and torch.isfinite(mixed.float()).all()
    assert relative_error(mixed, full) <= NETWORK_BOUND
    with mixed_precision(CPU, "auto"):  # auto is float32 on the CPU
        assert network(*inputs).dtype == torch.float32


def test_encoders_bf16_are_close_to_float32():
    from shared.models.synchformer import encode_sync_frames
    from shared.pretrained import load_clip, load_synchformer

    generator = torch.Generator().manual_seed(0)
    frames = torch.rand(8, 3, 384, 384, generator=generator)
    sync_frames = torch.rand(1, 16, 3, 224, 224, generator=generator) * 2 - 1
    clip, synchformer = load_clip("tiny", None, CPU), load_synchformer("tiny", None, CPU)
    with torch.no_grad():
        full = (clip.encode_frames(frames), clip.encode_text(["a dog barks", "rain"]),
                encode_sync_frames(synchformer, sync_frames))
        with warnings.catch_warnings(record=True) as caught, mixed_precision(CPU, "bf16"):
            warnings.simplefilter("always")
            mixed = (clip.encode_frames(frames), clip.encode_text(["a dog barks", "rain"]),
                     encode_sync_frames(synchformer, sync_frames))
    _no_dtype_fallbacks(caught)
    for ours, reference in zip(mixed, full):
        assert relative_error(ours, reference) <= ENCODER_BOUND


def test_every_command_runs_its_mixed_precision_path(features, tmp_path):
    """features, a few training steps, generate and evaluate with --precision bf16 (tiny, CPU)."""
    from typer.testing import CliRunner

    from mmaudio_lora.cli import app

    runner = CliRunner()
    root = features.parent
    two_clips = tmp_path / "two.tsv"  # the path is what is tested: two clips take it as six do, in a third of the time
    two_clips.write_text("".join((root / "clips.tsv").read_text().splitlines(keepends=True)[:3]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["features", "--tsv", str(two_clips), "--video-root", str(root / "videos"),
                                     "--out", str(tmp_path / "features"), "--profile", "tiny", "--variant", "small_16k",
                                     "--workers", "0", "--precision", "bf16"])
        assert result.exit_code == 0, result.output
        run = tmp_path / "run"
        result = runner.invoke(app, ["train", "--features", str(features), "--run", str(run), "--profile", "tiny",
                                     "--steps", "3", "--batch-size", "2", "--precision", "bf16"])
        assert result.exit_code == 0, result.output
        assert '"precision": "bf16"' in (run / "config.json").read_text()
        result = runner.invoke(app, ["generate", "--run", str(run), "--features", str(features), "--id", "c1",
                                     "--steps", "2", "--out", str(tmp_path / "audio"), "--precision", "bf16"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["evaluate", "--run", str(run), "--steps", "2", "--precision", "bf16"])
        assert result.exit_code == 0, result.output
    _no_dtype_fallbacks(caught)
    assert (tmp_path / "audio" / "c1.wav").is_file() and (run / "evaluation.json").is_file()
    refused = runner.invoke(app, ["generate", "--no-adapter", "--profile", "tiny", "--prompt", "x",
                                  "--precision", "fp16", "--out", str(tmp_path / "never")])
    assert refused.exit_code == 1 and "--precision must be one of auto, bf16, fp32" in refused.output


def test_collectives_run_in_a_process_group(tmp_path):
    """The path a multi-process run takes (one process here): values go through all_reduce on the
    rank's device, as NCCL requires (it reduces no CPU tensors)."""
    import torch.distributed as dist

    from shared.distributed import Ranks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        ranks = Ranks(rank=0, world_size=1, device=CPU, grouped=True)
        assert ranks.total(3) == 3 and ranks.mean(0.25) == 0.25
        ranks.barrier()
    finally:
        dist.destroy_process_group()


def test_a_group_ends_together_after_a_success_and_at_once_after_a_failure(tmp_path, monkeypatch):
    """Leaving a job's `with ranks:` waits at a barrier for every rank (rank 0 may still be writing)
    only when the job succeeded, then ends the group; a failure leaves without waiting."""
    import torch.distributed as dist

    from shared.distributed import Ranks

    waits = []
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: waits.append("barrier"))
    for index, fails in enumerate((False, True)):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'group{index}'}", rank=0, world_size=1)
        ranks = Ranks(rank=0, world_size=1, device=CPU, grouped=True)
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            with ranks:
                if fails:
                    raise RuntimeError("rank 0 failed")
        assert not dist.is_initialized() and not ranks.grouped
    assert waits == ["barrier"]  # the success only


def test_sync_features_are_float32_whatever_the_precision():
    """DeSync reads the stored Synchformer features as av-benchmark computes them, in float32: the
    encoder runs outside the bf16 region that CLIP uses (a bf16 argmax can pick another offset)."""
    from precompute.encode import FeatureEncoder
    from shared.media import Segment
    from shared.models.sequence import SequenceConfig
    from shared.runtime import Runtime

    seq, generator = SequenceConfig("16k", 1.0), torch.Generator().manual_seed(0)
    segment = Segment(clip_frames=torch.randint(0, 255, (seq.clip_seq_len, 3, 384, 384), dtype=torch.uint8,
                                                generator=generator),
                      sync_frames=torch.randint(0, 255, (seq.sync_frames, 3, 224, 224), dtype=torch.uint8,
                                                generator=generator),
                      audio=0.1 * torch.randn(seq.num_audio_samples, generator=generator), duration_sec=1.0)
    encoded = {precision: FeatureEncoder(Runtime(mode="16k", profile="tiny", device="cpu", precision=precision))
               .encode_media([segment]) for precision in ("fp32", "bf16")}
    assert torch.equal(encoded["bf16"]["sync_features"], encoded["fp32"]["sync_features"])
    assert torch.equal(encoded["bf16"]["mean"], encoded["fp32"]["mean"])  # the VAE: float32 too
    assert not torch.equal(encoded["bf16"]["clip_features"], encoded["fp32"]["clip_features"])  # CLIP: bf16
