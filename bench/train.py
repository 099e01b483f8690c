"""Seconds per TSD-SR training step and peak memory, full-size SD3-medium with random weights.

    python bench/train.py                       # 512² crops, batch 1 and 2, DASM N = 1 and 4 (GPU)
    python bench/train.py --tiny                # tiny configs (checks the script on a CPU)
    python bench/train.py --compile-only        # full size on any device: compile and count
    python ../shared/bench/baseline_train_torch.py   # the official step, beside it, same card

One device (a 1x1 mesh: the step is the one train.py jits). The step is ours as configs/tsd.py
runs it: bf16 base, float32 LoRA (student r64 + VAE-encoder r64, teacher r64, fake score r64),
one shared base, remat of the transformer blocks, cuDNN attention on a GPU. Prints one table:
compile seconds, median seconds per step, peak device memory (each row in its own process, so
that the peaks are its own). ``--compile-only`` compiles the step from shapes alone (nothing is
allocated, so it runs on a small CPU too) and prints XLA's FLOP count and buffer sizes instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax import trainer, tsd
from tsdsr_jax.adapters import STUDENT_TARGETS, vae_encoder_targets
from tsdsr_jax.model_dir import TINY_TRANSFORMER, TINY_VAE
from tsdsr_jax.models import lora, mmdit, vae
from tsdsr_jax.models import lpips as lpips_model

SD3_VAE = vae.VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=16, norm_num_groups=32, scaling_factor=1.5305,
                        shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)


def build(tiny: bool, dtype, attention: str | None, remat: str | None, abstract: bool = False):
    """Random frozen base, LPIPS, prompts and adapters, made on the device (or only their
    shapes, ``abstract``)."""
    t_cfg = TINY_TRANSFORMER if tiny else mmdit.MMDiTConfig.sd3_medium()
    t_cfg = dataclasses.replace(t_cfg, dtype=dtype, attention_impl=attention, remat_policy=remat)
    v_cfg = dataclasses.replace(TINY_VAE if tiny else SD3_VAE, dtype=dtype)
    nets = tsd.Networks(mmdit.MMDiT(t_cfg), vae.AutoencoderKL(v_cfg), v_cfg.scaling_factor)
    prompt_len = 8 if tiny else 333
    k = jax.random.split(jax.random.PRNGKey(0), 8)

    @jax.jit
    def make():
        cast = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)  # noqa: E731
        base = {"transformer": cast(mmdit.init_params(k[0], t_cfg)),
                "vae": cast(vae.init_params(k[1], v_cfg))}
        prompts = lambda key: tsd.Prompts(  # noqa: E731
            jax.random.normal(key, (prompt_len, t_cfg.joint_attention_dim)),
            jax.random.normal(key, (t_cfg.pooled_projection_dim,)))
        teacher = lora.init_adapter(k[2], base["transformer"], STUDENT_TARGETS, 64)
        frozen = trainer.Frozen(base, teacher, prompts(k[3]), prompts(k[4]),
                                cast(lpips_model.init_params(k[5], "alex")))
        student = (lora.init_adapter(k[6], base["transformer"], STUDENT_TARGETS, 64),
                   lora.init_adapter(k[7], base["vae"], vae_encoder_targets(base["vae"]), 64))
        return frozen, student

    frozen, student = jax.eval_shape(make) if abstract else make()
    return nets, frozen, student, prompt_len


def batch_of(b: int, side: int, prompt_len: int, nets: tsd.Networks, abstract: bool = False
             ) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    t = nets.mmdit.config
    latent = side // 8
    arrays = {"lr": rng.uniform(-1, 1, (b, side, side, 3)),
              "hr": rng.uniform(-1, 1, (b, side, side, 3)),
              "latent_hr": rng.standard_normal((b, latent, latent, 16)),
              "prompt_embeds": rng.standard_normal((b, prompt_len, t.joint_attention_dim)),
              "pooled_prompt_embeds": rng.standard_normal((b, t.pooled_projection_dim))}
    if abstract:
        return {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in arrays.items()}
    return {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}


def peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats else None


def run(args: argparse.Namespace, b: int, n: int) -> str:
    """One table row: compile, then time ``args.steps`` steps of batch ``b`` with DASM ``n``."""
    gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if gpu or args.compile_only else jnp.float32
    remat = None if args.remat == "none" else args.remat
    nets, frozen, student, prompt_len = build(args.tiny, dtype, "cudnn" if gpu else None, remat,
                                              abstract=args.compile_only)
    opt = trainer.optimizer(trainer.OptimConfig(learning_rate=5e-6))
    fake_opt = trainer.optimizer(trainer.OptimConfig(learning_rate=1e-6))
    init = functools.partial(trainer.init_state, jax.random.PRNGKey(1), opt_student=opt,
                             opt_fake=fake_opt, fake_rank=64)
    state = (jax.eval_shape(init, frozen.base, student) if args.compile_only
             else init(frozen.base, student))
    batch = batch_of(b, 64 if args.tiny else 512, prompt_len, nets, args.compile_only)
    step = jax.jit(functools.partial(trainer.train_step, nets=nets,
                                     config=tsd.TSDConfig(dasm_steps=n), opt_student=opt,
                                     opt_fake=fake_opt), donate_argnums=0)
    tic = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - tic
    if args.compile_only:
        flops = compiled.cost_analysis().get("flops", float("nan"))
        memory = compiled.memory_analysis()
        temp = getattr(memory, "temp_size_in_bytes", float("nan")) / 2 ** 30
        return f"| {b} | {n} | {compile_s:.1f} | {flops / 1e12:.1f} TFLOP | {temp:.1f} temp |"
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tic)
    peak = peak_gib()
    return (f"| {b} | {n} | {compile_s:.1f} | {np.median(times):.3f} | "
            f"{'n/a' if peak is None else f'{peak:.1f}'} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", default="1,2")
    p.add_argument("--dasm", default="1,4")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="full", help="none | full | dots")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--row", action="store_true", help="(internal) print one row only")
    args = p.parse_args()
    if args.row:
        print(run(args, int(args.batch), int(args.dasm)), flush=True)
        return
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.device_kind}; {64 if args.tiny else 512}² crops, "
          f"{'bf16' if device.platform == 'gpu' or args.compile_only else 'fp32'} base, "
          f"remat {args.remat}")
    print("| batch | DASM N | compile s | s / step | peak GiB |" if not args.compile_only
          else "| batch | DASM N | compile s | XLA's count per step | buffers GiB |")
    print("|---|---|---|---|---|", flush=True)
    for b in args.batch.split(","):
        for n in args.dasm.split(","):
            argv = [sys.executable, __file__, "--row", "--batch", b, "--dasm", n, "--steps",
                    str(args.steps), "--remat", args.remat] + (["--tiny"] if args.tiny else [])
            argv += ["--compile-only"] if args.compile_only else []
            subprocess.run(argv, check=True)


if __name__ == "__main__":
    main()
