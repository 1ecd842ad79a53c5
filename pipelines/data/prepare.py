"""The data stage's entry point: settle ``data.storage`` and prepare the splits in memory
(cached by content) or as shards (``stream``).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipelines.common.home import cache_dir, made_once
from pipelines.config.data import DataConfig
from pipelines.data.decode import IMAGE_SUFFIXES, image_files
from pipelines.data.errors import DataError
from pipelines.data.memory import data_key, load_cached, save_cached
from pipelines.data.prepared import Prepared, channel_sums, mean_std, split_counts
from pipelines.data.readers import cifar_zips, list_transfer_root, load_raw, read_transfer_root, resolve_root, sha256_files
from pipelines.data.splits import make_splits

STREAMABLE = ("imagefolder", "cifar10")  # sources of image files, read one file at a time


def storage_for(cfg: DataConfig) -> str:
    """``data.storage``, with ``auto`` settled: stream an image-folder or CIFAR-zip source
    whose float32 tensors would take over ``data.memory_limit_gb``; keep the rest in memory."""
    if cfg.storage != "auto":
        return cfg.storage
    if cfg.name not in STREAMABLE or (root := resolve_root(cfg)) is None or not root.is_dir():
        return "memory"
    if cfg.name == "imagefolder":
        count = len(image_files(root))
    else:
        count = 0
        for path in filter(None, cifar_zips(root)):
            with zipfile.ZipFile(path) as zf:
                count += sum(n.lower().endswith(IMAGE_SUFFIXES) for n in zf.namelist())
    side = cfg.image_size or 32
    return "stream" if count * 3 * side * side * 4 > cfg.memory_limit_gb * 2**30 else "memory"


def prepare(cfg: DataConfig) -> Prepared:
    """Load (or reuse from cache) the normalised train/quiz/val/test splits: tensors in
    memory, or shards read as they are needed (``data.storage``, see :func:`storage_for`)."""
    if storage_for(cfg) == "stream":
        from pipelines.data.stream import prepare_stream

        return prepare_stream(cfg)
    raw, source_hash = load_raw(cfg)
    transfer_files = list_transfer_root(Path(cfg.transfer_root).expanduser()) if cfg.transfer_root else []
    if transfer_files:
        source_hash = hashlib.sha256((source_hash + sha256_files(transfer_files)).encode()).hexdigest()
    key = data_key(cfg, source_hash)
    folder = cache_dir("data") / key
    return made_once(f"data-{key}", lambda: load_cached(folder), lambda: _build(cfg, raw, transfer_files, key, folder))


def _build(cfg: DataConfig, raw, transfer_files: list[Path], key: str, folder: Path) -> Prepared:
    splits = make_splits(raw, cfg)
    skipped = list(raw.skipped)
    if transfer_files:
        extra, left_out = read_transfer_root(transfer_files, raw.train[0].shape[1:], cfg.on_bad_image)
        skipped += left_out
        splits["transfer"] = (np.concatenate([splits["transfer"][0], extra])[:cfg.transfer_limit], None)
    if len(splits["train"][1]) < 2:
        raise DataError(f"{cfg.name}: only {len(splits['train'][1])} training examples remain after the splits")
    train_x = splits["train"][0]
    mean, std = mean_std(channel_sums(train_x), train_x.shape[2] * train_x.shape[3])
    tensors = {}
    for name, (x, y) in splits.items():
        x = (x - mean[None, :, None, None]) / std[None, :, None, None]
        tensors[f"{name}_x"] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if y is not None:
            tensors[f"{name}_y"] = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    num_classes = len(raw.class_names)
    prepared = Prepared(tensors=tensors, input_shape=tuple(int(s) for s in train_x.shape[1:]),
                        num_classes=num_classes, class_names=raw.class_names, mean=mean.tolist(),
                        std=std.tolist(), key=key, source=raw.source,
                        counts={**split_counts(tensors), "skipped_images": len(skipped)})
    save_cached(folder, prepared)
    return prepared
