"""TODO docstring."""

from __future__ import annotations

from collections.abc import Iterator
import torch
from pipelines.engine.device import rows


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
