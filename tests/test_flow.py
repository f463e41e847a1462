"""Flow-matching objective and sampler: hand-checkable cases."""
import pytest
import torch

from shared.models.flow import (
    euler_sample,
    flow_loss,
    interpolate,
    sample_time,
    target_velocity,
    valid_frame_mask,
)
from shared.models.network import build_network


def test_path_and_target():
    x0 = torch.zeros(2, 3, 1)
    x1 = torch.ones(2, 3, 1) * 4
    t = torch.tensor([0.25, 1.0])
    xt = interpolate(x0, x1, t)
    assert torch.equal(xt[0], torch.full((3, 1), 1.0))
    assert torch.equal(xt[1], x1[1])
    assert torch.equal(target_velocity(x0, x1), x1)


def test_time_is_logit_normal_in_unit_interval():
    t = sample_time(10000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (10000,)
    assert (t > 0).all() and (t < 1).all()
    assert abs(t.mean().item() - 0.5) < 0.01  # symmetric around 1/2
    assert abs(torch.logit(t).std().item() - 1.0) < 0.03


def test_loss_by_hand():
    predicted = torch.zeros(1, 4, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [3.0, 3.0]]])
    # squared errors per frame: 1, 4, 0, 9 → mean 3.5
    assert flow_loss(predicted, target).item() == pytest.approx(3.5)
    mask = torch.tensor([[True, True, False, False]])
    assert flow_loss(predicted, target, mask).item() == pytest.approx(2.5)


def test_full_mask_equals_unmasked_loss():
    generator = torch.Generator().manual_seed(1)
    predicted, target = torch.randn(3, 250, 20, generator=generator), torch.randn(3, 250, 20, generator=generator)
    full = torch.ones(3, 250, dtype=torch.bool)
    assert torch.allclose(flow_loss(predicted, target, full), flow_loss(predicted, target))


def test_masked_loss_ignores_padded_frames():
    generator = torch.Generator().manual_seed(2)
    predicted, target = torch.randn(2, 250, 20, generator=generator), torch.randn(2, 250, 20, generator=generator)
    mask = valid_frame_mask(torch.tensor([157, 250]), 250)
    before = flow_loss(predicted, target, mask)
    target[0, 157:] += 100.0  # change only the padding of the first sample
    after = flow_loss(predicted, target, mask)
    assert torch.equal(before, after)


def test_valid_frame_mask():
    mask = valid_frame_mask(torch.tensor([2, 0, 4]), 4)
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    with pytest.raises(ValueError, match="no valid latent frame"):
        flow_loss(torch.zeros(3, 4, 1), torch.ones(3, 4, 1), mask)


def test_euler_without_guidance_follows_a_constant_flow():
    """With zero network output the sampler must return x0 unchanged; with steps it integrates."""
    network = build_network(None, latent_dim=4, clip_dim=8, sync_dim=8, text_dim=8, hidden_dim=32,
                            depth=2, fused_depth=1, num_heads=2).eval()
    with torch.no_grad():
        network.final_layer.conv.weight.zero_()
        network.final_layer.conv.bias.fill_(0.5)  # flow == 0.5 everywhere
    conditions = network.preprocess_conditions(torch.randn(1, 64, 8), torch.randn(1, 192, 8), torch.randn(1, 77, 8))
    empty = network.get_empty_conditions(1)
    x0 = torch.randn(1, 250, 4)
    for cfg in (0.0, 4.5):  # guidance of a constant flow is the same constant
        x1 = euler_sample(network, x0, conditions, empty, num_steps=5, cfg_strength=cfg)
        assert torch.allclose(x1, x0 + 0.5, atol=1e-5)
