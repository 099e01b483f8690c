"""Reading input photos (any common format and mode) and writing PNGs atomically."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An input that cannot be read as an image; the message names the file."""


def list_images(source: Path, exclude: Path | None = None) -> list[Path]:
    """``source`` itself, or the image files directly inside the folder ``source`` (sorted),
    leaving out anything inside ``exclude`` (an output folder within the input folder)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ImageError(f"{source}: no such file or folder")
    excluded = exclude.resolve() if exclude else None
    return sorted(p for p in source.iterdir()
                  if p.is_file() and p.suffix.lower() in EXTENSIONS
                  and not (excluded and excluded in p.resolve().parents))


def output_names(paths: list[Path]) -> dict[Path, str]:
    """Each input's output file name, ``<stem>.png``; inputs that share a stem (``photo.png``,
    ``photo.jpg``) get ``<stem>_<extension>.png``, and a counter where even that repeats."""
    stems = Counter(p.stem for p in paths)
    names, taken = {}, set()
    for path in paths:
        name = path.stem if stems[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.')}"
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique)
        names[path] = unique + ".png"
    return names


def load_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB: EXIF orientation applied; grayscale, palette,
    alpha (dropped, as the official ``convert('RGB')``) and 16-bit modes handled."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if gray.max() > 255 or im.mode.startswith("I;16") else 255.0
        gray = np.clip(np.rint(gray / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"))


def save_png(image: np.ndarray, path: Path) -> None:
    """Writes a uint8 image as PNG; the file appears only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_uint8(image: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Floats in [0, 1] -> uint8, rounded to nearest (numpy in, numpy out; jax, traced too, in
    jax out)."""
    xp = jnp if isinstance(image, jax.Array) else np
    return xp.clip(xp.rint(xp.asarray(image) * 255.0), 0, 255).astype(xp.uint8)
