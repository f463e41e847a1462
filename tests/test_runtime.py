"""The runtime: the audio mode follows from the variant, each model loads once, and a mode that
does not fit is refused in one line before any work."""
import pytest
from typer.testing import CliRunner

from mmaudio_lora.cli import app
from shared.errors import UserError
from shared.runtime import Runtime


@pytest.mark.parametrize("options, variant, mode", [
    ({}, "large_44k_v2", "44k"),
    ({"variant": "small_16k"}, "small_16k", "16k"),
    ({"variant": "medium_44k", "mode": "44k"}, "medium_44k", "44k"),
    ({"mode": "16k"}, None, "16k"),  # features alone: no network named
    ({"network_file": "x.pth"}, None, None),  # the file's shapes will tell
])
def test_the_mode_follows_the_variant(options, variant, mode):
    runtime = Runtime(**options)
    assert (runtime.variant, runtime.mode) == (variant, mode)


@pytest.mark.parametrize("options, message", [
    ({"variant": "large_44k_v2", "mode": "16k"}, "variant large_44k_v2 makes 44k audio, not the 16k audio asked"),
    ({"variant": "small_16k", "mode": "22k"}, "unknown audio mode '22k'"),
    ({"variant": "huge"}, "unknown network variant 'huge'"),
    ({"mode": "22k"}, "unknown audio mode '22k'"),
    ({"profile": "big"}, "unknown profile 'big'"),
    ({"precision": "fp16"}, "--precision must be one of"),
])
def test_settings_that_do_not_fit_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        Runtime(**options)


def test_each_model_loads_once_on_first_use():
    runtime = Runtime(mode="16k", profile="tiny", device="cpu")
    assert runtime.loaded_models == [] and runtime.data_dim()["latent_seq_len"] == 250
    vae = runtime.vae()
    assert runtime.vae() is vae and runtime.vae_decoder() is vae  # the whole VAE serves decoding too
    network = runtime.network()
    assert runtime.network() is network and runtime.variant == "small_16k"  # the mode's default variant
    assert runtime.loaded_models == ["network", "vae"] and runtime.load_seconds > 0
    with pytest.raises(RuntimeError, match="before it loads"):
        runtime.on("cpu")


def test_features_refuses_a_variant_and_a_mode_that_disagree(tmp_path):
    result = CliRunner().invoke(app, ["features", "--tsv", str(tmp_path / "clips.tsv"), "--out", str(tmp_path / "out"),
                                      "--variant", "large_44k_v2", "--mode", "16k"])
    assert result.exit_code == 1
    assert "error: variant large_44k_v2 makes 44k audio, not the 16k audio asked for" in result.output
    assert not (tmp_path / "out").exists()
