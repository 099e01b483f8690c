"""Size classes: images of many sizes through one compiled program each class, every output
equal to the program of its own size, and independent of its batch."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tsdsr_jax.inference.canvas import Classes, ladder
from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline, posterior_noise
from tsdsr_jax.io import model_dir
from tsdsr_jax.models.mmdit import MMDiTConfig

FP32 = dict(precision="fp32", attention_impl="xla")


def photos(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in sizes]


@pytest.mark.parametrize("options, sizes", [
    # latent tiles of 8 (overlap 2): every image tiled, its tiles per image; 12x20 is below
    # process_size/upscale = 16, so it is made larger and resized back by PIL's rule
    (dict(process_size=64, latent_tile=8, latent_overlap=2),
     [(44, 36), (40, 40), (12, 20)]),
    # untiled, AdaIN against the LR, the posterior mean
    (dict(process_size=128, color_fix="adain", vae_posterior="mean"),
     [(40, 48), (36, 44), (44, 40)]),
], ids=["tiled-wavelet", "untiled-adain"])
def test_classes_equal_the_programs_of_each_size(options, sizes):
    model = model_dir.tiny()
    classes = Pipeline(model, InferenceConfig(**FP32, **options))
    exact = Pipeline(model, InferenceConfig(**FP32, **options, size_class_steps=0))
    shared = {classes.size_class(*s) for s in sizes}
    assert len(shared) < len(sizes) == len({exact.size_class(*s) for s in sizes})
    images = photos(sizes)
    got, want = classes(images, batch_size=2), exact(images, batch_size=1)
    for g, w, (h, wd) in zip(got, want, sizes):
        assert g.shape == w.shape == (4 * h, 4 * wd, 3)
        assert np.abs(g.astype(int) - w).max() <= 1


def test_output_does_not_depend_on_the_batch():
    """The same photo alone, and third in a folder of mixed sizes at batch 3, gives one output."""
    pipe = Pipeline(model_dir.tiny(), InferenceConfig(**FP32, process_size=128))
    images = photos([(40, 48), (36, 44), (44, 40), (32, 32)], seed=1)
    folder = {r.key: r.sr for batch in pipe.batches(zip("abcd", images), batch_size=3)
              for r in batch}
    alone = next(pipe.batches([("c", images[2])], batch_size=1))[0].sr
    assert np.abs(alone.astype(int) - folder["c"]).max() <= 1
    other = next(pipe.batches([("x", images[2])], batch_size=1))[0].sr
    assert np.abs(other.astype(int) - alone).max() > 1  # another key: other noise


def test_posterior_noise_ignores_the_canvas():
    key = jax.random.key(7)
    small = np.asarray(posterior_noise(key, (5, 7, 4)))
    large = np.asarray(posterior_noise(key, (9, 12, 4)))
    np.testing.assert_array_equal(large[:5, :7], small)
    assert 0.5 < small.std() < 1.5


def test_ladder_and_full_size_classes():
    assert [ladder(n, 2) for n in (512, 528, 768, 784, 1024, 1040, 2048)] == [
        512, 768, 768, 1024, 1024, 1536, 2048]
    assert ladder(528, 0) == 528
    classes = Classes(4, 512, 64, 8, MMDiTConfig.sd3_medium(), steps=2)
    phone = classes.of((384, 512))  # a 4:3 photo, x4 to 1536x2048: tiled, no padding
    assert phone.canvas == (1536, 2048) and phone.tile == 64
    assert classes.of((380, 500)) == phone  # a nearby size shares its program
    assert classes.of((128, 128)).tile is None  # one tile: untiled
    small = classes.of((100, 150))  # below 128: made at 512x768, resized back by PIL
    assert small == classes.of((128, 192)) and small.out == (512, 768)  # its program too
    geometry = classes.geometry(phone, [(384, 512), (380, 500)])
    assert geometry.tile_weight.sum(1).tolist() == [20.0, 20.0]  # 4x5 latent tiles each
