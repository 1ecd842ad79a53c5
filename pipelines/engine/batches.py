"""What the training loop eats: the seeded plan of global batches, the feed that gathers
(or, for stream splits, decodes ahead) their images, and :class:`Batches`, which puts
each step's labelled rows, their augmentation and the transfer rows beside them together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from meta.distill import UNLABELED
from pipelines.engine import distributed
from pipelines.engine.device import rows, to_device

# (images, per-example seeds) -> augmented images, on the batch's device
Augment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.cursor = state["order"], state["cursor"]

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
            from pipelines.data.shards import stream

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


@dataclass
class Transfer:
    """Unlabeled inputs drawn beside every labelled batch (``per_step`` of them), in their
    own seeded order, so the labelled batches stay exactly those of a run without them."""

    x: torch.Tensor
    per_step: int


class Batches:
    """Each step's ``(x, y, index)`` for this rank: its shard of the labelled batch of
    ``plan``, augmented, and with ``transfer`` its shard of the transfer batch of
    ``transfer_plan`` appended (label :data:`UNLABELED`, index after the training rows).
    ``index`` numbers rows of the training pool, for per-example caches."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], plan: BatchPlan, transfer: Transfer | None,
                 transfer_plan: BatchPlan | None, augment: Augment | None, steps: int, device: torch.device,
                 channels_last: bool = False):
        self.x, self.y = train
        self.plan, self.transfer, self.transfer_plan = plan, transfer, transfer_plan
        self.augment, self.device, self.channels_last = augment, device, channels_last
        self.local = distributed.shard(plan.batch_size)
        self.transfer_local = distributed.shard(transfer.per_step) if transfer else None
        # The plans' positions are the checkpoint's: a resumed stream reads on from there.
        parts = [(self.x, plan, self.local)]
        if transfer is not None:
            parts.append((transfer.x, transfer_plan, self.transfer_local))
        self.feed = Feed(parts, steps, device)
        self.order_there = None  # the plan's order on the training device

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at, batch, seeds = self.plan.next()
        if self.order_there is None or at == 0:  # one copy of the order per epoch, none per step
            self.order_there = to_device(self.plan.order, self.device)
        idx, index = batch[self.local], self.order_there[at:at + self.plan.batch_size][self.local]
        if self.transfer is None:
            x, = self.feed.take([idx], index)
        else:
            _, t_batch, t_seeds = self.transfer_plan.next()
            t_idx = t_batch[self.transfer_local]
            x, tx = self.feed.take([idx, t_idx], index)
        y = rows(self.y, idx, self.device, index)
        if self.augment is not None:
            x = self.augment(x, seeds[self.local])
        if self.transfer is not None:
            x = torch.cat([x, self.augment(tx, t_seeds[self.transfer_local]) if self.augment is not None else tx])
            y = torch.cat([y, torch.full((len(tx),), UNLABELED, dtype=y.dtype, device=self.device)])
            index = torch.cat([index, len(self.y) + to_device(t_idx, self.device)])
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, index

    def close(self) -> None:
        self.feed.close()
