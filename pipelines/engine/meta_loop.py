"""Outer loops for meta-learning an initialisation (and, for Meta-SGD, per-parameter
inner learning rates), plus few-shot evaluation on fixed tasks.  The algorithms are the
functions of ``meta.maml``; this module owns the optimiser, the sampler and logging."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from meta.functional import forward, params_of
from meta.maml import InnerLoop, adapt, meta_batch_loss, reptile_target
from meta.parallel import TaskParallel
from meta.tasks import Tasks, TaskSampler
from pipelines.engine import distributed
from pipelines.engine.checkpoint import Checkpointer
from pipelines.config.students import MamlConfig
from pipelines.common.progress import progress_bar
from pipelines.engine.loop import LogFn
from pipelines.engine.metrics import check_finite
from pipelines.engine.device import device_of, to_device


@dataclass
class MetaResult:
    lrs: dict[str, torch.Tensor] | None = None  # Meta-SGD's learned inner learning rates
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    tasks: int = 0


def meta_train(model: nn.Module, sampler: TaskSampler, cfg: MamlConfig, seed: int,
               on_log: LogFn | None = None, desc: str = "meta-train",
               checkpoint: Checkpointer | None = None) -> MetaResult:
    """Meta-train ``model``'s parameters in place as an initialisation.

    Under torchrun every rank draws the same meta-batch, computes the meta-gradient of its
    share of the tasks, and the shares are averaged: the step one process would take."""
    generator = torch.Generator().manual_seed(seed)
    local = distributed.shard(cfg.meta_batch)
    inner = InnerLoop(cfg.inner_steps, cfg.inner_lr, first_order=cfg.algorithm == "fomaml")
    lrs = None
    if cfg.algorithm == "metasgd":
        lrs = {k: torch.full_like(v, cfg.inner_lr, requires_grad=True) for k, v in model.named_parameters()}
    meta_params = list(model.parameters()) + (list(lrs.values()) if lrs else [])
    if cfg.algorithm == "reptile":
        optimizer = torch.optim.SGD(meta_params, lr=cfg.outer_lr)
    else:
        optimizer = torch.optim.Adam(meta_params, lr=cfg.outer_lr)
    result = MetaResult(lrs=lrs, curve={"meta_query_loss": [], "meta_query_acc": []})
    # Reptile needs no meta-gradient threads; idle ones would slow other kernels down.  On
    # CUDA one vmap over the whole task batch keeps the GPU busy; threads would only queue.
    device = device_of(model)
    workers = 1 if device.type == "cuda" else min(cfg.workers or torch.get_num_threads(), local.stop - local.start)
    runner = None if cfg.algorithm == "reptile" else TaskParallel(model, workers)
    first, spent = 1, 0.0
    if checkpoint is not None and (state := checkpoint.load("meta")) is not None:
        first, spent = _restore(state, model, lrs, optimizer, generator, result)
        print(f"{desc}: resumed from step {state['step']}", flush=True)

    def chunk_loss(replica: nn.Module, params, chunk):
        return meta_batch_loss(replica, params, chunk, inner, lrs=lrs, vectorize=cfg.vectorize,
                               chunk_size=cfg.chunk_size, vmap_query=cfg.vmap_query)

    start = time.perf_counter() - spent
    with progress_bar(desc, total=cfg.meta_steps) as advance:
        for step in range(first, cfg.meta_steps + 1):
            tasks = tuple(to_device(t[local], device) for t in sampler.sample(cfg.meta_batch, generator))
            optimizer.zero_grad(set_to_none=True)
            if cfg.algorithm == "reptile":
                loss, acc = _reptile_pseudo_gradient(model, tasks, cfg)
            else:
                grads, loss, acc = runner.grad(params_of(model), meta_params, tasks, chunk_loss)
                for p, g in zip(meta_params, grads):
                    p.grad = g
            distributed.average_([p.grad for p in meta_params])  # local share -> whole meta-batch
            loss, acc = distributed.mean_scalars([float(loss), float(acc)])
            check_finite(loss, desc, step, "meta query loss")
            optimizer.step()
            result.steps, result.tasks = step, result.tasks + cfg.meta_batch
            advance()
            if step % cfg.log_every == 0 or step == cfg.meta_steps:
                metrics = {"meta_query_loss": float(loss), "meta_query_acc": float(acc)}
                for k, v in metrics.items():
                    result.curve[k].append((step, v))
                if on_log is not None:
                    on_log(step, metrics)
            # Ranks must agree on stopping, or the others would wait in all_reduce forever.
            over_budget = cfg.time_budget_s is not None and distributed.mean_scalars(
                [float(time.perf_counter() - start > cfg.time_budget_s)])[0] > 0
            if checkpoint is not None and (over_budget or checkpoint.due(step, cfg.meta_steps)):
                checkpoint.save("meta", {"step": cfg.meta_steps if over_budget else step,
                                         "params": {k: v.detach() for k, v in model.named_parameters()},
                                         "lrs": {k: v.detach() for k, v in (lrs or {}).items()},
                                         "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                         "curve": result.curve,
                                         "tasks": result.tasks, "seconds": time.perf_counter() - start})
            if over_budget:
                break
    result.seconds = time.perf_counter() - start
    if runner is not None:
        runner.close()
    if lrs is not None:
        result.lrs = {k: v.detach() for k, v in lrs.items()}
    return result


def _restore(state: dict, model: nn.Module, lrs, optimizer, generator, result: MetaResult) -> tuple[int, float]:
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(state["params"][k])
        for k, v in (lrs or {}).items():
            v.copy_(state["lrs"][k])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    result.curve = state["curve"]
    result.steps, result.tasks = state["step"], state["tasks"]
    return state["step"] + 1, state["seconds"]


def _reptile_pseudo_gradient(model: nn.Module, tasks: Tasks, cfg: MamlConfig):
    """Set ``p.grad = p - mean_i(p_i')`` so that SGD with lr epsilon is Reptile's update."""
    params = params_of(model, detach=True)
    targets = [reptile_target(model, params, tuple(t[i] for t in tasks), cfg.inner_steps, cfg.inner_lr)
               for i in range(len(tasks[0]))]
    for name, p in model.named_parameters():
        p.grad = p.detach() - torch.stack([t[name] for t in targets]).mean(0)
    with torch.no_grad():  # report the query loss after adaptation, as the other algorithms do
        xq, yq = tasks[2], tasks[3]
        logits = torch.stack([forward(model, t, xq[i]) for i, t in enumerate(targets)])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), yq.flatten())
        acc = (logits.argmax(-1) == yq).float().mean()
    return loss, acc


def evaluate_tasks(model: nn.Module, tasks: Tasks, steps: int, lr: float,
                   lrs: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """Adapt on each task's support set, score its query set.  Returns the mean query
    accuracy and its 95% confidence half-width (1.96 * std / sqrt(n))."""
    accs = []
    inner = InnerLoop(steps, lr, first_order=True)
    base = {k: v.detach().requires_grad_() for k, v in params_of(model).items()}
    device = device_of(model)
    for task in zip(*tasks):
        xs, ys, xq, yq = (to_device(t, device) for t in task)
        with torch.enable_grad():
            adapted = adapt(model, base, xs, ys, inner, lrs)
        with torch.no_grad():
            accs.append((forward(model, adapted, xq).argmax(-1) == yq).float().mean().item())
    t = torch.tensor(accs)
    half = 1.96 * t.std(unbiased=True).item() / math.sqrt(len(accs)) if len(accs) > 1 else 0.0
    return t.mean().item(), half
