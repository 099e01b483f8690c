"""Full-reference PSNR and SSIM on the luma channel, as pyiqa's ``psnry`` and ``ssim`` compute them.

Images are uint8 RGB (H, W, 3), read as ``u8 / 255``. Luma (``space``):

- ``'ycbcr'``: Y of BT.601 YCbCr, ``(65.481 R + 128.553 G + 24.966 B + 16) / 255`` (range
  16/255 ... 235/255), the BasicSR convention of SR papers (pyiqa ``color_space='ycbcr'``);
- ``'yiq'``: ``0.299 R + 0.587 G + 0.114 B``, the default of pyiqa 0.1.16.

PSNR: ``10 log10(1 / (mse + 1e-8))`` of the luma in [0, 1], unrounded. SSIM: the luma times 255,
rounded to integers; Gaussian window 11x11, sigma 1.5; only the windows fully inside the image
("valid", no padding); ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``; the contrast-structure
term clipped at 0; no downsampling; the mean over the map. Computed in float64.
"""

from __future__ import annotations

import numpy as np

SPACES = ("ycbcr", "yiq")
_LUMA = {"ycbcr": (np.array([65.481, 128.553, 24.966]) / 255, 16 / 255),
         "yiq": (np.array([0.299, 0.587, 0.114]), 0.0)}
WINDOW, SIGMA = 11, 1.5


def luma(image: np.ndarray, space: str = "ycbcr") -> np.ndarray:
    """The luma (H, W) in [0, 1] of a uint8 RGB image, float64."""
    weights, offset = _LUMA[space]
    return (image.astype(np.float64) / 255) @ weights + offset


def psnr(a: np.ndarray, b: np.ndarray, space: str = "ycbcr") -> float:
    """PSNR in dB between two uint8 RGB images of the same size, on the luma."""
    mse = np.mean(np.square(luma(a, space) - luma(b, space)))
    return float(10 * np.log10(1 / (mse + 1e-8)))


def _gaussian() -> np.ndarray:
    x = np.arange(WINDOW) - (WINDOW - 1) / 2
    g = np.exp(-x * x / (2 * SIGMA * SIGMA))
    return g / g.sum()


def _filter(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The valid correlation of ``x`` (H, W) with the separable window ``g`` x ``g``."""
    n = len(g)
    h, w = x.shape[0] - n + 1, x.shape[1] - n + 1
    rows = sum(g[k] * x[k:k + h] for k in range(n))
    return sum(g[k] * rows[:, k:k + w] for k in range(n))


def ssim(a: np.ndarray, b: np.ndarray, space: str = "ycbcr") -> float:
    """SSIM between two uint8 RGB images of the same size (each side >= 11), on the luma."""
    if min(a.shape[:2]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW}, got {a.shape[:2]}")
    x, y = (np.round(luma(im, space) * 255) for im in (a, b))
    g = _gaussian()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter(x, g), _filter(y, g)
    vx = _filter(x * x, g) - mx * mx
    vy = _filter(y * y, g) - my * my
    cov = _filter(x * y, g) - mx * my
    cs = np.maximum((2 * cov + c2) / (vx + vy + c2), 0)
    return float(np.mean((2 * mx * my + c1) / (mx * mx + my * my + c1) * cs))
