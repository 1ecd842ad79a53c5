"""Omniglot readers: the npz form (``images`` bool [characters, 20, 105, 105]) and the
official zips (``<Alphabet>/<characterNN>/*.png``).  Strokes become 1.0, background 0.0,
and images are resized to ``size`` x ``size`` with area averaging."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.data.errors import DataError

LAYOUT = ("<root>/omniglot_npz/images_{split}.npz, or <root>/omniglot/omniglot-py/images_{split}*.zip "
          "(<Alphabet>/<characterNN>/*.png inside)")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 105, 105) in [0, 1] -> (N, 1, size, size) float32."""
    t = torch.from_numpy(images.astype(np.float32))[:, None]
    return F.interpolate(t, size=(size, size), mode="area").numpy()


def _from_npz(path: Path, size: int) -> tuple[np.ndarray, list[str]]:
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not an Omniglot npz with arrays 'images' and 'labels' ({exc})") from exc
    if images.ndim != 4 or images.shape[2:] != (105, 105):
        raise DataError(f"{path}: 'images' has shape {images.shape}, expected [characters, 20, 105, 105]")
    chars, per_char = images.shape[:2]
    strokes = ~images.reshape(-1, 105, 105).astype(bool)
    x = _resize(strokes, size).reshape(chars, per_char, 1, size, size)
    first = int(labels.min())
    return x, [f"character{int(labels[i, 0]) - first:04d}" for i in range(chars)]


def _from_zips(zips: list[Path], size: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    per_char: dict[str, list[np.ndarray]] = {}
    for path in zips:
        try:
            with zipfile.ZipFile(path) as zf:
                for name in sorted(n for n in zf.namelist() if n.endswith(".png")):
                    parts = name.split("/")
                    key = f"{parts[-3]}/{parts[-2]}"
                    img = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("L"), dtype=np.float32) / 255
                    per_char.setdefault(key, []).append(1.0 - img)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{path}: not a readable zip ({exc}); expected layout {LAYOUT}") from exc
    if not per_char:
        raise DataError(f"no character images found in {', '.join(map(str, zips))}; expected layout {LAYOUT}")
    n = min(len(v) for v in per_char.values())
    names = sorted(per_char)
    stacked = np.stack([np.stack(per_char[k][:n]) for k in names])  # (C, n, 105, 105)
    x = _resize(stacked.reshape(-1, 105, 105), size).reshape(len(names), n, 1, size, size)
    return x, names


def load_characters(root: Path, split: str = "background", size: int = 28) -> tuple[np.ndarray, list[str], list[Path]]:
    """Images per character: array (characters, examples, 1, size, size), names, source files."""
    root = Path(root)
    for npz in (root / "omniglot_npz" / f"images_{split}.npz", root / f"images_{split}.npz"):
        if npz.is_file():
            x, names = _from_npz(npz, size)
            return x, names, [npz]
    for folder in (root / "omniglot" / "omniglot-py", root / "omniglot-py", root):
        zips = sorted(folder.glob(f"images_{split}*.zip")) if folder.is_dir() else []
        if zips:
            x, names = _from_zips(zips, size)
            return x, names, zips
    raise DataError(f"Omniglot {split} characters not found under {root}; expected layout: "
                    + LAYOUT.format(split=split))


def load_background(root: Path, size: int = 28) -> tuple[np.ndarray, np.ndarray, list[str], list[Path]]:
    """Background characters flattened into a classification set (one class per character)."""
    x, names, files = load_characters(root, "background", size)
    chars, per_char = x.shape[:2]
    return x.reshape(chars * per_char, 1, size, size), np.repeat(np.arange(chars), per_char), names, files


def load_lake_runs(root: Path, size: int = 28) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The 20 one-shot 20-way runs of Lake et al. (``all_runs.zip``) as tasks
    ``(xs [20], ys [20], xq [20], yq [20])``: one training image per class, 20 test items."""
    from PIL import Image

    candidates = [root / "omniglot" / "omniglot-py" / "all_runs.zip", root / "omniglot-py" / "all_runs.zip",
                  root / "all_runs.zip"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"all_runs.zip not found under {root}; expected <root>/omniglot/omniglot-py/all_runs.zip")

    def image(zf: zipfile.ZipFile, name: str) -> np.ndarray:
        return 1.0 - np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("L"), dtype=np.float32) / 255

    runs = []
    with zipfile.ZipFile(path) as zf:
        for run in sorted({n.split("/")[0] for n in zf.namelist() if n.startswith("run")}):
            pairs = [line.split() for line in zf.read(f"{run}/class_labels.txt").decode().splitlines() if line.strip()]
            train_names = sorted({t for _, t in pairs})
            xs = _resize(np.stack([image(zf, n) for n in train_names]), size)
            xq = _resize(np.stack([image(zf, q) for q, _ in pairs]), size)
            yq = [train_names.index(t) for _, t in pairs]
            runs.append((torch.from_numpy(xs), torch.arange(len(train_names)), torch.from_numpy(xq), torch.tensor(yq)))
    if len(runs) != 20:
        raise DataError(f"{path}: expected 20 runs, found {len(runs)}")
    return runs
