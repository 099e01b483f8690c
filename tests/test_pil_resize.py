"""The device resize against PIL's own ``Image.resize`` (bicubic, the default): equal, bit for
bit, enlarging and shrinking, with either pass first."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from tsdsr_jax.inference.pil_resize import pil_resize

resize = jax.jit(pil_resize, static_argnums=1)


@pytest.mark.parametrize("shape, size", [
    ((32, 48), (128, 192)),    # ×4, the wavelet source
    ((37, 53), (148, 212)),    # ×4 of odd sides
    ((128, 128), (512, 512)),
    ((512, 384), (128, 96)),   # ÷4, an output made at the process size brought back
    ((300, 200), (77, 51)),    # shrinking by non-integer factors
    ((480, 130), (120, 520)),  # the height shrinks most: the vertical pass first
    ((64, 64), (64, 200)),     # one axis unchanged: one pass
    ((5, 7), (400, 3)),
])
def test_equals_pil(shape, size):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    images[0, : shape[0] // 2] = np.where(rng.random((shape[0] // 2, shape[1], 3)) < 0.5, 0, 255)
    want = np.stack([np.asarray(Image.fromarray(im).resize(size[::-1])) for im in images])
    got = np.asarray(resize(images, size))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
