"""The optimiser and schedules against torch/diffusers; the train step on a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

from tsdsr_jax.diffusion.denoiser import Networks, Prompts, StudentAdapters
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.tree import flatten
from tsdsr_jax.models import lora
from tsdsr_jax.models import lpips as jax_lpips
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.targets import STUDENT_TARGETS, vae_encoder_targets
from tsdsr_jax.models.vae import AutoencoderKL
from tsdsr_jax.training import optim, steps, tsd


@pytest.mark.parametrize("name,cycles", [("constant_with_warmup", 0.5), ("cosine", 0.5),
                                         ("cosine_with_restarts", 3)])
def test_schedules_equal_diffusers(name, cycles):
    config = optim.OptimConfig(learning_rate=5e-6, warmup_steps=30, total_steps=200,
                                 schedule=name, num_cycles=cycles)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-6)
    kwargs = {} if name == "constant_with_warmup" else {"num_training_steps": 200}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = cycles
    ref = get_scheduler(name, opt, num_warmup_steps=30, **kwargs)
    want = []
    for _ in range(220):
        want.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    got = [float(optim.lr_schedule(config)(s)) for s in range(220)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_adamw_with_clipping_equals_torch():
    """Three AdamW steps with global-norm clipping over two tensors, as torch does them."""
    rng = np.random.default_rng(0)
    params = {"a": rng.standard_normal((4, 3)).astype(np.float32),
              "b": rng.standard_normal((5,)).astype(np.float32)}
    grads = [{k: (rng.standard_normal(v.shape) * 3).astype(np.float32) for k, v in params.items()}
             for _ in range(3)]
    config = optim.OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10)
    opt = optim.optimizer(config)
    ours, state = jax.tree_util.tree_map(jnp.asarray, params), None
    state = opt.init(ours)
    torch_params = [torch.tensor(params[k], requires_grad=True) for k in ("a", "b")]
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=1e-4)
    sched = get_scheduler("cosine", torch_opt, num_warmup_steps=2, num_training_steps=10)
    for g in grads:
        updates, state = opt.update(jax.tree_util.tree_map(jnp.asarray, g), state, ours)
        ours = jax.tree_util.tree_map(lambda p, u: p + u, ours, updates)
        for p, k in zip(torch_params, ("a", "b")):
            p.grad = torch.tensor(g[k])
        torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
        torch_opt.step()
        sched.step()
    for p, k in zip(torch_params, ("a", "b")):
        np.testing.assert_allclose(ours[k], p.detach().numpy(), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_setup():
    model = model_dir.tiny()
    nets = Networks(MMDiT(model.transformer_config), AutoencoderKL(model.vae_config))
    base = model.params
    k = jax.random.split(jax.random.key(1), 3)
    student = StudentAdapters(
        lora.init_adapter(k[0], base["transformer"], STUDENT_TARGETS, 4),
        lora.init_adapter(k[1], base["vae"], vae_encoder_targets(base["vae"]), 4))
    emb = model.embeddings["default"]
    prompts = Prompts(emb["prompt_embeds"], emb["pooled_prompt_embeds"])
    frozen = steps.Frozen(base, None, prompts, prompts, jax_lpips.init_params(k[2], "alex"))
    opt = optim.optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=0,
                                       total_steps=10))
    state = steps.init_state(jax.random.key(2), base, student, 4, opt, opt)
    config = tsd.TSDConfig(dasm_steps=2)
    step = jax.jit(lambda s, f, b: steps.train_step(s, f, b, nets, config, opt, opt))
    rng = np.random.default_rng(0)
    batch = {"lr": rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32),
             "hr": rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32),
             "prompt_embeds": np.asarray(emb["prompt_embeds"])[None],
             "pooled_prompt_embeds": np.asarray(emb["pooled_prompt_embeds"])[None]}
    return state, frozen, step, batch


def test_train_step_updates_adapters(tiny_setup):
    state, frozen, step, batch = tiny_setup
    new, metrics = step(state, frozen, batch)
    assert int(new.step) == 1 and np.all(np.asarray(new.skipped) == 0)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    before = flatten(state.student._asdict())
    after = flatten(new.student._asdict())
    still = sorted(k for k in before if np.array_equal(before[k], after[k]))
    # B starts at zero and moves with its gradient; A moves by weight decay. Only the last
    # block's text-query projection, whose output SD3 discards, gets no gradient.
    assert still == ["transformer.transformer_blocks.1.attn.add_q_proj.lora_B"], still
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(state.fake_score), jax.tree_util.tree_leaves(new.fake_score)))


def test_non_finite_step_is_skipped_and_counted(tiny_setup):
    state, frozen, step, batch = tiny_setup
    # a NaN LR poisons both losses; a NaN HR only the student's (the fake score never reads it);
    # both reach the DASM values, which are zeroed (as the official code does) and counted
    for field, skipped in (("lr", [1, 1, 1]), ("hr", [1, 0, 1])):
        bad = {**batch, field: np.full_like(batch[field], np.nan)}
        new, _ = step(state, frozen, bad)
        assert np.asarray(new.skipped).tolist() == skipped, field
        for a, b in zip(jax.tree_util.tree_leaves((state.student, state.opt_student)),
                        jax.tree_util.tree_leaves((new.student, new.opt_student))):
            np.testing.assert_array_equal(a, b)
        fake_same = all(np.array_equal(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(state.fake_score), jax.tree_util.tree_leaves(new.fake_score)))
        assert fake_same == (skipped[1] == 1), field
