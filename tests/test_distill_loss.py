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


def test_transfer_examples_get_the_soft_term_only():
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([2, 0, -1, 1, -1])
    T, alpha = 2.0, 0.7
    log_q, log_p = (s / T).log_softmax(-1), (t / T).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    labelled = y >= 0
    ce = torch.nn.functional.cross_entropy(s[labelled], y[labelled])
    expected = alpha * T * T * kl.mean() + (1 - alpha) * ce
    assert torch.allclose(distillation_loss(s, t, y, T, alpha), expected)
    # A transfer example's label is never read: any negative value gives the same loss.
    assert torch.equal(distillation_loss(s, t, y, T, alpha), distillation_loss(s, t, y.where(labelled, -7), T, alpha))
    # A batch of transfer examples alone is pure soft loss, whatever alpha says about CE.
    none = torch.full((5,), -1)
    assert torch.allclose(distillation_loss(s, t, none, T, alpha), alpha * T * T * kl.mean())


def test_per_example_alpha_weighs_each_example():
    torch.manual_seed(1)
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    w = torch.tensor([0.0, 0.5, 1.0])
    T = 3.0
    log_q, log_p = (s / T).log_softmax(-1), (t / T).log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    expected = T * T * (w * kl).mean() + ((1 - w) * ce).sum() / 3
    assert torch.allclose(distillation_loss(s, t, y, T, w), expected)
    assert torch.allclose(distillation_loss(s, t, y, T, torch.full((3,), 0.4)), distillation_loss(s, t, y, T, 0.4))
