"""The 16-px grid score on real photos: clean, through PIL's JPEG encoder, with planted patterns.

The photos are used as they are (71 to 150 px, sharp to the pixel) and enlarged 2x (bicubic),
smooth at the top octave as SR outputs are.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tsdsr_jax.evaluation.grid import GRID_WARNING, MIN_SIDE, grid_score

DATA = Path(__file__).parent / "data"
PHOTOS = ("astronaut.png", "camera.png", "chelsea.jpg", "coffee.png", "rocket.jpg")
CASES = [(name, scale) for name in PHOTOS for scale in (1, 2)]


def photo(name: str, scale: int) -> np.ndarray:
    """A test photo, uint8 RGB (camera.png grey), enlarged ``scale`` times."""
    image = Image.open(DATA / name)
    image = image.convert("L" if image.mode == "L" else "RGB")
    return np.asarray(image.resize((image.width * scale, image.height * scale), Image.BICUBIC))


def planted(image: np.ndarray, amplitude: int, period: int = 16, seed: int = 0) -> np.ndarray:
    """``image`` plus a fixed random tile (period x period) of -a, 0, +a grey levels, repeated
    from a random phase, in every channel."""
    rng = np.random.default_rng(seed)
    tile = rng.choice([-amplitude, 0, amplitude], (period, period))
    dy, dx = rng.integers(period, size=2)
    h, w = image.shape[:2]
    pattern = np.tile(tile, (h // period + 2, w // period + 2))[dy:dy + h, dx:dx + w]
    pattern = pattern[..., None] if image.ndim == 3 else pattern
    return np.clip(image.astype(np.int64) + pattern, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf))


@pytest.mark.parametrize("name,scale", CASES)
def test_clean_photos_read_about_zero(name, scale):
    assert -1 < grid_score(photo(name, scale)) < GRID_WARNING - 2


@pytest.mark.parametrize("name,scale", CASES)
def test_jpeg_blocks_do_not_count(name, scale):
    assert grid_score(jpeg(photo(name, scale), 20)) < GRID_WARNING - 1.5


@pytest.mark.parametrize("name,scale", CASES)
def test_scores_grow_with_the_planted_amplitude(name, scale):
    seed = PHOTOS.index(name)
    scores = [grid_score(planted(photo(name, scale), a, seed=seed)) for a in (1, 2, 4, 8, 16)]
    assert np.all(np.diff(scores) > 0), scores


@pytest.mark.parametrize("name", PHOTOS)
def test_planted_grid_fires(name):
    seed = PHOTOS.index(name)
    assert grid_score(planted(photo(name, 2), 3, seed=seed)) > GRID_WARNING + 5
    assert grid_score(planted(photo(name, 1), 8, seed=seed)) > GRID_WARNING  # sharp and small


@pytest.mark.parametrize("name,scale", CASES)
def test_8px_pattern_does_not_fire(name, scale):
    image = photo(name, scale)
    score = grid_score(planted(image, 16, period=8, seed=PHOTOS.index(name)))
    assert score < GRID_WARNING - 2 and score == pytest.approx(grid_score(image), abs=0.5)


def test_input_checks():
    grey = photo("camera.png", 1)
    assert grid_score(np.stack([grey] * 3, axis=-1)) == pytest.approx(grid_score(grey), abs=1e-9)
    assert grid_score(np.full((MIN_SIDE, 100), 128, np.uint8)) == 0
    assert np.isfinite(grid_score(grey[:MIN_SIDE, :MIN_SIDE]))
    with pytest.raises(ValueError, match="at least 64 px a side.*got 96x63"):
        grid_score(grey[:MIN_SIDE - 1])
