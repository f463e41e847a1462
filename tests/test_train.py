"""The LoRA trainer on real precomputed memmaps (tiny profile)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.features import FeatureFormatError
from shared.models.sequence import SequenceConfig
from train.config import TrainConfig
from shared.lora import AdapterError, base_network, load_adapter
from train.loop import train
from train.objective import training_loss

from conftest import imports_refused

REPO = Path(__file__).resolve().parents[1]


def _config(features, run, **options) -> TrainConfig:
    values = dict(features=[str(features)], run=str(run), profile="tiny", steps=20, batch_size=2,
                  warmup_steps=2, val_every=10, log_every=1, checkpoint_every=10, device="cpu")
    values.update(options)
    return TrainConfig(**values)


def _metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_lora_learns_and_base_weights_stay_identical(features, tmp_path):
    base = {k: v.clone() for k, v in base_network("tiny", None, "small_16k")[0].state_dict().items()}
    config = _config(features, tmp_path / "run", steps=150, lr=3e-3, val_fraction=0.0, null_condition_probability=0.0,
                     val_every=1000, checkpoint_every=1000)
    result = train(config, show_progress=False)
    losses = [m["train_loss"] for m in _metrics(config.run)]
    assert sum(losses[-20:]) < sum(losses[:20])

    # The same fixed-noise loss on the training clips, before and after: it must fall clearly.
    from shared.features import data_dim
    from shared.profiles import feature_dims
    from shared.features import FeatureSet
    from shared.models.flow import validation_losses

    seq = SequenceConfig("16k")
    clips = FeatureSet.load([str(features)], data_dim(seq, feature_dims("tiny")), 8.0)
    batches = [clips.batch(list(range(len(clips))))]
    network = base_network("tiny", None, "small_16k")[0]
    before = validation_losses(network, batches, seq).mean()
    assert all(torch.equal(network.state_dict()[k], v) for k, v in base.items())
    model = load_adapter(network, Path(config.run) / "adapter")
    after = validation_losses(network, batches, seq).mean()
    assert after < 0.7 * before, (before, after)
    merged_keys = {k for k in model.state_dict() if "lora_" in k}
    assert merged_keys and result.trainable_parameters == sum(
        v.numel() for k, v in model.state_dict().items() if "lora_" in k)
    for key, value in base.items():  # the base weights under the adapter are untouched
        wrapped = f"base_model.model.{key}"
        wrapped = wrapped if wrapped in model.state_dict() else wrapped.replace(".weight", ".base_layer.weight") \
            .replace(".bias", ".base_layer.bias")
        assert torch.equal(model.state_dict()[wrapped], value), key


def test_masked_loss_ignores_padded_latents(features):
    from shared.features import data_dim, open_feature_dir
    from shared.profiles import feature_dims

    seq = SequenceConfig("16k")
    dataset = open_feature_dir(features, data_dim(seq, feature_dims("tiny")))
    batch = {"a_mean": dataset.mean[:2].clone(), "a_std": dataset.std[:2].clone(),
             "clip_features": dataset.clip_features[:2].clone(), "sync_features": dataset.sync_features[:2].clone(),
             "text_features": dataset.text_features[:2].clone(), "duration_sec": dataset.duration_sec[:2].clone()}
    assert batch["duration_sec"].tolist() == [2.0, 3.5]
    network = base_network("tiny", None, "small_16k")[0]
    before = training_loss(network, batch, seq, torch.Generator().manual_seed(0))
    # Latent frames past 3.5 s: ceil(3.5 * 16000 / 256 / 2) = 110. Fill them with anything.
    batch["a_mean"][:, 110:] = 1e3
    batch["a_std"][:, 110:] = 5.0
    after = training_loss(network, batch, seq, torch.Generator().manual_seed(0))
    assert torch.equal(before, after)
    batch["a_mean"][1, 100] += 1.0  # a real frame does count
    assert not torch.equal(training_loss(network, batch, seq, torch.Generator().manual_seed(0)), before)


def test_resume_repeats_the_uninterrupted_run(features, tmp_path):
    # Constant schedule: stopping at 10 of a cosine run would need --steps 20 from the start.
    straight = _config(features, tmp_path / "straight", steps=20, schedule="constant")
    train(straight, show_progress=False)
    interrupted = _config(features, tmp_path / "interrupted", steps=10, schedule="constant")
    train(interrupted, show_progress=False)
    interrupted.steps = 20
    train(interrupted, resume=True, show_progress=False)
    a, b = _metrics(straight.run), _metrics(interrupted.run)
    assert [m["step"] for m in b] == list(range(1, 21))
    assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
    assert [m.get("val_loss") for m in a] == [m.get("val_loss") for m in b]
    assert (Path(interrupted.run) / "adapter" / "adapter_model.safetensors").is_file()
    assert (Path(interrupted.run) / "config.json").is_file()
    assert len(list((Path(interrupted.run) / "checkpoints").iterdir())) == 2  # keep_last


def test_training_never_imports_an_encoder(features, tmp_path):
    with imports_refused("shared.models.clip", "shared.models.synchformer", "shared.models.vae", "shared.models.mel", "open_clip",
                         "precompute") as refused:
        from train.config import TrainConfig
        from train.loop import train as train_anew

        train_anew(TrainConfig(features=[str(features)], run=str(tmp_path / "run"), profile="tiny", steps=2,
                               batch_size=2, device="cpu"), show_progress=False)
    assert refused.attempts == []
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_inputs_give_clear_errors(features, tmp_path):
    with pytest.raises(FeatureFormatError, match="no clips.tsv"):
        train(_config(tmp_path / "nowhere", tmp_path / "run"), show_progress=False)
    with pytest.raises(FeatureFormatError, match="another mode"):  # 16k features, a 44k network
        train(_config(features, tmp_path / "run", variant="large_44k_v2"), show_progress=False)
    corrupt = tmp_path / "adapter"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": "x"}')
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot load this adapter"):
        load_adapter(base_network("tiny", None, "small_16k")[0], corrupt)
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapter(base_network("tiny", None, "small_16k")[0], tmp_path)


def test_cli_train_with_toml_config(features, tmp_path):
    from typer.testing import CliRunner

    from mmaudio_lora.cli import app

    toml = tmp_path / "train.toml"
    toml.write_text("rank = 4\nalpha = 8.0\nlog_every = 1\nval_every = 3\nschedule = \"constant\"\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--features", str(features), "--run", str(run), "--profile", "tiny",
                                      "--steps", "3", "--batch-size", "2", "--config", str(toml)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["rank"] == 4
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3] and "val_loss" in _metrics(run)[-1]
    bad = tmp_path / "bad.toml"
    bad.write_text("ranks = 4\n")
    result = CliRunner().invoke(app, ["train", "--features", str(features), "--run", str(run), "--profile", "tiny",
                                      "--config", str(bad)])
    assert result.exit_code == 1 and "unknown option(s) ranks" in result.output


def test_two_processes_equal_one_with_the_same_global_batch(features, tmp_path):
    def command(run, launcher):
        return launcher + ["-m", "mmaudio_lora", "train", "--features", str(features), "--run-dir", str(run),
                           "--profile", "tiny", "--steps", "6", "--batch-size", "4", "--device", "cpu",
                           "--val-fraction", "0.2"]

    from typer.testing import CliRunner

    from mmaudio_lora.cli import app

    single = CliRunner().invoke(app, command(tmp_path / "one", [])[2:])  # in this process: no startup to pay
    assert single.exit_code == 0, single.output
    double = subprocess.run(command(tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        "--nproc_per_node=2"]),
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("trained 6 steps") == 1  # rank 0 reports
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)


def test_run_folder_rules_damaged_checkpoint_and_resume_summary(features, tmp_path, caplog):
    """A finished run is continued only with --resume and replaced only with --overwrite; a damaged
    newest checkpoint is named and the previous one used; the summary counts this invocation's steps."""
    from typer.testing import CliRunner

    from mmaudio_lora.cli import app

    run = tmp_path / "run"
    common = ["train", "--features", str(features), "--run", str(run), "--profile", "tiny", "--batch-size", "2"]
    toml = tmp_path / "every2.toml"
    toml.write_text("checkpoint_every = 2\nkeep_last = 3\nval_every = 2\nlog_every = 1\n")
    assert CliRunner().invoke(app, common + ["--steps", "4", "--config", str(toml)]).exit_code == 0
    refused = CliRunner().invoke(app, common + ["--steps", "4"])
    assert refused.exit_code == 1 and "already holds a training run; pass --resume" in refused.output
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]  # nothing touched

    (run / "checkpoints" / "step-000004" / "trainer_state.pt").write_bytes(b"\x80 truncated")
    with caplog.at_level("WARNING"):
        resumed = CliRunner().invoke(app, common + ["--steps", "6", "--config", str(toml), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert any("step-000004/trainer_state.pt is unreadable" in r.getMessage() for r in caplog.records)
    assert "trained 4 steps (now at step 6)" in resumed.output  # from step 2, the newest good checkpoint
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4, 5, 6]

    replaced = CliRunner().invoke(app, common + ["--steps", "2", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert [m["step"] for m in _metrics(run)] == [2]  # log_every 10: the last step only
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
