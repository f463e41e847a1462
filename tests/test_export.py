"""Export: the merged checkpoint has the base network's layout and computes base + adapter."""
import json

import torch
from typer.testing import CliRunner

from mmaudio_lora.cli import app
from shared.lora import base_network, load_adapter
from shared.network import build_network


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
