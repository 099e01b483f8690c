"""Run by tests/test_sharding.py in a process with 8 CPU devices: the TSD train step on the tiny
model, on one device and under several meshes, a checkpoint moved between meshes, and the
inference pipeline with its batch split over a mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_steps.py OUT.json CKPT

Writes the largest relative differences (losses, LoRA weights) to OUT.json.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax import sharding
from tsdsr_jax.diffusion.denoiser import Networks, Prompts
from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline
from tsdsr_jax.io import model_dir
from tsdsr_jax.models import lora
from tsdsr_jax.models import lpips as lpips_model
from tsdsr_jax.models.mmdit import MMDiT
from tsdsr_jax.models.targets import STUDENT_TARGETS, vae_encoder_targets
from tsdsr_jax.models.vae import AutoencoderKL
from tsdsr_jax.training import optim, steps, tsd
from tsdsr_jax.training.checkpoint import Checkpoints

jax.config.update("jax_default_matmul_precision", "highest")
B, SIDE, STEPS = 8, 32, 2
MESHES = ((8, 1), (4, 2), (1, 8))


def setup():
    model = model_dir.tiny()
    nets = Networks(MMDiT(model.transformer_config), AutoencoderKL(model.vae_config))
    emb = model.embeddings["default"]
    prompts = Prompts(emb["prompt_embeds"], emb["pooled_prompt_embeds"])
    null = Prompts(jnp.zeros_like(prompts.embeds), jnp.zeros_like(prompts.pooled))
    frozen = steps.Frozen(model.params, None, prompts, null,
                            lpips_model.init_params(jax.random.key(1), "alex"))
    opt = optim.optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=100))
    k = jax.random.split(jax.random.PRNGKey(2), 3)  # raw keys, as train.py
    student = (lora.init_adapter(k[0], model.params["transformer"], STUDENT_TARGETS, 4),
               lora.init_adapter(k[1], model.params["vae"], vae_encoder_targets(model.params["vae"]),
                                 4))
    state = steps.init_state(k[2], model.params, student, 4, opt, opt)
    rng = np.random.default_rng(0)
    latent = SIDE // 8
    batches = [{"lr": rng.uniform(-1, 1, (B, SIDE, SIDE, 3)).astype(np.float32),
                "hr": rng.uniform(-1, 1, (B, SIDE, SIDE, 3)).astype(np.float32),
                "latent_hr": rng.standard_normal((B, latent, latent, 16)).astype(np.float32),
                "prompt_embeds": rng.standard_normal((B, 8, 32)).astype(np.float32),
                "pooled_prompt_embeds": rng.standard_normal((B, 32)).astype(np.float32)}
               for _ in range(STEPS)]
    config = tsd.TSDConfig(dasm_steps=1)
    step = lambda s, f, b: steps.train_step(s, f, b, nets, config, opt, opt)  # noqa: E731
    return jax.device_get(state), jax.device_get(frozen), batches, step


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def weight_errors(got, want) -> dict[str, float]:
    """The LoRA weights' largest difference over their largest magnitude, all adapters as one
    array ("all") and tensor by tensor ("worst tensor")."""
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    diff = max(float(np.abs(np.asarray(g, np.float64) - w).max()) for g, w in zip(got, want))
    return {"all": diff / max(float(np.abs(w).max()) for w in want),
            "worst tensor": max(rel(g, w) for g, w in zip(got, want))}


def sharded(mesh_shape, state, frozen):
    config = sharding.ShardingConfig(*mesh_shape, adapters="fsdp", min_shard_size=0)
    mesh = sharding.make_mesh(config)
    state_sh = sharding.shardings(state, mesh, True, 0)
    frozen_sh = sharding.shardings(frozen, mesh, True, 0)
    return mesh, state_sh, frozen_sh


def inference() -> dict[str, float]:
    """The pipeline's network (uint8 out) on a batch of 8 over a 4x2 mesh against one device:
    the largest difference in levels, and the fraction of values that differ."""
    config = InferenceConfig(process_size=128, vae_posterior="mean", precision="fp32")
    images = np.random.default_rng(3).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    mesh = sharding.make_mesh(sharding.ShardingConfig(4, 2))
    key = jax.random.key(0)
    single = Pipeline(model_dir.tiny(), config)
    want = np.asarray(single.network(*single.inputs(list(images), range(8), key))[0], np.int32)
    pipe = Pipeline(model_dir.tiny(), config, mesh)
    with sharding.activate(mesh):
        got = np.asarray(pipe.network(*pipe.inputs(list(images), range(8), key))[0], np.int32)
    return {"max": int(np.abs(got - want).max()), "differ": float(np.mean(got != want))}


def main(out: str, checkpoint_dir: str) -> None:
    state0, frozen0, batches, step = setup()
    # one device
    state, frozen = jax.device_put((state0, frozen0), jax.devices()[0])
    single = jax.jit(step)
    losses = []
    for batch in batches:
        state, metrics = single(state, frozen, batch)
        losses.append({k: float(metrics[k]) for k in ("loss", "reg_loss", "tsd_loss")})
    want = jax.device_get(state)

    results = {}
    for shape in MESHES:
        mesh, state_sh, frozen_sh = sharded(shape, state0, frozen0)
        state = sharding.put(state0, state_sh)
        frozen = sharding.put(frozen0, frozen_sh)
        fn = jax.jit(step, in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
        got = []
        with sharding.activate(mesh):
            for batch in batches:
                state, metrics = fn(state, frozen, sharding.global_batch(batch, mesh))
                got.append({k: float(metrics[k]) for k in ("loss", "reg_loss", "tsd_loss")})
        split = [leaf for leaf in jax.tree_util.tree_leaves(frozen)
                 if not leaf.sharding.is_fully_replicated]
        results[f"{shape[0]}x{shape[1]}"] = {
            "loss": max(rel(g[k], w[k]) for g, w in zip(got, losses) for k in w),
            "weights": weight_errors(jax.device_get((state.student, state.fake_score)),
                                     (want.student, want.fake_score)),
            "split_frozen_arrays": len(split)}
        if shape == (4, 2):
            checkpoints = Checkpoints(checkpoint_dir)
            checkpoints.save(STEPS, state, {"position": 7})
            checkpoints.close()
    # restore the 4x2 checkpoint onto the 1x8 mesh
    _, state_sh, _ = sharded((1, 8), state0, frozen0)
    like = sharding.put(state0, state_sh)
    checkpoints = Checkpoints(checkpoint_dir)
    restored, data = checkpoints.restore(like)
    checkpoints.close()
    results["restored"] = {
        "weights": weight_errors(jax.device_get((restored.student, restored.fake_score)),
                                 (want.student, want.fake_score)),
        "same_shardings": all(a.sharding == b for a, b in zip(
            jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state_sh))),
        "data": data}
    results["inference"] = inference()
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    assert jax.device_count() == 8, "run with --xla_force_host_platform_device_count=8"
    main(sys.argv[1], sys.argv[2])
