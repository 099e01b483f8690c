"""resize_bicubic against torch's F.interpolate(mode="bicubic", align_corners=False)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tsdsr_jax.inference.resize import resize_bicubic

DATA = Path(__file__).parent / "data"
resize = jax.jit(resize_bicubic, static_argnames="size")


def load(name: str) -> np.ndarray:
    """A test photo as (H, W, 3) float32 in [0, 1]."""
    return np.asarray(Image.open(DATA / name).convert("RGB"), dtype=np.float32) / 255


def torch_bicubic(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    out = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=False)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name, size", [
    ("astronaut.png", (512, 512)),  # ×4
    ("coffee.png", (400, 600)),     # ×4, 100×150
    ("chelsea.jpg", (300, 452)),    # ×4, 75×113
    ("astronaut.png", (333, 207)),  # non-integer scales
    ("coffee.png", (37, 61)),       # downscale
    ("chelsea.jpg", (150, 40)),     # up in height, down in width
    ("astronaut.png", (128, 128)),  # same size
])
def test_matches_torch(name: str, size: tuple[int, int]) -> None:
    x = load(name)[None]
    out = resize(jnp.asarray(x), size=size)
    assert out.shape == (1, *size, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), torch_bicubic(x, size), rtol=0, atol=1e-5)


def test_batch() -> None:
    x = load("astronaut.png")
    x = np.stack([x, x[::-1, :, ::-1]])
    out = resize(jnp.asarray(x), size=(200, 90))
    np.testing.assert_allclose(np.asarray(out), torch_bicubic(x, (200, 90)), rtol=0, atol=1e-5)


def test_large_non_integer_scale() -> None:
    """Far from the origin the float32 source coordinate must round like torch's fused
    multiply-add."""
    x = np.random.default_rng(0).random((1, 3, 1000, 3), dtype=np.float32)
    out = resize(jnp.asarray(x), size=(7, 2333))
    np.testing.assert_allclose(np.asarray(out), torch_bicubic(x, (7, 2333)), rtol=0, atol=1e-5)
