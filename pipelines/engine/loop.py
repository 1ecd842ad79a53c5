"""TODO docstring."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
import torch
import torch.nn.functional as F
from torch import nn
from meta.distill import UNLABELED
from pipelines.engine import distributed
from pipelines.augment.policies import Augmenter
from pipelines.engine.checkpoint import Checkpointer
from pipelines.config.training import TrainConfig
from pipelines.common.progress import progress_bar
from pipelines.engine.batches import BatchPlan, Feed
from pipelines.engine.device import autocast, precision, rows, to_device
from pipelines.engine.metrics import check_finite, validation_accuracy
from pipelines.engine.optim import lr_at, make_optimizer


# (logits, x, y, index): y < 0 marks unlabeled transfer examples; index numbers the rows of
# the training pool, train rows first and transfer rows after them (for per-example caches).
BatchLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


LogFn = Callable[[int, dict[str, float]], None]


def supervised_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The plain supervised loss, as a :data:`BatchLoss`."""
    return F.cross_entropy(logits, y)


@dataclass
class Transfer:
    """Unlabeled inputs drawn beside every labelled batch (``per_step`` of them), in their
    own seeded order, so the labelled batches stay exactly those of a run without them."""

    x: torch.Tensor
    per_step: int


@dataclass
class TrainResult:
    curve: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seconds: float = 0.0
    steps: int = 0


@runtime_checkable
class Stateful(Protocol):
    """A loss with state of its own (the learned teacher), checkpointed with the student."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def train_classifier(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, cfg: TrainConfig,
                     loss_fn: BatchLoss, seed: int, augment: Augmenter | None = None,
                     val: tuple[torch.Tensor, torch.Tensor] | None = None,
                     on_log: LogFn | None = None, desc: str = "train",
                     checkpoint: Checkpointer | None = None, transfer: Transfer | None = None,
                     phase: str = "train", device: torch.device | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps on ``device`` (default: where
    ``train_x`` lives); returns its curves and compute time.

    With ``transfer``, each step appends ``transfer.per_step`` unlabeled examples (label
    :data:`UNLABELED`) to the labelled batch; ``loss_fn`` decides what they contribute.
    Under torchrun every rank draws the same global batch and trains on its shard, with
    DDP averaging the gradients: the same steps as one process with the same batch.
    Metrics accumulate on the device and are read at log steps only (no host sync per
    step); a NaN or infinite loss raises :class:`TrainingDiverged` naming ``desc`` and the
    first step it happened at, by the next log or checkpoint step."""
    if cfg.batch_size > len(train_y):
        raise ValueError(f"{desc}: train.batch_size={cfg.batch_size} exceeds the {len(train_y)} training examples; "
                         f"lower the batch size")
    device = device or train_x.device
    generator = torch.Generator().manual_seed(seed)
    transfer_gen = torch.Generator().manual_seed(seed + 1_000_003)  # never the labelled order's
    plan = BatchPlan(len(train_y), cfg.batch_size, generator, augment is not None)
    t_plan = BatchPlan(len(transfer.x), transfer.per_step, transfer_gen, True) if transfer else None
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model)
    if cfg.compile:
        net = torch.compile(net)
    local = distributed.shard(cfg.batch_size)
    optimizer = make_optimizer(model.parameters(), cfg.optimizer)
    result = TrainResult(curve={"train_loss": [], "train_acc": [], "val_acc": []})
    first = 1
    if checkpoint is not None and (state := checkpoint.load(phase)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        plan.order, plan.cursor, first = state["order"], state["cursor"], state["step"] + 1
        if transfer is not None:
            transfer_gen.set_state(state["transfer_generator"])
            t_plan.order, t_plan.cursor = state["transfer_order"], state["transfer_cursor"]
        result.curve = state["curve"]
        if isinstance(loss_fn, Stateful):
            loss_fn.load_state_dict(state["loss"])
        print(f"{desc}: resumed from step {state['step']}", flush=True)
    t_local = distributed.shard(transfer.per_step) if transfer else None
    # The plans' positions are the checkpoint's: a resumed stream reads on from there.
    feed = Feed([(train_x, plan, local)] + ([(transfer.x, t_plan, t_local)] if transfer else []),
                cfg.steps - first + 1, device)
    order_there = None  # the plan's order on the training device
    # loss sum, correct, examples, labelled examples (this rank's shard); first bad step
    running = torch.zeros(4, dtype=torch.float64, device=device)
    first_bad, bad_value = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), device=device)
    eval_every = max(cfg.log_every, cfg.steps // 10)
    start = time.perf_counter()
    model.train()
    with progress_bar(desc, total=cfg.steps) as advance, precision(device, cfg.precision):
        for step in range(first, cfg.steps + 1):
            at, batch, seeds = plan.next()
            if order_there is None or at == 0:  # one copy of the order per epoch, none per step
                order_there = to_device(plan.order, device)
            idx, index = batch[local], order_there[at:at + cfg.batch_size][local]
            if transfer is None:
                x, = feed.take([idx], index)
            else:
                _, t_batch, t_seeds = t_plan.next()
                t_idx = t_batch[t_local]
                x, tx = feed.take([idx, t_idx], index)
            y = rows(train_y, idx, device, index)
            if augment is not None:
                x = augment(x, seeds[local])
            if transfer is not None:
                x = torch.cat([x, augment(tx, t_seeds[t_local]) if augment is not None else tx])
                y = torch.cat([y, torch.full((len(tx),), UNLABELED, dtype=y.dtype, device=device)])
                index = torch.cat([index, len(train_y) + to_device(t_idx, device)])
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - 1, cfg.steps, cfg.optimizer)

            with autocast(device, cfg.precision):
                logits = net(x)
                loss = loss_fn(logits, x, y, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()

            with torch.no_grad():
                value, labelled = loss.detach().float(), y >= 0
                newly_bad = (first_bad == 0) & ~torch.isfinite(value)
                first_bad = torch.where(newly_bad, step, first_bad)
                bad_value = torch.where(newly_bad, value, bad_value)
                running[0] += value * len(y)
                running[1] += ((logits.argmax(-1) == y) & labelled).sum()
                running[2] += len(y)
                running[3] += labelled.sum()
            advance()
            logs = step % cfg.log_every == 0 or step == cfg.steps
            saves = checkpoint is not None and checkpoint.due(step, cfg.steps)
            if logs or saves:
                if (bad := int(first_bad)) > 0:  # one host sync per log or checkpoint step
                    check_finite(bad_value.item(), desc, bad)
            if logs:
                loss_sum, correct, n, n_labelled = distributed.mean_tensor(running).tolist()
                metrics = {"train_loss": loss_sum / n, "train_acc": correct / max(n_labelled, 1),
                           "lr": optimizer.param_groups[0]["lr"]}
                if val is not None and len(val[1]) and (step % eval_every == 0 or step == cfg.steps):
                    metrics["val_acc"] = validation_accuracy(model, *val)
                for name in ("train_loss", "train_acc", "val_acc"):
                    if name in metrics:
                        result.curve[name].append((step, metrics[name]))
                if on_log is not None:
                    on_log(step, metrics)
                running.zero_()
            if saves:
                checkpoint.save(phase, {
                    "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "order": plan.order, "cursor": plan.cursor,
                    "curve": result.curve,
                    "loss": loss_fn.state_dict() if isinstance(loss_fn, Stateful) else {},
                    **({"transfer_generator": transfer_gen.get_state(), "transfer_order": t_plan.order,
                        "transfer_cursor": t_plan.cursor} if transfer is not None else {})})
    feed.close()
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock measures work done, not work queued
    result.seconds = time.perf_counter() - start
    result.steps = cfg.steps
    return result
