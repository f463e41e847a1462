"""Length buckets, gradient checkpointing and early stopping (train/buckets.py, the Trainer)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.buckets import bucket_lengths, epoch_order, epoch_plan
from train.config import TrainConfig
from train.loop import train


def _config(features, run, **options) -> TrainConfig:
    values = dict(features=[str(features)], run=str(run), profile="tiny", steps=12, batch_size=2, warmup_steps=2,
                  val_every=4, log_every=1, checkpoint_every=100, device="cpu")
    values.update(options)
    return TrainConfig(**values)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_bucket_lengths_round_up_within_the_window():
    assert bucket_lengths([2.0, 2.001, 3.4, 7.95, 8.0], 1.0, 8.0) == [2.0, 3.0, 4.0, 8.0, 8.0]
    assert bucket_lengths([0.3, 5.0], 2.0, 8.0) == [2.0, 6.0]
    assert bucket_lengths([2.0, 5.0], 0.0, 8.0) == [8.0, 8.0]


def test_epoch_plan_keeps_batches_full_and_clips_no_shorter_than_their_bucket():
    buckets = [2.0, 3.0, 3.0, 5.0, 8.0, 2.0, 4.0, 8.0, 6.0, 3.0, 2.0]
    for epoch in range(5):
        plan = epoch_plan(buckets, 3, seed=7, epoch=epoch)
        assert plan == epoch_plan(buckets, 3, seed=7, epoch=epoch)  # a function of (seed, epoch)
        assert len(plan) == len(buckets) // 3 and all(len(b.indices) == 3 for b in plan)
        used = [i for b in plan for i in b.indices]
        assert len(set(used)) == len(used)
        assert all(buckets[i] <= b.seconds for b in plan for i in b.indices)  # carried up, never cut
    # one bucket: the fixed window's plan, consecutive slices of the shuffled order
    fixed = epoch_plan([8.0] * 7, 2, seed=3, epoch=1)
    order = epoch_order(7, 3, 1).tolist()
    assert [b.indices for b in fixed] == [order[0:2], order[2:4], order[4:6]]


@pytest.fixture(scope="module")
def full_window_features(features, tmp_path_factory):
    """The session's features with every clip marked as a full 8 s window."""
    from tensordict import TensorDict

    copy = tmp_path_factory.mktemp("eight-seconds") / "features"
    shutil.copytree(features, copy)
    memmap = TensorDict.load_memmap(copy / "memmap")
    memmap["duration_sec"][:] = 8.0
    return copy


def test_every_clip_at_the_window_trains_exactly_as_the_fixed_window(full_window_features, tmp_path):
    bucketed = _config(full_window_features, tmp_path / "buckets", length_bucket_sec=1.0)
    fixed = _config(full_window_features, tmp_path / "fixed", length_bucket_sec=0.0)
    train(bucketed, show_progress=False)
    train(fixed, show_progress=False)
    assert _metrics(bucketed.run) == _metrics(fixed.run)
    a = load_file(Path(bucketed.run) / "adapter" / "adapter_model.safetensors")
    b = load_file(Path(fixed.run) / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_short_clips_train_at_their_bucket_length(features, tmp_path):
    from train.loop import Trainer
    from shared.distributed import Ranks

    config = _config(features, tmp_path / "run", length_bucket_sec=1.0, val_fraction=0.0).validate()
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, tmp_path / "run", Ranks(), config.runtime())
    lengths = set()
    for position in range(trainer.batches_per_epoch * 3):
        seq, batch, _ = trainer.batch(position)
        assert batch["a_mean"].shape[1] == seq.latent_seq_len and batch["clip_features"].shape[1] == seq.clip_seq_len
        assert (batch["duration_sec"] <= seq.window_sec + 1e-6).all()
        lengths.add(seq.window_sec)
    assert len(lengths) > 1 and min(lengths) < 8.0


def test_gradient_checkpointing_gives_the_same_gradients(features):
    from shared.lora import add_lora, base_network, lora_config
    from shared.features import FeatureSet, data_dim
    from shared.profiles import feature_dims
    from shared.models.sequence import SequenceConfig
    from train.config import DEFAULT_TARGETS
    from train.objective import training_loss

    seq = SequenceConfig("16k")
    clips = FeatureSet.load([str(features)], data_dim(seq, feature_dims("tiny")), 8.0)
    gradients = []
    for checkpointing in (False, True):
        network = base_network("tiny", None, "small_16k")[0]
        model = add_lora(network, lora_config(4, 4.0, 0.0, DEFAULT_TARGETS))
        for name, parameter in model.named_parameters():  # LoRA B starts at zero: give it a value
            if parameter.requires_grad:
                torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        network.gradient_checkpointing = checkpointing
        loss = training_loss(network, clips.batch([0, 1, 2]), seq, torch.Generator().manual_seed(0), forward=model)
        loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-5)


def test_early_stopping_keeps_the_best_adapter(features, tmp_path, monkeypatch):
    """Validation gets worse after the second check (the losses are scripted, the training is
    real): the run stops after `patience` worse validations and its adapter is the best one."""
    from train.loop import Trainer

    losses = iter([4.0, 3.0, 3.5, 3.6, 3.7, 3.8])
    validate = Trainer.validate
    monkeypatch.setattr(Trainer, "validate", lambda self, clips: None if validate(self, clips) is None else next(losses))
    config = _config(features, tmp_path / "run", steps=40, lr=1e-2, warmup_steps=1, val_every=2,
                     early_stopping_patience=2, val_ids=["c0", "c1"])
    result = train(config, show_progress=False)
    assert result.best_step == 4 and result.steps == 8
    assert result.stopped_early and result.steps < 40 and result.best_step is not None
    assert result.steps == result.best_step + 2 * 2  # two validations, two steps apart
    best = load_file(tmp_path / "run" / "best" / "adapter" / "adapter_model.safetensors")
    final = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)
    assert json.loads((tmp_path / "run" / "best" / "step.json").read_text())["step"] == result.best_step
