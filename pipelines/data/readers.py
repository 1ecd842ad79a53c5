"""Reading each source into arrays in [0, 1]: scikit-learn's digits, IDX files (MNIST,
Fashion-MNIST), CIFAR (JPEG zips or torchvision's pickles), image folders, Omniglot.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.common.home import sha256_of
from pipelines.config.data import DataConfig
from pipelines.data.decode import IMAGE_SUFFIXES, decode_images, resize_array
from pipelines.data.errors import DataError, DataLayoutError


@dataclass
class RawData:
    """Images in [0, 1] as float32 (N,C,H,W); ``test`` is None when the source has none."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray] | None
    class_names: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # undecodable images left out (data.on_bad_image=skip)


def resolve_root(cfg: DataConfig) -> Path | None:
    """The data folder, absolute (it is logged as the data set's source)."""
    if cfg.root is not None:
        return Path(cfg.root).expanduser().resolve()
    env = os.environ.get("METADISTILL_DATA")
    return Path(env).expanduser().resolve() if env else None


def need_root(cfg: DataConfig, layout: str) -> Path:
    root = resolve_root(cfg)
    if root is None:
        raise DataError(f"data set {cfg.name!r} needs a data folder: pass --set data.root=PATH or set "
                        f"METADISTILL_DATA; expected layout: {layout}")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; expected layout: {layout}")
    return root


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        sha256_of(path, digest)
    return digest.hexdigest()


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
    root = need_root(cfg, f"<root>/{_IDX_FOLDERS[cfg.name][0]}/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]")
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


def cifar_zips(root: Path) -> tuple[Path | None, Path | None]:
    """The CIFAR-10 JPEG zips under ``root`` (in ``cifar10/`` or at the top): the test zip,
    and the train zip beside it when there is one.  Both storage modes look here."""
    test = next((p for p in (root / "cifar10" / "cifar10_test_jpg.zip", root / "cifar10_test_jpg.zip")
                 if p.is_file()), None)
    train = test.with_name("cifar10_train_jpg.zip") if test is not None else None
    return (train if train is not None and train.is_file() else None), test


def _load_cifar(cfg: DataConfig) -> tuple[RawData, list[Path]]:
    root = need_root(cfg, "<root>/cifar10/cifar10_test_jpg.zip (test/<class>/*.jpg) or torchvision's "
                           "<root>/cifar-10-batches-py / cifar-100-python")
    train_zip, jpg_zip = cifar_zips(root)
    if cfg.name == "cifar10" and jpg_zip is not None:
        test = read_image_zip(jpg_zip, "RGB", cfg.image_size, cfg.on_bad_image)
        if train_zip is None:  # the test zip alone: the small, carved-split setting
            return test, [jpg_zip]
        train = read_image_zip(train_zip, "RGB", cfg.image_size, cfg.on_bad_image)
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


def read_image_zip(path: Path, mode: str, size: int | None, on_bad: str = "fail") -> RawData:
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png")))
            classes = sorted({n.split("/")[-2] for n in names})
            items = [(f"{path}:{n}", zf.read(n)) for n in names]
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a readable zip ({exc})") from exc
    if not items:
        raise DataError(f"{path}: no images inside; expected <split>/<class>/<image>.jpg")
    x, kept, skipped = decode_images(items, mode, size, on_bad)
    labels = np.array([classes.index(names[i].split("/")[-2]) for i in kept], dtype=np.int64)
    return RawData((x, labels), None, classes, str(path), skipped)


def class_files(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """An image folder's classes (its sub-folders, or ``classes`` of the training folder)
    and its ``(image, class index)`` files, refusing layouts a model cannot use: a class
    folder without images, a class that appears only in the test folder, and in the
    training folder a single class or a class with one image."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes is not None and (only_here := sorted(set(found) - set(classes))):
        raise DataLayoutError(f"{folder}: class(es) {', '.join(only_here)} appear only here, not in the "
                              f"training folder: a model trained there cannot predict them")
    training = classes is None
    if training and len(found) == 1:
        raise DataLayoutError(f"{folder}: one class folder ({found[0]}): a classifier needs at least two "
                              f"<class>/ folders of images")
    classes = classes or found
    files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).glob("*"))
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{folder}: no images found; expected <class>/<image>.png|jpg")
    empty = [c for i, c in enumerate(classes) if (folder / c).is_dir() and not any(f[1] == i for f in files)]
    if empty:
        raise DataLayoutError(f"{folder}: class folder(s) {', '.join(empty)} hold no images "
                              f"({', '.join(IMAGE_SUFFIXES)}); remove them or add images")
    if training:
        counts = np.bincount([i for _, i in files], minlength=len(classes))
        if lone := [c for c, n in zip(classes, counts) if n < 2]:
            which = f"class {lone[0]} has 1 image" if len(lone) == 1 else f"classes {', '.join(lone)} have 1 image each"
            raise DataLayoutError(f"{folder}: {which}: a class needs at least 2 training images (without a test/ "
                                  f"folder one of each class is held out for testing); add images or remove it")
    return classes, files


def class_counts(cfg: DataConfig) -> dict[str, int] | None:
    """Training images per class of an image folder, in the order preparing it gives its
    classes, from the file listing (nothing decoded); None for the other sources."""
    if cfg.name != "imagefolder":
        return None
    root = need_root(cfg, "<root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/...")
    classes, files = class_files(imagefolder_splits(root)[0])
    counts = np.bincount([i for _, i in files], minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


IMBALANCE_RATIO = 10  # the largest class with at least this many times the smallest's images: warned


def imbalance_note(cfg: DataConfig) -> str | None:
    """A one-line warning when an image folder's largest training class holds at least
    ``IMBALANCE_RATIO`` times the images of its smallest; None otherwise (and for the other sources)."""
    counts = class_counts(cfg)
    if not counts:
        return None
    large, small = max(counts, key=counts.get), min(counts, key=counts.get)
    if counts[large] < IMBALANCE_RATIO * counts[small]:
        return None
    return (f"classes are imbalanced: {large} {counts[large]} images, {small} {counts[small]} "
            f"({counts[large] / counts[small]:.0f}x): accuracy mostly reflects the large classes; "
            f"add images to the small ones for a model that serves every class")


def imagefolder_splits(root: Path) -> tuple[Path, Path | None]:
    """The training folder of an image-folder source and its test folder, if it has one."""
    if (root / "train").is_dir():
        return root / "train", (root / "test" if (root / "test").is_dir() else None)
    return root, None


def _load_imagefolder(cfg: DataConfig) -> tuple[RawData, list[Path]]:
    root = need_root(cfg, "<root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/...")
    skipped: list[str] = []

    def read(folder: Path, classes: list[str] | None = None):
        classes, files = class_files(folder, classes)
        x, kept, left_out = decode_images([(str(p), p.read_bytes()) for p, _ in files], "RGB",
                                          cfg.image_size or 32, cfg.on_bad_image)
        skipped.extend(left_out)
        return (x, np.array([files[i][1] for i in kept], dtype=np.int64)), classes, [p for p, _ in files]

    train_folder, test_folder = imagefolder_splits(root)
    train, classes, f1 = read(train_folder)
    test, _, f2 = read(test_folder, classes) if test_folder is not None else (None, None, [])
    return RawData(train, test, classes, str(root), skipped), f1 + f2


def _load_omniglot(cfg: DataConfig) -> tuple[RawData, list[Path]]:
    """Background characters of Omniglot as a 964-way classification set, 28x28."""
    root = need_root(cfg, "<root>/omniglot_npz/images_background.npz or "
                           "<root>/omniglot/omniglot-py/images_background*.zip")
    from pipelines.data.omniglot import load_background

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
    return _at_size(raw, cfg.image_size), sha256_files(files)


def _at_size(raw: RawData, size: int | None) -> RawData:
    """Sources read as arrays (IDX files, CIFAR pickles, Omniglot) brought to ``data.image_size``."""
    if size is None or raw.train[0].shape[2:] == (size, size):
        return raw
    resize = lambda pair: None if pair is None else (resize_array(pair[0], size), pair[1])  # noqa: E731
    return RawData(resize(raw.train), resize(raw.test), raw.class_names, raw.source, raw.skipped)


def list_transfer_root(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"data.transfer_root {root} is not a folder; expected a folder of images "
                        f"({', '.join(IMAGE_SUFFIXES)}) at any depth")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data.transfer_root {root}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_transfer_root(files: list[Path], shape: tuple[int, ...], on_bad: str) -> tuple[np.ndarray, list[str]]:
    """The user's unlabeled images, decoded to the data set's channels and size, and the
    paths of those left out as unreadable."""
    channels, height, width = shape
    if height != width:
        raise DataError(f"data.transfer_root: the data set's images are {height}x{width}; only square sizes "
                        f"are supported for transfer images")
    x, _, skipped = decode_images([(str(p), p.read_bytes()) for p in files], "L" if channels == 1 else "RGB",
                                   height, on_bad)
    return x, skipped


def source_size(cfg: DataConfig) -> tuple[int, bool, int]:
    """How many images the source's training pool holds, whether it has a test split of its
    own, and how many classes, from file listings and headers alone (nothing decoded): what the pre-flight
    check needs to refuse settings the splits cannot satisfy.  Raises :class:`DataError`
    naming the missing folder or file."""
    if cfg.name == "digits":
        return 1797, False, 10
    if cfg.name == "omniglot":
        need_root(cfg, "<root>/omniglot_npz/images_background.npz or <root>/omniglot/omniglot-py/images_background*.zip")
        return 964 * 20, False, 964  # the background alphabets' characters, 20 drawings each
    if cfg.name in _IDX_FOLDERS:
        root = need_root(cfg, f"<root>/{_IDX_FOLDERS[cfg.name][0]}/raw/train-images-idx3-ubyte[.gz]")
        path = _find_idx(root, cfg.name, "train-images-idx3-ubyte")
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
            header = fh.read(8)
        return (struct.unpack(">I", header[4:8])[0] if len(header) == 8 else 0), True, 10
    if cfg.name == "imagefolder":
        root = need_root(cfg, "<root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/...")
        train_folder, test_folder = imagefolder_splits(root)
        classes, files = class_files(train_folder)
        if test_folder is not None:
            class_files(test_folder, classes)
        return len(files), test_folder is not None, len(classes)
    root = need_root(cfg, "<root>/cifar10/cifar10_test_jpg.zip or torchvision's <root>/cifar-10-batches-py")
    train_zip, test_zip = cifar_zips(root)
    if cfg.name == "cifar10" and test_zip is not None:
        with zipfile.ZipFile(train_zip or test_zip) as zf:
            return sum(n.lower().endswith(IMAGE_SUFFIXES) for n in zf.namelist()), train_zip is not None, 10
    folder = root / ("cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python")
    if not folder.is_dir() and not cfg.download:
        raise DataError(f"{cfg.name}: neither the JPEG zips nor {folder} under {root}; set data.download=true "
                        f"(needs internet) or point data.root at a folder that has them")
    return 50000, True, 10 if cfg.name == "cifar10" else 100
