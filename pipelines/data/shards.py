"""``data.storage=stream``: the splits as WebDataset-style tar shards, read by DataLoader workers.

A prepared folder ``<home>/cache/data/<key>/`` holds

- ``<split>-NNNNNN.tar``: uncompressed tar shards of about ``data.shard_mb`` each.  Sample
  ``k`` of a split is the members ``<split>NNNNNNNN.<png|jpg|npy>`` (the encoded image:
  the source's own bytes when it is already at ``data.image_size``, else a lossless PNG
  of the resized image; ``.npy`` float32 for sources read as arrays) and, in labelled
  splits, ``<split>NNNNNNNN.cls``.  Any WebDataset reader reads them in order.
- ``locations.safetensors``: per split, each sample's shard, byte offset and size, and the
  labels (``<split>_y``), so a reader can fetch any sample with one ``pread``.
- ``index.json``: counts, class names, input shape, the normalisation statistics (one
  streaming pass over the training split), the source's fingerprint, and each shard's
  size, modification time and SHA-256.

Training draws the same seeded global order as in memory, and each rank decodes only its
slice of every global batch, fetched by offset (WebDataset's indexed ``wids`` mode).  That is
what keeps N processes equal to one, and a resumed run equal to an uninterrupted one:
reading each rank's own shards in sequence would change the batches with the world size.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# Imported here, once: forked DataLoader workers inherit it instead of each paying ~2 s.
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from pipelines.common import entrypoints
from pipelines.common.home import sha256_of
from pipelines.common.proc import pid_exists
from pipelines.data.errors import DataError


class ShardError(DataError):
    """A shard that changed under the cache, or one that cannot be read."""


class ShardWriter:
    """Writes one split's samples into tar shards of about ``shard_bytes`` each and keeps
    each sample's location (shard, data offset, size)."""

    def __init__(self, folder: Path, split: str, shard_bytes: int):
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.names: list[str] = []
        self.locations: list[tuple[int, int, int]] = []
        self._tar: tarfile.TarFile | None = None

    def _open_next(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self.names.append(f"{self.split}-{len(self.names):06d}.tar")
        self._tar = tarfile.open(self.folder / self.names[-1], "w", format=tarfile.USTAR_FORMAT)

    def _member(self, name: str, payload: bytes) -> int:
        """Appends ``name`` and returns the offset of its data in the shard."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        offset = self._tar.offset + len(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
        self._tar.addfile(info, io.BytesIO(payload))
        return offset

    def add(self, payload: bytes, ext: str, label: int | None) -> None:
        if self._tar is None or self._tar.offset >= self.shard_bytes:
            self._open_next()
        key = f"{self.split}{len(self.locations):08d}"
        offset = self._member(f"{key}.{ext}", payload)
        self.locations.append((len(self.names) - 1, offset, len(payload)))
        if label is not None:
            self._member(f"{key}.cls", str(label).encode())

    def close(self) -> torch.Tensor:
        if self._tar is not None:
            self._tar.close()
        return torch.tensor(self.locations, dtype=torch.int64).reshape(-1, 3)


def shard_record(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(path)}


def verify_shards(folder: Path, records: list[dict]) -> None:
    """Each shard is as written: same size and time, or failing that the same SHA-256.
    A changed shard would silently train on other data; it is refused, named."""
    for rec in records:
        path = folder / rec["name"]
        if not path.is_file():
            raise ShardError(f"{path}: shard missing from the prepared data; remove {folder} to prepare it again")
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) == (rec["bytes"], rec["mtime_ns"]):
            continue
        if stat.st_size != rec["bytes"] or sha256_of(path) != rec["sha256"]:
            raise ShardError(f"{path}: shard changed since it was written (fingerprint {rec['sha256'][:12]} "
                             f"no longer matches); remove {folder} to prepare the data again")


def decode(payload: bytes, mode: str) -> torch.Tensor:
    """One stored sample as (C, H, W): uint8 for images, float32 in [0, 1] for arrays.
    RGB images go through torchvision's libjpeg-turbo / libpng decoder: twice PIL's speed
    on small images, and the same pixels for the 8-bit RGB JPEGs and PNGs the shards hold
    (tested against the memory mode, which decodes with PIL)."""
    if payload.startswith(b"\x93NUMPY"):
        return torch.from_numpy(np.load(io.BytesIO(payload), allow_pickle=False))
    if mode == "RGB":
        return decode_image(torch.frombuffer(bytearray(payload), dtype=torch.uint8), mode=ImageReadMode.RGB)
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(payload)).convert(mode))
    return torch.from_numpy((array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy())


def encode_array(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(image, dtype=np.float32), allow_pickle=False)
    return out.getvalue()


class ShardImages:
    """One split on shards as a read-only array of normalised float32 images (N, C, H, W).

    ``len``, ``shape``, ``dtype`` and ``device`` work as on a tensor; indexing (an int, a
    slice, an index or mask tensor) decodes just those rows in this process, and
    :meth:`stream` decodes a sequence of batches ahead in DataLoader workers."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, folder: Path, shards: list[str], locations: torch.Tensor, mode: str,
                 shape: tuple[int, int, int], mean: list[float], std: list[float], workers: int):
        self.folder, self.shards, self.locations = Path(folder), list(shards), locations
        self.mode, self.workers = mode, workers
        self.shape = (len(locations), *shape)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.locations)

    def __getstate__(self) -> dict:  # file descriptors stay with their process
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            self._fds[shard] = os.open(self.folder / self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def raw(self, idx: torch.Tensor) -> torch.Tensor:
        """The stored samples ``idx``, decoded, not normalised: uint8, or float32 for arrays."""
        payloads = []
        for shard, offset, size in self.locations[idx].tolist():
            payloads.append(os.pread(self._fd(shard), size, offset))
            if len(payloads[-1]) != size:
                raise ShardError(f"{self.folder / self.shards[shard]}: truncated at byte {offset + len(payloads[-1])}; "
                                 f"remove {self.folder} to prepare the data again")
        if payloads and self.mode == "RGB" and all(p[:2] == b"\xff\xd8" for p in payloads):  # JPEGs: one call
            images = decode_jpeg([torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads],
                                 mode=ImageReadMode.RGB)
        else:
            images = [decode(p, self.mode) for p in payloads]
        if not images:
            return torch.zeros((0, *self.shape[1:]))
        if len({a.dtype for a in images}) > 1:  # arrays beside image files (data.transfer_root)
            images = [a.to(torch.float32) / 255.0 if a.dtype == torch.uint8 else a for a in images]
        return torch.stack(images)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Normalised float32 images from :meth:`raw`'s pixels, on ``raw``'s device."""
        if raw.dtype == torch.uint8:  # the pixels memory storage holds: float32(x / 255), then the same two ops
            raw = raw.to(torch.float32).div_(255)
        return (raw - self.mean.to(raw.device)) / self.std.to(raw.device)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self[torch.tensor([key])][0]
        if isinstance(key, slice):
            key = torch.arange(len(self))[key]
        key = torch.as_tensor(key)
        if key.dtype == torch.bool:
            key = key.nonzero().flatten()
        return self.normalise(self.raw(key.cpu().long()))

    def subset(self, idx) -> ShardImages:
        """The rows ``idx`` (a slice or index tensor) as another lazy array."""
        view = ShardImages(self.folder, self.shards, self.locations[idx], self.mode,
                           self.shape[1:], [], [], self.workers)
        view.mean, view.std = self.mean, self.std
        return view

    def stream(self, batches: Iterable[torch.Tensor], device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(idx, images)`` for each index tensor of ``batches``, in order (see :func:`stream`)."""
        for (idx,), (x,) in stream([self], ((b,) for b in batches), device):
            yield idx, x

    def chunks(self, size: int, device: torch.device) -> Iterator[torch.Tensor]:
        """All rows in order, ``size`` at a time."""
        batches = (torch.arange(i, min(i + size, len(self))) for i in range(0, len(self), size))
        for _, x in self.stream(batches, device):
            yield x


def stream(arrays: list[ShardImages], batches: Iterable[tuple[torch.Tensor, ...]],
           device: torch.device) -> Iterator[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """For each tuple of index tensors (one per array) of ``batches``, in order: the indices
    and the images, decoded ahead by the first array's ``workers`` DataLoader processes
    (one set for all the arrays), then normalised on ``device``."""
    from torch.utils.data import DataLoader

    workers = arrays[0].workers
    loader = DataLoader(_Rows(arrays), sampler=batches, batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                        multiprocessing_context=worker_context() if workers else None,
                        worker_init_fn=functools.partial(exit_with, os.getpid()) if workers else None)
    for idx, raw in loader:
        yield idx, tuple(a.normalise(r.to(device, non_blocking=True)) for a, r in zip(arrays, raw))


class _Rows(torch.utils.data.Dataset):
    """The DataLoader's view: a tuple of index tensors in, ``(indices, raw pixels)`` out."""

    def __init__(self, arrays: list[ShardImages]):
        self.arrays = arrays

    def __getitem__(self, idx: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        return idx, tuple(a.raw(i) for a, i in zip(self.arrays, idx))


def worker_context():
    """Worker processes start from a fork server that has imported this module, not as forks
    of the training process: a fork copies locks that other threads (gloo's, Prefect's,
    a DataLoader's queue feeders) may hold at that moment, and the child can hang on them."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([entrypoints.SHARD_READER])
    return context


def exit_with(owner: int, *_) -> None:
    """In a worker: exit once process ``owner`` is gone.  Workers are children of the fork
    server, which outlives a SIGKILLed training process, so they watch their owner."""
    def watch() -> None:
        while True:
            time.sleep(1)
            if not pid_exists(owner):
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-owner").start()


def default_workers() -> int:
    """DataLoader workers per training process: its cores less one for training, 1 to 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, max(1, cores - 1))


def write_index(folder: Path, index: dict, locations: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in locations.items()}, str(folder / "locations.safetensors"))
    (folder / "index.json").write_text(json.dumps(index, indent=1))


def read_index(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    index_path, loc_path = folder / "index.json", folder / "locations.safetensors"
    if not (index_path.is_file() and loc_path.is_file()):
        return None
    index = json.loads(index_path.read_text())
    verify_shards(folder, index["shards"])
    return index, load_file(str(loc_path))
