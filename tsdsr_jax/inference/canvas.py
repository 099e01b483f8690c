"""Size classes: LR images of any size through a few compiled shapes, each output as if alone.

An LR image's *working image* is the network's input for it: the LR upsampled to
:func:`target_size`, padded to a multiple of 16. Its :class:`SizeClass` is the padded shape (the
*canvas*) that its working image is placed in, at the top left: each side rounded up to a
ladder of ``steps`` sizes per octave (``steps=2``: …, 512, 768, 1024, 1536, 2048, …), plus what
the program must know statically (whether the transformer runs on latent tiles, and the shape
of PIL's resize back to ×upscale for small inputs). All images of a class run through one compiled
program. Their :class:`Geometry`, built here on the host, tells it each image's own sizes, so
that it computes for each what the program of that image's own size computes: resize tables
per image, the networks' extents (:mod:`tsdsr_jax.models.vae`) and patch layout
(:mod:`tsdsr_jax.models.mmdit`), latent tiles per image, and the colour fix's extents.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import NamedTuple

import numpy as np

from tsdsr_jax.diffusion.denoiser import MULTIPLE
from tsdsr_jax.inference.pil_resize import pil_taps, vertical_first
from tsdsr_jax.inference.resize import cubic_taps
from tsdsr_jax.inference.tiling import axis_offsets
from tsdsr_jax.models.mmdit import MMDiTConfig, PatchLayout, patch_layout

VAE_FACTOR = 8  # SD3's VAE: image pixels per latent pixel
# PIL's taps of the resize back to ×upscale of an input whose short side is at least half of
# process_size/upscale (64 of 128); smaller ones take 17, 33, ... (a class each).
BACK_TAPS = 9
SOURCE_TAPS = 5  # PIL's bicubic taps when enlarging (the wavelet fix's source)


def target_size(height: int, width: int, upscale: int, process_size: int) -> tuple[int, int]:
    """The size the network makes for an LR image: ×upscale, unless a side is below
    process_size/upscale. Then, as the official rule, the image is first scaled so that its
    short side reaches it (and the result is resized back to ×upscale afterwards)."""
    low = process_size // upscale
    if width < low or height < low:
        scale = low / min(width, height)
        height, width = int(scale * height), int(scale * width)
    return upscale * height, upscale * width


def ladder(n: int, steps: int) -> int:
    """``n`` rounded up to the next of ``steps`` sizes per octave (multiples of 16)."""
    if steps == 0:
        return n
    quantum = max(MULTIPLE, 2 ** (max(n - 1, 1).bit_length() - 1) // steps)
    return -(-n // quantum) * quantum


@dataclasses.dataclass(frozen=True)
class SizeClass:
    """The static shape of one compiled program."""

    canvas: tuple[int, int]  # the working images' padded (height, width)
    lr: tuple[int, int]      # the LR inputs' padded shape
    out: tuple[int, int]     # the outputs' padded shape: upscale × lr
    tile: int | None         # the latent tile when the transformer runs tiled, else None
    back: tuple[bool, int]   # the resize back to ×upscale of small inputs: (rows first, taps)

    def __str__(self) -> str:
        rows_first, taps = self.back
        return (f"{self.canvas[0]}x{self.canvas[1]}"
                + (f", latent tiles of {self.tile}" if self.tile else ", untiled")
                + (", resized back rows first" if rows_first else "")
                + (f", resized back with {taps} taps" if taps > BACK_TAPS else ""))


class Geometry(NamedTuple):
    """Each image's own sizes and tables in a batch of one :class:`SizeClass` (numpy, B first)."""

    lr: np.ndarray        # (B, 2) the LR's (height, width)
    work: np.ndarray      # (B, 2) the working image's
    final: np.ndarray     # (B, 2) the output's: upscale × lr
    rows: tuple[np.ndarray, np.ndarray]  # torch-bicubic LR -> working rows, reflect-padded:
    cols: tuple[np.ndarray, np.ndarray]  # (B, canvas, 4) indices and weights (0 beyond)
    layout: PatchLayout | None           # the untiled transformer's
    tiles: np.ndarray | None             # (B, n, 2) latent tile corners (tiled)
    tile_weight: np.ndarray | None       # (B, n) 1 for an image's tiles, 0 for the padding's
    source: tuple                        # PIL taps LR -> final: rows and cols (wavelet)
    back: tuple                          # PIL taps working -> final: rows and cols
    resized: np.ndarray                  # (B,) whether the image is resized back


def _reflect(n: int, length: int) -> np.ndarray:
    """``jnp.pad(mode="reflect")``'s source index of each of ``length`` >= n positions."""
    if n == 1:
        return np.zeros(length, np.int64)
    i = np.arange(length) % (2 * (n - 1))
    return np.where(i < n, i, 2 * (n - 1) - i)


def _working_taps(lr: int, size: int, work: int, canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic taps from ``lr`` to ``size`` pixels, reflect-padded to ``work``, zero to
    ``canvas``."""
    index, weights = cubic_taps(lr, size)
    if lr == size:  # resize_bicubic's skip: the identity
        index = np.repeat(np.arange(size)[:, None], 4, axis=1)
        weights = np.zeros((size, 4), np.float32)
        weights[:, 1] = 1
    source = _reflect(size, work)
    out_index = np.zeros((canvas, 4), np.int32)
    out_weights = np.zeros((canvas, 4), np.float32)
    out_index[:work], out_weights[:work] = index[source], weights[source]
    return out_index, out_weights


def _pil_canvas(in_size: int, out_size: int, canvas: int, taps: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """PIL's taps from ``in_size`` to ``out_size``, zero weights to ``canvas``."""
    index, weights = pil_taps(in_size, out_size, taps)
    pad = ((0, canvas - out_size), (0, 0))
    return np.pad(index, pad), np.pad(weights, pad)


class Classes:
    """Size classes of one inference setting: ``steps`` per octave (0: every size its own)."""

    def __init__(self, upscale: int, process_size: int, latent_tile: int, latent_overlap: int,
                 transformer: MMDiTConfig, steps: int):
        self.upscale, self.process_size, self.steps = upscale, process_size, steps
        self.latent_tile, self.latent_overlap = latent_tile, latent_overlap
        self.transformer = transformer

    def _sizes(self, lr: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        size = target_size(*lr, self.upscale, self.process_size)
        return size, tuple(-(-s // MULTIPLE) * MULTIPLE for s in size)

    def _tile(self, work: tuple[int, int]) -> int | None:
        h, w = (s // VAE_FACTOR for s in work)
        return None if h * w <= self.latent_tile ** 2 else min(self.latent_tile, h, w)

    def _back(self, lr: tuple[int, int], size: tuple[int, int]) -> tuple[bool, int]:
        final = (self.upscale * lr[0], self.upscale * lr[1])
        if size == final:
            return False, BACK_TAPS
        taps = max(pil_taps(s, f)[0].shape[1] for s, f in zip(size, final))
        return vertical_first(size, final), max(BACK_TAPS, 2 ** (taps - 2).bit_length() + 1)

    def of(self, lr: tuple[int, int]) -> SizeClass:
        """The class of an LR image of ``lr`` = (height, width)."""
        size, work = self._sizes(lr)
        tile = self._tile(work)
        canvas = tuple(ladder(s, self.steps) for s in work)
        # an untiled image's canvas stays within one tile's area (what its attention costs)
        if tile is None and canvas[0] * canvas[1] > (self.latent_tile * VAE_FACTOR) ** 2:
            canvas = work
        lr_canvas = tuple(-(-c // self.upscale) for c in canvas)
        return SizeClass(canvas, lr_canvas, tuple(self.upscale * c for c in lr_canvas), tile,
                         self._back(lr, size))

    def geometry(self, cls: SizeClass, sizes: list[tuple[int, int]]) -> Geometry:
        """The :class:`Geometry` of LR images of ``sizes``, all of class ``cls``."""
        rows, cols, source, back, works, finals, corners, resized = ([] for _ in range(8))
        for lr in sizes:
            size, work = self._sizes(lr)
            final = (self.upscale * lr[0], self.upscale * lr[1])
            works.append(work)
            finals.append(final)
            rows.append(_working_taps(lr[0], size[0], work[0], cls.canvas[0]))
            cols.append(_working_taps(lr[1], size[1], work[1], cls.canvas[1]))
            source.append([_pil_canvas(i, o, c, SOURCE_TAPS)
                           for i, o, c in zip(lr, final, cls.out)])
            back.append([_pil_canvas(s, f, c, cls.back[1])
                         for s, f, c in zip(size, final, cls.out)])
            resized.append(size != final)
            if cls.tile is not None:
                h, w = (s // VAE_FACTOR for s in work)
                corners.append([(y, x) for y in axis_offsets(h, cls.tile, self.latent_overlap)
                                for x in axis_offsets(w, cls.tile, self.latent_overlap)])
        stack = lambda parts: tuple(np.stack(p) for p in zip(*parts))  # noqa: E731
        pairs = lambda parts: tuple(stack(p) for p in zip(*parts))  # noqa: E731
        layout = tiles = tile_weight = None
        if cls.tile is None:
            layout = patch_layout(self.transformer, tuple(c // VAE_FACTOR for c in cls.canvas),
                                  [(h // VAE_FACTOR, w // VAE_FACTOR) for h, w in works])
        else:
            n = self.tile_count(cls)
            tiles = np.zeros((len(sizes), n, 2), np.int32)
            tile_weight = np.zeros((len(sizes), n), np.float32)
            for b, c in enumerate(corners):
                tiles[b, :len(c)], tile_weight[b, :len(c)] = c, 1
        return Geometry(np.array(sizes, np.int32), np.array(works, np.int32),
                        np.array(finals, np.int32), stack(rows), stack(cols), layout, tiles,
                        tile_weight, pairs(source), pairs(back), np.array(resized))

    def tile_count(self, cls: SizeClass) -> int:
        """The latent tiles of the class's largest image (every batch of it has as many)."""
        h, w = (c // VAE_FACTOR for c in cls.canvas)
        return (len(axis_offsets(h, cls.tile, self.latent_overlap))
                * len(axis_offsets(w, cls.tile, self.latent_overlap)))

    def padded_fraction(self, lr: tuple[int, int]) -> float:
        """How much larger the class's canvas is than the image's own working image."""
        _, work = self._sizes(lr)
        canvas = self.of(lr).canvas
        return canvas[0] * canvas[1] / (work[0] * work[1]) - 1


def noise_id(key: object) -> int:
    """A stable 32-bit number for an image's key (its path relative to the input folder): the
    image's posterior noise derives from it and the seed alone."""
    return zlib.crc32(str(key).encode()) & 0xFFFFFFFF

