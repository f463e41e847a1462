"""What a CPU can show of the CUDA path: attention inputs the fused kernels take, float32 kept
exact, decoding bounded by shared memory, and every rank of a job fed alike."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.lora import base_network


def test_every_tensor_reaching_attention_has_a_unit_last_stride(monkeypatch):
    """The fused kernels (flash, memory-efficient, cuDNN) need stride 1 in the last dimension;
    anything else falls back to the math kernel (and can crash cuDNN training)."""
    import shared.models.layers

    seen = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.extend(t.stride(-1) for t in (q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(shared.models.layers.F, "scaled_dot_product_attention", recording)
    for variant in ("small_16k", "large_44k_v2"):  # joint and fused blocks, v1 and v2
        network = base_network("tiny", None, variant)[0]
        c = network.config
        network(torch.randn(1, c.latent_seq_len, c.latent_dim), torch.randn(1, c.clip_seq_len, c.clip_dim),
                torch.randn(1, c.sync_seq_len, c.sync_dim), torch.randn(1, 77, c.text_dim), torch.rand(1)).sum().backward()
    assert seen and set(seen) == {1}, sorted(set(seen))


def test_float32_stays_float32_on_cuda():
    """TF32 is off for float32 matrix products and convolutions: the VAE, vocoder, --precision fp32
    and the device check's reference are exact float32 (torch runs convolutions in TF32 by default)."""
    from shared.device import exact_float32, uses_bf16

    exact_float32()
    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):
        assert backends.cudnn.conv.fp32_precision == "ieee" and backends.cuda.matmul.fp32_precision == "ieee"
    else:
        assert not backends.cudnn.allow_tf32 and not backends.cuda.matmul.allow_tf32
    cpu = torch.device("cpu")
    assert not uses_bf16(cpu, "auto") and uses_bf16(cpu, "bf16") and not uses_bf16(cpu, "fp32")


def test_decoding_is_bounded_by_free_shared_memory():
    from precompute.decode import clip_bytes, out_of_shared_memory, plan_decoding

    per_clip = clip_bytes("44k", 8.0)
    assert 55e6 < per_clip < 65e6  # uint8 frames: a quarter of the 235 MB float32 took
    roomy = plan_decoding(12, 8, "44k", 8.0, free_bytes=10**12)
    assert (roomy.workers, roomy.prefetch) == (12, 2)
    container = plan_decoding(12, 8, "44k", 8.0, free_bytes=2 * 10**9)  # a 2 GB /dev/shm
    assert container.workers * container.prefetch * 8 * per_clip <= 10**9 and container.workers >= 1
    tiny = plan_decoding(12, 8, "44k", 8.0, free_bytes=64 * 10**6)  # docker's default 64 MB: not one batch fits
    assert (tiny.workers, tiny.prefetch) == (0, None)  # decoded in the main process, never a worker that hangs
    assert plan_decoding(12, 1, "16k", 1.0, free_bytes=64 * 10**6).workers >= 1  # small batches still fit
    assert plan_decoding(0, 8, "44k", 8.0, free_bytes=64 * 10**6).workers == 0
    assert out_of_shared_memory(RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. It is "
                                             "possible that dataloader's workers are out of shared memory."))
    assert not out_of_shared_memory(RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly"))


def test_each_rank_gets_rows_and_draws_the_global_batch_s_noise(features, tmp_path):
    """A batch of fewer clips than the batch size (a small set) is cut to a multiple of the ranks,
    so no rank trains on nothing (a NaN loss), and both ranks draw the same global noise."""
    from shared.distributed import Ranks
    from train.config import TrainConfig
    from train.loop import Trainer

    config = TrainConfig(features=[str(features)], run=str(tmp_path / "run"), profile="tiny", batch_size=8,
                         device="cpu", val_ids=["c0", "c1", "c2"]).validate()  # 3 training clips, batch 8
    sizes = []
    for rank in (0, 1):
        trainer = Trainer(config, tmp_path / "run", Ranks(rank, 2), config.runtime())
        seq, batch, size = trainer.batch(0)
        sizes.append((batch["a_mean"].shape[0], size))
    assert sizes == [(1, 2), (1, 2)]
    with pytest.raises(Exception, match="cannot feed 4 processes"):
        Trainer(config, tmp_path / "run", Ranks(0, 4), config.runtime())
