"""MMDiT against diffusers' SD3Transformer2DModel (tiny random models, CPU, float32)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from conftest import rel_err
from tsdsr_jax.conversion.torch_layout import match, to_flax
from tsdsr_jax.io.tree import flatten, nest
from tsdsr_jax.models import lora, mmdit
from tsdsr_jax.models.mmdit import (
    MMDiT,
    MMDiTConfig,
    abstract_params,
    dot_product_attention,
    init_params,
    pos_embed_axes,
    timestep_embedding,
)

TOL = 1e-5
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "proj", "linear", "proj_out"]
TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
            pooled_projection_dim=16, out_channels=6, pos_embed_max_size=16)
VARIANTS = {
    "sd3": TINY,
    "sd35": TINY | dict(pos_embed_max_size=24, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
}
SIZES = [(8, 8), (16, 8), (6, 10)]


# --------------------------------------------------------------------------- helpers


def shapes_of(tree) -> dict[str, tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}


def tiny_torch(config: dict, seed: int = 0) -> SD3Transformer2DModel:
    """A tiny diffusers model with every parameter randomised (so zero-inits hide nothing)."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn_like(p))
    return model


def to_tree(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict:
    """torch tensors as our nested tree, checked name by name and shape by shape."""
    pairs = match(expected, {k: tuple(v.shape) for k, v in tensors.items()}, "test")
    return nest({path: jnp.asarray(to_flax(path, tensors[name].detach().numpy()))
                 for path, name in pairs.items()})


def base_params(model: SD3Transformer2DModel, cfg: MMDiTConfig) -> dict:
    sd = {k: v for k, v in model.state_dict().items() if k != "pos_embed.pos_embed"}
    return to_tree(sd, shapes_of(abstract_params(cfg)))


def inputs(cfg: MMDiTConfig, height: int, width: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, height, width, cfg.in_channels), dtype=np.float32)
    t = np.array([1000.0, 37.5], np.float32)
    ctx = rng.standard_normal((2, 5, cfg.joint_attention_dim), dtype=np.float32)
    pooled = rng.standard_normal((2, cfg.pooled_projection_dim), dtype=np.float32)
    return x, t, ctx, pooled


def torch_forward(model: SD3Transformer2DModel, x, t, ctx, pooled) -> np.ndarray:
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x).permute(0, 3, 1, 2),
                    encoder_hidden_states=torch.from_numpy(ctx),
                    pooled_projections=torch.from_numpy(pooled),
                    timestep=torch.from_numpy(t)).sample
    return out.permute(0, 2, 3, 1).numpy()


def flax_forward(cfg: MMDiTConfig, variables: dict, x, t, ctx, pooled) -> np.ndarray:
    return np.asarray(MMDiT(cfg).apply(variables, x, t, ctx, pooled))


# --------------------------------------------------------------------------- tests


def test_config_from_diffusers():
    d = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.31.0",
         **VARIANTS["sd35"], "dual_attention_layers": [0, 1]}
    cfg = MMDiTConfig.from_diffusers(d, attention_impl="xla")
    assert cfg.dual_attention_layers == (0, 1) and cfg.attention_impl == "xla"
    assert MMDiTConfig.from_diffusers(cfg.to_dict()) == cfg
    assert MMDiTConfig.from_diffusers(cfg.to_dict(), dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="layer_norm"):
        MMDiTConfig.from_diffusers(d | {"qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="bogus"):
        MMDiTConfig.from_diffusers(d | {"bogus": 1})


@pytest.mark.parametrize("name", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_full_size_shapes_match_diffusers(name):
    cfg = getattr(MMDiTConfig, name)()
    with torch.device("meta"):
        model = SD3Transformer2DModel(**{k: v for k, v in cfg.to_dict().items()
                                         if k not in ("dtype", "attention_impl", "remat_policy")})
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "pos_embed.pos_embed"}
    expected = shapes_of(abstract_params(cfg))
    match(expected, sd, name)
    if name == "sd3_medium":
        assert sum(int(np.prod(s)) for s in expected.values()) == pytest.approx(2.03e9, rel=0.01)


def test_timestep_embedding():
    from diffusers.models.embeddings import get_timestep_embedding
    t = np.array([0.0, 1.0, 37.5, 500.25, 999.0, 1000.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                 downscale_freq_shift=0).numpy()
    out = np.asarray(timestep_embedding(jnp.asarray(t)))
    # torch's float32 exp is off by an ulp on some frequencies: t * ulp(freq) of phase error
    assert np.all(np.abs(out - ref) <= 1e-6 + t[:, None] * 2.0 ** -22)
    np.testing.assert_allclose(out[:2], ref[:2], rtol=0, atol=1e-6)


def test_pos_embed_table():
    """The two axis tables rebuild diffusers' full (max x max) buffer, and its centred crops."""
    for config in VARIANTS.values():
        cfg = MMDiTConfig(**config)
        model = tiny_torch(config)
        size, d = cfg.pos_embed_max_size, cfg.inner_dim
        x_emb, y_emb = pos_embed_axes(cfg, size, size)
        table = np.concatenate([np.broadcast_to(x_emb[None], (size, size, d // 2)),
                                np.broadcast_to(y_emb[:, None], (size, size, d // 2))], -1)
        np.testing.assert_array_equal(table.reshape(1, -1, d), model.pos_embed.pos_embed.numpy())
        for h, w in [(3, 5), (4, 4), (size, 1)]:
            x_emb, y_emb = pos_embed_axes(cfg, h, w)
            crop = model.pos_embed.cropped_pos_embed(h * cfg.patch_size, w * cfg.patch_size)
            crop = crop.numpy().reshape(h, w, d)
            np.testing.assert_array_equal(crop[0, :, : d // 2], x_emb)
            np.testing.assert_array_equal(crop[:, 0, d // 2:], y_emb)
        with pytest.raises(ValueError, match="exceeds"):
            pos_embed_axes(cfg, size + 1, 1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers(variant):
    cfg = MMDiTConfig(**VARIANTS[variant], attention_impl="xla")
    model = tiny_torch(VARIANTS[variant])
    params = base_params(model, cfg)
    for height, width in SIZES:
        args = inputs(cfg, height, width)
        ref = torch_forward(model, *args)
        out = flax_forward(cfg, {"params": params}, *args)
        assert out.shape == ref.shape == (2, height, width, cfg.out_channels)
        err = rel_err(out, ref)
        print(f"{variant} {height}x{width}: max rel err {err:.2e}")
        assert err <= TOL, (variant, height, width, err)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_precomputed_conditioning_matches_diffusers(variant):
    """One timestep and prompt's Conditioning, computed once, serves a batch: diffusers' output
    with them repeated, from params without the layers it replaces."""
    cfg = MMDiTConfig(**VARIANTS[variant], attention_impl="xla")
    model = tiny_torch(VARIANTS[variant])
    params = base_params(model, cfg)
    x, t, ctx, pooled = inputs(cfg, 6, 10)
    t[:], ctx[1], pooled[1] = 1000.0, ctx[0], pooled[0]
    conditioning = mmdit.condition(cfg, params, t[:1], ctx[:1], pooled[:1])
    network = mmdit.without_conditioning(params)
    dropped = set(flatten(params)) - set(flatten(network))
    assert {p.split(".")[0] for p in dropped} == {"time_text_embed", "context_embedder",
                                                  "transformer_blocks", "norm_out"}
    assert all(".norm1" in p for p in dropped if p.startswith("transformer_blocks"))
    out = MMDiT(cfg).apply({"params": network}, x, conditioning=conditioning)
    err = rel_err(np.asarray(out), torch_forward(model, x, t, ctx, pooled))
    assert err <= TOL, err


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_matches_peft(variant):
    from peft import LoraConfig, get_peft_model_state_dict
    cfg = MMDiTConfig(**VARIANTS[variant], attention_impl="xla")
    model = tiny_torch(VARIANTS[variant])
    params = base_params(model, cfg)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    expected = {}
    for path, (shape_a, shape_b) in lora.adapter_shapes(params, LORA_TARGETS, 4).items():
        expected |= {f"{path}.lora_A": shape_a, f"{path}.lora_B": shape_b}
    assert "pos_embed.proj.lora_A" in expected and "norm_out.linear.lora_B" in expected
    adapter = to_tree(get_peft_model_state_dict(model), expected)

    args = inputs(cfg, 16, 8)
    ref = torch_forward(model, *args)
    errors = {
        "adapter": rel_err(flax_forward(cfg, {"params": params, "lora": adapter}, *args), ref),
        "merged": rel_err(flax_forward(cfg, {"params": lora.merge(params, adapter)}, *args), ref),
    }
    base_change = rel_err(flax_forward(cfg, {"params": params}, *args), ref)
    print(f"{variant} lora: max rel err {errors}, base vs adapted {base_change:.2e}")
    assert base_change > 1e-2  # the adapter matters
    assert max(errors.values()) <= TOL, errors


def test_bf16_close_to_fp32():
    cfg = MMDiTConfig(**VARIANTS["sd35"], attention_impl="xla")
    params = base_params(tiny_torch(VARIANTS["sd35"]), cfg)
    args = inputs(cfg, 8, 8)
    ref = flax_forward(cfg, {"params": params}, *args)
    bf16 = MMDiTConfig(**VARIANTS["sd35"], dtype=jnp.bfloat16)
    out = flax_forward(bf16, {"params": params}, *args)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(np.float32), ref) < 5e-2


def test_remat_changes_nothing_but_memory():
    """A rematerialised MMDiT gives the same outputs and gradients as the plain one."""
    cfg = MMDiTConfig(**VARIANTS["sd3"], attention_impl="xla")
    params = init_params(jax.random.key(0), cfg)
    x, t, c, p = (jax.random.normal(jax.random.key(1), (1, 8, 8, cfg.in_channels)),
                  jnp.array([500.0]),
                  jax.random.normal(jax.random.key(2), (1, 5, cfg.joint_attention_dim)),
                  jax.random.normal(jax.random.key(3), (1, cfg.pooled_projection_dim)))

    def loss(params, config):
        return jnp.sum(MMDiT(config).apply({"params": params}, x, t, c, p) ** 2)

    plain = jax.grad(loss)(params, cfg)
    for policy in ("full", "dots"):
        remat = jax.grad(loss)(params, dataclasses.replace(cfg, remat_policy=policy))
        for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_padded_attention_matches_torch():
    """The padded attention that cuDNN training gets (SD3's 1357 joint tokens at 512², padded to
    a multiple of 128 and masked by length) equals torch's SDPA, forward and gradients."""
    b, length, heads, dim = 2, 1357, 2, 16
    rng = np.random.default_rng(0)
    q, k, v, cot = (rng.standard_normal((b, length, heads, dim), dtype=np.float32)
                    for _ in range(4))

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, "xla", mmdit.CUDNN_SEQ_MULTIPLE)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    tq, tk, tv = (torch.tensor(a).transpose(1, 2).requires_grad_() for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    ref.backward(torch.tensor(cot).transpose(1, 2))
    assert rel_err(np.asarray(out), ref.transpose(1, 2).detach().numpy()) <= 1e-6
    for name, g, t in zip("qkv", grads, (tq, tk, tv)):
        err = rel_err(np.asarray(g), t.grad.transpose(1, 2).numpy())
        assert err <= TOL, (name, err)  # 1.4e-6 for q with jax 0.10.2 on this CPU


def test_cudnn_padding_matches_diffusers(monkeypatch):
    """The MMDiT with its joint sequence padded as under cuDNN (here to 64 tokens, XLA's kernel
    on the CPU) still equals diffusers."""
    monkeypatch.setattr(mmdit, "dot_product_attention",
                        lambda q, k, v, impl: dot_product_attention(q, k, v, "xla", 64))
    cfg = MMDiTConfig(**VARIANTS["sd3"], attention_impl="xla")
    model = tiny_torch(VARIANTS["sd3"])
    args = inputs(cfg, 6, 10)  # 15 image + 5 text tokens, padded to 64
    err = rel_err(flax_forward(cfg, {"params": base_params(model, cfg)}, *args),
                  torch_forward(model, *args))
    assert err <= TOL, err


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padded_batch_matches_diffusers_per_image(variant):
    """Latents of two sizes padded to one grid (garbage beyond them) and placed by their
    PatchLayout give, inside their sizes, diffusers' output for each latent alone."""
    cfg = MMDiTConfig(**VARIANTS[variant], attention_impl="xla")
    model = tiny_torch(VARIANTS[variant])
    params = base_params(model, cfg)
    sizes, grid = [(8, 8), (6, 10)], (10, 12)
    x, t, ctx, pooled = inputs(cfg, *grid)
    x = x * 9  # the padding: garbage
    alone = []
    for b, (h, w) in enumerate(sizes):
        own = np.random.default_rng(b).standard_normal((1, h, w, cfg.in_channels), np.float32)
        x[b, :h, :w] = own[0]
        alone.append(torch_forward(model, own, t[b:b + 1], ctx[b:b + 1], pooled[b:b + 1])[0])
    layout = mmdit.patch_layout(cfg, grid, sizes)
    out = jax.jit(MMDiT(cfg).apply)({"params": params}, x, t, ctx, pooled, layout=layout)
    for b, (h, w) in enumerate(sizes):
        err = rel_err(np.asarray(out[b, :h, :w]), alone[b])
        assert err <= TOL, (b, err)


def test_patch_layout_rejects_what_does_not_fit():
    cfg = MMDiTConfig(**TINY)
    with pytest.raises(ValueError, match="whole patches"):
        mmdit.patch_layout(cfg, (8, 8), [(8, 10)])
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        mmdit.patch_layout(cfg, (40, 8), [(34, 8)])
