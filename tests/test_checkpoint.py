"""Official checkpoint files: round trip, variant inference and clear errors for bad files."""
import json
import pickle

import pytest
import torch

from shared.checkpoint import CheckpointError, infer_variant, load_network, save_state_dict
from shared.models.network import VARIANTS, build_network


@pytest.fixture(scope="module")
def small_16k_file(tmp_path_factory, fill_state_dict):
    """A filled small_16k saved as an older official file would be: with the legacy tables."""
    network = build_network("small_16k")
    state = fill_state_dict(network.state_dict())
    network.load_state_dict(state)
    legacy = dict(state, latent_rot=torch.zeros(1), clip_rot=torch.zeros(1), **{"t_embed.freqs": torch.zeros(128)})
    path = tmp_path_factory.mktemp("weights") / "mmaudio_small_16k.pth"
    torch.save(legacy, path)
    return path, state


def test_round_trip_infers_variant_and_loads_equal(small_16k_file):
    path, state = small_16k_file
    network = load_network(path)
    assert network.config == VARIANTS["small_16k"]
    loaded = network.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # The rebuilt tables equal those of a freshly built network, so the outputs agree.
    fresh = build_network("small_16k")
    assert torch.equal(network.latent_rot, fresh.latent_rot)
    assert torch.equal(network.t_embed.freqs, fresh.t_embed.freqs)
    assert not network.latent_mean.requires_grad


def test_variant_inferred_from_shapes_for_all_official_variants(reference_dir):
    manifest = json.loads((reference_dir / "mmaudio_state_dict_manifest.json").read_text())
    for variant, shapes in manifest.items():
        state = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
        assert infer_variant(state) == variant


def test_wrong_variant_names_file_variant_and_keys(small_16k_file):
    path, _ = small_16k_file
    with pytest.raises(CheckpointError) as error:
        load_network(path, variant="large_44k_v2")
    message = str(error.value)
    assert str(path) in message and "large_44k_v2 (given)" in message
    assert "missing" in message and "shape" in message
    assert "\n" not in message


def test_truncated_file(small_16k_file, tmp_path):
    path, _ = small_16k_file
    truncated = tmp_path / "mmaudio_small_16k.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_network(truncated)


def test_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, foreign)
    with pytest.raises(CheckpointError, match="not an MMAudio network state dict"):
        load_network(foreign)
    with pytest.raises(CheckpointError, match="no such file"):
        load_network(tmp_path / "absent.pth")
    nested = tmp_path / "trainer.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "step": torch.tensor(3)}, nested)
    with pytest.raises(CheckpointError, match="plain state dict"):
        load_network(nested)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"x": _Payload()}, handle)
    with pytest.raises(CheckpointError):
        load_network(path)
    assert "code ran" not in capsys.readouterr().out


def test_safetensors_copy_loads_the_same(small_16k_file, tmp_path):
    path, state = small_16k_file
    copy = tmp_path / "mmaudio_small_16k.safetensors"
    save_state_dict(state, copy)
    network = load_network(copy, variant="small_16k")
    assert torch.equal(network.joint_blocks[0].latent_block.attn.qkv.weight,
                       state["joint_blocks.0.latent_block.attn.qkv.weight"])
    assert not list(tmp_path.glob("*.tmp"))
