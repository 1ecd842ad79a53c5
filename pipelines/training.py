"""The supervised training loop shared by the teacher and every student method.

One function, top to bottom: sample a batch, augment, forward, loss, backward, step,
log.  What differs between methods is only the loss function passed in.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from meta.distill import UNLABELED
from pipelines import distributed
from pipelines.augment import Augmenter
from pipelines.checkpoint import Checkpointer
from pipelines.config import OptimConfig, TrainConfig
from pipelines.progress import progress_bar

# (logits, x, y, index): y < 0 marks unlabeled transfer examples; index numbers the rows of
# the training pool, train rows first and transfer rows after them (for per-example caches).
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LogFn = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite: the stage fails rather than finish on garbage."""


def check_finite(value: float, desc: str, step: int, what: str = "training loss") -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"{desc}: the {what} is {value} at step {step}; training diverged. Lower the "
                               f"learning rate, set train.grad_clip, or lower kd.temperature")


def cross_entropy(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The plain supervised loss, as a :data:`LossFn`."""
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


class BatchPlan:
    """The seeded sequence of global batches: an epoch's random order cut into batches and,
    when ``seeds``, an augmentation seed per example drawn after each batch.  Two plans
    from the same state give the same batches: a stream reader runs one ahead of the loop."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, seeds: bool,
                 order: torch.Tensor | None = None, cursor: int = 0):
        self.n, self.batch_size, self.generator, self.seeds = n, batch_size, generator, seeds
        self.order = torch.randperm(n, generator=generator) if order is None else order
        self.cursor = cursor

    def next(self) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """``(start, rows, seeds)``: the batch is ``order[start:start + batch_size]``."""
        if self.cursor + self.batch_size > len(self.order):
            self.order, self.cursor = torch.randperm(self.n, generator=self.generator), 0
        start = self.cursor
        self.cursor += self.batch_size
        seeds = torch.randint(0, 2**31 - 1, (self.batch_size,), generator=self.generator) if self.seeds else None
        return start, self.order[start:self.cursor], seeds

    def copy(self) -> BatchPlan:
        return BatchPlan(self.n, self.batch_size, torch.Generator().set_state(self.generator.get_state()),
                         self.seeds, self.order, self.cursor)

    def ahead(self, steps: int, local: slice) -> Iterator[torch.Tensor]:
        """This rank's rows of the next ``steps`` batches, from a copy of the plan as it is now."""
        plan = self.copy()
        return (plan.next()[1][local] for _ in range(steps))


class Feed:
    """The loop's images for each step, one list entry per part (the labelled batch, the
    transfer batch): gathered from tensors, or for lazy stream splits decoded ahead by one
    set of DataLoader workers, in the order of copies of the parts' plans."""

    def __init__(self, parts: list[tuple[object, BatchPlan, slice]], steps: int, device: torch.device):
        self.arrays, self.device = [x for x, _, _ in parts], device
        self.lazy = [k for k, x in enumerate(self.arrays) if hasattr(x, "stream")]
        self.stream = None
        if self.lazy:
            from pipelines.shards import stream

            batches = zip(*(plan.ahead(steps, local) for k, (_, plan, local) in enumerate(parts) if k in self.lazy))
            self.stream = stream([self.arrays[k] for k in self.lazy], batches, device)

    def take(self, idx: list[torch.Tensor], idx_there: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each part's rows ``idx[k]`` on the device (``idx_there``: the first part's, already there)."""
        decoded = {}
        if self.stream is not None:
            got, images = next(self.stream)
            for k, rows_got, x in zip(self.lazy, got, images):
                if not torch.equal(rows_got, idx[k]):
                    raise RuntimeError("stream reader out of step with the training loop: a bug, please report it")
                decoded[k] = x
        return [decoded[k] if k in decoded else rows(x, idx[k], self.device, idx_there if k == 0 else None)
                for k, x in enumerate(self.arrays)]

    def close(self) -> None:
        self.stream = None  # stops the DataLoader's workers


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


def device_of(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where ``model``'s weights live (``default``, else the CPU, when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default or torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for CUDA goes through pinned memory, so the
    copy does not block the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def rows(t: torch.Tensor, idx: torch.Tensor, device: torch.device,
         idx_there: torch.Tensor | None = None) -> torch.Tensor:
    """``t[idx]`` on ``device``: indexed there when ``t`` lives there (by ``idx_there``,
    ``idx`` already copied, when given), else gathered on the host and copied."""
    if t.device == device:
        return t[idx_there if idx_there is not None else to_device(idx, device)]
    return to_device(t[idx], device)


def inference_batch(x) -> int:
    """Rows per forward pass when only scoring ``x``: 1024 images of 3x32x32, fewer of
    larger images, so the activations of a pass stay the same size at any resolution."""
    per_image = math.prod(x.shape[1:])
    return max(8, min(1024, 1024 * 3 * 32 * 32 // per_image))


def in_batches(x, size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``x``'s rows in order, ``size`` at a time, on ``device``; a stream split's are
    decoded ahead by its DataLoader workers."""
    if hasattr(x, "chunks"):
        yield from x.chunks(size, device)
        return
    for i in range(0, len(x), size):
        yield to_device(x[i:i + size], device)


def part_of(x, part: slice):
    """Rows ``part`` (a slice or an index tensor) of ``x``; a stream split stays lazy."""
    return x.subset(part) if hasattr(x, "subset") else x[part]


@contextlib.contextmanager
def precision(device: torch.device, mode: str) -> Iterator[None]:
    """``train.precision``'s math mode on CUDA: TensorFloat-32 matmuls and convolutions for
    tf32 and bf16.  The CPU always computes in float32."""
    if device.type != "cuda" or mode == "fp32":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass and the loss on CUDA under ``train.precision=bf16``.
    Backward, gradient clipping and the optimizer step stay outside it: under autocast the
    gradient norm of clipping can overflow, and clipping by an infinite norm zeroes the step."""
    if device.type == "cuda" and mode == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    batch = batch or inference_batch(x)
    was_training = model.training
    model.eval()
    device = device_of(model, x.device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i, images in zip(range(0, len(y), batch), in_batches(x, batch, device)):
        correct += (model(images).argmax(-1) == to_device(y[i:i + batch], device)).sum()
    model.train(was_training)
    return correct.item() / max(1, len(y))


def validation_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Each rank scores its part of the validation split; the counts are summed."""
    part = distributed.part(len(y))
    n = part.stop - part.start
    correct, n = distributed.mean_scalars([accuracy(model, part_of(x, part), y[part]) * n, float(n)])
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

