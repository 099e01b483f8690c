"""The TSD training objective against the official algorithm in PyTorch (diffusers + peft).

The reference below follows the official `train/train.py` step on tiny diffusers
models with peft adapters: student ("default" on the transformer and the VAE encoder), teacher
("teacher") and fake score ("reg") on one transformer, LPIPS-alex with a random backbone. It
uses each sample's own DASM indices (the official code uses the first sample's for all). Both sides get the same noise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import lpips as lpips_package
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from peft import get_peft_model_state_dict

from conftest import add_lora, convert_release, peft_grads, rel_err
from tsdsr_jax.conversion.torch_layout import to_flax, torch_name
from tsdsr_jax.diffusion.denoiser import Networks, Prompts, StudentAdapters
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.tree import flatten, nest
from tsdsr_jax.models import lpips as jax_lpips
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.vae import AutoencoderKL
from tsdsr_jax.training import tsd

FAKE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
B, SIDE = 2, 64  # two 64² images: 8² latents of the tiny VAE


# ------------------------------------------------------------------ the official step, in torch


def official_step(release, lpips_net, inputs, noise, config: tsd.TSDConfig):
    """One official training step's losses and LoRA gradients (fp32, per-sample indices)."""
    tr, vae = release.transformer, release.vae
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigmas_table, timesteps_table = scheduler.sigmas, scheduler.timesteps
    s = vae.config.scaling_factor
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    n = {k: torch.tensor(np.asarray(v)) for k, v in noise._asdict().items()}
    nchw = lambda x: x.permute(0, 3, 1, 2).contiguous()  # noqa: E731
    for model in (tr, vae):
        model.zero_grad()

    def run(adapter, x, timestep, embeds, pooled):
        if adapter is None:
            tr.disable_adapters()
        else:
            tr.enable_adapters()
            tr.set_adapter(adapter)
        return tr(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                  pooled_projections=pooled).sample

    def cfg(adapter, x, timestep):
        v = run(adapter, torch.cat([x, x]), torch.cat([timestep, timestep]),
                torch.cat([t["null_embeds"], t["prompt_embeds"]]),
                torch.cat([t["null_pooled"], t["pooled_prompt_embeds"]]))
        v_null, v_cond = v.chunk(2)
        return v_null + config.guidance_scale * (v_cond - v_null)

    # 1. the student
    vae.enable_adapters()
    posterior = vae.encode(nchw(t["lr"])).latent_dist
    z_l = (posterior.mean + posterior.std * nchw(n["posterior"])) * s
    v = run("default", z_l, torch.full((B,), 1000.0), t["default_embeds"], t["default_pooled"])
    z_hat = v * -1.0 + z_l
    z_hr = nchw(t["latent_hr"])
    # 2-3. DASM under CFG, per-sample indices
    indices = torch.stack([
        torch.linspace(int(i), min(int(i) + config.dasm_step_size * config.dasm_steps
                                   + int(n["bias"]), 999), config.dasm_steps + 1).long()
        for i in n["teacher_index"]])
    sig = lambda k: sigmas_table[indices[:, k]].view(B, 1, 1, 1)  # noqa: E731
    eps = nchw(n["teacher_noise"])
    with torch.no_grad():
        x_hat = sig(0) * eps + (1 - sig(0)) * z_hat
        x = sig(0) * eps + (1 - sig(0)) * z_hr
        grad_vsd = grad_tsm = 0.0
        for k in range(config.dasm_steps):
            ts = timesteps_table[indices[:, k]]
            v_tea_hat, v_tea = cfg("teacher", x_hat, ts), cfg("teacher", x, ts)
            v_fake = cfg("reg", x_hat, ts)
            w = config.dasm_weights[k]
            grad_vsd = torch.nan_to_num(grad_vsd + (v_tea_hat - v_fake) * sig(k) ** 2 * w)
            grad_tsm = torch.nan_to_num(grad_tsm + (v_tea_hat - v_tea) * sig(k) ** 2 * w)
            if k + 1 < config.dasm_steps:
                x_hat = x_hat - (sig(k) - sig(k + 1)) * v_fake
                x = x - (sig(k) - sig(k + 1)) * v_tea
        grad = config.lambda_vsd * grad_vsd + (1 - config.lambda_vsd) * grad_tsm
        target = (z_hat - grad).detach()
    # (the official code holds two transformer copies; on our one, peft only accumulates
    # gradients into the active adapter, so make the student's active again)
    tr.enable_adapters()
    tr.set_adapter("default")
    tsd_loss = 0.5 * F.mse_loss(z_hat, target)
    # 5. the data loss through the frozen decoder
    vae.disable_adapters()
    image = vae.decode(z_hat / s).sample.clamp(-1, 1) * 0.5 + 0.5
    vae.enable_adapters()
    lpips_loss = lpips_net(image, nchw(t["hr"]) * 0.5 + 0.5, normalize=True).mean()
    mse = F.mse_loss(z_hat, z_hr)
    (lpips_loss + mse + tsd_loss).backward()
    # 6. the fake score on the same (detached) student latents
    sigma = sigmas_table[n["fake_index"]].view(B, 1, 1, 1)
    noisy = (sigma * nchw(n["fake_noise"]) + (1 - sigma) * z_hat).detach()
    pred = run("reg", noisy, timesteps_table[n["fake_index"]], t["prompt_embeds"],
               t["pooled_prompt_embeds"]) * -sigma + noisy
    weighting = torch.sigmoid(n["u"])
    reg = torch.nan_to_num(0.5 * weighting.view(-1, 1, 1, 1)
                           * F.mse_loss(pred, z_hat.detach())).mean()
    reg.backward()
    grads = {"transformer": peft_grads(tr, "default"), "vae": peft_grads(vae, "default"),
             "fake": peft_grads(tr, "reg")}
    tr.enable_adapters()
    tr.set_adapter("default")
    nhwc = lambda x: x.detach().permute(0, 2, 3, 1).numpy()  # noqa: E731
    return {"grad_vsd": nhwc(grad_vsd), "grad_tsm": nhwc(grad_tsm), "tsd_loss": tsd_loss.item(),
            "lpips_loss": lpips_loss.item(), "mse_loss": mse.item(), "reg_loss": reg.item(),
            "z_hat": nhwc(z_hat)}, grads


# ------------------------------------------------------------------ ours


def peft_tree(state_dict) -> dict:
    """A peft adapter state dict (``…lora_A.weight``) as our adapter tree."""
    flat = {}
    for key, value in state_dict.items():
        path = key.removesuffix(".weight")
        flat[path] = jnp.asarray(to_flax(path, value.detach().numpy()))
    return nest(flat)


def lpips_params(net) -> dict:
    """The lpips package's LPIPS-alex weights as our tree (backbone slices -> `features`)."""
    import re
    expected = flatten(jax_lpips.abstract_params("alex"))
    state = {re.sub(r"^net\.slice\d+\.", "features.", k): v.numpy()
             for k, v in net.state_dict().items() if not k.startswith("scaling_layer")}
    return nest({p: jnp.asarray(to_flax(p, state[torch_name(p)])) for p in expected})


@pytest.fixture(scope="module")
def setup(release, tmp_path_factory):
    model = model_dir.load(convert_release(release, tmp_path_factory.mktemp("tsd") / "model",
                                           "lora", "teacher"))
    if "reg" not in release.transformer.peft_config:
        add_lora(release.transformer, FAKE_TARGETS, 4, "reg", 4)
    release.transformer.set_adapter("default")
    fake = peft_tree(get_peft_model_state_dict(release.transformer, adapter_name="reg"))
    torch.manual_seed(0)
    lpips_net = lpips_package.LPIPS(net="alex", pnet_rand=True, version="0.1", verbose=False)
    for p in lpips_net.parameters():
        p.requires_grad_(False)
    adapters = tsd.Adapters(StudentAdapters(model.adapters["student"], model.adapters["student_vae"]),
                            model.adapters["teacher"], fake)
    nets = Networks(MMDiT(dataclasses.replace(model.transformer_config, attention_impl="xla")),
                        AutoencoderKL(model.vae_config))
    return model, nets, adapters, lpips_net, lpips_params(lpips_net)


def make_inputs(release, seed=0):
    rng = np.random.default_rng(seed)
    dim, pooled = release.prompt_embeds.shape[-1], release.pooled_prompt_embeds.shape[-1]
    null = torch.load(release.null_embeddings / "prompt_embeds.pt", weights_only=True)[0].numpy()
    null_pooled = torch.load(release.null_embeddings / "pool_embeds.pt",
                             weights_only=True)[0].numpy()
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    image = lambda: rng.uniform(-1, 1, (B, SIDE, SIDE, 3)).astype(np.float32)  # noqa: E731
    return {"lr": image(), "hr": image(), "latent_hr": f32(B, 8, 8, 4),
            "prompt_embeds": f32(B, 7, dim), "pooled_prompt_embeds": f32(B, pooled),
            "default_embeds": np.repeat(release.prompt_embeds.numpy(), B, 0),
            "default_pooled": np.repeat(release.pooled_prompt_embeds.numpy(), B, 0),
            "null_embeds": np.repeat(null[None], B, 0),
            "null_pooled": np.repeat(null_pooled[None], B, 0)}


@pytest.mark.parametrize("dasm_steps", [1, 4])
def test_training_step_equals_official(release, setup, dasm_steps):
    model, nets, adapters, lpips_net, lpips_tree = setup
    config = tsd.TSDConfig(dasm_steps=dasm_steps)
    inputs = make_inputs(release)
    noise = tsd.sample_noise(jax.random.key(dasm_steps), (B, 8, 8, 4), config)
    noise = noise._replace(teacher_index=jnp.asarray([120, 803]), bias=jnp.asarray(-7))
    want, torch_grads = official_step(release, lpips_net, inputs, noise, config)

    batch = {k: jnp.asarray(inputs[k]) for k in
             ("lr", "hr", "latent_hr", "prompt_embeds", "pooled_prompt_embeds")}
    default = Prompts(jnp.asarray(inputs["default_embeds"][0]),
                      jnp.asarray(inputs["default_pooled"][0]))
    null = Prompts(jnp.asarray(inputs["null_embeds"]), jnp.asarray(inputs["null_pooled"]))
    lpips_fn = lambda x, y: jax_lpips.lpips(lpips_tree, x, y)  # noqa: E731
    (loss, parts), grads = jax.value_and_grad(tsd.student_loss, has_aux=True)(
        adapters.student, nets, model.params, adapters, batch, noise,
        default, null, lpips_fn, config)
    reg_loss, fake_grads = jax.value_and_grad(tsd.fake_score_loss)(
        adapters.fake_score, nets, model.params, parts["z_hat"], batch, noise, config)

    assert rel_err(parts["z_hat"], want["z_hat"]) <= 1e-4
    for key in ("grad_vsd", "grad_tsm"):
        assert rel_err(parts[key], want[key]) <= 1e-4, key
    for key in ("tsd_loss", "lpips_loss", "mse_loss"):
        assert rel_err(parts[key], want[key]) <= 1e-4, key
    assert rel_err(reg_loss, want["reg_loss"]) <= 1e-4
    ours = {"transformer": flatten(grads[0]), "vae": flatten(grads[1]),
            "fake": flatten(fake_grads)}
    worst = 0.0
    for net, want_grads in torch_grads.items():  # (the teacher gets no gradient)
        assert set(ours[net]) == set(want_grads), net
        for path, g in want_grads.items():
            err = rel_err(ours[net][path], g)
            assert err <= 1e-4, f"{net}:{path}"
            worst = max(worst, err)
    print(f"N={dasm_steps}: worst LoRA-gradient relative error {worst:.2e}; grad_vsd "
          f"{rel_err(parts['grad_vsd'], want['grad_vsd']):.2e}, L_tsd "
          f"{rel_err(parts['tsd_loss'], want['tsd_loss']):.2e}, L_reg "
          f"{rel_err(reg_loss, want['reg_loss']):.2e}")
