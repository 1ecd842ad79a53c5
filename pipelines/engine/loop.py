"""The supervised training loop shared by the teacher and every student method.

One function, top to bottom as in nanoGPT: batch, forward, loss, backward, step, log,
checkpoint.  Its parts have one job each: :class:`~pipelines.engine.batches.Batches`
assembles the step's batch, :class:`LoopState` is everything a checkpoint saves, and
:class:`~pipelines.engine.metrics.RunningMetrics` accumulates what is logged.  What
differs between methods is what is passed in: the loss function, and the step hooks
(:class:`StepHook`) that act around each step, in plain sight of the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.common.progress import progress_bar
from pipelines.config.training import TrainConfig
from pipelines.engine import distributed
from pipelines.engine.batches import Augment, Batches, BatchPlan, Transfer
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.device import autocast, precision
from pipelines.engine.metrics import RunningMetrics, validation_accuracy
from pipelines.engine.optim import lr_at, make_optimizer

# (logits, x, y, index): y < 0 marks unlabeled transfer examples; index numbers the rows of
# the training pool, train rows first and transfer rows after them (for per-example caches).
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

LogFn = Callable[[int, dict[str, float]], None]


def supervised_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The plain supervised loss, as a :data:`BatchLoss`."""
    return F.cross_entropy(logits, y)


@dataclass
class TrainResult:
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0


class StepHook:
    """What acts on the training step beside the loss, handed to the loop explicitly (in
    order) by the method that needs it: ``before_step`` sees the step's batch before the
    forward, ``after_step`` the optimiser right after its step; ``state_dict`` and
    ``load_state_dict`` checkpoint it with the student.  Each hook has one job (the
    co-trained teacher's head update, its guard, the temperature's follower, ...)."""

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        pass

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LoopState:
    """Everything a resumed run needs, saved whole by the checkpoint: the weights, the
    optimiser, the positions of the batch plans, the curves so far, and the state of each
    step hook."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, seed: int, n: int, seeds: bool,
                 transfer: Transfer | None, hooks: Sequence[StepHook]):
        self.model, self.hooks, self.step = model, hooks, 0
        self.optimizer = make_optimizer(model.parameters(), cfg.optimizer)
        self.plan = BatchPlan(n, cfg.batch_size, torch.Generator().manual_seed(seed), seeds)
        self.transfer_plan = None
        if transfer is not None:  # a generator of its own: never the labelled order's
            self.transfer_plan = BatchPlan(len(transfer.x), transfer.per_step,
                                           torch.Generator().manual_seed(seed + 1_000_003), True)
        self.curve: dict[str, list[tuple[int, float]]] = {"train_loss": [], "train_acc": [], "val_acc": []}

    def state_dict(self) -> dict:
        state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 **self.plan.state_dict(), "curve": self.curve,
                 "hooks": [hook.state_dict() for hook in self.hooks]}
        if self.transfer_plan is not None:
            state.update({f"transfer_{k}": v for k, v in self.transfer_plan.state_dict().items()})
        return state

    def resume(self, checkpoint: Checkpointer | None, phase: str, desc: str) -> None:
        """Load the last checkpoint of ``phase``, if there is one."""
        if checkpoint is not None and (saved := checkpoint.load(phase)) is not None:
            self.load_state_dict(saved)
            print(f"{desc}: resumed from step {self.step}", flush=True)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.plan.load_state_dict(state)
        if self.transfer_plan is not None:
            self.transfer_plan.load_state_dict({k: state[f"transfer_{k}"] for k in ("generator", "order", "cursor")})
        self.step, self.curve = state["step"], state["curve"]
        for hook, saved in zip(self.hooks, state["hooks"], strict=True):
            hook.load_state_dict(saved)


def placed(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """``model`` moved to ``device``; returns the network the loop calls: wrapped for data
    parallelism in a process group, compiled when asked."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model)
    return torch.compile(net) if cfg.compile else net


def train_classifier(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, cfg: TrainConfig, loss_fn: BatchLoss,
                     seed: int, hooks: Sequence[StepHook] = (), augment: Augment | None = None,
                     val: tuple[torch.Tensor, torch.Tensor] | None = None, on_log: LogFn | None = None,
                     desc: str = "train", checkpoint: Checkpointer | None = None, transfer: Transfer | None = None,
                     phase: str = "train", device: torch.device | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps on ``device`` (default: where
    ``train_x`` lives); returns its curves and compute time.  ``hooks`` act around each
    step (:class:`StepHook`), in the order given.  With ``transfer``, each step appends
    ``transfer.per_step`` unlabeled examples (label ``UNLABELED``) to the labelled batch;
    ``loss_fn`` decides what they contribute.  Under torchrun every rank draws the same
    global batch and trains on its shard, with DDP averaging the gradients: the same steps
    as one process.  A NaN or infinite loss raises ``TrainingDiverged`` naming ``desc``
    and the first step it happened at, by the next log or checkpoint step."""
    if cfg.batch_size > len(train_y):
        raise ValueError(f"{desc}: train.batch_size={cfg.batch_size} exceeds the {len(train_y)} training examples; "
                         f"lower the batch size")
    device = device or train_x.device
    net = placed(model, cfg, device)
    state = LoopState(model, cfg, seed, len(train_y), augment is not None, transfer, hooks)
    state.resume(checkpoint, phase, desc)
    batches = Batches((train_x, train_y), state.plan, transfer, state.transfer_plan, augment, cfg.steps - state.step,
                      device, cfg.channels_last)
    metrics, eval_every = RunningMetrics(device), max(cfg.log_every, cfg.steps // 10)
    start = time.perf_counter()
    model.train()
    with progress_bar(desc, total=cfg.steps) as advance, precision(device, cfg.precision):
        for step in range(state.step + 1, cfg.steps + 1):
            x, y, index = batches.next()
            for hook in hooks:
                hook.before_step(step, x, y, index)
            for group in state.optimizer.param_groups:
                group["lr"] = lr_at(step - 1, cfg.steps, cfg.optimizer)
            with autocast(device, cfg.precision):
                logits = net(x)
                loss = loss_fn(logits, x, y, index)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            state.optimizer.step()
            for hook in hooks:
                hook.after_step(step, state.optimizer)
            state.step = step
            metrics.add(step, loss, logits, y)
            advance()
            logs = step % cfg.log_every == 0 or step == cfg.steps
            saves = checkpoint is not None and checkpoint.due(step, cfg.steps)
            if logs or saves:
                metrics.check(desc)
            if logs:
                scores = val if step % eval_every == 0 or step == cfg.steps else None
                _log(step, metrics.read(), state, scores, on_log)
            if saves:
                checkpoint.save(phase, state.state_dict())
    batches.close()
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock measures work done, not work queued
    return TrainResult(state.curve, time.perf_counter() - start, cfg.steps)


def _log(step: int, metrics: dict[str, float], state: LoopState, val: tuple[torch.Tensor, torch.Tensor] | None,
         on_log: LogFn | None) -> None:
    """Add the learning rate and, on evaluation steps, the validation accuracy; record the
    curves and hand the metrics to ``on_log``."""
    metrics["lr"] = state.optimizer.param_groups[0]["lr"]
    if val is not None and len(val[1]):
        metrics["val_acc"] = validation_accuracy(state.model, *val)
    for name in ("train_loss", "train_acc", "val_acc"):
        if name in metrics:
            state.curve[name].append((step, metrics[name]))
    if on_log is not None:
        on_log(step, metrics)
