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


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_dkd_matches_hand_computation_and_decomposes_kd():
    """DKD's terms worked by hand on one example, and the paper's identity (its eq. 1):
    KD = TCKD + (1 - p_t) * NCKD, with p_t the teacher's target probability."""
    from meta.dkd import dkd_loss

    s, t, y, T = [2.0, 1.0, 0.0], [1.0, 2.0, 0.0], 0, 2.0
    ps, pt = _softmax([v / T for v in s]), _softmax([v / T for v in t])
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = _kl(_softmax([t[1] / T, t[2] / T]), _softmax([s[1] / T, s[2] / T]))
    got = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T, alpha=1.0, beta=8.0)
    assert abs(got.item() - T * T * (tckd + 8.0 * nckd)) < 1e-5  # float32
    decomposed = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), T, alpha=1.0, beta=1 - pt[0])
    assert abs(decomposed.item() - T * T * _kl(pt, ps)) < 1e-5


def test_dkd_equals_the_reference_formula_on_a_batch():
    """mdistiller's dkd_loss written out (cat_mask, kl_div summed / batch, the 1000 mask)."""
    import torch.nn.functional as F

    from meta.dkd import dkd_loss

    torch.manual_seed(0)
    s, t, y, T, a, b = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)), 4.0, 1.0, 8.0
    gt = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    cat = lambda p: torch.cat([(p * gt).sum(1, keepdims=True), (p * ~gt).sum(1, keepdims=True)], dim=1)
    ps, pt = cat(F.softmax(s / T, dim=1)), cat(F.softmax(t / T, dim=1))
    tckd = F.kl_div(torch.log(ps), pt, reduction="sum") * T ** 2 / 8
    nckd = F.kl_div(F.log_softmax(s / T - 1000.0 * gt, dim=1), F.softmax(t / T - 1000.0 * gt, dim=1),
                    reduction="sum") * T ** 2 / 8
    assert torch.allclose(dkd_loss(s, t, y, T, a, b), a * tckd + b * nckd, atol=1e-6)


def test_dist_matches_hand_computed_pearson_correlations():
    from meta.dist_kd import dist_loss

    def pearson(u: list[float], v: list[float]) -> float:
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        num = sum((a - mu) * (b - mv) for a, b in zip(u, v))
        return num / math.sqrt(sum((a - mu) ** 2 for a in u) * sum((b - mv) ** 2 for b in v))

    s, t, T, beta, gamma = [[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]], [[1.0, 0.0, 2.0], [1.0, 0.5, 0.0]], 2.0, 1.5, 0.5
    ys, yt = [_softmax([v / T for v in row]) for row in s], [_softmax([v / T for v in row]) for row in t]
    inter = 1 - (pearson(ys[0], yt[0]) + pearson(ys[1], yt[1])) / 2
    cols = lambda m: [[row[j] for row in m] for j in range(3)]  # 2 examples per class: r = +-1
    intra = 1 - sum(pearson(a, b) for a, b in zip(cols(ys), cols(yt))) / 3
    got = dist_loss(torch.tensor(s), torch.tensor(t), T, beta, gamma)
    assert abs(got.item() - T * T * (beta * inter + gamma * intra)) < 1e-5
    assert dist_loss(torch.tensor(s), torch.tensor(s), T, beta, gamma).abs() < 1e-5  # identical: no loss
