"""Decoding image files and bringing them to ``data.image_size``; both storage modes decode
here, and report unreadable files the same way.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch

from pipelines.data.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


# What PIL raises for a corrupt or truncated file (its UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, ValueError, SyntaxError)


def decode_image(data: bytes, mode: str, size: int | None) -> tuple[np.ndarray, bool]:
    """One encoded image as float32 (C, H, W) in [0, 1], converted to ``mode`` and brought to
    ``size`` (:func:`resize_and_crop`); and whether ``data`` already decodes to exactly that
    (an 8-bit JPEG or PNG in ``mode`` at ``size``, which stream storage keeps as it is, since
    PIL and torchvision's decoder give the same pixels for it).  Both storage modes decode
    here.  Raises one of :data:`UNREADABLE` for a corrupt or truncated file."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # a truncated file fails here, not later
    as_is = img.format in ("JPEG", "PNG") and img.mode == mode and (size is None or img.size == (size, size))
    img = img.convert(mode)
    if size is not None and img.size != (size, size):
        img = resize_and_crop(img, size)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), as_is


def left_out(name: str, exc: Exception, on_bad: str, skipped: list[str]) -> None:
    """``data.on_bad_image`` for an unreadable image: fail naming it, or note it in ``skipped``."""
    # PIL names the in-memory buffer it read from ("cannot identify image file <_io.BytesIO
    # object at 0x...>"); the file's own name is already in the message.
    reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)) or type(exc).__name__
    if on_bad == "fail":
        raise DataError(f"{name}: not a readable image ({reason}); fix or remove it, or set "
                        f"data.on_bad_image=skip to leave such files out") from None
    print(f"skipping unreadable image {name}: {reason}", flush=True)
    skipped.append(name)


def none_readable(names: list[str]) -> DataError:
    return DataError(f"none of the {len(names)} images could be read (first: {names[0] if names else '-'})")


def decode_images(items: list[tuple[str, bytes]], mode: str, size: int | None,
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


def resize_and_crop(img, size: int):
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


def resize_array(x: np.ndarray, size: int) -> np.ndarray:
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


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
