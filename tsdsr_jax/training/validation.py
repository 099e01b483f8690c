"""Held-out validation of the TSD stage: a fixed subset of held-out samples, super-resolved by
the student every ``validate_every`` steps and scored against their HR as ``tsdsr-evaluate``
scores a folder (PSNR and SSIM on the luma, LPIPS-alex), with the 16-px grid score
(:mod:`tsdsr_jax.evaluation.grid`); a few LR | SR | HR rows make the step's image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tsdsr_jax.data.batches import DataConfig, records_of
from tsdsr_jax.data.degrade import DegradeConfig
from tsdsr_jax.data.source import SampleSpec, load_sample
from tsdsr_jax.evaluation import evaluate, grid
from tsdsr_jax.io.images import to_uint8


def held_out(roots: tuple[str, ...], num_images: int, spec: SampleSpec,
             degradation: DegradeConfig | None, seed: int) -> dict[str, np.ndarray]:
    """``{'lr', 'hr'}`` (N, H, W, 3) in [-1, 1] of ``num_images`` samples evenly spaced over the
    sorted samples of ``roots``: the same ones, with the same LR, at every step and resume.
    With ``degradation`` the LR is made from the HR (seeded by ``seed`` and the sample),
    otherwise read from ``lr_bicubic/``."""
    records = sorted(records_of(DataConfig(roots=roots, batch_size=1, degradation=degradation,
                                           spec=spec)), key=lambda r: r.name)
    picked = [records[i] for i in np.linspace(0, len(records) - 1, min(num_images, len(records)))
              .round().astype(int)]
    samples = [load_sample(r, i, spec, degradation, (seed,)) for i, r in enumerate(picked)]
    return {k: np.stack([s[k] for s in samples]) for k in ("lr", "hr")}


def scores(sr: np.ndarray, hr: np.ndarray, lpips_params: Any) -> dict[str, float]:
    """``val/psnr``, ``val/ssim``, ``val/lpips`` (with ``lpips_params``) and ``val/grid`` (at
    least 64 px a side), the means over uint8 SR and HR images (N, H, W, 3)."""
    rows = evaluate.evaluate(list(zip(sr, hr)), lpips_params, "ycbcr",
                             with_grid=min(sr.shape[1:3]) >= grid.MIN_SIDE)
    return {f"val/{k.lower()}": float(np.mean([r[k] for r in rows])) for k in rows[0]}


def panels(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """LR | SR | HR side by side, one row per sample, as one uint8 image."""
    return np.concatenate([np.concatenate(row, axis=1) for row in zip(lr, sr, hr)], axis=0)


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] as uint8."""
    return to_uint8(np.asarray(images) * 0.5 + 0.5)
