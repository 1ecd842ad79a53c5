"""Deterministic splits of a source's training pool: test (where the source has none),
the labelled train/quiz/val splits and the unlabeled transfer split.  Both storage modes
split through here.
"""

from __future__ import annotations

import numpy as np

from pipelines.config.data import DataConfig
from pipelines.data.readers import RawData


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out) with ``fraction`` of each class held out (at least one)."""
    kept, held = [], []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_held = max(1, int(round(len(idx) * fraction))) if fraction > 0 else 0
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def split_indices(y: np.ndarray, has_test: bool, cfg: DataConfig) -> dict[str, np.ndarray | None]:
    """Each split's rows of the source's training pool (labels ``y``); ``test`` is None when
    the source has a test split of its own.  Both storage modes split through here."""
    rng = np.random.default_rng(cfg.split_seed)
    pool, test = np.arange(len(y)), None
    if not has_test:
        pool, test = _stratified_split(y, cfg.test_fraction, rng)
    n_keep = int(round(len(pool) * cfg.train_fraction))
    if cfg.label_budget is not None:
        n_keep = min(n_keep, cfg.label_budget)
    transfer = np.zeros(0, dtype=np.int64)
    if n_keep < len(pool):
        drawn = rng.permutation(len(pool))
        if cfg.transfer:
            transfer = pool[np.sort(drawn[n_keep:])[:cfg.transfer_limit]]
        pool = pool[np.sort(drawn[:n_keep])]
    order = rng.permutation(len(pool))
    n_val = int(round(len(pool) * cfg.val_fraction))
    n_quiz = max(1, int(round(len(pool) * cfg.quiz_fraction)))
    return {"train": pool[order[n_val + n_quiz:]], "quiz": pool[order[n_val:n_val + n_quiz]],
            "val": pool[order[:n_val]], "test": test, "transfer": transfer}


def make_splits(raw: RawData, cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Labelled splits as (x, y); ``transfer`` as (x, None): its labels never leave here."""
    x, y = raw.train
    rows = split_indices(y, raw.test is not None, cfg)
    splits = {name: (x[rows[name]], y[rows[name]]) for name in ("train", "quiz", "val")}
    splits["test"] = raw.test if rows["test"] is None else (x[rows["test"]], y[rows["test"]])
    splits["transfer"] = (x[rows["transfer"]], None)
    return splits
