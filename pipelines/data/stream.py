"""The data stage under ``data.storage=stream``: the source read one image at a time,
split exactly as in memory, and written once as shards (:mod:`pipelines.shards`).

Two passes over the source, each in bounded memory: the first decodes every image once,
to find the unreadable ones (``data.on_bad_image``) and to sum each image's pixels, so the
splits are drawn over the same readable images as in memory mode and the training
split's mean and std need no second decode; the second writes each split's samples into
its shards.  The cache key holds a fingerprint of the source files' names, sizes and
modification times (hashing every byte of a million files would cost more than a read).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipelines.common.home import atomic_folder, cache_dir, made_once
from pipelines.common.progress import progress_bar
from pipelines.config.data import DataConfig
from pipelines.data import shards
from pipelines.data.decode import IMAGE_SUFFIXES, UNREADABLE, decode_image, left_out, none_readable
from pipelines.data.errors import DataError, DataLayoutError
from pipelines.data.memory import data_key
from pipelines.data.prepared import Prepared, channel_sums, mean_std
from pipelines.data.readers import cifar_zips, list_transfer_root, load_raw, need_root, sha256_files
from pipelines.data.splits import split_indices

LABELLED = ("train", "quiz", "val", "test")


@dataclass
class Pool:
    """Images of one source pool: their names, labels, and how to read each one: ``read``
    gives a file's bytes, or ``arrays`` holds images already decoded to [0, 1]."""

    names: list[str]
    labels: np.ndarray | None
    read: Callable[[str], bytes] | None = None
    arrays: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class SourceListing:
    train: Pool
    test: Pool | None
    class_names: list[str]
    source: str
    fingerprint: str
    mode: str = "RGB"
    size: int | None = None  # the side every image is brought to; None: the source's own


@dataclass
class Scan:
    """What the first pass learnt of a pool: the readable images, each one's channel sums,
    whether its bytes can be stored as they are, and the names left out."""

    kept: np.ndarray
    sums: np.ndarray  # (kept, 2, C): sum and sum of squares of each image's channels
    as_is: np.ndarray  # (kept,) bool
    shape: tuple[int, int, int]
    skipped: list[str] = field(default_factory=list)


def _stat_fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_file(name: str) -> bytes:
    return Path(name).read_bytes()


class ZipReader:
    """Reads ``path``'s members (names ``<zip>:<member>``), opening the zip once per process:
    worker processes must not share one file offset.  Picklable, for the scan's workers."""

    def __init__(self, path: Path):
        self.path, self._zip, self._pid = path, None, None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_zip": None, "_pid": None}

    def __call__(self, name: str) -> bytes:
        if self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.read(name.split(":", 1)[1])


def _folder_pool(folder: Path, classes: list[str] | None = None) -> tuple[Pool, list[str], list[Path]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes is not None and (only_here := sorted(set(found) - set(classes))):
        raise DataLayoutError(f"{folder}: class(es) {', '.join(only_here)} appear only here, not in the "
                              f"training folder: a model trained there cannot predict them")
    classes = classes or found
    files, labels, empty = [], [], []
    for i, name in enumerate(classes):
        inside = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (folder / name).is_dir() else []
        if (folder / name).is_dir() and not inside:
            empty.append(name)
        files += inside
        labels += [i] * len(inside)
    if not files:
        raise DataError(f"{folder}: no images found; expected <class>/<image>.png|jpg")
    if empty:
        raise DataLayoutError(f"{folder}: class folder(s) {', '.join(empty)} hold no images "
                              f"({', '.join(IMAGE_SUFFIXES)}); remove them or add images")
    pool = Pool([str(p) for p in files], np.array(labels, dtype=np.int64), read=read_file)
    return pool, classes, files


def _zip_pool(path: Path) -> tuple[Pool, list[str]]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a readable zip ({exc})") from exc
    if not names:
        raise DataError(f"{path}: no images inside; expected <split>/<class>/<image>.jpg")
    classes = sorted({n.split("/")[-2] for n in names})
    labels = np.array([classes.index(n.split("/")[-2]) for n in names], dtype=np.int64)
    return Pool([f"{path}:{n}" for n in names], labels, read=ZipReader(path)), classes


def open_source(cfg: DataConfig) -> SourceListing:
    """The source, listed but not decoded (sources read as arrays are small: read whole)."""
    if cfg.name == "imagefolder":
        root = need_root(cfg, "<root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/...")
        if (root / "train").is_dir():
            train, classes, files = _folder_pool(root / "train")
            test, _, more = _folder_pool(root / "test", classes) if (root / "test").is_dir() else (None, None, [])
            files += more
        else:
            (train, classes, files), test = _folder_pool(root), None
        return SourceListing(train, test, classes, str(root), _stat_fingerprint(files), "RGB", cfg.image_size or 32)
    if cfg.name == "cifar10":
        root = need_root(cfg, "<root>/cifar10/cifar10_test_jpg.zip (test/<class>/*.jpg)")
        train_zip, test_zip = cifar_zips(root)
        if test_zip is not None:
            test, classes = _zip_pool(test_zip)
            if train_zip is None:
                return SourceListing(test, None, classes, str(test_zip), sha256_files([test_zip]), "RGB", cfg.image_size)
            train, train_classes = _zip_pool(train_zip)
            if train_classes != classes:
                raise DataError(f"{train_zip}: classes {train_classes} differ from {test_zip}'s {classes}")
            return SourceListing(train, test, classes, f"{train_zip} + {test_zip}", sha256_files([train_zip, test_zip]),
                          "RGB", cfg.image_size)
    raw, fingerprint = load_raw(cfg)
    as_pool = lambda pair: Pool([f"{raw.source}#{i}" for i in range(len(pair[1]))], pair[1], arrays=pair[0])  # noqa: E731
    mode = "L" if raw.train[0].shape[1] == 1 else "RGB"
    return SourceListing(as_pool(raw.train), as_pool(raw.test) if raw.test is not None else None, raw.class_names,
                  raw.source, fingerprint, mode, raw.train[0].shape[-1])


def _pixels(pool: Pool, i: int, mode: str, size: int | None) -> tuple[np.ndarray, bool]:
    """Image ``i`` at ``size``, and whether its bytes can be stored as they are
    (:func:`pipelines.data.decode_image`)."""
    if pool.arrays is not None:
        return pool.arrays[i], False
    return decode_image(pool.read(pool.names[i]), mode, size)


_SCANNED: tuple | None = None  # (pool, mode, size) in each scan worker


def _start_scan(pool: Pool, mode: str, size: int | None, owner: int | None = None) -> None:
    global _SCANNED
    _SCANNED = (pool, mode, size)
    if owner is not None:
        shards.exit_with(owner)


def _scan_chunk(bounds: tuple[int, int]) -> list[tuple[int, np.ndarray | None, bool, tuple | str]]:
    """(index, channel sums or None, stored as is, shape or the reason it is unreadable)."""
    pool, mode, size = _SCANNED
    out = []
    for i in range(*bounds):
        try:
            x, as_is = _pixels(pool, i, mode, size)
        except UNREADABLE as exc:
            out.append((i, None, False, str(exc)))
            continue
        out.append((i, channel_sums(x[None])[0], as_is, x.shape))
    return out


def scan(pool: Pool, mode: str, size: int | None, on_bad: str, workers: int, desc: str) -> Scan:
    """First pass: decode every image once (in ``workers`` processes)."""
    if pool.arrays is not None:
        return Scan(np.arange(len(pool)), channel_sums(pool.arrays), np.zeros(len(pool), bool),
                    tuple(pool.arrays.shape[1:]))
    kept, sums, as_is, skipped, shapes = [], [], [], [], set()
    chunks = [(i, min(i + 256, len(pool))) for i in range(0, len(pool), 256)]
    _start_scan(pool, mode, size)
    try:
        with progress_bar(desc, total=len(chunks)) as advance, contextlib.ExitStack() as stack:
            imap = map if workers < 2 else stack.enter_context(
                shards.worker_context().Pool(workers, _start_scan, (pool, mode, size, os.getpid()))).imap
            for chunk in imap(_scan_chunk, chunks):
                advance()
                for i, s, ok, shape_or_reason in chunk:
                    if s is None:
                        left_out(pool.names[i], shape_or_reason, on_bad, skipped)
                        continue
                    kept.append(i)
                    sums.append(s)
                    as_is.append(ok)
                    shapes.add(shape_or_reason)
    finally:
        _start_scan(None, mode, size)
    if not kept:
        raise none_readable(pool.names)
    if len(shapes) > 1:
        raise DataError(f"{desc}: images of several sizes {sorted(shapes)}; set data.image_size to bring them to one")
    return Scan(np.array(kept), np.stack(sums), np.array(as_is), next(iter(shapes)), skipped)


def _payload(pool: Pool, i: int, as_is: bool, mode: str, size: int | None) -> tuple[bytes, str]:
    """What a shard stores for image ``i``: its own bytes when they decode to the prepared
    image, else a lossless PNG of it (or ``.npy`` for arrays)."""
    if pool.arrays is not None:
        return shards.encode_array(pool.arrays[i]), "npy"
    if as_is:
        name = pool.names[i]
        return pool.read(name), Path(name).suffix.lower().lstrip(".").replace("jpeg", "jpg")
    from PIL import Image

    x, _ = _pixels(pool, i, mode, size)
    image = (x * 255.0).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(out, "PNG")
    return out.getvalue(), "png"


def prepare_stream(cfg: DataConfig) -> Prepared:
    source = open_source(cfg)
    transfer_files = list_transfer_root(Path(cfg.transfer_root).expanduser()) if cfg.transfer_root else []
    fingerprint = source.fingerprint
    if transfer_files:
        fingerprint = hashlib.sha256((fingerprint + _stat_fingerprint(transfer_files)).encode()).hexdigest()
    key = data_key(cfg, fingerprint, "stream")
    folder = cache_dir("data") / key
    workers = cfg.workers if cfg.workers is not None else shards.default_workers()
    return made_once(f"data-{key}", lambda: load(folder, workers),
                     lambda: _build(cfg, source, transfer_files, key, folder, workers, fingerprint))


def _build(cfg: DataConfig, source: SourceListing, transfer_files: list[Path], key: str, folder: Path, workers: int,
           fingerprint: str) -> Prepared:
    with atomic_folder(folder) as tmp:
        index, locations = _write(cfg, source, transfer_files, key, tmp, max(1, workers))
        index["fingerprint"] = fingerprint  # the source's, and data.transfer_root's when set
        shards.write_index(tmp, index, locations)
    prepared = load(folder, workers)
    prepared.cached = False
    return prepared


def _write(cfg: DataConfig, source: SourceListing, transfer_files: list[Path], key: str, folder: Path,
           workers: int) -> tuple[dict, dict[str, torch.Tensor]]:
    train_scan = scan(source.train, source.mode, source.size, cfg.on_bad_image, workers, "scan train pool")
    test_scan = (scan(source.test, source.mode, source.size, cfg.on_bad_image, workers, "scan test")
                 if source.test is not None else None)
    shape = train_scan.shape
    if test_scan is not None and test_scan.shape != shape:
        raise DataError(f"{source.source}: test images are {test_scan.shape[1:]}, training images {shape[1:]}; "
                        f"set data.image_size to bring them to one size")
    rows = split_indices(source.train.labels[train_scan.kept], source.test is not None, cfg)
    if len(rows["train"]) < 2:
        raise DataError(f"{cfg.name}: only {len(rows['train'])} training examples remain after the splits")
    mean, std = mean_std(train_scan.sums[rows["train"]], shape[1] * shape[2])
    members = {name: (source.train, train_scan, rows[name]) for name in ("train", "quiz", "val")}
    members["test"] = ((source.test, test_scan, np.arange(len(test_scan.kept))) if rows["test"] is None
                       else (source.train, train_scan, rows["test"]))
    parts = [(source.train, train_scan, rows["transfer"])]
    skipped = train_scan.skipped + (test_scan.skipped if test_scan else [])
    if transfer_files:
        extra = Pool([str(p) for p in transfer_files], None, read=read_file)
        extra_scan = scan(extra, source.mode, shape[1], cfg.on_bad_image, workers, "scan data.transfer_root")
        if shape[1] != shape[2]:
            raise DataError(f"data.transfer_root: the data set's images are {shape[1]}x{shape[2]}; only square "
                            f"sizes are supported for transfer images")
        parts.append((extra, extra_scan, np.arange(len(extra_scan.kept))))
        skipped += extra_scan.skipped
    locations, records = {}, []
    for split in (*LABELLED, "transfer"):
        writer = shards.ShardWriter(folder, split, cfg.shard_mb << 20)
        chosen = [members[split]] if split in members else parts
        total = sum(len(r) for _, _, r in chosen)
        left = cfg.transfer_limit if split == "transfer" and cfg.transfer_limit else total
        with progress_bar(f"write {split} shards", total=min(total, left)) as advance:
            for pool, pool_scan, picked in chosen:
                for row in picked[:left]:
                    i = int(pool_scan.kept[row])
                    payload, ext = _payload(pool, i, bool(pool_scan.as_is[row]), source.mode, shape[1])
                    writer.add(payload, ext, None if split == "transfer" else int(pool.labels[i]))
                    advance()
                left -= min(left, len(picked))
        locations[f"{split}_loc"] = writer.close()
        if split != "transfer":
            labels = [pool.labels[pool_scan.kept[r]] for pool, pool_scan, r in chosen]
            locations[f"{split}_y"] = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        records += [shards.shard_record(folder / name) for name in writer.names]
        locations[f"{split}_shards"] = torch.tensor([len(records) - len(writer.names), len(writer.names)])
    index = {"storage": "stream", "key": key, "source": source.source, "fingerprint": source.fingerprint,
             "input_shape": list(shape), "num_classes": len(source.class_names), "class_names": source.class_names,
             "mean": mean.tolist(), "std": std.tolist(), "mode": source.mode, "skipped_images": len(skipped),
             "shards": records}
    return index, locations


def load(folder: Path, workers: int) -> Prepared | None:
    """The prepared splits in ``folder`` as lazy arrays, after checking every shard."""
    found = shards.read_index(folder)
    if found is None:
        return None
    index, locations = found
    names = [r["name"] for r in index["shards"]]
    tensors, counts = {}, {}
    for split in (*LABELLED, "transfer"):
        first, n = locations[f"{split}_shards"].tolist()
        images = shards.ShardImages(folder, names[first:first + n], locations[f"{split}_loc"],
                                    index["mode"], tuple(index["input_shape"]), index["mean"], index["std"], workers)
        tensors[f"{split}_x"] = images
        if split != "transfer":
            tensors[f"{split}_y"] = locations[f"{split}_y"]
        counts[split] = len(images)
    counts["skipped_images"] = index["skipped_images"]
    return Prepared(tensors=tensors, input_shape=tuple(index["input_shape"]), num_classes=index["num_classes"],
                    class_names=index["class_names"], mean=index["mean"], std=index["std"], key=index["key"],
                    source=index["source"], cached=True, counts=counts, storage="stream")
