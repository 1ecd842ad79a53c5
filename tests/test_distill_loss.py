import math

import torch

from meta.distill import distillation_loss


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    T, alpha = 2.0, 0.75
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    ce = -math.log(math.exp(1) / (math.exp(1) + 1))
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert abs(distillation_loss(s, t, y, T, alpha).item() - expected) < 1e-6


def test_mse_soft_loss_and_alpha_zero_is_cross_entropy():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    assert torch.allclose(distillation_loss(s, t, y, 3.0, 0.0), torch.nn.functional.cross_entropy(s, y))
    ps, pt = (s / 3).softmax(-1), (t / 3).softmax(-1)
    expected = 9 * (ps - pt).pow(2).sum(-1).mean()
    assert torch.allclose(distillation_loss(s, t, y, 3.0, 1.0, "mse"), expected)


def test_identical_logits_have_zero_soft_loss():
    s = torch.randn(6, 5)
    assert distillation_loss(s, s.clone(), torch.zeros(6, dtype=torch.long), 4.0, 1.0).abs() < 1e-6
