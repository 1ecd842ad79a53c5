"""The supervised training loop shared by the teacher and every student method.

One function, top to bottom: sample a batch, augment, forward, loss, backward, step,
log.  What differs between methods is only the loss function passed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.augment import Augmenter
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


def train_classifier(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, cfg: TrainConfig,
                     loss_fn: LossFn, seed: int, augment: Augmenter | None = None,
                     val: tuple[torch.Tensor, torch.Tensor] | None = None,
                     on_log: LogFn | None = None, desc: str = "train") -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps; returns its curves and compute time."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    result = TrainResult(curve={"train_loss": [], "train_acc": [], "val_acc": []})
    order, cursor = torch.randperm(len(train_y), generator=generator), 0
    running_loss, running_correct, running_n = 0.0, 0, 0
    eval_every = max(cfg.log_every, cfg.steps // 10)
    start = time.perf_counter()
    model.train()
    with progress_bar(desc, total=cfg.steps) as advance:
        for step in range(1, cfg.steps + 1):
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(train_y), generator=generator), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            x, y = train_x[idx], train_y[idx]
            if augment is not None:
                x = augment(x, generator)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - 1, cfg.steps, cfg.optimizer)

            logits = model(x)
            loss = loss_fn(logits, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            running_loss += loss.item() * len(y)
            running_correct += (logits.argmax(-1) == y).sum().item()
            running_n += len(y)
            advance()
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = {"train_loss": running_loss / running_n, "train_acc": running_correct / running_n,
                           "lr": optimizer.param_groups[0]["lr"]}
                if val is not None and len(val[1]) and (step % eval_every == 0 or step == cfg.steps):
                    metrics["val_acc"] = accuracy(model, *val)
                for name in ("train_loss", "train_acc", "val_acc"):
                    if name in metrics:
                        result.curve[name].append((step, metrics[name]))
                if on_log is not None:
                    on_log(step, metrics)
                running_loss, running_correct, running_n = 0.0, 0, 0
    model.eval()
    result.seconds = time.perf_counter() - start
    result.steps = cfg.steps
    return result
