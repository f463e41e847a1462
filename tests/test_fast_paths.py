"""The training fast paths keep the numbers: compiled blocks equal eager ones, DDP gets the settings
MMAudio's trainer uses, and every rank makes the same choices."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.lora import add_lora, base_network, lora_config
from shared.models.sequence import SequenceConfig
from shared.synthesis import use_duration
from train.config import DEFAULT_TARGETS, TrainConfig
from train.objective import training_loss


def _lora_network():
    network = base_network("tiny", None, "small_16k")[0]
    model = add_lora(network, lora_config(16, 16, 0.0, DEFAULT_TARGETS))
    generator = torch.Generator().manual_seed(1)
    for parameter in model.parameters():
        if parameter.requires_grad:  # LoRA's B starts at zero: give every LoRA weight a gradient
            torch.nn.init.normal_(parameter, std=0.02, generator=generator)
    return network, model


def _batch(seconds: float, network) -> tuple[SequenceConfig, dict]:
    seq, c, g = SequenceConfig("16k", seconds), network.config, torch.Generator().manual_seed(int(seconds * 10))
    return seq, {"a_mean": torch.randn(2, seq.latent_seq_len, c.latent_dim, generator=g),
                 "a_std": torch.rand(2, seq.latent_seq_len, c.latent_dim, generator=g),
                 "clip_features": torch.randn(2, seq.clip_seq_len, c.clip_dim, generator=g),
                 "sync_features": torch.randn(2, seq.sync_seq_len, c.sync_dim, generator=g),
                 "text_features": torch.randn(2, 77, c.text_dim, generator=g),
                 "duration_sec": torch.tensor([seconds, seconds - 0.5])}


def test_compiled_blocks_give_the_eager_loss_and_gradients_at_two_bucket_lengths():
    """Regional compilation (train.loop.compile_blocks) under peft, at two lengths through the same
    graphs. The CPU test compiles with aot_eager (dynamo's capture, AOT autograd and functionalization:
    all but inductor's code generation, which costs minutes on two cores; bench/train.py --compile
    and make gpu-check run inductor)."""
    from train.loop import compile_blocks

    eager_network, eager = _lora_network()
    compiled_network, compiled = _lora_network()
    compile_blocks(compiled_network, backend="aot_eager")
    for seconds in (3.0, 5.0):
        results = []
        for network, model in ((eager_network, eager), (compiled_network, compiled)):
            seq, batch = _batch(seconds, network)
            use_duration(network, seq)
            loss = training_loss(network, batch, seq, torch.Generator().manual_seed(0), 0.1, model)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
            model.zero_grad(set_to_none=True)
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        assert ((compiled_loss - eager_loss).abs() / eager_loss.abs()).item() <= 1e-4
        assert max(((c - e).abs().max() / e.abs().max()).item() for c, e in zip(compiled_grads, eager_grads)) <= 1e-4
    assert all(block._compiled_call_impl is not None for block in compiled_network.joint_blocks)


def test_ddp_gets_mmaudio_s_settings_and_accumulation_syncs_once(features, tmp_path):
    """In a one-process group (gloo): no buffer broadcast, and with three micro-steps the gradients
    are all-reduced only at the last one."""
    import torch.distributed as dist

    from shared.distributed import Ranks
    from train.loop import Trainer

    config = TrainConfig(features=[str(features)], run=str(tmp_path / "run"), profile="tiny", batch_size=2,
                         grad_accumulation=3, device="cpu", compile="off").validate()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        trainer = Trainer(config, tmp_path / "run", Ranks(0, 1, torch.device("cpu"), grouped=True), config.runtime())
        synced = getattr(trainer.forward, "forward_sync_buffers", None)  # torch ≥ 2.14; before: broadcast_buffers
        assert trainer.forward is not trainer.model
        assert (synced if synced is not None else trainer.forward.broadcast_buffers) is False
        skipped = []
        real = trainer.forward.no_sync

        def counting():
            skipped.append(trainer.step)
            return real()

        trainer.forward.no_sync = counting
        trainer.train_step()
        trainer.train_step()
        assert skipped == [0, 0, 1, 1]  # two of the three micro-steps of each step
    finally:
        dist.destroy_process_group()


def _two_ranks(rank: int, folder: str) -> None:
    """One of two gloo ranks: each sees other validation losses (rank 1's keep improving, so alone it
    would never stop); the choices are made on rank 0's."""
    import torch.distributed as dist

    from shared.distributed import Ranks
    from train.choices import Choices

    import datetime

    # a rank left waiting fails within minutes instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=2,
                            timeout=datetime.timedelta(minutes=5))
    ranks = Ranks(rank, 2, torch.device("cpu"), grouped=True)
    mine = [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99] if rank == 0 else [1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    choices, stopped = Choices(patience=2), None
    for step, loss in enumerate(mine, start=1):
        choices.record(step, ranks.from_main(loss))
        if choices.stop:
            stopped = step
            break
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"stopped": stopped, "best": choices.best_step}))
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_stops_at_the_step_rank_0_decides(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert outcomes[0] == outcomes[1] == {"stopped": 4, "best": 2}


@pytest.mark.parametrize("setting,device,expected", [("auto", "cpu", False), ("on", "cpu", True), ("off", "cpu", False)])
def test_compile_setting(setting, device, expected, features, tmp_path, monkeypatch):
    """auto compiles on CUDA only; the choice reaches the blocks (checked without compiling)."""
    import train.loop as loop

    compiled = []
    monkeypatch.setattr(loop, "compile_blocks", lambda network: compiled.append(network))
    config = TrainConfig(features=[str(features)], run=str(tmp_path / "run"), profile="tiny", batch_size=2,
                         device=device, compile=setting).validate()
    loop.Trainer(config, tmp_path / "run", loop.Ranks(), config.runtime())
    assert bool(compiled) == expected
    with pytest.raises(ValueError, match="compile must be auto, on or off"):
        TrainConfig(features=[str(features)], compile="sometimes").validate()
