"""Data stage: read a data set, split it deterministically, normalise, cache on disk.

Splits: where a data set has no test split (digits, the CIFAR-10 JPEG test folder alone, a
single ImageFolder tree, Omniglot), ``data.test_fraction`` of it is carved out, stratified
by class.  From the remaining training pool, ``train_fraction`` / ``label_budget`` keep a
labelled subset; from that subset ``val_fraction`` and ``quiz_fraction`` are held out.
The rest of the pool becomes the ``transfer`` split (``data.transfer``): its images are
kept and its labels dropped here, before anything is cached or logged, so no transfer
label can reach a training step.  ``data.transfer_root`` adds a folder of unlabeled
images of the user's own.  Every split is drawn with ``data.split_seed``.

Prepared tensors are cached under ``<home>/cache/data/<key>``; the key is a SHA-256 of
the source files' bytes, the split settings and the augmentation list, so a second run
with the same inputs skips the stage and a changed file invalidates it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import zipfile
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipelines.config import ConfigError, DataConfig
from pipelines.home import cache_dir, sha256_of

CACHE_VERSION = 2  # 2: transfer split
SPLITS = ("train", "quiz", "val", "test")  # labelled; "transfer" has inputs only
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class DataError(RuntimeError):
    """Missing or corrupt data; the message names the file and the expected layout."""


class DataLayoutError(DataError, ConfigError):
    """A data set whose classes cannot be used as given (exit 2, like bad settings)."""


@dataclass
class Prepared:
    tensors: dict[str, torch.Tensor]  # {split}_x float32 (N,C,H,W) normalised, {split}_y int64; transfer_x
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    key: str
    source: str
    cached: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")  # where training on it runs (see `place`)
    storage: str = "memory"  # or "stream": the x splits are lazy `pipelines.shards.ShardImages`

    def x(self, split: str) -> torch.Tensor:
        return self.tensors[f"{split}_x"]

    def y(self, split: str) -> torch.Tensor:
        return self.tensors[f"{split}_y"]

    def transfer(self) -> torch.Tensor | None:
        """The unlabeled transfer inputs, or None when there are none."""
        x = self.tensors.get("transfer_x")
        return x if x is not None and len(x) else None


def place(data: Prepared, device: torch.device, share: float = 0.5) -> Prepared:
    """``data`` for training on ``device``.  Its tensors move there once when they take at
    most ``share`` of the device's free memory; else they stay on the host in pinned
    memory, and the training loops copy each batch over without blocking."""
    if device.type == "cpu" or data.device == device or data.storage == "stream":  # copied as decoded
        return dataclasses.replace(data, device=device)
    nbytes = sum(t.numel() * t.element_size() for t in data.tensors.values())
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= share * free:
        tensors = {k: t.to(device) for k, t in data.tensors.items()}
    else:
        tensors = {k: t.pin_memory() for k, t in data.tensors.items()}
    return dataclasses.replace(data, tensors=tensors, device=device)


def split_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    counts = {s: len(tensors[f"{s}_y"]) for s in SPLITS}
    counts["transfer"] = len(tensors["transfer_x"]) if "transfer_x" in tensors else 0
    return counts


@dataclass
class RawData:
    """Images in [0, 1] as float32 (N,C,H,W); ``test`` is None when the source has none."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    class_names: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # undecodable images left out (data.on_bad_image=skip)


def resolve_root(cfg: DataConfig) -> Path | None:
    if cfg.root is not None:
        return Path(cfg.root).expanduser()
    env = os.environ.get("METADISTILL_DATA")
    return Path(env).expanduser() if env else None


def _need_root(cfg: DataConfig, layout: str) -> Path:
    root = resolve_root(cfg)
    if root is None:
        raise DataError(f"data set {cfg.name!r} needs a data folder: pass --set data.root=PATH or set "
                        f"METADISTILL_DATA; expected layout: {layout}")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; expected layout: {layout}")
    return root


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        sha256_of(path, digest)
    return digest.hexdigest()


# ---------------------------------------------------------------- readers

def _load_digits() -> RawData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    return RawData((x, bunch.target.astype(np.int64)), None, [str(i) for i in range(10)],
                   "sklearn.datasets.load_digits")


_IDX_FOLDERS = {"mnist": ("MNIST", "mnist/MNIST"), "fashion-mnist": ("FashionMNIST", "fashion_mnist/FashionMNIST")}
_IDX_CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}
# MD5 of the decompressed official files, for error messages.
_IDX_MD5 = {
    ("mnist", "train-images-idx3-ubyte"): "6bbc9ace898e44ae57da46a324031adb",
    ("fashion-mnist", "train-images-idx3-ubyte"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
}


def _find_idx(root: Path, name: str, stem: str) -> Path:
    layout = f"<root>/{_IDX_FOLDERS[name][0]}/raw/{stem}[.gz]"
    for folder in _IDX_FOLDERS[name]:
        for candidate in (root / folder / "raw" / stem, root / folder / "raw" / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{name}: file {stem}[.gz] not found under {root}; expected layout: {layout}")


def read_idx(path: Path, expected_dims: int, what: str) -> np.ndarray:
    """Parse an IDX file (gzipped or plain): big-endian header, unsigned bytes."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read {what} ({exc}); the file is corrupt or truncated") from exc
    if len(raw) < 4 + 4 * expected_dims:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX {what} file")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or dims != expected_dims:
        raise DataError(f"{path}: not an IDX {what} file (header {raw[:4].hex()}, expected "
                        f"0000 08 {expected_dims:02x}: unsigned bytes, {expected_dims} dimensions)")
    shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    body = raw[4 + 4 * dims:]
    if len(body) != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} = {int(np.prod(shape))} bytes but the file holds "
                        f"{len(body)}; it is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _load_idx_set(cfg: DataConfig) -> tuple[RawData, list[Path]]:
    root = _need_root(cfg, f"<root>/{_IDX_FOLDERS[cfg.name][0]}/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]")
    files = {stem: _find_idx(root, cfg.name, stem) for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    arrays = {}
    for stem, path in files.items():
        dims = 3 if "images" in stem else 1
        arrays[stem] = read_idx(path, dims, "images" if dims == 3 else "labels")
    for split in ("train", "t10k"):
        n_img, n_lab = len(arrays[f"{split}-images-idx3-ubyte"]), len(arrays[f"{split}-labels-idx1-ubyte"])
        if n_img != n_lab:
            md5 = _IDX_MD5.get((cfg.name, f"{split}-images-idx3-ubyte"))
            raise DataError(f"{files[f'{split}-images-idx3-ubyte']}: {n_img} images but {n_lab} labels"
                            + (f"; the official decompressed file has MD5 {md5}" if md5 else ""))

    def pair(split):
        x = arrays[f"{split}-images-idx3-ubyte"].astype(np.float32)[:, None] / 255.0
        return x, arrays[f"{split}-labels-idx1-ubyte"].astype(np.int64)

    return RawData(pair("train"), pair("t10k"), _IDX_CLASSES[cfg.name], str(root)), list(files.values())


# What PIL raises for a corrupt or truncated file (its UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, ValueError, SyntaxError)


def decode_image(data: bytes, mode: str, size: int | None) -> tuple[np.ndarray, bool]:
    """One encoded image as float32 (C, H, W) in [0, 1], converted to ``mode`` and brought to
    ``size`` (:func:`_resize_and_crop`); and whether ``data`` already decodes to exactly that
    (an 8-bit JPEG or PNG in ``mode`` at ``size``, which stream storage keeps as it is, since
    PIL and torchvision's decoder give the same pixels for it).  Both storage modes decode
    here.  Raises one of :data:`UNREADABLE` for a corrupt or truncated file."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # a truncated file fails here, not later
    as_is = img.format in ("JPEG", "PNG") and img.mode == mode and (size is None or img.size == (size, size))
    img = img.convert(mode)
    if size is not None and img.size != (size, size):
        img = _resize_and_crop(img, size)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), as_is


def left_out(name: str, exc: Exception, on_bad: str, skipped: list[str]) -> None:
    """``data.on_bad_image`` for an unreadable image: fail naming it, or note it in ``skipped``."""
    if on_bad == "fail":
        raise DataError(f"{name}: not a readable image ({exc}); fix or remove it, or set "
                        f"data.on_bad_image=skip to leave such files out") from None
    print(f"skipping unreadable image {name}: {exc}", flush=True)
    skipped.append(name)


def none_readable(names: list[str]) -> DataError:
    return DataError(f"none of the {len(names)} images could be read (first: {names[0] if names else '-'})")


def _decode_images(items: list[tuple[str, bytes]], mode: str, size: int | None,
                   on_bad: str = "fail") -> tuple[np.ndarray, list[int], list[str]]:
    """Decode ``(name, bytes)`` items; returns the images, the indices decoded and the names
    left out.  A corrupt or truncated image raises :class:`DataError` naming it, or with
    ``on_bad="skip"`` is left out."""
    out, kept, skipped = [], [], []
    for i, (name, data) in enumerate(items):
        try:
            out.append(decode_image(data, mode, size)[0])
        except UNREADABLE as exc:
            left_out(name, exc, on_bad, skipped)
            continue
        kept.append(i)
    if not out:
        raise none_readable([name for name, _ in items])
    return np.stack(out), kept, skipped


def _resize_and_crop(img, size: int):
    """``data.image_size``'s policy: the shorter side to ``size`` (PIL's bilinear filter,
    which antialiases when shrinking), then the centre ``size`` x ``size``."""
    from PIL import Image

    width, height = img.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != img.size:
        img = img.resize(new, Image.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def _resize_array(x: np.ndarray, size: int) -> np.ndarray:
    """The same policy for images already decoded to (N, C, H, W) arrays in [0, 1]."""
    if x.shape[2:] == (size, size):
        return x
    height, width = x.shape[2:]
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    out = []
    for i in range(0, len(x), 4096):  # bounded memory for large sets
        chunk = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x[i:i + 4096])), size=new,
                                                mode="bilinear", align_corners=False, antialias=size < min(height, width))
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        out.append(chunk[:, :, top:top + size, left:left + size].clamp_(0, 1).numpy())
    return np.concatenate(out)


def _load_cifar(cfg: DataConfig) -> tuple[RawData, list[Path]]:
    root = _need_root(cfg, "<root>/cifar10/cifar10_test_jpg.zip (test/<class>/*.jpg) or torchvision's "
                           "<root>/cifar-10-batches-py / cifar-100-python")
    jpg_zip = next((p for p in (root / "cifar10" / "cifar10_test_jpg.zip", root / "cifar10_test_jpg.zip")
                    if p.is_file()), None)
    if cfg.name == "cifar10" and jpg_zip is not None:
        test = _read_image_zip(jpg_zip, "RGB", cfg.image_size, cfg.on_bad_image)
        train_zip = jpg_zip.with_name("cifar10_train_jpg.zip")
        if not train_zip.is_file():  # the test zip alone: the small, carved-split setting
            return test, [jpg_zip]
        train = _read_image_zip(train_zip, "RGB", cfg.image_size, cfg.on_bad_image)
        if train.class_names != test.class_names:
            raise DataError(f"{train_zip}: classes {train.class_names} differ from {jpg_zip}'s {test.class_names}")
        return (RawData(train.train, test.train, test.class_names, f"{train_zip} + {jpg_zip}",
                        train.skipped + test.skipped), [train_zip, jpg_zip])
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as exc:
        raise DataError(f"{cfg.name}: {exc} under {root}; set data.download=true to fetch it "
                        f"(needs internet) or point data.root at a folder that has it") from exc
    to_x = lambda d: d.data.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # noqa: E731
    folder = root / ("cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python")
    return (RawData((to_x(train), np.asarray(train.targets)), (to_x(test), np.asarray(test.targets)),
                    list(train.classes), str(root)), sorted(p for p in folder.iterdir() if p.is_file()))


def _read_image_zip(path: Path, mode: str, size: int | None, on_bad: str = "fail") -> RawData:
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
            classes = sorted({n.split("/")[-2] for n in names})
            items = [(f"{path}:{n}", zf.read(n)) for n in names]
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a readable zip ({exc})") from exc
    if not items:
        raise DataError(f"{path}: no images inside; expected <split>/<class>/<image>.jpg")
    x, kept, skipped = _decode_images(items, mode, size, on_bad)
    labels = np.array([classes.index(names[i].split("/")[-2]) for i in kept], dtype=np.int64)
    return RawData((x, labels), None, classes, str(path), skipped)


def _load_imagefolder(cfg: DataConfig) -> tuple[RawData, list[Path]]:
    root = _need_root(cfg, "<root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/...")

    skipped: list[str] = []

    def read(folder: Path, classes: list[str] | None = None):
        found = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if classes is not None and (only_here := sorted(set(found) - set(classes))):
            raise DataLayoutError(f"{folder}: class(es) {', '.join(only_here)} appear only here, not in the "
                                  f"training folder: a model trained there cannot predict them")
        classes = classes or found
        files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).glob("*"))
                 if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{folder}: no images found; expected <class>/<image>.png|jpg")
        empty = [c for i, c in enumerate(classes) if (folder / c).is_dir() and not any(f[1] == i for f in files)]
        if empty:
            raise DataLayoutError(f"{folder}: class folder(s) {', '.join(empty)} hold no images "
                                  f"({', '.join(IMAGE_SUFFIXES)}); remove them or add images")
        x, kept, left_out = _decode_images([(str(p), p.read_bytes()) for p, _ in files], "RGB",
                                           cfg.image_size or 32, cfg.on_bad_image)
        skipped.extend(left_out)
        return (x, np.array([files[i][1] for i in kept], dtype=np.int64)), classes, [p for p, _ in files]

    if (root / "train").is_dir():
        train, classes, f1 = read(root / "train")
        test, _, f2 = read(root / "test", classes) if (root / "test").is_dir() else (None, None, [])
        return RawData(train, test, classes, str(root), skipped), f1 + f2
    train, classes, files = read(root)
    return RawData(train, None, classes, str(root), skipped), files


def _load_omniglot(cfg: DataConfig) -> tuple[RawData, list[Path]]:
    """Background characters of Omniglot as a 964-way classification set, 28x28."""
    root = _need_root(cfg, "<root>/omniglot_npz/images_background.npz or "
                           "<root>/omniglot/omniglot-py/images_background*.zip")
    from pipelines.omniglot import load_background

    x, y, names, files = load_background(root)
    return RawData((x, y), None, names, str(root)), files


def load_raw(cfg: DataConfig) -> tuple[RawData, str]:
    """The raw data set and a fingerprint of its source bytes."""
    if cfg.name == "digits":
        raw = _load_digits()
        return _at_size(raw, cfg.image_size), hashlib.sha256(raw.train[0].tobytes() + raw.train[1].tobytes()).hexdigest()
    loader = {"mnist": _load_idx_set, "fashion-mnist": _load_idx_set, "cifar10": _load_cifar,
              "cifar100": _load_cifar, "imagefolder": _load_imagefolder, "omniglot": _load_omniglot}[cfg.name]
    raw, files = loader(cfg)
    return _at_size(raw, cfg.image_size), _sha256_files(files)


def _at_size(raw: RawData, size: int | None) -> RawData:
    """Sources read as arrays (IDX files, CIFAR pickles, Omniglot) brought to ``data.image_size``."""
    if size is None or raw.train[0].shape[2:] == (size, size):
        return raw
    resize = lambda pair: None if pair is None else (_resize_array(pair[0], size), pair[1])  # noqa: E731
    return RawData(resize(raw.train), resize(raw.test), raw.class_names, raw.source, raw.skipped)


# ---------------------------------------------------------------- splitting

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


def _transfer_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"data.transfer_root {root} is not a folder; expected a folder of images "
                        f"({', '.join(IMAGE_SUFFIXES)}) at any depth")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data.transfer_root {root}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_transfer_root(files: list[Path], shape: tuple[int, ...], on_bad: str) -> tuple[np.ndarray, list[str]]:
    """The user's unlabeled images, decoded to the data set's channels and size, and the
    paths of those left out as unreadable."""
    channels, height, width = shape
    if height != width:
        raise DataError(f"data.transfer_root: the data set's images are {height}x{width}; only square sizes "
                        f"are supported for transfer images")
    x, _, skipped = _decode_images([(str(p), p.read_bytes()) for p in files], "L" if channels == 1 else "RGB",
                                   height, on_bad)
    return x, skipped


# ---------------------------------------------------------------- storage

STREAMABLE = ("imagefolder", "cifar10")  # sources of image files, read one file at a time


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


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
        zips = [p for p in (root / "cifar10" / "cifar10_train_jpg.zip", root / "cifar10" / "cifar10_test_jpg.zip",
                            root / "cifar10_train_jpg.zip", root / "cifar10_test_jpg.zip") if p.is_file()]
        count = 0
        for path in zips:
            with zipfile.ZipFile(path) as zf:
                count += sum(n.lower().endswith(IMAGE_SUFFIXES) for n in zf.namelist())
    side = cfg.image_size or 32
    return "stream" if count * 3 * side * side * 4 > cfg.memory_limit_gb * 2**30 else "memory"


# ---------------------------------------------------------------- caching

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


def prepare(cfg: DataConfig) -> Prepared:
    """Load (or reuse from cache) the normalised train/quiz/val/test splits: tensors in
    memory, or shards read as they are needed (``data.storage``, see :func:`storage_for`)."""
    if storage_for(cfg) == "stream":
        from pipelines.stream import prepare_stream

        return prepare_stream(cfg)
    raw, source_hash = load_raw(cfg)
    transfer_files = _transfer_files(Path(cfg.transfer_root).expanduser()) if cfg.transfer_root else []
    if transfer_files:
        source_hash = hashlib.sha256((source_hash + _sha256_files(transfer_files)).encode()).hexdigest()
    key = cache_key(cfg, source_hash)
    folder = cache_dir("data") / key
    cached = _load_cached(folder)
    if cached is not None:
        return cached
    splits = make_splits(raw, cfg)
    skipped = list(raw.skipped)
    if transfer_files:
        extra, left_out = _read_transfer_root(transfer_files, raw.train[0].shape[1:], cfg.on_bad_image)
        skipped += left_out
        splits["transfer"] = (np.concatenate([splits["transfer"][0], extra])[:cfg.transfer_limit], None)
    if len(splits["train"][1]) < 2:
        raise DataError(f"{cfg.name}: only {len(splits['train'][1])} training examples remain after the splits")
    train_x = splits["train"][0]
    mean = train_x.mean(axis=(0, 2, 3))
    std = train_x.std(axis=(0, 2, 3)) + 1e-6
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
    _save(folder, prepared)
    return prepared
