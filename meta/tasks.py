"""Episodic N-way K-shot tasks over a class-split data set.

Each task draws ``ways`` classes, gives them labels 0..ways-1 in random order, and draws
``shots`` support and ``queries`` query examples per class without replacement.  With
``rotations`` every class also appears rotated by 90, 180 and 270 degrees as three new
classes (the usual Omniglot augmentation).  Sampling is driven by an explicit
``torch.Generator``, so a seed fixes every task; :meth:`TaskSampler.fixed` gives a
reproducible evaluation set.
"""

from __future__ import annotations

import torch

Tasks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # xs, ys, xq, yq (task dim first)


class TaskSampler:
    def __init__(self, per_class: torch.Tensor | list[torch.Tensor], ways: int, shots: int, queries: int,
                 rotations: bool = False):
        self.per_class = list(per_class)
        self.ways, self.shots, self.queries, self.rotations = ways, shots, queries, rotations
        self.num_classes = len(self.per_class) * (4 if rotations else 1)
        if ways > self.num_classes:
            raise ValueError(f"{ways}-way tasks need at least {ways} classes, the data has {self.num_classes}")
        need = shots + queries
        short = [i for i, c in enumerate(self.per_class) if len(c) < need]
        if short:
            raise ValueError(f"{len(short)} classes have fewer than shots + queries = {need} examples "
                             f"(class {short[0]} has {len(self.per_class[short[0]])})")

    @classmethod
    def from_labels(cls, x: torch.Tensor, y: torch.Tensor, ways: int, shots: int, queries: int,
                    rotations: bool = False, select=None) -> TaskSampler:
        """Classes from a labelled set; classes with too few examples are dropped.
        ``select(x, idx)`` picks a class's rows (default ``x[idx]``; a lazily read set can
        keep them lazy, as long as indexing the result with a tensor gives images)."""
        need = shots + queries
        select = select or (lambda data, idx: data[idx])
        per_class = [select(x, (y == c).nonzero().flatten()) for c in torch.unique(y).tolist()]
        return cls([c for c in per_class if len(c) >= need], ways, shots, queries, rotations)

    def _one(self, generator: torch.Generator) -> Tasks:
        classes = torch.randperm(self.num_classes, generator=generator)[:self.ways].tolist()
        support, query = [], []
        for cls in classes:
            base = self.per_class[cls % len(self.per_class)]
            pick = torch.randperm(len(base), generator=generator)[:self.shots + self.queries]
            images = base[pick]
            turns = cls // len(self.per_class)
            if turns:
                images = torch.rot90(images, turns, dims=(-2, -1))
            support.append(images[:self.shots])
            query.append(images[self.shots:])
        labels = torch.arange(self.ways, device=support[0].device)
        return (torch.cat(support), labels.repeat_interleave(self.shots),
                torch.cat(query), labels.repeat_interleave(self.queries))

    def sample(self, n_tasks: int, generator: torch.Generator) -> Tasks:
        tasks = [self._one(generator) for _ in range(n_tasks)]
        return tuple(torch.stack(parts) for parts in zip(*tasks))  # type: ignore[return-value]

    def fixed(self, n_tasks: int, seed: int = 0) -> Tasks:
        return self.sample(n_tasks, torch.Generator().manual_seed(seed))


def split_tasks(tasks: Tasks, size: int) -> list[Tasks]:
    """Cut a task batch into chunks of at most ``size`` tasks."""
    n = len(tasks[0])
    return [tuple(t[i:i + size] for t in tasks) for i in range(0, n, size)]  # type: ignore[misc]
