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
from pipelines.common.progress import progress_bar
from pipelines.config.students import MamlConfig
from pipelines.engine import distributed
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.device import device_of, to_device
from pipelines.engine.loop import LogFn
from pipelines.engine.metrics import check_finite


@dataclass
class MetaResult:
    lrs: dict[str, torch.Tensor] | None = None  # Meta-SGD's learned inner learning rates
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    tasks: int = 0


class MetaState:
    """What a resumed meta-training needs, saved whole by the checkpoint: the
    initialisation, Meta-SGD's inner learning rates, the optimiser, the task generator,
    the curves, and the tasks and seconds spent so far."""

    def __init__(self, model: nn.Module, cfg: MamlConfig, seed: int):
        self.model, self.generator = model, torch.Generator().manual_seed(seed)
        self.lrs = None
        if cfg.algorithm == "metasgd":
            self.lrs = {k: torch.full_like(v, cfg.inner_lr, requires_grad=True) for k, v in model.named_parameters()}
        self.meta_params = list(model.parameters()) + (list(self.lrs.values()) if self.lrs else [])
        optimizer = torch.optim.SGD if cfg.algorithm == "reptile" else torch.optim.Adam
        self.optimizer = optimizer(self.meta_params, lr=cfg.outer_lr)
        self.curve: dict[str, list[tuple[int, float]]] = {"meta_query_loss": [], "meta_query_acc": []}
        self.step, self.tasks, self.seconds = 0, 0, 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "params": {k: v.detach() for k, v in self.model.named_parameters()},
                "lrs": {k: v.detach() for k, v in (self.lrs or {}).items()},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "curve": self.curve, "tasks": self.tasks, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                p.copy_(state["params"][k])
            for k, v in (self.lrs or {}).items():
                v.copy_(state["lrs"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.curve, self.step, self.tasks, self.seconds = state["curve"], state["step"], state["tasks"], state["seconds"]

    def result(self) -> MetaResult:
        lrs = {k: v.detach() for k, v in self.lrs.items()} if self.lrs is not None else None
        return MetaResult(lrs, self.curve, self.step, self.seconds, self.tasks)


def meta_train(model: nn.Module, sampler: TaskSampler, cfg: MamlConfig, seed: int,
               on_log: LogFn | None = None, desc: str = "meta-train",
               checkpoint: Checkpointer | None = None) -> MetaResult:
    """Meta-train ``model``'s parameters in place as an initialisation.

    Under torchrun every rank draws the same meta-batch, computes the meta-gradient of its
    share of the tasks, and the shares are averaged: the step one process would take."""
    state, local, device = MetaState(model, cfg, seed), distributed.shard(cfg.meta_batch), device_of(model)
    meta_gradient = MetaGradient(model, state.lrs, cfg, device, local)
    if checkpoint is not None and (saved := checkpoint.load("meta")) is not None:
        state.load_state_dict(saved)
        print(f"{desc}: resumed from step {state.step}", flush=True)
    start, began, first = time.perf_counter() - state.seconds, time.perf_counter(), state.step + 1
    with progress_bar(desc, total=cfg.meta_steps) as advance:
        for step in range(state.step + 1, cfg.meta_steps + 1):
            tasks = tuple(to_device(t[local], device) for t in sampler.sample(cfg.meta_batch, state.generator))
            state.optimizer.zero_grad(set_to_none=True)
            loss, acc = meta_gradient(tasks, state.meta_params)
            distributed.average_([p.grad for p in state.meta_params])  # local share -> whole meta-batch
            loss, acc = distributed.mean_scalars([float(loss), float(acc)])
            check_finite(loss, desc, step, "meta query loss")
            state.optimizer.step()
            state.step, state.tasks = step, state.tasks + cfg.meta_batch
            advance()
            if step % cfg.log_every == 0 or step == cfg.meta_steps:
                for k, v in {"meta_query_loss": loss, "meta_query_acc": acc}.items():
                    state.curve[k].append((step, v))
                if on_log is not None:
                    on_log(step, {"meta_query_loss": loss, "meta_query_acc": acc})
            # Ranks must agree on stopping, or the others would wait in all_reduce forever.
            over_budget = cfg.time_budget_s is not None and distributed.mean_scalars(
                [float(time.perf_counter() - start > cfg.time_budget_s)])[0] > 0
            state.seconds = time.perf_counter() - start
            if step == first + 1:  # two steps timed: say what the rest costs when it is long
                _announce(desc, cfg, (time.perf_counter() - began) / 2, cfg.meta_steps - step)
            if checkpoint is not None and (over_budget or checkpoint.due(step, cfg.meta_steps)):
                checkpoint.save("meta", {**state.state_dict(), "step": cfg.meta_steps if over_budget else step})
            if over_budget:
                break
    state.seconds = time.perf_counter() - start
    meta_gradient.close()
    return state.result()


ANNOUNCE_OVER_S = 30.0  # shorter meta-trainings go unannounced: their progress bar says enough


def _announce(desc: str, cfg: MamlConfig, per_step: float, left: int, over: float = ANNOUNCE_OVER_S) -> None:
    """Say what the rest of meta-training will cost when it is long: a user who set a small
    budget elsewhere (student.train.steps) learns where this one is bounded."""
    seconds = per_step * left
    if cfg.time_budget_s is not None:
        seconds = min(seconds, cfg.time_budget_s)
    if seconds > over:
        print(f"{desc}: meta-training takes about {seconds:.0f} s more ({left} meta-steps of {per_step:.2f} s, "
              f"maml.algorithm={cfg.algorithm}); bound it with maml.meta_steps, maml.time_budget_s or "
              f"maml.algorithm=fomaml", flush=True)


class MetaGradient:
    """Sets the meta-gradient of a batch of tasks on the meta-parameters and returns the
    query loss and accuracy: MAML's family through ``meta.maml`` on task-parallel threads,
    Reptile's pseudo-gradient directly."""

    def __init__(self, model: nn.Module, lrs: dict[str, torch.Tensor] | None, cfg: MamlConfig,
                 device: torch.device, local: slice):
        self.model, self.lrs, self.cfg = model, lrs, cfg
        self.inner = InnerLoop(cfg.inner_steps, cfg.inner_lr, first_order=cfg.algorithm == "fomaml")
        # Reptile needs no meta-gradient threads; idle ones would slow other kernels down.  On
        # CUDA one vmap over the whole task batch keeps the GPU busy; threads would only queue.
        workers = 1 if device.type == "cuda" else min(cfg.workers or torch.get_num_threads(), local.stop - local.start)
        self.runner = None if cfg.algorithm == "reptile" else TaskParallel(model, workers)

    def _chunk_loss(self, replica: nn.Module, params, chunk):
        return meta_batch_loss(replica, params, chunk, self.inner, lrs=self.lrs, vectorize=self.cfg.vectorize,
                               chunk_size=self.cfg.chunk_size, vmap_query=self.cfg.vmap_query)

    def __call__(self, tasks: Tasks, meta_params: list[torch.Tensor]):
        if self.runner is None:
            return _reptile_pseudo_gradient(self.model, tasks, self.cfg)
        grads, loss, acc = self.runner.grad(params_of(self.model), meta_params, tasks, self._chunk_loss)
        for p, g in zip(meta_params, grads):
            p.grad = g
        return loss, acc

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


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
