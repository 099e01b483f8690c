"""The VAE against diffusers' AutoencoderKL (CPU, float32), with and without an encoder LoRA."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from jax.ad_checkpoint import print_saved_residuals
from peft import LoraConfig, get_peft_model_state_dict

from conftest import rel_err
from tsdsr_jax.conversion.torch_layout import match, to_flax
from tsdsr_jax.io import tree
from tsdsr_jax.models import lora, splash
from tsdsr_jax.models.vae import (
    AutoencoderKL,
    GroupNorm,
    NearestX2Conv,
    VAEConfig,
    abstract_params,
    init_params,
    sample_posterior,
)

TINY = {  # SD3-like: no quant convs, 4 blocks (latents of 24x40 images are 3x5)
    "block_out_channels": [8, 16, 16, 16], "layers_per_block": 2, "latent_channels": 16,
    "norm_num_groups": 4, "use_quant_conv": False, "use_post_quant_conv": False}
TINY_QUANT = {
    "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 4, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": False}
SIZES = [(32, 32), (24, 40)]
TOL = 1e-5


@pytest.fixture
def interpreted_splash(monkeypatch):
    """attention_impl="splash" runs the Pallas kernel in its interpreter (this host has no TPU)."""
    monkeypatch.setattr(splash, "splash_attention",
                        functools.partial(splash.splash_attention, interpret=True))


def diffusers_config(d):
    n = len(d["block_out_channels"])
    return {**d, "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "act_fn": "silu"}


def torch_vae(d, seed=0):
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(**diffusers_config(d)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def convert(expected, tensors):
    """Torch tensors as our tree; ``expected`` is ``{flax path: shape}``."""
    pairs = match(expected, {k: tuple(v.shape) for k, v in tensors.items()}, "test")
    return tree.nest({path: jnp.asarray(to_flax(path, tensors[name].detach().numpy()))
                      for path, name in pairs.items()})


def convert_params(cfg, vae):
    shapes = {k: v.shape for k, v in tree.flatten(abstract_params(cfg)).items()}
    return convert(shapes, vae.state_dict())


def apply(cfg, variables, x, method):
    fn = functools.partial(AutoencoderKL(cfg).apply, method=method)
    return jax.tree.map(np.asarray, jax.jit(fn)(variables, jnp.asarray(x)))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("d", [TINY, TINY_QUANT], ids=["plain", "quant"])
def test_encode_decode_match_diffusers(d):
    cfg = VAEConfig.from_diffusers(diffusers_config(d))
    vae = torch_vae(d)
    params = convert_params(cfg, vae)
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        x = rng.uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
        with torch.no_grad():
            dist = vae.encode(nchw(x)).latent_dist
        mean, logvar = apply(cfg, {"params": params}, x, "encode")
        assert rel_err(mean, nhwc(dist.mean)) <= TOL
        assert rel_err(logvar, nhwc(dist.logvar)) <= TOL

        z = rng.standard_normal(mean.shape).astype(np.float32)
        with torch.no_grad():
            ref = nhwc(vae.decode(nchw(z)).sample)
        out = apply(cfg, {"params": params}, z, "decode")
        assert out.shape == (2, h, w, 3)
        assert rel_err(out, ref) <= TOL


def test_encoder_lora_matches_peft():
    cfg = VAEConfig.from_diffusers(diffusers_config(TINY))
    vae = torch_vae(TINY, seed=1)
    params = convert_params(cfg, vae)
    targets = ["encoder." + name for name, m in vae.encoder.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert set(targets) == {p for p in lora.layer_paths(params) if p.startswith("encoder.")}
    vae.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=targets))
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    flat = {}
    for path, (shape_a, shape_b) in lora.adapter_shapes(params, targets, 4).items():
        flat[path + ".lora_A"], flat[path + ".lora_B"] = shape_a, shape_b
    adapter = convert(flat, get_peft_model_state_dict(vae))

    x = np.random.default_rng(1).uniform(-1, 1, (1, 24, 40, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(nchw(x)).latent_dist
    ref_mean, ref_logvar = nhwc(dist.mean), nhwc(dist.logvar)
    mean, logvar = apply(cfg, {"params": params, "lora": adapter}, x, "encode")
    assert rel_err(mean, ref_mean) <= TOL and rel_err(logvar, ref_logvar) <= TOL
    base_mean, _ = apply(cfg, {"params": params}, x, "encode")
    assert rel_err(base_mean, ref_mean) > 1e-2  # the adapter matters

    merged_mean, merged_logvar = apply(cfg, {"params": lora.merge(params, adapter)}, x, "encode")
    assert rel_err(merged_mean, ref_mean) <= TOL and rel_err(merged_logvar, ref_logvar) <= TOL


def test_sd3_config_and_lora_targets():
    cfg = VAEConfig.sd3()
    params = abstract_params(cfg)
    assert sum(np.prod(v.shape) for v in jax.tree.leaves(params)) == 83_819_683
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    assert "quant_conv" not in params and "post_quant_conv" not in params
    encoder_layers = [p for p in lora.layer_paths(params) if p.startswith("encoder.")]
    assert len(encoder_layers) == 31  # the official VAE-encoder LoRA targets


def test_config_round_trip_and_rejects_unsupported():
    cfg = VAEConfig.sd3(dtype=jnp.bfloat16)
    assert VAEConfig.from_diffusers(json.loads(json.dumps(cfg.to_dict()))) == cfg
    official = {  # stabilityai/stable-diffusion-3-medium-diffusers vae/config.json
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.29.0.dev0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": [
            "DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
        "latent_channels": 16, "latents_mean": None, "latents_std": None,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
        "scaling_factor": 1.5305, "shift_factor": 0.0609,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False,
        "use_quant_conv": False}
    assert VAEConfig.from_diffusers(official) == VAEConfig.sd3()
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_diffusers({**official, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        VAEConfig.from_diffusers({**official, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="norm_type"):
        VAEConfig.from_diffusers({**official, "norm_type": "spatial"})
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        VAEConfig(attention_impl="flash")


def test_bfloat16_stays_close():
    cfg = VAEConfig.from_diffusers({**diffusers_config(TINY), "dtype": "bfloat16"})
    vae = torch_vae(TINY)
    params = convert_params(cfg, vae)
    x = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_mean = nhwc(vae.encode(nchw(x)).latent_dist.mean)
        ref_image = nhwc(vae.decode(nchw(ref_mean)).sample)
    mean, _ = apply(cfg, {"params": params}, x, "encode")
    image = apply(cfg, {"params": params}, ref_mean, "decode")
    assert mean.dtype == image.dtype == jnp.bfloat16
    # measured 2.4e-2 and 1.9e-2; diffusers itself in bf16 is off by 1.8e-2 and 3.5e-2
    assert rel_err(mean.astype(np.float32), ref_mean) < 5e-2
    assert rel_err(image.astype(np.float32), ref_image) < 5e-2


def test_init_params_and_posterior_sample():
    cfg = VAEConfig(block_out_channels=(4,), norm_num_groups=2, latent_channels=2,
                    mid_block_add_attention=False)  # few leaves: compiling init is slow on CPU
    params = init_params(jax.random.key(0), cfg)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, abstract_params(cfg))
    assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    assert "attentions.0" not in params["encoder"]["mid_block"]

    mean, logvar = jnp.ones((4096,)), jnp.full((4096,), np.log(4.0))
    z = sample_posterior(mean, logvar, jax.random.normal(jax.random.key(2), mean.shape))
    assert abs(float(z.mean()) - 1.0) < 0.1 and abs(float(z.std()) - 2.0) < 0.1


def test_query_chunked_attention_is_exact():
    """The chunked path (used beyond QUERY_CHUNK tokens, e.g. 1024² images) equals one block."""
    from tsdsr_jax.models.vae import single_head_attention

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 100, 8)) for i in range(3))
    whole = single_head_attention(q, k, v, query_chunk=100)
    chunked = single_head_attention(q, k, v, query_chunk=32)  # 4 chunks, the last padded
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy,norms,attention", [(None, False, None), (None, True, None),
                                                    ("full", True, None),
                                                    ("full", True, "splash")])
def test_gradients_match_torch_with_and_without_remat(policy, norms, attention,
                                                      interpreted_splash):
    """The input gradient through encode (posterior mean) and decode equals torch autograd on
    diffusers' VAE: plain; with the GroupNorms recomputed in the backward pass (as training
    runs it), alone and with every block rematerialised; and with the mid-block attention in
    the splash kernel (as a TPU runs it)."""
    vae = torch_vae(TINY, seed=2)
    cfg = VAEConfig.from_diffusers(diffusers_config(TINY) | {"remat_policy": policy,
                                                             "remat_norms": norms,
                                                             "attention_impl": attention})
    params = convert_params(cfg, vae)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 24, 40, 3)).astype(np.float32)
    cot = rng.standard_normal((1, 24, 40, 3)).astype(np.float32)
    model = AutoencoderKL(cfg)

    def loss(x):
        mean, _ = model.apply({"params": params}, x, method="encode")
        return jnp.sum(model.apply({"params": params}, mean, method="decode") * cot)

    grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    tx = nchw(x).requires_grad_()
    (vae.decode(vae.encode(tx).latent_dist.mean).sample * nchw(cot)).sum().backward()
    assert rel_err(grad, nhwc(tx.grad)) <= 1e-4


def test_upsample_is_nearest_then_conv():
    """NearestX2Conv (a transposed convolution of the input) against torch's nearest x2
    interpolation followed by a 3x3 conv with padding 1, on odd sizes."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 6, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    got = NearestX2Conv(4, jnp.float32).apply(
        {"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
    up = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                         scale_factor=2, mode="nearest")
    want = torch.nn.functional.conv2d(up, torch.from_numpy(kernel).permute(3, 2, 0, 1),
                                      torch.from_numpy(bias), padding=1)
    assert rel_err(got, want.permute(0, 2, 3, 1).numpy()) <= TOL


def test_group_norm_statistics_with_a_large_mean():
    """One-pass float32 statistics (about each channel's first pixel) against torch's
    group_norm in float64, on activations whose mean is 300 times their spread (where float32
    E[x²] - E[x]², torch's own float32 result among them, is off by percents)."""
    rng = np.random.default_rng(1)
    x = (300 + rng.standard_normal((2, 16, 12, 8)) * rng.uniform(0.5, 2, 8)).astype(np.float32)
    scale, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(
        np.float32)
    got = GroupNorm(4).apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(x))
    want = torch.nn.functional.group_norm(torch.from_numpy(x).double().permute(0, 3, 1, 2), 4,
                                          torch.from_numpy(scale).double(),
                                          torch.from_numpy(bias).double(), eps=1e-6)
    assert rel_err(got, want.permute(0, 2, 3, 1).numpy()) <= TOL


@pytest.mark.parametrize("d,attention", [(TINY, None), (TINY_QUANT, None), (TINY, "splash")],
                         ids=["plain", "quant", "plain-splash"])
def test_padded_batch_matches_diffusers_per_image(d, attention, interpreted_splash):
    """Images of two sizes in one padded batch (garbage beyond each ``extent``) give, inside
    their extents, what diffusers gives for each image alone; also with the mid-block attention
    in the splash kernel (its real tokens a region of the latent grid)."""
    cfg = VAEConfig.from_diffusers(diffusers_config(d) | {"attention_impl": attention})
    vae = torch_vae(d)
    params = convert_params(cfg, vae)
    f = cfg.downscale_factor
    rng = np.random.default_rng(3)
    sizes, canvas = [(24, 40), (48, 32)], (56, 48)
    x = rng.uniform(-5, 5, (2, *canvas, 3)).astype(np.float32)  # the padding is garbage
    images = [rng.uniform(-1, 1, (h, w, 3)).astype(np.float32) for h, w in sizes]
    for b, im in enumerate(images):
        x[b, :im.shape[0], :im.shape[1]] = im
    extent = np.array(sizes, np.int32)
    mean, logvar = jax.jit(functools.partial(AutoencoderKL(cfg).apply, method="encode"))(
        {"params": params}, x, extent)
    z = rng.standard_normal((2, canvas[0] // f, canvas[1] // f, cfg.latent_channels))
    z = z.astype(np.float32) * 5
    zs = [rng.standard_normal((h // f, w // f, cfg.latent_channels)).astype(np.float32)
          for h, w in sizes]
    for b, zb in enumerate(zs):
        z[b, :zb.shape[0], :zb.shape[1]] = zb
    out = jax.jit(functools.partial(AutoencoderKL(cfg).apply, method="decode"))(
        {"params": params}, z, extent // f)
    for b, ((h, w), im, zb) in enumerate(zip(sizes, images, zs)):
        with torch.no_grad():
            dist = vae.encode(nchw(im[None])).latent_dist
            ref = nhwc(vae.decode(nchw(zb[None])).sample)
        assert rel_err(np.asarray(mean[b, :h // f, :w // f]), nhwc(dist.mean)[0]) <= TOL
        assert rel_err(np.asarray(logvar[b, :h // f, :w // f]), nhwc(dist.logvar)[0]) <= TOL
        assert rel_err(np.asarray(out[b, :h, :w]), ref[0]) <= TOL


@pytest.mark.parametrize("remat_norms", [False, True])
def test_remat_norms_stores_nothing_computed_in_a_group_norm(remat_norms, capsys):
    """With ``remat_norms`` (as training runs it) the decoder's backward pass keeps nothing
    computed inside a GroupNorm or its SiLU, by jax's own list of the saved residuals; without
    it, it keeps their float32 intermediates."""
    cfg = VAEConfig(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                    dtype=jnp.bfloat16, remat_norms=remat_norms)
    model = AutoencoderKL(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    decode = lambda z: model.apply({"params": params}, z, method="decode").sum()  # noqa: E731
    print_saved_residuals(decode, jnp.zeros((1, 8, 8, 4), jnp.bfloat16))
    inside = [line for line in capsys.readouterr().out.splitlines()
              if "(GroupNorm.__call__)" in line or "(group_moments)" in line]
    assert bool(inside) != remat_norms, inside
