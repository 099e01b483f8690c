"""Colour fixes against torch references written from the official definitions."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tsdsr_jax.inference.colorfix import (
    COLOR_FIXES,
    adain_color_fix,
    wavelet_color_fix,
)

DATA = Path(__file__).parent / "data"
adain = jax.jit(adain_color_fix)
wavelet = jax.jit(wavelet_color_fix)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def pil_upscale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The official wavelet source: PIL's default resize of the uint8 LR, as floats."""
    return np.asarray(Image.fromarray(image).resize(size[::-1]), dtype=np.float32) / 255


def torch_adain(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    def mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        std = (torch.var(flat, 2, unbiased=True) + 1e-5).sqrt()
        return flat.mean(2)[..., None, None], std[..., None, None]

    t, s = nchw(target), nchw(source)
    (mean_t, std_t), (mean_s, std_s) = mean_std(t), mean_std(s)
    return nhwc(((t - mean_t) / std_t * std_s + mean_s).clamp(0, 1))


def torch_decompose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over 5 levels of image − blur, lowest band)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None] / 16).expand(3, 1, 3, 3)
    high = torch.zeros_like(x)
    for i in range(5):
        r = 2**i
        low = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), kernel, groups=3, dilation=r)
        high, x = high + (x - low), low
    return high, x


def torch_wavelet(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    return nhwc((torch_decompose(nchw(target))[0] + torch_decompose(nchw(source))[1]).clamp(0, 1))


def load_uint8(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / name).convert("RGB"))


def fake_sr(lr: np.ndarray, seed: int, gain: tuple[float, ...] = (0.8, 1.0, 0.9)) -> np.ndarray:
    """A ×4 torch-bicubic upscale of ``lr`` (n, h, w, 3) with a colour cast and noise."""
    up = nhwc(F.interpolate(nchw(lr), scale_factor=4, mode="bicubic", align_corners=False))
    noise = np.random.default_rng(seed).normal(0, 0.02, up.shape).astype(np.float32)
    return np.clip(up * np.float32(gain) + np.float32([0.1, -0.05, 0.05]) + noise, 0, 1)


@pytest.fixture(scope="module", params=["astronaut.png", "coffee.png"])
def photo(request) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(LR uint8 (h, w, 3), LR float (1, h, w, 3), fake SR (1, 4h, 4w, 3))."""
    lr_uint8 = load_uint8(request.param)
    lr = lr_uint8[None].astype(np.float32) / 255
    return lr_uint8, lr, fake_sr(lr, 0)


def test_adain_matches_torch(photo) -> None:
    _, lr, sr = photo
    out = adain(jnp.asarray(sr), jnp.asarray(lr))
    assert out.shape == sr.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), torch_adain(sr, lr), rtol=0, atol=1e-5)


def test_adain_batch_small_source_flat_target() -> None:
    """Per-image stats; an 8×8 source makes the unbiased variance matter, a flat target the eps."""
    lr = load_uint8("chelsea.jpg")[None].astype(np.float32) / 255
    sr = fake_sr(lr, 1)
    target = np.concatenate([sr, 0.5 + 0.001 * sr[:, ::-1]])
    source = np.concatenate([lr[:, 30:38, 50:58], lr[:, 40:48, 10:18] * 0.5 + 0.3])
    out = adain(jnp.asarray(target), jnp.asarray(source))
    np.testing.assert_allclose(np.asarray(out), torch_adain(target, source), rtol=0, atol=1e-5)


def test_adain_takes_source_statistics(photo) -> None:
    _, lr, sr = photo
    source = 0.2 + 0.6 * lr  # keeps the result inside [0, 1], unclipped
    out = np.asarray(adain(jnp.asarray(sr), jnp.asarray(source)), dtype=np.float64)
    source, sr = source.astype(np.float64), sr.astype(np.float64)
    assert np.abs(sr.mean((1, 2)) - source.mean((1, 2))).max() > 0.03  # the cast to undo
    assert np.abs(sr.std((1, 2)) - source.std((1, 2))).max() > 0.03
    np.testing.assert_allclose(out.mean((1, 2)), source.mean((1, 2)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.std((1, 2), ddof=1), source.std((1, 2), ddof=1),
                               rtol=0, atol=1e-4)


def test_wavelet_matches_torch(photo) -> None:
    lr_uint8, _, sr = photo
    source = pil_upscale(lr_uint8, sr.shape[1:3])[None]
    out = wavelet(jnp.asarray(sr), jnp.asarray(source))
    assert out.shape == sr.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), torch_wavelet(sr, source), rtol=0, atol=1e-5)


def test_wavelet_small_batch_matches_torch() -> None:
    """Images smaller than the coarsest radius (16): replicate padding beyond the image."""
    target, source = np.random.default_rng(2).random((2, 2, 9, 7, 3), dtype=np.float32)
    out = wavelet(jnp.asarray(target), jnp.asarray(source))
    np.testing.assert_allclose(np.asarray(out), torch_wavelet(target, source), rtol=0, atol=1e-5)


def test_wavelet_keeps_source_low_band(photo) -> None:
    lr_uint8, lr, _ = photo
    sr = fake_sr(lr, 3, gain=(1.0, 1.0, 1.0))  # a cast of pure low frequency
    source = pil_upscale(lr_uint8, sr.shape[1:3])[None]
    out = np.array(wavelet(jnp.asarray(sr), jnp.asarray(source)))
    low = {k: nhwc(torch_decompose(nchw(v))[1])
           for k, v in (("sr", sr), ("src", source), ("out", out))}
    assert np.abs(low["sr"] - low["src"]).mean() > 0.05  # the cast to undo
    assert np.abs(low["out"] - low["src"]).mean() < 0.003


def test_wavelet_undoes_a_constant_cast(photo) -> None:
    """With source = target + c per channel, the result is target + c."""
    _, _, sr = photo
    target = 0.1 + 0.8 * sr
    offset = np.float32([0.05, -0.08, 0.1])
    out = wavelet(jnp.asarray(target), jnp.asarray(target + offset))
    np.testing.assert_allclose(np.asarray(out), target + offset, rtol=0, atol=1e-5)


def test_color_fixes() -> None:
    assert set(COLOR_FIXES) == {"wavelet", "adain", "none"}
    x = jnp.linspace(0, 1, 48).reshape(1, 4, 4, 3)
    assert jnp.array_equal(jax.jit(COLOR_FIXES["none"])(x, x[:, :2]), x)
