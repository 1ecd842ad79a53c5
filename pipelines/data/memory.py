"""Memory storage's cache: the data key and the prepared tensors saved and read back."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipelines.common.home import atomic_folder, cache_key
from pipelines.config.data import DataConfig
from pipelines.data.prepared import Prepared, split_counts

CACHE_VERSION = 3  # 2: transfer split; 3: statistics from float64 sums per image, as stream storage


def data_key(cfg: DataConfig, source_hash: str, storage: str = "memory") -> str:
    settings = cfg.model_dump(mode="json", exclude={"root", "download", "transfer_root", "storage",
                                                     "memory_limit_gb", "workers", "shard_mb"})
    storage_part = {} if storage == "memory" else {"storage": storage}  # memory keys stay as they were
    return cache_key(CACHE_VERSION, source=source_hash, settings=settings, **storage_part)


def save_cached(folder: Path, prepared: Prepared) -> None:
    meta = {"input_shape": prepared.input_shape, "num_classes": prepared.num_classes,
            "class_names": prepared.class_names, "mean": prepared.mean, "std": prepared.std,
            "key": prepared.key, "source": prepared.source, "skipped_images": prepared.counts["skipped_images"]}
    with atomic_folder(folder) as tmp:
        save_file({k: v.contiguous() for k, v in prepared.tensors.items()}, str(tmp / "tensors.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta))


def load_cached(folder: Path) -> Prepared | None:
    meta_path, tensor_path = folder / "meta.json", folder / "tensors.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(tensor_path))
    return Prepared(tensors=tensors, input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"],
                    class_names=meta["class_names"], mean=meta["mean"], std=meta["std"], key=meta["key"],
                    source=meta["source"], cached=True,
                    counts={**split_counts(tensors), "skipped_images": meta.get("skipped_images", 0)})
