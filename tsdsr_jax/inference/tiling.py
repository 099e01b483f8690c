"""Tiled inference: the transformer over latent tiles, and a seamless tiled VAE.

**Latent tiling** (:func:`tiled_apply`) is the official ``tile_sample``: square tiles of
``min(tile, h, w)`` at a stride of ``tile - overlap`` (which must be positive; the official
loop never ends otherwise), the last row and column flush with the edge, blended with the
official Gaussian weights divided by their sum. All tiles go through ``fn`` as one batch, or
in chunks of ``max_tiles`` tiles (one compiled ``fn`` in a ``lax.map``).

**Tiled VAE** (:func:`tiled_encode`, :func:`tiled_decode`): the input is cut into overlapping
windows of one size, at most ``tile + 2·halo`` (vaehook's tile size and pad), kept inside the
input so that its borders see the network's own zero padding; the windows run as one batch
and each supplies the part of the output at least ``halo`` from its inner edges (its core).
Tiles leave no seams because every GroupNorm normalises with the statistics of the *whole
image* (as the official "vaehook" does), here computed exactly: over the cores of all windows
together, which partition the image. Only the mid-block attention is local: it attends within
its window, as in vaehook.

Memory: the convolutions need about what the untiled call needs (times the windows' overlap);
the mid-block attention needs n·T² logits for n windows of T positions instead of N² for the
whole latent (N ≈ n·T). With ``max_tiles``, windows run in chunks of that many (bounded
memory, one ``lax.map``); their statistics then cannot see all windows at once and come from
one untiled pass over a copy of the input downscaled to one window: vaehook's "fast mode", an
approximation.

Everything is static-shaped; jit the calls, e.g.
``jax.jit(functools.partial(tiled_decode, vae, tile=224))(variables, z)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.models.vae import AutoencoderKL, GroupNorm, group_moments

PyTree = Any

GAUSSIAN_VAR = 0.01


# --------------------------------------------------------------------------- latent tiling


def axis_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: a stride of ``tile - overlap``, the last flush with the end."""
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    count = 1 + math.ceil(max(length - tile, 0) / stride)
    return [i * stride for i in range(count - 1)] + [length - tile]


def tile_offsets(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """``(y, x)`` corners of the square tiles that the official ``tile_sample`` uses."""
    return [(y, x) for y in axis_offsets(h, tile, overlap) for x in axis_offsets(w, tile, overlap)]


def gaussian_weights(tile_h: int, tile_w: int) -> np.ndarray:
    """The official blend weights (tile_h, tile_w): variance 0.01 of the tile size, centred at
    ``(tile_w - 1) / 2`` in x but at ``tile_h / 2`` in y, as the official code has it."""
    def probs(n: int, mid: float) -> np.ndarray:
        d = (np.arange(n) - mid) / n
        return np.exp(-d * d / (2 * GAUSSIAN_VAR)) / np.sqrt(2 * np.pi * GAUSSIAN_VAR)

    return np.outer(probs(tile_h, tile_h / 2), probs(tile_w, (tile_w - 1) / 2))


def _repeat(stats: tuple[jax.Array, jax.Array], k: int) -> tuple[jax.Array, jax.Array]:
    """Per-image statistics (B, G) repeated for ``k`` windows, tile-major: (k·B, G)."""
    return tuple(jnp.tile(a, (k, 1)) for a in stats)


def _map_chunks(body: Callable[[jax.Array], jax.Array], tiles: jax.Array,
                max_tiles: int | None) -> jax.Array:
    """``body`` over ``tiles`` (n, ...) in equal chunks of at most ``max_tiles`` (one
    ``lax.map``; the last chunk is padded by repeating a tile, whose results are dropped)."""
    n = tiles.shape[0]
    chunks = 1 if max_tiles is None else math.ceil(n / max_tiles)
    if chunks == 1:
        return body(tiles)
    k = math.ceil(n / chunks)
    tiles = jnp.concatenate([tiles, jnp.repeat(tiles[-1:], chunks * k - n, axis=0)])
    out = jax.lax.map(body, tiles.reshape(chunks, k, *tiles.shape[1:]))
    return out.reshape(chunks * k, *out.shape[2:])[:n]


def tiled_apply(fn: Callable[[jax.Array], jax.Array], z: jax.Array, tile: int = 64,
                overlap: int = 8, max_tiles: int | None = None) -> jax.Array:
    """``fn(z)`` through the official latent tiling when ``h·w > tile²`` (else one call).

    ``z`` is (B, h, w, C). ``fn`` gets k tiles of every image at once, tile-major as
    (k·B, t, t, C) (entry ``i·B + b`` is tile i of image b: repeat per-image conditioning with
    ``jnp.tile``), and returns (k·B, t, t, C'). The blend runs in float32; the result has
    ``fn``'s dtype.
    """
    b, h, w, _ = z.shape
    if h * w <= tile * tile:
        return fn(z)
    size = min(tile, h, w)
    corners = np.broadcast_to(np.array(tile_offsets(h, w, size, overlap), np.int32),
                              (b, len(tile_offsets(h, w, size, overlap)), 2))
    return tiled_apply_at(fn, z, corners, np.ones(corners.shape[:2], np.float32), size,
                          max_tiles)


def tiled_apply_at(fn: Callable[[jax.Array], jax.Array], z: jax.Array, corners: jax.Array,
                   present: jax.Array, tile: int, max_tiles: int | None = None) -> jax.Array:
    """:func:`tiled_apply` with each image's own tiles: ``corners`` (B, n, 2) are their
    ``(y, x)``, and ``present`` (B, n) is 1 for a tile of the image and 0 for a slot that only
    pads its count to n (computed, weighed 0). Pixels that no tile covers come out 0."""
    b, h, w, c = z.shape
    # every tile's pixels at once: indices (B, n, t, t) of image, row and column
    offsets = jnp.arange(tile)
    rows = corners[:, :, 0, None, None] + offsets[:, None]
    cols = corners[:, :, 1, None, None] + offsets[None, :]
    images = jnp.arange(b)[:, None, None, None]
    tiles = z[images, rows, cols].swapaxes(0, 1)  # (n, B, t, t, C), tile-major

    def body(chunk: jax.Array) -> jax.Array:
        out = fn(chunk.reshape(-1, *chunk.shape[2:]))
        return out.reshape(chunk.shape[0], b, *out.shape[1:])

    preds = _map_chunks(body, tiles, max_tiles).swapaxes(0, 1)  # (B, n, t, t, C')
    weight = jnp.asarray(gaussian_weights(tile, tile), jnp.float32) * present[:, :, None, None]
    # one scatter-add of all tiles (a pixel's sum may round differently from a loop's)
    out = jnp.zeros((b, h, w, preds.shape[-1]), jnp.float32).at[images, rows, cols].add(
        preds.astype(jnp.float32) * weight[..., None])
    total = jnp.zeros((b, h, w), jnp.float32).at[images, rows, cols].add(weight)
    return (out / jnp.where(total > 0, total, 1)[..., None]).astype(preds.dtype)


# --------------------------------------------------------------------------- tiled VAE


def vae_windows(length: int, tile: int, halo: int) -> tuple[int, list[int], list[int]]:
    """Windows along one axis, in latent pixels: ``(size, starts, cuts)``.

    vaehook's count of windows, ``ceil((length - 2·halo) / tile)``, all of one ``size`` of at
    most ``tile + 2·halo``, spread evenly from the start to the end. Window i supplies the
    output ``[cuts[i], cuts[i+1])``, the middle of its overlaps, so each output pixel is
    ``halo`` or more from its window's edges (unless that edge is the input's).
    """
    count = max(1, math.ceil((length - 2 * halo) / tile))
    size = min(length, math.ceil((length - 2 * halo) / count) + 2 * halo)
    starts = [round(i * (length - size) / max(count - 1, 1)) for i in range(count)]
    cuts = [0] + [(a + b + size) // 2 for a, b in zip(starts, starts[1:])] + [length]
    return size, starts, cuts


class _Plan:
    """A 2-D window plan in latent pixels (``vae_windows`` along each axis)."""

    def __init__(self, h: int, w: int, tile: int, halo: int):
        self.size_y, self.ys, self.cut_y = vae_windows(h, tile, halo)
        self.size_x, self.xs, self.cut_x = vae_windows(w, tile, halo)

    @property
    def single(self) -> bool:
        return len(self.ys) == len(self.xs) == 1

    def windows(self, a: jax.Array, scale: int) -> jax.Array:
        """The windows of ``a`` (B, h·scale, w·scale, C), tile-major: (n, B, size·scale, C)."""
        sy, sx = self.size_y * scale, self.size_x * scale
        return jnp.stack([a[:, y * scale:y * scale + sy, x * scale:x * scale + sx]
                          for y in self.ys for x in self.xs])

    def cores(self) -> np.ndarray:
        """Each window's core in its own latent pixels: (n, 4) rows of (y0, y1, x0, x1)."""
        return np.array([(self.cut_y[i] - y, self.cut_y[i + 1] - y,
                          self.cut_x[j] - x, self.cut_x[j + 1] - x)
                         for i, y in enumerate(self.ys) for j, x in enumerate(self.xs)], np.int32)

    def core_mask(self, r: int) -> np.ndarray:
        """Each window's core at ``r`` pixels per latent pixel: (n, size_y·r, size_x·r) bools."""
        mask = np.zeros((len(self.ys) * len(self.xs), self.size_y * r, self.size_x * r), bool)
        for m, (y0, y1, x0, x1) in zip(mask, self.cores() * r):
            m[y0:y1, x0:x1] = True
        return mask

    def stitch(self, tiles: jax.Array, scale: int) -> jax.Array:
        """Crops every window's core from ``tiles`` (n, B, ...) and joins them."""
        nx = len(self.xs)
        cores = self.cores().reshape(len(self.ys), nx, 4) * scale
        rows = [jnp.concatenate([tiles[i * nx + j][:, y0:y1, x0:x1]
                                 for j, (y0, y1, x0, x1) in enumerate(row)], axis=2)
                for i, row in enumerate(cores)]
        return jnp.concatenate(rows, axis=1)


@contextmanager
def _group_norms(handler: Callable[[tuple[str, ...], GroupNorm, jax.Array], Any]
                 ) -> Iterator[None]:
    """Within, every ``GroupNorm`` call normalises ``x`` with ``handler(path, module, x)``."""
    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, GroupNorm) and context.method_name == "__call__":
            return next_fun(args[0], stats=handler(context.module.path, context.module, args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _core_stats(h: jax.Array, groups: int, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Per-image, per-group ``(mean, var)`` (B, G) over the cores of all n windows of ``h``
    (n·B, H, W, C), tile-major; ``mask`` (n, H, W) marks the cores."""
    n = mask.shape[0]
    _, height, width, c = h.shape
    by_image = h.reshape(n, -1, height, width, c).swapaxes(0, 1).reshape(-1, n * height, width, c)
    cores = np.broadcast_to(mask[None, ..., None], (by_image.shape[0], n, height, width, 1))
    return group_moments(by_image, groups, cores.reshape(-1, n * height, width, 1))


def _exact(fn: Callable[[jax.Array], jax.Array], tiles: jax.Array, plan: _Plan) -> jax.Array:
    """``fn`` over all windows ``tiles`` (n, B, ...) at once, with whole-image statistics."""
    n, b = tiles.shape[:2]

    def whole_image(path, module, h):
        mask = plan.core_mask(h.shape[1] // plan.size_y)
        return _repeat(_core_stats(h, module.num_groups, mask), n)

    with _group_norms(whole_image):
        out = fn(tiles.reshape(n * b, *tiles.shape[2:]))
    return out.reshape(n, b, *out.shape[1:])


def _downscale(x: jax.Array, size: int) -> jax.Array:
    """``x`` resized (nearest) so its longer side is ``size``, then given ``x``'s per-channel
    mean and std and clipped to its range (vaehook's correction of the fast-mode copy)."""
    b, h, w, c = x.shape
    scale = size / max(h, w)
    small = jax.image.resize(x, (b, max(1, round(h * scale)), max(1, round(w * scale)), c),
                             "nearest")
    moments = lambda a: (a.mean((1, 2), keepdims=True), a.std((1, 2), keepdims=True))
    (m_big, s_big), (m_small, s_small) = moments(x), moments(small)
    small = (small - m_small) / jnp.maximum(s_small, 1e-6) * s_big + m_big
    return jnp.clip(small, x.min((1, 2, 3), keepdims=True), x.max((1, 2, 3), keepdims=True))


def _estimated(fn: Callable[[jax.Array], jax.Array], tiles: jax.Array, small: jax.Array,
               max_tiles: int) -> jax.Array:
    """``fn`` over ``tiles`` (n, B, ...) in chunks, with the statistics of ``fn(small)``."""
    stats = {}

    def record(path, module, h):
        stats[path] = group_moments(h, module.num_groups)
        return stats[path]

    with _group_norms(record):
        fn(small)

    def body(chunk: jax.Array) -> jax.Array:
        k, b = chunk.shape[:2]
        with _group_norms(lambda path, module, h: _repeat(stats[path], k)):
            out = fn(chunk.reshape(k * b, *chunk.shape[2:]))
        return out.reshape(k, b, *out.shape[1:])

    return _map_chunks(body, tiles, max_tiles)


def _tiled(fn: Callable[[jax.Array], jax.Array], x: jax.Array, plan: _Plan, scale_in: int,
           scale_out: int, max_tiles: int | None) -> jax.Array:
    """``fn`` (input pixels per latent pixel ``scale_in``, output ``scale_out``) over ``x`` in
    the windows of ``plan``."""
    tiles = plan.windows(x, scale_in)
    if max_tiles is None or max_tiles >= tiles.shape[0]:
        out = _exact(fn, tiles, plan)
    else:
        small = _downscale(x, max(plan.size_y, plan.size_x) * scale_in)
        out = _estimated(fn, tiles, small, max_tiles)
    return plan.stitch(out, scale_out)


def tiled_encode(vae: AutoencoderKL, variables: PyTree, x: jax.Array, tile: int = 1024,
                 halo: int = 32, max_tiles: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``vae.encode(x)``, the posterior's ``(mean, logvar)``, of images (B, H, W, C) tiled as
    vaehook does with tile size ``tile`` and pad ``halo`` (the official defaults, in pixels,
    rounded up to whole latent pixels): windows of at most ``tile + 2·halo`` pixels. H and W
    must be multiples of the VAE's factor. Untiled when one window covers the image."""
    f = vae.config.downscale_factor
    _, h, w, _ = x.shape
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not a multiple of {f}")
    plan = _Plan(h // f, w // f, -(-tile // f), -(-halo // f))
    if plan.single:
        return vae.apply(variables, x, method="encode")
    encode = lambda a: jnp.concatenate(vae.apply(variables, a, method="encode"), axis=-1)
    mean, logvar = jnp.split(_tiled(encode, x, plan, f, 1, max_tiles), 2, axis=-1)
    return mean, logvar


def tiled_decode(vae: AutoencoderKL, variables: PyTree, z: jax.Array, tile: int = 224,
                 halo: int = 11, max_tiles: int | None = None) -> jax.Array:
    """``vae.decode(z)`` of latents (B, h, w, C) tiled as vaehook does with tile size ``tile``
    and pad ``halo`` (the official defaults, in latent pixels): windows of at most
    ``tile + 2·halo``. Untiled when one window covers the latent."""
    plan = _Plan(z.shape[1], z.shape[2], tile, halo)
    decode = lambda a: vae.apply(variables, a, method="decode")
    if plan.single:
        return decode(z)
    return _tiled(decode, z, plan, 1, vae.config.downscale_factor, max_tiles)
