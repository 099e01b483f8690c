"""On-the-fly Real-ESRGAN second-order degradation (SeeSR's settings), in numpy on the CPU.

``degrade(hr, config, rng(seed, index))`` turns a 512² HR image into the LR the official data
holds in ``lr_bicubic/``: blur → random resize → Gaussian or Poisson noise → JPEG, twice (the
second blur with probability 0.8), then resize to 1/4 with a final sinc filter and JPEG in random
order; the 128² result is bicubic-upsampled (torch semantics) back to 512² and quantised to 8 bits
as SeeSR's PNG files are. Resizes follow ``F.interpolate`` (area, bilinear, bicubic; no
antialiasing) at the integer output size. Every random draw comes from one numpy ``Generator``
seeded from (seed, index), so a sample's LR is reproducible anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image
from scipy import fft, ndimage

from tsdsr_jax.checks import in_range, interval, probabilities
from tsdsr_jax.data.kernels import KernelConfig, odd_sizes, random_kernel, sinc
from tsdsr_jax.io.images import to_uint8

MODES = ("area", "bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Resize, noise and JPEG of one degradation stage."""

    resize_prob: tuple[float, float, float]  # up, down, keep
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]         # Gaussian σ in 8-bit levels
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]

    def __post_init__(self):
        probabilities(self, "resize_prob")
        interval(self, "resize_range", low=1e-2)
        for name in ("gaussian_noise_prob", "gray_noise_prob"):
            in_range(self, name, 0, 1)
        interval(self, "noise_range", low=0)
        interval(self, "poisson_scale_range", low=0)
        interval(self, "jpeg_range", 1, 100)


@dataclasses.dataclass(frozen=True)
class DegradeConfig:
    """The published settings (Real-ESRGAN x4plus as used by SeeSR's ``make_paired_data.py``)."""

    scale: int = 4
    kernel1: KernelConfig = dataclasses.field(
        default_factory=lambda: KernelConfig(sigma=(0.2, 3.0)))
    kernel2: KernelConfig = dataclasses.field(
        default_factory=lambda: KernelConfig(sigma=(0.2, 1.5)))
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = tuple(range(7, 22, 2))
    stage1: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        (0.2, 0.7, 0.1), (0.15, 1.5), 0.5, (1, 30), (0.05, 3.0), 0.4, (30, 95)))
    second_blur_prob: float = 0.8
    stage2: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(
        (0.3, 0.4, 0.3), (0.3, 1.2), 0.5, (1, 25), (0.05, 2.5), 0.4, (30, 95)))
    # SeeSR sharpens the GT before degrading it and saves the sharpened GT as ``gt/``: leave this
    # off for such data, turn it on for raw photos (then the HR should be sharpened as well).
    usm_sharpen: bool = False

    def __post_init__(self):
        in_range(self, "scale", 1, 8)
        for name in ("final_sinc_prob", "second_blur_prob"):
            in_range(self, name, 0, 1)
        odd_sizes(self, "final_sinc_sizes")


def rng(*keys: int) -> np.random.Generator:
    """A generator determined by the non-negative integers ``keys`` (e.g. seed, shard, index)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlates (H, W, C) with an odd 2-D kernel, reflect-101 padded (basicsr's ``filter2D``)."""
    k = kernel.shape[0]
    h, w = image.shape[:2]
    padded = np.pad(image, ((k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="reflect")
    shape = padded.shape[:2]
    spectrum = fft.rfft2(padded, axes=(0, 1)) * fft.rfft2(kernel[::-1, ::-1], shape)[..., None]
    full = fft.irfft2(spectrum, shape, axes=(0, 1))  # circular; the valid part is exact
    return np.ascontiguousarray(full[k - 1:k - 1 + h, k - 1:k - 1 + w], np.float32)


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel with torch's a = −0.75."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=512)
def resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) weights of torch's ``F.interpolate`` along one axis (align_corners=False);
    cached, read-only."""
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    if mode == "area":  # adaptive average pooling
        for o in rows:
            start, end = o * n_in // n_out, -(-(o + 1) * n_in // n_out)
            m[o, start:end] = 1.0 / (end - start)
    elif mode == "bilinear":
        src = np.maximum((rows + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = (src - i0).astype(np.float32)
        np.add.at(m, (rows, i0), 1 - frac)
        np.add.at(m, (rows, i1), frac)
    elif mode == "bicubic":  # four taps, indices clamped to the edge
        src = (rows + 0.5) * (n_in / n_out) - 0.5
        start = np.floor(src).astype(int)
        taps = start[:, None] + np.arange(-1, 3)
        weights = _cubic(src[:, None] - taps)
        np.add.at(m, (np.repeat(rows, 4), np.clip(taps, 0, n_in - 1).ravel()), weights.ravel())
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    m.flags.writeable = False
    return m


@functools.lru_cache(maxsize=512)
def _taps(n_in: int, n_out: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero weights of ``resize_matrix`` per output row: indices and weights (n_out, K),
    padded with zero weights."""
    m = resize_matrix(n_in, n_out, mode)
    nonzero = m != 0
    k = max(int(nonzero.sum(axis=1).max()), 1)
    index = np.zeros((n_out, k), np.intp)
    weight = np.zeros((n_out, k), np.float32)
    for row in range(n_out):
        cols = np.flatnonzero(nonzero[row])
        index[row, :len(cols)] = cols
        weight[row, :len(cols)] = m[row, cols]
    return index, weight


def _resize_axis(x: np.ndarray, n_out: int, axis: int, mode: str) -> np.ndarray:
    index, weight = _taps(x.shape[axis], n_out, mode)
    shape = (n_out,) + (1,) * (x.ndim - 1 - axis)
    out = np.take(x, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
    for k in range(1, index.shape[1]):
        out += np.take(x, index[:, k], axis=axis) * weight[:, k].reshape(shape)
    return out


def resize(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resizes (H, W, C) float32 to (height, width, C), one sparse pass per axis."""
    return _resize_axis(_resize_axis(image, height, 0, mode), width, 1, mode)


def add_gaussian_noise(image: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator
                       ) -> np.ndarray:
    """Adds N(0, σ²) noise (σ in [0, 1] units), one field for all channels when ``gray``."""
    h, w, c = image.shape
    noise = rng.standard_normal((h, w, 1 if gray else c), dtype=np.float32) * np.float32(sigma)
    return np.clip(image + noise, 0, 1)


def add_poisson_noise(image: np.ndarray, scale: float, gray: bool, rng: np.random.Generator
                      ) -> np.ndarray:
    """Adds ``scale``× Poisson (shot) noise; the photon count per level is the next power of two
    above the number of distinct 8-bit values, as Real-ESRGAN does."""
    base = image @ np.float32([0.299, 0.587, 0.114]) if gray else image
    levels = np.clip(np.rint(base * 255), 0, 255).astype(np.uint8)
    vals = 2.0 ** np.ceil(np.log2(np.count_nonzero(np.bincount(levels.ravel(), minlength=256))))
    quantised = levels.astype(np.float64) / 255
    noise = (rng.poisson(quantised * vals) / vals - quantised).astype(np.float32)
    if gray:
        noise = noise[..., None]
    return np.clip(image + noise * np.float32(scale), 0, 1)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip (libjpeg through PIL, 4:2:0) of a [0, 1] float image."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), np.float32) / 255



def usm_sharpen(image: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: int = 10
                ) -> np.ndarray:
    """Unsharp masking as Real-ESRGAN's ``usm_sharp``: Gaussian ``radius``+1 taps (OpenCV's
    default σ for that size), applied only where the residual exceeds ``threshold`` levels."""
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2 * sigma ** 2))
    taps = (taps / taps.sum()).astype(np.float32)

    def blur(x: np.ndarray) -> np.ndarray:
        x = ndimage.correlate1d(x, taps, axis=0, mode="mirror")
        return ndimage.correlate1d(x, taps, axis=1, mode="mirror")

    residual = image - blur(image)
    soft_mask = blur((np.abs(residual) * 255 > threshold).astype(np.float32))
    sharp = np.clip(image + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * image


def _stage(x: np.ndarray, stage: StageConfig, base: tuple[int, int], rng: np.random.Generator
           ) -> np.ndarray:
    """Random resize (by a random factor of the ``base`` size) and random noise."""
    direction = rng.choice(3, p=np.asarray(stage.resize_prob) / sum(stage.resize_prob))
    factor = (rng.uniform(1, stage.resize_range[1]) if direction == 0 else
              rng.uniform(stage.resize_range[0], 1) if direction == 1 else 1.0)
    mode = MODES[rng.integers(3)]
    h, w = base
    x = resize(x, max(int(h * factor), 1), max(int(w * factor), 1), mode)
    if rng.random() < stage.gaussian_noise_prob:
        sigma = rng.uniform(*stage.noise_range) / 255
        x = add_gaussian_noise(x, sigma, rng.random() < stage.gray_noise_prob, rng)
    else:
        scale = rng.uniform(*stage.poisson_scale_range)
        x = add_poisson_noise(x, scale, rng.random() < stage.gray_noise_prob, rng)
    return x


def degrade_lr(hr: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    """The degraded LR of a uint8 (H, W, 3) HR image: float32 (H/scale, W/scale, 3) in [0, 1]."""
    x = hr.astype(np.float32) / 255
    if config.usm_sharpen:
        x = usm_sharpen(x)
    h, w = x.shape[:2]
    kernel1 = random_kernel(rng, config.kernel1)
    kernel2 = random_kernel(rng, config.kernel2)
    final = None
    if rng.random() < config.final_sinc_prob:
        final = sinc(rng.uniform(np.pi / 3, np.pi), int(rng.choice(config.final_sinc_sizes)), 21)
    x = _stage(filter2d(x, kernel1), config.stage1, (h, w), rng)
    x = jpeg(x, round(rng.uniform(*config.stage1.jpeg_range)))
    if rng.random() < config.second_blur_prob:
        x = filter2d(x, kernel2)
    target = (h // config.scale, w // config.scale)
    x = _stage(x, config.stage2, target, rng)

    def resize_and_sinc(y: np.ndarray) -> np.ndarray:
        y = resize(y, *target, MODES[rng.integers(3)])
        return filter2d(y, final) if final is not None else y

    quality = round(rng.uniform(*config.stage2.jpeg_range))
    if rng.random() < 0.5:
        x = jpeg(np.clip(resize_and_sinc(x), 0, 1), quality)
    else:
        x = resize_and_sinc(jpeg(x, quality))
    return np.clip(x, 0, 1)


def degrade(hr: np.ndarray, config: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    """The training LR of a uint8 HR image, as ``lr_bicubic/`` holds it: degraded, bicubic-
    upsampled back to the HR size, 8-bit quantised; float32 (H, W, 3) in [-1, 1]."""
    lr = degrade_lr(hr, config, rng)
    up = resize(lr, hr.shape[0], hr.shape[1], "bicubic")
    return to_uint8(up).astype(np.float32) * np.float32(2 / 255) - np.float32(1)
