"""The supervised training loop shared by the teacher and every student method.

One function, top to bottom: sample a batch, augment, forward, loss, backward, step,
log.  What differs between methods is only the loss function passed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pipelines import distributed
from pipelines.augment import Augmenter
from pipelines.checkpoint import Checkpointer
from pipelines.config import OptimConfig, TrainConfig
from pipelines.progress import progress_bar

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, x, y)
LogFn = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(y), batch))
    model.train(was_training)
    return correct / max(1, len(y))


def _validation_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Each rank scores its part of the validation split; the counts are summed."""
    part = distributed.part(len(y))
    n = part.stop - part.start
    correct, n = distributed.mean_scalars([accuracy(model, x[part], y[part]) * n, float(n)])
    return correct / n


@runtime_checkable
class Stateful(Protocol):
    """A loss with state of its own (the learned teacher), checkpointed with the student."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def train_classifier(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, cfg: TrainConfig,
                     loss_fn: LossFn, seed: int, augment: Augmenter | None = None,
                     val: tuple[torch.Tensor, torch.Tensor] | None = None,
                     on_log: LogFn | None = None, desc: str = "train",
                     checkpoint: Checkpointer | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps; returns its curves and compute time.

    Under torchrun every rank draws the same global batch and trains on its shard, with
    DDP averaging the gradients: the same steps as one process with the same batch."""
    generator = torch.Generator().manual_seed(seed)
    net = distributed.wrap(model)
    local = distributed.shard(cfg.batch_size)
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    result = TrainResult(curve={"train_loss": [], "train_acc": [], "val_acc": []})
    order, cursor, first = torch.randperm(len(train_y), generator=generator), 0, 1
    if checkpoint is not None and (state := checkpoint.load("train")) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        order, cursor, first = state["order"], state["cursor"], state["step"] + 1
        result.curve = state["curve"]
        if isinstance(loss_fn, Stateful):
            loss_fn.load_state_dict(state["loss"])
        print(f"{desc}: resumed from step {state['step']}", flush=True)
    running = [0.0, 0.0, 0.0]  # loss sum, correct, examples (this rank's shard)
    eval_every = max(cfg.log_every, cfg.steps // 10)
    start = time.perf_counter()
    model.train()
    with progress_bar(desc, total=cfg.steps) as advance:
        for step in range(first, cfg.steps + 1):
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(train_y), generator=generator), 0
            idx = order[cursor:cursor + cfg.batch_size][local]
            cursor += cfg.batch_size
            x, y = train_x[idx], train_y[idx]
            if augment is not None:
                x = augment(x, torch.randint(0, 2**31 - 1, (cfg.batch_size,), generator=generator)[local])
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - 1, cfg.steps, cfg.optimizer)

            logits = net(x)
            loss = loss_fn(logits, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            running[0] += loss.item() * len(y)
            running[1] += (logits.argmax(-1) == y).sum().item()
            running[2] += len(y)
            advance()
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss_sum, correct, n = distributed.mean_scalars(running)
                metrics = {"train_loss": loss_sum / n, "train_acc": correct / n, "lr": optimizer.param_groups[0]["lr"]}
                if val is not None and len(val[1]) and (step % eval_every == 0 or step == cfg.steps):
                    metrics["val_acc"] = _validation_accuracy(model, *val)
                for name in ("train_loss", "train_acc", "val_acc"):
                    if name in metrics:
                        result.curve[name].append((step, metrics[name]))
                if on_log is not None:
                    on_log(step, metrics)
                running = [0.0, 0.0, 0.0]
            if checkpoint is not None and checkpoint.due(step, cfg.steps):
                checkpoint.save("train", {
                    "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "order": order, "cursor": cursor,
                    "curve": result.curve,
                    "loss": loss_fn.state_dict() if isinstance(loss_fn, Stateful) else {}})
    model.eval()
    result.seconds = time.perf_counter() - start
    result.steps = cfg.steps
    return result
