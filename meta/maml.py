"""MAML (Finn et al. 2017), first-order MAML, Meta-SGD (Li et al. 2017) and Reptile
(Nichol et al. 2018) as small functions over parameter dicts.

The API is learn2learn-sized: ``adapt`` returns adapted parameters for one task's support
set; ``query_loss`` adapts and returns the query loss (and accuracy) that the trainer's
outer loop differentiates.  ``meta_batch_loss`` runs a meta-batch of tasks batched with
``torch.func.vmap`` (in chunks, to bound memory), with a plain per-task loop, or with
vmap for the inner loops and a loop for the query sets; all give the same
meta-gradient.  The outer optimiser, the task sampler and logging stay in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad as func_grad
from torch.func import vmap

from meta.functional import LossFn, Params, cross_entropy, forward, sgd_step


@dataclass(frozen=True)
class InnerLoop:
    steps: int = 5
    lr: float = 0.4
    first_order: bool = False


def adapt(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, inner: InnerLoop,
          lrs: Params | None = None, loss_fn: LossFn = cross_entropy) -> Params:
    """``inner.steps`` SGD steps on (x, y) from ``params``; keeps the graph for second
    order unless ``inner.first_order`` (then inner gradients are constants).  ``lrs``
    (Meta-SGD) replaces the scalar learning rate by learned per-parameter tensors."""
    lr = lrs if lrs is not None else inner.lr
    for _ in range(inner.steps):
        loss = loss_fn(forward(model, params, x), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not inner.first_order)
        if inner.first_order:
            grads = tuple(g.detach() for g in grads)
        params = sgd_step(params, grads, lr)
    return params


def query_loss(model: nn.Module, params: Params, task: tuple[torch.Tensor, ...], inner: InnerLoop,
               lrs: Params | None = None, loss_fn: LossFn = cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapt on the task's support set, return (query loss, query accuracy)."""
    xs, ys, xq, yq = task
    return _score(model, adapt(model, params, xs, ys, inner, lrs, loss_fn), xq, yq, loss_fn)


def _score(model: nn.Module, params: Params, xq: torch.Tensor, yq: torch.Tensor,
           loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    logits = forward(model, params, xq)
    return loss_fn(logits, yq), (logits.argmax(-1) == yq).float().mean()


def _vmappable(model: nn.Module, inner: InnerLoop, loss_fn: LossFn):
    """Per-task functions for vmap: inner gradients by ``torch.func.grad`` (composable
    with vmap and with the outer autograd for second order)."""

    def support_loss(p: Params, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return loss_fn(forward(model, p, xs), ys)

    def adapt_one(params: Params, lrs: Params | None, xs, ys) -> Params:
        lr = lrs if lrs is not None else inner.lr
        p = params
        for _ in range(inner.steps):
            g = func_grad(support_loss)(p, xs, ys)
            if inner.first_order:
                g = {k: v.detach() for k, v in g.items()}
            p = sgd_step(p, g, lr)
        return p

    def query_one(params: Params, lrs: Params | None, xs, ys, xq, yq):
        return _score(model, adapt_one(params, lrs, xs, ys), xq, yq, loss_fn)

    return adapt_one, query_one


def meta_batch_loss(model: nn.Module, params: Params, tasks: tuple[torch.Tensor, ...], inner: InnerLoop,
                    lrs: Params | None = None, vectorize: bool = True, chunk_size: int | None = None,
                    loss_fn: LossFn = cross_entropy, vmap_query: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean query loss and accuracy over a meta-batch ``tasks = (xs, ys, xq, yq)`` whose
    tensors have a leading task dimension.  Differentiate the loss with respect to
    ``params`` (and ``lrs``) for the meta-gradient.

    ``vectorize=False`` loops over tasks.  With ``vectorize``, vmap batches the tasks'
    inner loops, and the query pass too unless ``vmap_query=False``: then each task's
    query set is scored in a loop.  Small support sets are dominated by per-operator
    overhead, which vmap shares across tasks; large query sets are dominated by
    convolutions, which run faster as ordinary per-task convolutions on the CPU than as
    vmap's grouped ones."""
    xs, ys, xq, yq = tasks
    if not vectorize:
        results = [query_loss(model, params, (xs[i], ys[i], xq[i], yq[i]), inner, lrs, loss_fn)
                   for i in range(len(xs))]
    else:
        adapt_one, query_one = _vmappable(model, inner, loss_fn)
        if vmap_query:
            losses, accs = vmap(query_one, in_dims=(None, None, 0, 0, 0, 0), chunk_size=chunk_size,
                                randomness="error")(params, lrs, xs, ys, xq, yq)
            return losses.mean(), accs.mean()
        adapted = vmap(adapt_one, in_dims=(None, None, 0, 0), chunk_size=chunk_size,
                       randomness="error")(params, lrs, xs, ys)
        results = [_score(model, {k: v[i] for k, v in adapted.items()}, xq[i], yq[i], loss_fn)
                   for i in range(len(xs))]
    losses, accs = zip(*results)
    return torch.stack(losses).mean(), torch.stack(accs).mean()


def first_order_meta_grad(model: nn.Module, params: Params, task: tuple[torch.Tensor, ...], inner: InnerLoop,
                          loss_fn: LossFn = cross_entropy) -> Params:
    """FOMAML's gradient for one task: the query-loss gradient at the adapted
    parameters, used as the gradient at the initial ones."""
    xs, ys, xq, yq = task
    adapted = adapt(model, {k: v.detach().requires_grad_() for k, v in params.items()}, xs, ys,
                    InnerLoop(inner.steps, inner.lr, first_order=True), loss_fn=loss_fn)
    adapted = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    loss = loss_fn(forward(model, adapted, xq), yq)
    return dict(zip(adapted, torch.autograd.grad(loss, list(adapted.values()))))


def reptile_target(model: nn.Module, params: Params, task: tuple[torch.Tensor, ...], steps: int, lr: float,
                   loss_fn: LossFn = cross_entropy) -> Params:
    """Parameters after ``steps`` plain SGD steps on the whole task (support + query)."""
    xs, ys, xq, yq = task
    x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
    p = {k: v.detach().requires_grad_() for k, v in params.items()}
    for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(forward(model, p, x), y), list(p.values()))
        p = {k: (v - lr * g).detach().requires_grad_() for (k, v), g in zip(p.items(), grads)}
    return {k: v.detach() for k, v in p.items()}


@torch.no_grad()
def reptile_update(params: Params, targets: list[Params], epsilon: float) -> Params:
    """``theta + epsilon * mean_i(theta_i' - theta)``."""
    return {k: v + epsilon * torch.stack([t[k] - v for t in targets]).mean(0) for k, v in params.items()}
