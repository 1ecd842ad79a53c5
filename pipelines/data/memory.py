"""TODO docstring."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from safetensors.torch import load_file, save_file
from pipelines.config.data import DataConfig
from pipelines.data.prepared import Prepared, split_counts


CACHE_VERSION = 2  # 2: transfer split


def cache_key(cfg: DataConfig, source_hash: str, storage: str = "memory") -> str:
    settings = cfg.model_dump(mode="json", exclude={"root", "download", "transfer_root", "storage",
                                                     "memory_limit_gb", "workers", "shard_mb"})
    blob = {"v": CACHE_VERSION, "source": source_hash, "settings": settings}
    if storage != "memory":
        blob["storage"] = storage
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _save(folder: Path, prepared: Prepared) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in prepared.tensors.items()}, str(tmp / "tensors.safetensors"))
    meta = {"input_shape": prepared.input_shape, "num_classes": prepared.num_classes,
            "class_names": prepared.class_names, "mean": prepared.mean, "std": prepared.std,
            "key": prepared.key, "source": prepared.source, "skipped_images": prepared.counts["skipped_images"]}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: its copy is equivalent
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: Path) -> Prepared | None:
    meta_path, tensor_path = folder / "meta.json", folder / "tensors.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(tensor_path))
    return Prepared(tensors=tensors, input_shape=tuple(meta["input_shape"]), num_classes=meta["num_classes"],
                    class_names=meta["class_names"], mean=meta["mean"], std=meta["std"], key=meta["key"],
                    source=meta["source"], cached=True,
                    counts={**split_counts(tensors), "skipped_images": meta.get("skipped_images", 0)})
