"""The project's GPU programs from shapes alone: the inference network and the training steps,
built exactly as infer.py and train.py build them, over abstract weights (nothing allocated)
and GPU devices that the host need not have (:func:`tsdsr_jax.aot.plan.gpu_devices`).

    program = training(configs.tsd.get_config(), gpu_devices("h200", 8))
    plan = program.plan()          # the compiler's memory plan, kernels and FLOPs per device
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from tsdsr_jax import sharding
from tsdsr_jax.aot.plan import Plan, compile_plan
from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.safetensors import SafeTensors
from tsdsr_jax.models import lora, mmdit, vae
from tsdsr_jax.models import lpips as lpips_model
from tsdsr_jax.models.targets import STUDENT_TARGETS
from tsdsr_jax.training import stages

SD3_PROMPT_LEN = 333        # 77 CLIP + 256 T5 tokens
TEACHER_RANK = 64           # the released teacher LoRA's


class Program(NamedTuple):
    """A jitted function, the abstract arguments it is compiled for, and its mesh."""

    jitted: Callable
    args: tuple
    mesh: jax.sharding.Mesh

    def plan(self) -> Plan:
        with sharding.activate(self.mesh):
            return compile_plan(self.jitted, self.args)


def model_shapes(model: str) -> tuple[mmdit.MMDiTConfig, vae.VAEConfig, int]:
    """The transformer and VAE configs and prompt length of ``model``: ``tiny`` (with SD3's
    prompt length, so that its joint sequences are odd as SD3's are), ``sd3-medium`` or a model
    directory (only its config.json and embedding shapes are read)."""
    if model == "tiny":
        return model_dir.TINY_TRANSFORMER, model_dir.TINY_VAE, SD3_PROMPT_LEN
    if model == "sd3-medium":
        return mmdit.MMDiTConfig.sd3_medium(), vae.VAEConfig.sd3(), SD3_PROMPT_LEN
    config = model_dir.read_config(model)
    prompt_len = SD3_PROMPT_LEN
    embeddings = Path(model) / model_dir.EMBEDDINGS
    if embeddings.is_file():
        shapes = SafeTensors(embeddings)
        prompt_len = next((shapes.shape(k)[0] for k in shapes if k.endswith(".prompt_embeds")),
                          prompt_len)
    return (mmdit.MMDiTConfig.from_diffusers(config["transformer"]),
            vae.VAEConfig.from_diffusers(config["vae"]), prompt_len)


def abstract_model(model: str) -> model_dir.Model:
    """``model``'s shapes as a :class:`~tsdsr_jax.io.model_dir.Model` of ``jax.ShapeDtypeStruct``
    leaves (float32 base, default and null prompts, no adapters)."""
    t_cfg, v_cfg, prompt_len = model_shapes(model)
    params = {"transformer": mmdit.abstract_params(t_cfg), "vae": vae.abstract_params(v_cfg)}
    prompt = {"prompt_embeds": jax.ShapeDtypeStruct((prompt_len, t_cfg.joint_attention_dim),
                                                    jnp.float32),
              "pooled_prompt_embeds": jax.ShapeDtypeStruct((t_cfg.pooled_projection_dim,),
                                                           jnp.float32)}
    return model_dir.Model(Path(model), t_cfg, v_cfg, params, {},
                           {"default": prompt, "null": prompt})


def platform(devices: list) -> str:
    """The devices' platform as jax names backends: gpu, tpu or cpu."""
    return {"cuda": "gpu", "rocm": "gpu"}.get(devices[0].platform, devices[0].platform)


def inference(model: model_dir.Model, config: InferenceConfig, batch: int,
              lr_size: tuple[int, int], devices: list) -> Program:
    """infer.py's network for ``batch`` LR images of ``lr_size`` over ``devices`` (the batch
    split over them, as ``--devices``)."""
    mesh = sharding.make_mesh(sharding.ShardingConfig(data=len(devices)), devices)
    pipe = Pipeline(model, config, mesh)
    images = [jax.ShapeDtypeStruct((*lr_size, 3), jnp.uint8)] * batch
    key = jax.eval_shape(lambda: jax.random.key(0))
    return Program(pipe.network, pipe.inputs(images, range(batch), key), mesh)


def training(config: ml_collections.ConfigDict, devices: list) -> Program:
    """train.py's step for ``config`` over ``devices`` (its mesh from ``config.sharding``), on
    ``config.model``'s shapes with a teacher LoRA of the released rank where the stage has one."""
    shard_config, mesh = stages.make_mesh(config, devices)
    model = abstract_model(config.model)
    config = config.copy_and_resolve_references()
    config.attention_impl = mmdit.resolve_attention(config.attention_impl, platform(devices))
    for key in ("init_student", "init_teacher"):  # the model's adapters have these shapes too
        if key in config:
            config[key] = "random"
    made = []

    def make(params, embeddings):
        m = dataclasses.replace(model, params=params, embeddings=embeddings)
        made.append(stages.make_stage(config, m))
        keys = jax.random.split(jax.random.key(0))
        teacher = lpips = None
        if config.stage == "tsd":
            lpips = lpips_model.init_params(keys[0], "alex")
            if config.teacher != "sd3":
                teacher = lora.init_adapter(keys[1], params["transformer"], STUDENT_TARGETS,
                                            TEACHER_RANK)
        return made[0].state, stages.frozen_inputs(config, m, teacher, lpips)

    state, frozen = jax.eval_shape(make, model.params, model.embeddings)
    jitted = stages.jit_stage(made[0]._replace(state=state), frozen, mesh, shard_config)
    return Program(jitted.step, (state, frozen, batch_shapes(config, model)), mesh)


def batch_shapes(config: ml_collections.ConfigDict, model: model_dir.Model
                 ) -> dict[str, jax.ShapeDtypeStruct]:
    """One global batch as the data pipeline delivers it (with prepared HR latents)."""
    spec = stages.sample_spec(config, model)
    b, side = config.batch_size, spec.resolution
    shapes = {"hr": (side, side, 3), "latent_hr": spec.latent_shape,
              "prompt_embeds": spec.prompt_shape, "pooled_prompt_embeds": (spec.pooled_dim,)}
    if config.stage == "tsd":
        shapes["lr"] = (side, side, 3)
    return {k: jax.ShapeDtypeStruct((b, *s), jnp.float32) for k, s in shapes.items()}
