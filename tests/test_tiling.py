"""Tiling: the latent tile loop against the official ``tile_sample``, and the tiled VAE against
the untiled one on a real photograph (tiny VAEs with converted diffusers weights, CPU, float32)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from PIL import Image

from conftest import TINY_TRANSFORMER, TINY_VAE, jitter
from tsdsr_jax.conversion.torch_layout import match, to_flax
from tsdsr_jax.inference import tiling
from tsdsr_jax.io import tree
from tsdsr_jax.models import mmdit
from tsdsr_jax.models.vae import AutoencoderKL, VAEConfig, abstract_params

OFFICIAL_REPO = Path(os.environ.get("TSDSR_OFFICIAL_REPO", "/work/.mirror/Microtreei+TSD-SR/repo"))
PHOTO = Path(__file__).parent / "data" / "astronaut_256.png"


# --------------------------------------------------------------------------- latent tiling


def official_tile_sample(channels: int, tile: int, overlap: int):
    """The official ``tile_sample`` and ``_gaussian_weights``, executed from a checkout of the
    official repository (not copied here), with the globals they read; skips without one."""
    file = OFFICIAL_REPO / "test" / "test_tsdsr.py"
    try:
        source = file.read_text() if file.exists() else subprocess.run(
            ["git", "-C", str(OFFICIAL_REPO), "show", "HEAD:test/test_tsdsr.py"],
            capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no official TSD-SR checkout (set TSDSR_OFFICIAL_REPO)")
    wanted = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
              and node.name in ("_gaussian_weights", "tile_sample")]
    args = SimpleNamespace(device="cpu", latent_tiled_size=tile, latent_tiled_overlap=overlap)
    transformer = SimpleNamespace(config=SimpleNamespace(in_channels=channels))
    namespace = {"torch": torch, "args": args, "transformer": transformer}
    exec(compile(ast.Module(wanted, type_ignores=[]), str(file), "exec"), namespace)
    return namespace["tile_sample"], args


def position_dependent(t, xp):
    """A per-sample, position-dependent function of NHWC tiles, for numpy/jax (``xp``)."""
    _, h, w, _ = t.shape
    ramp = 0.01 * xp.arange(h)[:, None, None] - 0.02 * xp.arange(w)[None, :, None]
    return xp.sin(t) + t.mean(axis=(1, 2), keepdims=True) + ramp


def test_offsets_and_weights():
    assert tiling.axis_offsets(64, 64, 8) == [0]
    assert tiling.axis_offsets(65, 64, 8) == [0, 1]
    assert tiling.axis_offsets(150, 64, 8) == [0, 56, 86]
    assert tiling.tile_offsets(96, 80, 64, 8) == [(0, 0), (0, 16), (32, 0), (32, 16)]
    with pytest.raises(ValueError, match="overlap"):
        tiling.axis_offsets(100, 8, 8)
    weights = tiling.gaussian_weights(8, 6)
    assert weights.shape == (8, 6)
    np.testing.assert_allclose(weights, weights[:, ::-1])  # x: centred at (6 - 1) / 2
    assert weights[:, 0].argmax() == 4  # y: centred at 8 / 2
    # y at its midpoint, x half a pixel off (6 - 1) / 2: exp(-(0.5 / 6)² / (2·0.01)) / (2π·0.01)
    np.testing.assert_allclose(weights[4, 2], np.exp(-(0.5 / 6) ** 2 / 0.02) / (2 * np.pi * 0.01))


@pytest.mark.parametrize("h, w, tile, overlap", [(96, 80, 64, 8), (40, 150, 64, 8),
                                                 (64, 65, 64, 8), (45, 37, 16, 4)])
def test_matches_official_tile_sample(h, w, tile, overlap):
    tile_sample, args = official_tile_sample(4, tile, overlap)
    z = np.random.default_rng(0).standard_normal((1, h, w, 4)).astype(np.float32)

    def torch_fn(hidden_states, **_):
        nhwc = hidden_states.permute(0, 2, 3, 1)
        return (position_dependent(nhwc, torch).permute(0, 3, 1, 2),)

    ref = tile_sample(torch.from_numpy(z).permute(0, 3, 1, 2), torch.zeros(1, 3, h * 8, w * 8),
                      torch_fn, None, None, None, torch.float32, args)
    out = tiling.tiled_apply(functools.partial(position_dependent, xp=jnp), jnp.asarray(z),
                             tile, overlap)
    np.testing.assert_allclose(np.asarray(out), ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_untiled_cases_and_chunks():
    z = jnp.asarray(np.random.default_rng(1).standard_normal((2, 40, 30, 4)), jnp.float32)
    fn = functools.partial(position_dependent, xp=jnp)
    # No tiling while h·w <= tile²: exactly fn(z).
    np.testing.assert_array_equal(tiling.tiled_apply(fn, z, 35, 8), fn(z))
    # A pointwise fn is untouched by the normalised blend.
    np.testing.assert_allclose(tiling.tiled_apply(jnp.tanh, z, 16, 4), jnp.tanh(z), atol=1e-6)
    # Chunks of at most 4 of the 12 tiles (3 lax.map steps) give the one-batch result.
    one_batch = jax.jit(lambda a: tiling.tiled_apply(fn, a, 16, 4))(z)
    chunked = jax.jit(lambda a: tiling.tiled_apply(fn, a, 16, 4, max_tiles=4))(z)
    np.testing.assert_allclose(chunked, one_batch, atol=1e-6)


def test_tiny_mmdit_tiled_close_to_untiled():
    cfg = mmdit.MMDiTConfig.from_diffusers(TINY_TRANSFORMER)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: jnp.asarray(0.1 * rng.standard_normal(leaf.shape)),
                          mmdit.abstract_params(cfg))
    keys = jax.random.split(jax.random.key(1), 3)
    z = jax.random.normal(keys[0], (1, 24, 40, cfg.in_channels))
    prompt = jax.random.normal(keys[1], (1, 7, cfg.joint_attention_dim))
    pooled = jax.random.normal(keys[2], (1, cfg.pooled_projection_dim))

    def fn(tiles):
        n = tiles.shape[0]
        return mmdit.MMDiT(cfg).apply({"params": params}, tiles, jnp.full((n,), 1000.0),
                                      jnp.tile(prompt, (n, 1, 1)), jnp.tile(pooled, (n, 1)))

    untiled = jax.jit(fn)(z)
    tiled = jax.jit(lambda a: tiling.tiled_apply(fn, a, 16, 4))(z)  # 2 x 3 tiles
    rel = float(jnp.abs(tiled - untiled).mean() / jnp.abs(untiled).mean())
    # Measured 0.19: a random MMDiT attends globally, and SD3 gives every tile the centre crop
    # of its position embedding, so tiles see a different context; the official code does too.
    assert rel < 0.5


# --------------------------------------------------------------------------- tiled VAE


def psnr(a, b, peak: float) -> float:
    return float(10 * np.log10(peak ** 2 / np.mean(np.square(np.asarray(a) - np.asarray(b)))))


def seam_jump(out, ref, cuts_y, cuts_x, scale: int) -> tuple[float, float]:
    """Mean |jump| of the error across the tile cuts, and across all other pixel lines."""
    e = np.asarray(out, np.float64) - np.asarray(ref, np.float64)
    jump_y = np.abs(np.diff(e, axis=1)).mean((0, 2, 3))
    jump_x = np.abs(np.diff(e, axis=2)).mean((0, 1, 3))
    at_y = [c * scale - 1 for c in cuts_y[1:-1]]
    at_x = [c * scale - 1 for c in cuts_x[1:-1]]
    at = np.concatenate([jump_y[at_y], jump_x[at_x]]).mean()
    other = np.concatenate([np.delete(jump_y, at_y), np.delete(jump_x, at_x)]).mean()
    return float(at), float(other)


@dataclasses.dataclass
class TinyVAE:
    vae: AutoencoderKL
    variables: dict
    image: jax.Array  # the photo and its rotation, (2, 256, 384, 3) in [-1, 1]
    mean: jax.Array   # their untiled posterior means, (2, 32, 48, 4)

    def untiled(self, method: str, x: jax.Array) -> jax.Array:
        return jax.jit(functools.partial(self.vae.apply, method=method))(self.variables, x)


def tiny_vae(attention: bool) -> TinyVAE:
    """TINY_VAE (4 blocks, factor 8), diffusers weights + noise, converted; and a photo."""
    config = TINY_VAE | {"mid_block_add_attention": attention}
    torch.manual_seed(0)
    module = TorchAutoencoderKL(**config).eval()
    jitter(module)
    cfg = VAEConfig.from_diffusers(config)
    shapes = {k: v.shape for k, v in tree.flatten(abstract_params(cfg)).items()}
    state = module.state_dict()
    pairs = match(shapes, {k: tuple(v.shape) for k, v in state.items()}, "test")
    params = tree.nest({path: jnp.asarray(to_flax(path, state[name].numpy()))
                        for path, name in pairs.items()})
    photo = np.asarray(Image.open(PHOTO).convert("RGB"), np.float32) / 127.5 - 1
    photo = jax.image.resize(jnp.asarray(photo), (256, 384, 3), "cubic").clip(-1, 1)
    image = jnp.stack([photo, photo[::-1, ::-1]])  # two images: statistics are per image
    t = TinyVAE(AutoencoderKL(cfg), {"params": params}, image, None)
    t.mean = t.untiled("encode", image)[0]
    return t


@pytest.fixture(scope="module")
def plain_vae() -> tuple[TinyVAE, jax.Array]:
    """The VAE without its mid-block attention, and its untiled decode of the photo's latent."""
    t = tiny_vae(attention=False)
    return t, t.untiled("decode", t.mean)


def test_vae_windows():
    for length, tile, halo in [(512, 224, 11), (48, 16, 11), (64, 8, 4), (7, 2, 1), (30, 8, 11)]:
        size, starts, cuts = tiling.vae_windows(length, tile, halo)
        count = max(1, -(-(length - 2 * halo) // tile))  # vaehook's tile count
        assert len(starts) == count and starts[0] == 0 and starts[-1] + size == length
        assert size <= tile + 2 * halo
        assert cuts[0] == 0 and cuts[-1] == length and np.all(np.diff(cuts) > 0)
        for i, start in enumerate(starts):
            assert start + (halo if i else 0) <= cuts[i] < cuts[i + 1]
            assert cuts[i + 1] <= start + size - (halo if i < count - 1 else 0)
    assert tiling.vae_windows(512, 224, 11) == (186, [0, 163, 326], [0, 174, 337, 512])


DECODE_PLAN = dict(tile=8, halo=11)  # 2 x 4 windows of 27 x 29 latent pixels


def decode_seams(image: jax.Array, decoded: jax.Array) -> tuple[float, float]:
    _, _, cuts_y = tiling.vae_windows(decoded.shape[1] // 8, **DECODE_PLAN)
    _, _, cuts_x = tiling.vae_windows(decoded.shape[2] // 8, **DECODE_PLAN)
    return seam_jump(image, decoded, cuts_y, cuts_x, 8)


def test_tiled_vae_is_exact_without_attention(plain_vae):
    """All windows in one batch, whole-image GroupNorm statistics: the untiled result."""
    t, decoded = plain_vae
    mean, logvar = jax.jit(functools.partial(tiling.tiled_encode, t.vae, tile=64, halo=32))(
        t.variables, t.image)  # 3 x 5 windows of 128² pixels
    assert mean.shape == logvar.shape == t.mean.shape
    # measured 42.1 dB (peak: the latent's range): 32 pixels are short of the encoder's
    # receptive field
    assert psnr(mean, t.mean, np.ptp(t.mean)) > 38

    image = jax.jit(functools.partial(tiling.tiled_decode, t.vae, **DECODE_PLAN))(
        t.variables, t.mean)
    assert psnr(image, decoded, 2.0) > 80  # measured 101.0 dB
    at_cuts, _ = decode_seams(image, decoded)
    assert at_cuts * 127.5 < 0.05  # in 8-bit levels: measured 0.007


def test_tiled_vae_fast_mode_in_chunks(plain_vae):
    """Chunks of windows, statistics estimated on a downscaled copy: approximate, no seams."""
    t, decoded = plain_vae
    image = jax.jit(functools.partial(tiling.tiled_decode, t.vae, **DECODE_PLAN, max_tiles=3))(
        t.variables, t.mean)
    # measured 25.5 dB: a random decoder's statistics on a downscaled copy are off; the same
    # windows normalised with their own statistics give 25.4 dB, and seams (ratio 1.66)
    assert psnr(image, decoded, 2.0) > 22
    at_cuts, elsewhere = decode_seams(image, decoded)
    # measured 1.13
    assert at_cuts < 1.3 * elsewhere


def test_tiled_vae_with_attention_and_fallback():
    """TINY_VAE as it is, its mid-block attention within windows. (Decoding, where that
    attention comes first, it dominates the difference: 23.4 dB with DECODE_PLAN.)"""
    t = tiny_vae(attention=True)
    mean, _ = jax.jit(functools.partial(tiling.tiled_encode, t.vae, tile=64, halo=32))(
        t.variables, t.image)
    assert psnr(mean, t.mean, np.ptp(t.mean)) > 37  # measured 40.4 dB
    # One window covers the image: exactly the untiled call.
    untiled = jax.make_jaxpr(functools.partial(t.vae.apply, method="encode"))
    single = jax.make_jaxpr(functools.partial(tiling.tiled_encode, t.vae, tile=256, halo=64))
    assert str(single(t.variables, t.image)) == str(untiled(t.variables, t.image))
