"""The teacher stage against diffusers: the SD3 LoRA training recipe (timestep density, noising,
preconditioning, loss weighting) with a peft adapter, and the Euler sampler against
``FlowMatchEulerDiscreteScheduler`` driving the same tiny transformer under CFG."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from conftest import convert_release, peft_grads, rel_err
from tsdsr_jax.diffusion import sampling, schedule
from tsdsr_jax.diffusion.denoiser import Networks, Prompts
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.tree import flatten
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.vae import AutoencoderKL
from tsdsr_jax.training import flow_matching

B, LATENT = 3, (8, 8, 4)


@pytest.fixture(scope="module")
def setup(release, tmp_path_factory):
    model = model_dir.load(convert_release(release, tmp_path_factory.mktemp("teacher") / "model",
                                           "teacher", "null"))
    nets = Networks(MMDiT(dataclasses.replace(model.transformer_config, attention_impl="xla")),
                        AutoencoderKL(model.vae_config))
    yield model, nets
    release.transformer.enable_adapters()
    release.transformer.set_adapter("default")


def inputs(release, seed):
    rng = np.random.default_rng(seed)
    dim, pooled = release.prompt_embeds.shape[-1], release.pooled_prompt_embeds.shape[-1]
    null = torch.load(release.null_embeddings / "prompt_embeds.pt", weights_only=True)
    null_pooled = torch.load(release.null_embeddings / "pool_embeds.pt", weights_only=True)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"latents": f32(B, *LATENT), "noise": f32(B, *LATENT), "embeds": f32(B, 7, dim),
            "pooled": f32(B, pooled), "null_embeds": np.repeat(null.numpy(), B, 0),
            "null_pooled": np.repeat(null_pooled.numpy(), B, 0)}


def density_draw(scheme: str, seed: int) -> torch.Tensor:
    """The raw draw that ``compute_density_for_timestep_sampling`` makes from this seed."""
    g = torch.Generator().manual_seed(seed)
    if scheme == "logit_normal":
        return torch.normal(mean=0.3, std=1.2, size=(B,), generator=g)
    return torch.rand(size=(B,), generator=g)


@pytest.mark.parametrize("scheme", flow_matching.WEIGHTING_SCHEMES)
def test_density_and_weighting_equal_diffusers(scheme):
    want = compute_density_for_timestep_sampling(scheme, B, logit_mean=0.3, logit_std=1.2,
                                                 mode_scale=1.29,
                                                 generator=torch.Generator().manual_seed(5))
    got = schedule.timestep_density(jnp.asarray(density_draw(scheme, 5).numpy()), scheme, 1.29)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    sigmas = torch.tensor([0.003, 0.2, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(schedule.loss_weighting(jnp.asarray(sigmas.numpy()), scheme),
                               compute_loss_weighting_for_sd3(scheme, sigmas).numpy(), rtol=1e-6)


def diffusers_recipe(tr, x, u, drop, precondition: bool, scheme: str):
    """The SD3 LoRA example's loss on the active adapter (its noising and reduction), with
    captions where ``drop`` is set replaced by the null prompt; returns the loss."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    nchw = lambda a: a.permute(0, 3, 1, 2).contiguous()  # noqa: E731
    model_input, noise = nchw(t["latents"]), nchw(t["noise"])
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == s).nonzero().item() for s in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    d = torch.from_numpy(drop)
    embeds = torch.where(d.view(-1, 1, 1), t["null_embeds"], t["embeds"])
    pooled = torch.where(d.view(-1, 1), t["null_pooled"], t["pooled"])
    pred = tr(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
              pooled_projections=pooled).sample
    if precondition:
        pred, target = pred * (-sigmas) + noisy, model_input
    else:
        target = noise - model_input
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2)
                      .reshape(target.shape[0], -1), 1).mean()


@pytest.mark.parametrize("scheme,precondition", [("logit_normal", True), ("logit_normal", False),
                                                 ("mode", True), ("sigma_sqrt", True),
                                                 ("cosmap", False)])
def test_loss_and_gradients_equal_diffusers_recipe(release, setup, scheme, precondition):
    model, nets = setup
    config = flow_matching.FlowMatchingConfig(weighting_scheme=scheme, logit_mean=0.3,
                                              logit_std=1.2, precondition_outputs=precondition)
    x = inputs(release, 1)
    drop = np.array([False, True, False])
    u = compute_density_for_timestep_sampling(scheme, B, logit_mean=0.3, logit_std=1.2,
                                              mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(7))
    tr = release.transformer
    tr.enable_adapters()
    tr.set_adapter("teacher")
    tr.zero_grad()
    want = diffusers_recipe(tr, x, u, drop, precondition, scheme)
    want.backward()
    want_grads = peft_grads(tr, "teacher")

    noise = flow_matching.FlowNoise(jnp.asarray(density_draw(scheme, 7).numpy()),
                              jnp.asarray(x["noise"]), jnp.asarray(drop))
    prompts = Prompts(jnp.asarray(x["embeds"]), jnp.asarray(x["pooled"]))
    null = Prompts(jnp.asarray(x["null_embeds"]), jnp.asarray(x["null_pooled"]))
    (loss, _), grads = jax.value_and_grad(flow_matching.flow_matching_loss, has_aux=True)(
        model.adapters["teacher"], nets, model.params["transformer"], jnp.asarray(x["latents"]),
        prompts, null, noise, config)
    assert rel_err(loss, want.item()) <= 1e-5
    grads = flatten(grads)
    assert set(grads) == set(want_grads)
    worst = max(rel_err(grads[p], g) for p, g in want_grads.items())
    assert worst <= 1e-4
    print(f"{scheme} precondition={precondition}: loss {rel_err(loss, want.item()):.1e}, "
          f"worst LoRA gradient {worst:.1e}")


def test_caption_dropout_rate():
    config = flow_matching.FlowMatchingConfig(caption_dropout=0.25)
    drops = jax.vmap(lambda k: flow_matching.sample_noise(k, (4, 2, 2, 1), config).drop)(
        jax.random.split(jax.random.key(0), 2000))
    assert abs(float(jnp.mean(drops)) - 0.25) < 0.02
    assert not jnp.any(flow_matching.sample_noise(jax.random.key(1), (64, 2, 2, 1),
                                            flow_matching.FlowMatchingConfig(
                                                caption_dropout=0)).drop)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sampler_sigmas_equal_scheduler(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    np.testing.assert_array_equal(sampling.sampler_sigmas(steps), scheduler.sigmas.numpy())


@pytest.mark.parametrize("strength,guidance", [(1.0, 4.0), (0.5, 4.0), (1.0, 1.0)])
def test_sampler_equals_scheduler_loop(release, setup, strength, guidance):
    """Generation (strength 1) and image-to-image denoising as SD3's pipelines run them."""
    model, nets = setup
    steps = 4
    x = inputs(release, 2)
    tr = release.transformer
    tr.enable_adapters()
    tr.set_adapter("teacher")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(steps)
    t_start = int(max(steps - min(steps * strength, steps), 0))
    timesteps = scheduler.timesteps[t_start:]
    scheduler.set_begin_index(t_start)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    latents = scheduler.scale_noise(nchw(x["latents"]), timesteps[:1], nchw(x["noise"]))
    embeds = torch.cat([torch.from_numpy(x["null_embeds"]), torch.from_numpy(x["embeds"])])
    pooled = torch.cat([torch.from_numpy(x["null_pooled"]), torch.from_numpy(x["pooled"])])
    with torch.no_grad():
        for t in timesteps:
            if guidance > 1:
                v = tr(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * B),
                       encoder_hidden_states=embeds, pooled_projections=pooled).sample
                v_null, v_cond = v.chunk(2)
                v = v_null + guidance * (v_cond - v_null)
            else:
                v = tr(hidden_states=latents, timestep=t.expand(B),
                       encoder_hidden_states=embeds[B:], pooled_projections=pooled[B:]).sample
            latents = scheduler.step(v, t, latents).prev_sample
    want = latents.permute(0, 2, 3, 1).numpy()

    prompts = Prompts(jnp.asarray(x["embeds"]), jnp.asarray(x["pooled"]))
    null = Prompts(jnp.asarray(x["null_embeds"]), jnp.asarray(x["null_pooled"]))
    got = sampling.denoise(nets, model.params["transformer"], model.adapters["teacher"],
                          jnp.asarray(x["latents"]), jnp.asarray(x["noise"]), steps, strength,
                          prompts, null, guidance)
    assert rel_err(got, want) <= 1e-5
