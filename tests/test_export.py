"""Export: the merged checkpoint has the base network's layout and computes base + adapter."""
import json

import torch
from typer.testing import CliRunner

from mmaudio_lora.cli import app
from shared.lora import base_network, load_adapter
from shared.models.network import build_network


def test_export_round_trip(trained_run, tmp_path):
    run = trained_run
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "merged.pth"),
                                      "--profile", "tiny"])
    assert result.exit_code == 0, result.output
    merged = torch.load(tmp_path / "merged.pth", weights_only=True)
    base, _ = base_network("tiny", None, "small_16k")
    base_state = base.state_dict()
    assert merged.keys() == base_state.keys() and not any("lora" in k for k in merged)
    assert all(merged[k].shape == v.shape and merged[k].dtype == v.dtype for k, v in base_state.items())
    assert any(not torch.equal(merged[k], base_state[k]) for k in merged)

    from safetensors.torch import load_file
    copy = load_file(str(tmp_path / "merged.safetensors"))
    assert all(torch.equal(copy[k], merged[k]) for k in merged)

    inputs = (torch.randn(2, 250, 20), torch.randn(2, 64, 32), torch.randn(2, 192, 32), torch.randn(2, 77, 32),
              torch.rand(2))
    with torch.no_grad():
        adapted = load_adapter(base, run / "adapter")
        expected = base(*inputs)  # base + adapter (peft wraps the module in place)
        plain = build_network(None, **base.config.__dict__)
        plain.load_state_dict(merged, strict=True)
        assert torch.allclose(plain(*inputs), expected, atol=1e-5, rtol=1e-4)
        adapted.disable_adapter_layers()
        assert not torch.allclose(base(*inputs), expected, atol=1e-5)


def test_merged_real_variant_keeps_the_official_layout(reference_dir):
    from shared.lora import add_lora, lora_config
    from train.config import DEFAULT_TARGETS

    manifest = json.loads((reference_dir / "mmaudio_state_dict_manifest.json").read_text())
    with torch.device("meta"):
        model = add_lora(build_network("large_44k_v2"), lora_config(16, 16, 0.0, DEFAULT_TARGETS))
        merged = model.merge_and_unload().state_dict()
    assert {k: list(v.shape) for k, v in merged.items()} == manifest["large_44k_v2"]


def test_half_precision_exports_keep_the_layout_and_differ_by_rounding_only(trained_run, tmp_path):
    """fp16 and bf16 exports: the same keys and shapes, about half the file, strict loads, the latent
    statistics kept in float32; a clip generated from each differs from fp32 by rounding only."""
    from shared.checkpoint import load_strict
    from shared.runtime import Runtime
    from shared.models.sequence import SequenceConfig
    from shared.synthesis import SamplingSettings, sample_latents

    latents, sizes = {}, {}
    seq = SequenceConfig("16k", 2.0)
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, seq.clip_seq_len, 32, generator=g)
    sync = torch.randn(1, seq.sync_seq_len, 32, generator=g)
    text = torch.randn(1, 77, 32, generator=g)
    for dtype, wanted in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / f"merged_small_16k_{dtype}.pth"
        result = CliRunner().invoke(app, ["export", "--run", str(trained_run), "--out", str(out), "--dtype", dtype])
        assert result.exit_code == 0, result.output
        assert "warning" not in result.output  # the name says 16
        state = torch.load(out, weights_only=True)
        sizes[dtype] = out.stat().st_size
        assert {k for k, v in state.items() if v.dtype != wanted} <= {"latent_mean", "latent_std"}
        assert state["latent_mean"].dtype == state["latent_std"].dtype == torch.float32
        plain = base_network("tiny", None, "small_16k")[0]
        load_strict(plain, state, out, "the tiny small_16k network")  # as official files load: strict
        plain.update_seq_lengths(seq.latent_seq_len, seq.clip_seq_len, seq.sync_seq_len)
        latents[dtype] = sample_latents(Runtime(variant="small_16k", profile="tiny", device="cpu"), plain.eval(),
                                        clip, sync, text, SamplingSettings(steps=4))
    assert sizes["fp16"] < 0.6 * sizes["fp32"] and sizes["bf16"] < 0.6 * sizes["fp32"]
    scale = latents["fp32"].abs().max()
    assert 0 < (latents["fp16"] - latents["fp32"]).abs().max() / scale < 1e-2
    assert 0 < (latents["bf16"] - latents["fp32"]).abs().max() / scale < 5e-2
    warned = CliRunner().invoke(app, ["export", "--run", str(trained_run), "--out", str(tmp_path / "mine.pth")])
    assert warned.exit_code == 0 and "warning: mine.pth does not say 16 (kHz)" in warned.output
    refused = CliRunner().invoke(app, ["export", "--run", str(trained_run), "--out", str(tmp_path / "x.pth"),
                                       "--dtype", "int8"])
    assert refused.exit_code == 1 and "--dtype must be one of fp32, fp16, bf16" in refused.output
