"""A no-reference score of 16-px grid artifacts: the period of a diffusion transformer's patches
(patch 2 x VAE factor 8) that a badly fine-tuned SR model leaves faintly in its output.

``grid_score`` in dB, per image:

1. The luma in [0, 1], float64: ``0.299 R + 0.587 G + 0.114 B``, JPEG's Y (the 16-px blocks of
   JPEG's 4:2:0 chroma stay out of it); a grey image as it is.
2. For each axis, the first differences along it (they whiten the 1/f spectrum of photos),
   cropped to the largest multiple ``16 m`` of 16, each line's mean removed.
3. The power spectrum of each line (rows for x, columns for y), averaged over the lines. The
   frequency ``k / 16`` cycles/px falls exactly on bin ``k m``.
4. For the odd harmonics ``k = 1, 3, 5, 7`` of the 16-px period (the even ones are also those
   of 8 px: JPEG's blocks, 4x upscaling; they are ignored): the ratio of the peak, the power in
   bin ``k m``, to the background, the median power of the bins ``k m +- d`` for
   ``2 <= d <= max(3, m // 4)`` and ``d < m`` (not the peak's direct neighbours, nor the next
   harmonics: a 64-px side has ``m = 3``). Both get ``eps_k`` added, the power that rounding
   to 8 bits (white noise of 1/12 grey level^2) puts there, so that flat images read 0 dB.
5. The axis's score is ``10 log10`` of the mean of the four ratios; the image's is the larger of
   its two axes'.

Each harmonic is judged against the image's own spectrum around it, so a grid counts most where
the image is quiet, where it shows. Averaged over the lines, a bin's power is near its mean, and
so is the median (no ln 2 bias): a clean image reads about 0 dB, a 16-px pattern positive.

:data:`GRID_WARNING`, 3 dB (the peaks twice their surroundings), is the score above which a
grid is deemed visible or emerging. It was chosen on random crops of 16 of scikit-image's
sample photographs (scenes, textures, micrographs), as they are and enlarged 2x and 4x
(bicubic): clean and as JPEGs of quality 10 to 90 they read 0.2 dB typically and at most
2.2 dB in crops of 256 px and more. Smaller crops are noisier (of 64 to 256 px, 1 % read above
3 dB; of 64 to 80 px, 3 %), as is a scanned page of text (up to 3.4 dB). A 16-px tile of +-2
grey levels added to the 512-px photos reads 2.5 to 13 dB, but 0.9 and 1.4 on grass and coins,
whose texture hides it; +-3 reads 4.3 to 16 dB (there 1.8 and 2.4). On the tests' photos
enlarged 2x (SR outputs, too, are smooth at the top octave) even +-1 reads above 7 dB.
"""

from __future__ import annotations

import numpy as np

from tsdsr_jax.evaluation.metrics import luma

PERIOD = 16
HARMONICS = (1, 3, 5, 7)
MIN_SIDE = 4 * PERIOD
GRID_WARNING = 3.0
_ROUNDING = 1 / 12 / 255**2  # the variance of rounding to 8 bits, on luma in [0, 1]


def _axis_score(y: np.ndarray) -> float:
    """The score in dB of the rows of the luma ``y`` (lines, length)."""
    d = np.diff(y, axis=1)
    m = d.shape[1] // PERIOD
    d = d[:, :PERIOD * m]
    d = d - d.mean(axis=1, keepdims=True)
    power = np.mean(np.abs(np.fft.rfft(d, axis=1)) ** 2, axis=0)
    w = min(max(3, m // 4), m - 1)
    offsets = np.r_[-w:-1, 2:w + 1]
    ratios = []
    for k in HARMONICS:
        # rounding's white noise in bin k m, through the first difference
        eps = PERIOD * m * _ROUNDING * 4 * np.sin(np.pi * k / PERIOD) ** 2
        ratios.append((power[k * m] + eps) / (np.median(power[k * m + offsets]) + eps))
    return float(10 * np.log10(np.mean(ratios)))


def grid_score(image: np.ndarray) -> float:
    """The 16-px grid score in dB of a uint8 RGB (H, W, 3) or grey (H, W) image, sides >= 64."""
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"the grid score needs at least {MIN_SIDE} px a side (4 periods of "
                         f"{PERIOD} px), got {image.shape[1]}x{image.shape[0]}")
    y = luma(image, "yiq") if image.ndim == 3 else image.astype(np.float64) / 255
    return max(_axis_score(y), _axis_score(y.T))
