"""Reading input photos (any common format and mode) and writing outputs atomically.

Outputs carry the input's ICC profile (the network's values are left in the input's colour
space, so a Display-P3 photo stays Display-P3) and, in their EXIF ``Software`` tag, a mark
(:data:`MARK`) by which :func:`is_output` tells this project's outputs from other files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}  # output suffix -> PIL's format
MARK = "tsdsr-jax"
_SOFTWARE = 0x0131  # the EXIF tag
# PIL's warning about large images, off: load_photo's max_pixels refuses them by name instead
# (a filter, not catch_warnings, which is not safe in the threads that decode)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An input that cannot be read as an image; the message names the file."""


def list_images(source: Path, exclude: Path | None = None, recursive: bool = False
                ) -> list[Path]:
    """``source`` itself, or the image files inside the folder ``source`` (directly, or in any
    subfolder), sorted, leaving out anything inside ``exclude`` (an output folder within the
    input folder) and hidden files (our own partial outputs)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ImageError(f"{source}: no such file or folder")
    excluded = exclude.resolve() if exclude else None
    found = source.rglob("*") if recursive else source.iterdir()
    return sorted(p for p in found
                  if p.is_file() and p.suffix.lower() in EXTENSIONS
                  and not p.name.startswith(".")
                  and not (excluded and excluded in p.resolve().parents))


def output_names(paths: list[Path], root: Path | None = None, suffix: str = ".png"
                 ) -> dict[Path, str]:
    """Each input's output path relative to the output folder: its path relative to ``root``
    (its name alone without one) with ``suffix``; inputs of one folder that share a stem
    (``photo.png``, ``photo.jpg``) get ``<stem>_<extension>``, and a counter where even that
    repeats."""
    def stem_of(path: Path) -> str:
        return (path.relative_to(root).with_suffix("") if root else Path(path.stem)).as_posix()

    stems = Counter(stem_of(p) for p in paths)
    names, taken = {}, set()
    for path in paths:
        stem = stem_of(path)
        name = stem if stems[stem] == 1 else f"{stem}_{path.suffix.lstrip('.')}"
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        taken.add(unique)
        names[path] = unique + suffix
    return names


class Photo(NamedTuple):
    pixels: np.ndarray          # (H, W, 3) uint8 RGB
    icc_profile: bytes | None   # the embedded ICC profile, if any


def load_photo(path: Path, max_pixels: int | None = None) -> Photo:
    """An image file as (H, W, 3) uint8 RGB and its ICC profile: EXIF orientation applied;
    grayscale, palette, alpha (dropped, as the official ``convert('RGB')``) and 16-bit modes
    handled. One of more than ``max_pixels`` pixels is refused before it is decoded."""
    try:
        with Image.open(path) as im:
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageError(f"{path}: {im.width}x{im.height} is "
                                 f"{_mp(im.width * im.height)}, more than --max-pixels "
                                 f"{_mp(max_pixels)}")
            im = ImageOps.exif_transpose(im)
            im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: cannot read image ({e})") from None
    icc = im.info.get("icc_profile") or None
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(im, dtype=np.float64)
        scale = 65535.0 if gray.max() > 255 or im.mode.startswith("I;16") else 255.0
        gray = np.clip(np.rint(gray / scale * 255.0), 0, 255).astype(np.uint8)
        return Photo(np.repeat(gray[..., None], 3, axis=-1), None)
    if im.mode not in ("RGB", "RGBA", "RGBX", "P"):  # a gray or CMYK profile does not fit RGB
        icc = None
    return Photo(np.asarray(im.convert("RGB")), icc)


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


def load_image(path: Path) -> np.ndarray:
    """:func:`load_photo`'s pixels."""
    return load_photo(path).pixels


def _partial_prefix(path: Path) -> str:
    """The start of the names under which :func:`save_image` writes ``path`` before renaming
    it: hidden and of a fixed length, so that any name that fits the file system fits."""
    return f".{hashlib.sha1(path.name.encode()).hexdigest()[:16]}."


def _partial_name(path: Path) -> Path:
    return path.with_name(f"{_partial_prefix(path)}{os.getpid()}.partial")


def partials(outputs: Iterable[Path]) -> list[Path]:
    """What :func:`save_image`, in any process, left unfinished of ``outputs`` (a killed run's
    hidden ``.HASH.PID.partial`` files)."""
    prefixes: dict[Path, set[str]] = {}
    for path in outputs:
        prefixes.setdefault(path.parent, set()).add(_partial_prefix(path))
    found = []
    for folder, ours in prefixes.items():
        width = len(next(iter(ours)))
        with contextlib.suppress(OSError):
            found += [p for p in folder.iterdir()
                      if p.name.endswith(".partial") and p.name[:width] in ours]
    return found


def save_image(image: np.ndarray, path: Path, quality: int = 95, compress_level: int = 6,
               icc_profile: bytes | None = None) -> None:
    """Writes a uint8 image in the format of ``path``'s suffix (:data:`FORMATS`), marked as
    ours; the file appears only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(path)
    exif = Image.Exif()
    exif[_SOFTWARE] = MARK
    fmt = FORMATS[path.suffix.lstrip(".").lower()]
    options = {"compress_level": compress_level} if fmt == "PNG" else {"quality": quality}
    if icc_profile:
        options["icc_profile"] = icc_profile
    try:
        Image.fromarray(image).save(tmp, format=fmt, exif=exif, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_output(path: Path) -> bool:
    """Whether ``path`` is an image that :func:`save_image` wrote."""
    try:
        with Image.open(path) as im:
            return im.getexif().get(_SOFTWARE) == MARK
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def to_uint8(image: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """Floats in [0, 1] -> uint8, rounded to nearest (numpy in, numpy out; jax, traced too, in
    jax out)."""
    xp = jnp if isinstance(image, jax.Array) else np
    return xp.clip(xp.rint(xp.asarray(image) * 255.0), 0, 255).astype(xp.uint8)
