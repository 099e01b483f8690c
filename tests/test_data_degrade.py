"""The Real-ESRGAN degradation against basicsr where they share a function, and its statistics
on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.data import degradations as ref
from basicsr.utils.img_process_util import filter2D, usm_sharp
from PIL import Image

from tsdsr_jax.data import kernels
from tsdsr_jax.data.degrade import (
    DegradeConfig,
    add_poisson_noise,
    degrade,
    degrade_lr,
    filter2d,
    jpeg,
    resize,
    rng,
    usm_sharpen,
)

DATA = Path(__file__).parent / "data"


def photo(name: str, side: int) -> np.ndarray:
    with Image.open(DATA / name) as im:
        return np.asarray(im.convert("RGB").resize((side, side), Image.BICUBIC))


@pytest.mark.parametrize("size,sx,sy,theta", [(21, 2.5, 2.5, 0.0), (7, 0.3, 1.9, 1.1),
                                              (15, 3.0, 0.7, -2.8)])
def test_kernels_equal_basicsr(size, sx, sy, theta):
    iso = sx == sy and theta == 0
    g = ref.mesh_grid(size)[0]
    cases = [
        (kernels.gaussian(size, sx, sy, theta),
         ref.bivariate_Gaussian(size, sx, sy, theta, g, isotropic=iso)),
        (kernels.generalized_gaussian(size, sx, sy, theta, 0.7),
         ref.bivariate_generalized_Gaussian(size, sx, sy, theta, 0.7, g, isotropic=iso)),
        (kernels.plateau(size, sx, sy, theta, 1.6),
         ref.bivariate_plateau(size, sx, sy, theta, 1.6, g, isotropic=iso)),
    ]
    for ours, theirs in cases:
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("cutoff,size,pad", [(np.pi / 3, 7, 21), (2.5, 13, 0), (0.7, 21, 21)])
def test_sinc_equals_basicsr(cutoff, size, pad):
    with np.errstate(all="ignore"):
        theirs = ref.circular_lowpass_kernel(cutoff, size, pad_to=pad)
    np.testing.assert_allclose(kernels.sinc(cutoff, size, pad), theirs, rtol=1e-10, atol=1e-14)


def test_random_kernels_are_normalised_and_padded():
    g = rng(0, 1)
    for _ in range(50):
        k = kernels.random_kernel(g, kernels.KernelConfig())
        assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-9 and np.isfinite(k).all()


def test_filter_and_resize_equal_torch():
    x = np.random.default_rng(0).random((40, 56, 3), dtype=np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    k = kernels.gaussian(21, 2.0, 0.8, 0.6)
    theirs = filter2D(t, torch.from_numpy(k).float()[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(filter2d(x, k), theirs, atol=2e-6)
    for mode in ("area", "bilinear", "bicubic"):
        for hw in ((10, 14), (97, 31)):
            theirs = F.interpolate(t, size=hw, mode=mode)[0].permute(1, 2, 0).numpy()
            np.testing.assert_allclose(resize(x, *hw, mode), theirs, atol=1e-5)


def test_usm_equals_basicsr():
    x = photo("astronaut_256.png", 256).astype(np.float32) / 255
    np.testing.assert_allclose(usm_sharpen(x), usm_sharp(x), atol=2e-5)


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_equals_basicsr(quality):
    x = photo("astronaut_256.png", 128).astype(np.float32) / 255
    theirs = ref.add_jpg_compression(x[..., ::-1], quality)[..., ::-1]  # basicsr is BGR
    assert np.abs(jpeg(x, quality) - theirs).max() <= 2 / 255  # libjpeg builds may round apart
    assert np.abs(jpeg(x, quality) - theirs).mean() < 0.2 / 255


@pytest.mark.parametrize("gray", [False, True])
def test_poisson_noise_matches_basicsr_statistics(gray):
    x = photo("coffee.png", 128).astype(np.float32) / 255
    ours = add_poisson_noise(x, 2.0, gray, rng(0)) - x
    torch.manual_seed(0)
    theirs = ref.generate_poisson_noise_pt(torch.from_numpy(x).permute(2, 0, 1)[None], 2.0,
                                           int(gray))[0].permute(1, 2, 0).numpy()
    inner = (x > 0.1) & (x < 0.9)  # away from the clip
    assert abs(ours[inner].std() / theirs[inner].std() - 1) < 0.05
    same = np.mean(np.ptp(ours, axis=-1) < 1e-6)  # one noise field for all channels?
    assert same > 0.8 if gray else same < 0.1  # (the rest is clipped)


@pytest.mark.parametrize("name", ["astronaut_256.png", "coffee.png", "chelsea.jpg", "rocket.jpg",
                                  "camera.png"])
def test_pipeline_statistics_on_photos(name):
    hr = photo(name, 128)
    config = DegradeConfig()
    for index in range(3):
        small = degrade_lr(hr, config, rng(7, index))
        assert small.shape == (32, 32, 3) and small.dtype == np.float32
        lr = degrade(hr, config, rng(7, index))
        assert lr.shape == (128, 128, 3) and lr.dtype == np.float32
        assert np.isfinite(lr).all() and lr.min() >= -1 and lr.max() <= 1
        hr_unit = hr.astype(np.float32) / 127.5 - 1
        assert abs(lr.mean() - hr_unit.mean()) < 0.1          # colours kept
        mse = np.mean((lr - hr_unit) ** 2) / 4
        assert 10 < -10 * np.log10(mse) < 35                  # degraded, but the same picture
    np.testing.assert_array_equal(degrade(hr, config, rng(7, 1)), degrade(hr, config, rng(7, 1)))
    assert not np.array_equal(degrade(hr, config, rng(7, 1)), degrade(hr, config, rng(7, 2)))


def test_usm_option_and_custom_scale():
    hr = photo("astronaut_256.png", 64)
    lr = degrade_lr(hr, DegradeConfig(scale=2, usm_sharpen=True), rng(0))
    assert lr.shape == (32, 32, 3)
