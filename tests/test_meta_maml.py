"""MAML family against hand-computed references (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meta.functional import params_of
from meta.maml import InnerLoop, first_order_meta_grad, meta_batch_loss, query_loss, reptile_target, reptile_update
from tests.helpers import worst_relative_error


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def make_tasks(n_tasks=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_tasks, 6, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(n_tasks, 9, 4, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (n_tasks, 6), generator=g)
    yq = torch.randint(0, 3, (n_tasks, 9), generator=g)
    return xs, ys, xq, yq


def meta_grad(model, tasks, inner, vectorize=True, lrs=None, vmap_query=True):
    params = {k: v.detach().clone().requires_grad_() for k, v in params_of(model).items()}
    loss, _ = meta_batch_loss(model, params, tasks, inner, lrs=lrs, vectorize=vectorize, vmap_query=vmap_query)
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_finite_differences(steps):
    model, tasks = tiny_mlp(), make_tasks()
    inner = InnerLoop(steps=steps, lr=0.3)
    analytic = meta_grad(model, tasks, inner, vectorize=False)
    base = {k: v.detach().clone() for k, v in params_of(model).items()}

    def loss_at(p):
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        return meta_batch_loss(model, q, tasks, inner, vectorize=False)[0].item()

    assert worst_relative_error(analytic, base, loss_at) < 1e-4


def test_vmap_and_loop_paths_agree():
    model, tasks = tiny_mlp(), make_tasks(n_tasks=5)
    inner = InnerLoop(steps=3, lr=0.2)
    looped = meta_grad(model, tasks, inner, vectorize=False)
    batched = meta_grad(model, tasks, inner, vectorize=True)
    for k in looped:
        assert (looped[k] - batched[k]).abs().max() <= 1e-6
    params = {k: v.detach().clone().requires_grad_() for k, v in params_of(model).items()}
    loss, _ = meta_batch_loss(model, params, tasks, inner, vectorize=True, chunk_size=2)
    chunk_grads = torch.autograd.grad(loss, list(params.values()))
    for k, g in zip(params, chunk_grads):
        assert (g - looped[k]).abs().max() <= 1e-6


@pytest.mark.parametrize("steps", [0, 2])
def test_vmapped_inner_loop_with_looped_queries_agrees(steps):
    model, tasks = tiny_mlp(), make_tasks(n_tasks=4)
    inner = InnerLoop(steps=steps, lr=0.2)
    looped = meta_grad(model, tasks, inner, vectorize=False)
    hybrid = meta_grad(model, tasks, inner, vectorize=True, vmap_query=False)
    for k in looped:
        assert (looped[k] - hybrid[k]).abs().max() <= 1e-10
    if steps == 0:
        return
    # Meta-SGD's learned rates get the same gradient too
    lrs = {k: torch.full_like(v, 0.2, requires_grad=True) for k, v in model.named_parameters()}
    params = {k: v.detach().clone().requires_grad_() for k, v in params_of(model).items()}
    grads = []
    for mode in ({"vectorize": False}, {"vectorize": True, "vmap_query": False}):
        loss, _ = meta_batch_loss(model, params, tasks, inner, lrs=lrs, **mode)
        grads.append(torch.autograd.grad(loss, list(lrs.values())))
    assert all((a - b).abs().max() <= 1e-10 for a, b in zip(*grads))


def test_zero_inner_steps_is_the_ordinary_query_gradient():
    model, tasks = tiny_mlp(), make_tasks()
    got = meta_grad(model, tasks, InnerLoop(steps=0, lr=0.5))
    model.zero_grad()
    xq, yq = tasks[2], tasks[3]
    torch.stack([F.cross_entropy(model(xq[i]), yq[i]) for i in range(len(xq))]).mean().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-12)


# ---- linear least squares: every quantity has a closed form ------------------------

def mse(pred, y):
    return ((pred.squeeze(-1) - y) ** 2).mean()


def linear_model(w0):
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(np.asarray(w0, dtype=np.float64)[None]))
    return model


def grad_mse(w, X, y):
    return 2.0 / len(y) * X.T @ (X @ w - y)


def test_first_order_maml_matches_hand_computed():
    rng = np.random.default_rng(0)
    w = rng.normal(size=3)
    Xs, ys, Xq, yq = rng.normal(size=(5, 3)), rng.normal(size=5), rng.normal(size=(7, 3)), rng.normal(size=7)
    alpha, steps = 0.1, 2
    w_adapted = w.copy()
    for _ in range(steps):
        w_adapted = w_adapted - alpha * grad_mse(w_adapted, Xs, ys)
    expected = grad_mse(w_adapted, Xq, yq)

    model = linear_model(w)
    task = tuple(torch.tensor(a) for a in (Xs, ys, Xq, yq))
    got = first_order_meta_grad(model, params_of(model), task, InnerLoop(steps, alpha), loss_fn=mse)
    assert np.allclose(got["weight"].numpy().ravel(), expected, atol=1e-12)

    # The first_order flag of the general path gives the same gradient.
    params = {k: v.detach().clone().requires_grad_() for k, v in params_of(model).items()}
    loss, _ = query_loss(model, params, task, InnerLoop(steps, alpha, first_order=True), loss_fn=mse)
    (g,) = torch.autograd.grad(loss, [params["weight"]])
    assert np.allclose(g.numpy().ravel(), expected, atol=1e-12)


def test_reptile_update_matches_hand_computed():
    rng = np.random.default_rng(1)
    w = rng.normal(size=3)
    tasks = [(rng.normal(size=(4, 3)), rng.normal(size=4), rng.normal(size=(4, 3)), rng.normal(size=4))
             for _ in range(3)]
    lr, steps, epsilon = 0.05, 3, 0.5
    targets_np = []
    for Xs, ys, Xq, yq in tasks:
        X, y, v = np.vstack([Xs, Xq]), np.concatenate([ys, yq]), w.copy()
        for _ in range(steps):
            v = v - lr * grad_mse(v, X, y)
        targets_np.append(v)
    expected = w + epsilon * np.mean([t - w for t in targets_np], axis=0)

    model = linear_model(w)
    params = params_of(model, detach=True)
    targets = [reptile_target(model, params, tuple(torch.tensor(a) for a in t), steps, lr, loss_fn=mse)
               for t in tasks]
    updated = reptile_update(params, targets, epsilon)
    assert np.allclose(updated["weight"].numpy().ravel(), expected, atol=1e-12)


def test_meta_sgd_with_frozen_learning_rates_equals_maml():
    model, tasks = tiny_mlp(), make_tasks()
    inner = InnerLoop(steps=2, lr=0.25)
    maml = meta_grad(model, tasks, inner)
    lrs = {k: torch.full_like(v, 0.25) for k, v in params_of(model, detach=True).items()}
    meta_sgd = meta_grad(model, tasks, inner, lrs=lrs)
    for k in maml:
        assert torch.allclose(maml[k], meta_sgd[k], atol=1e-12)
    # And the learning rates themselves receive a gradient when they are learnable.
    lrs = {k: v.clone().requires_grad_() for k, v in lrs.items()}
    params = {k: v.detach().clone().requires_grad_() for k, v in params_of(model).items()}
    loss, _ = meta_batch_loss(model, params, tasks, inner, lrs=lrs)
    lr_grads = torch.autograd.grad(loss, list(lrs.values()))
    assert all(g.abs().sum() > 0 for g in lr_grads)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_task_parallel_meta_gradient_equals_single_loop(workers):
    from meta.parallel import TaskParallel

    model, tasks = tiny_mlp(), make_tasks(n_tasks=7)
    inner = InnerLoop(steps=2, lr=0.3)
    reference = meta_grad(model, tasks, inner, vectorize=False)
    runner = TaskParallel(model, workers)
    wrt = list(model.parameters())
    grads, loss, acc = runner.grad(params_of(model), wrt, tasks,
                                   lambda m, p, chunk: meta_batch_loss(m, p, chunk, inner, vectorize=True))
    runner.close()
    for (name, _), g in zip(model.named_parameters(), grads):
        assert (g - reference[name]).abs().max() <= 1e-10
    expected_loss, _ = meta_batch_loss(model, params_of(model), tasks, inner, vectorize=False)
    assert abs(loss - expected_loss.item()) < 1e-10 and 0 <= acc <= 1


def test_batch_statistics_conv4_is_exact_under_vmap():
    """MAML's transductive batch norm: the vmap path's second-order meta-gradient equals
    the loop's, and the one through a conv bias that feeds the norm is zero (the norm
    removes any per-channel shift).  With torch's own batch_norm the vmap path disagrees
    (it gives that bias -0.026)."""
    from models import build_model

    torch.manual_seed(0)
    model = build_model("conv4", (1, 16, 16), 3, channels=4, norm="batch").double()
    g = torch.Generator().manual_seed(2)
    tasks = (torch.randn(3, 3, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(3, 1),
             torch.randn(3, 6, 1, 16, 16, generator=g, dtype=torch.float64), torch.arange(3).repeat(3, 2))
    inner = InnerLoop(steps=2, lr=0.4)
    looped = meta_grad(model, tasks, inner, vectorize=False)
    for mode in (True, False):
        batched = meta_grad(model, tasks, inner, vectorize=True, vmap_query=mode)
        for k in looped:
            assert (looped[k] - batched[k]).abs().max() <= 1e-10, k
    assert looped["features.0.0.bias"].abs().max() <= 1e-10
    assert looped["features.0.1.weight"].abs().max() > 1e-4  # the norm's own scale does learn
