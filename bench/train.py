"""Seconds per TSD-SR training step and peak memory, full-size SD3-medium with random weights,
beside the official step in PyTorch measured in the same run.

    python bench/train.py --reference REF  # 512² crops, batch 1 and 2, DASM N = 1 and 4 (GPU)
    python bench/train.py --tiny           # tiny configs (checks the script on a CPU)
    python bench/train.py --compile-only   # full size on any device: compile and count
    python bench/train.py                  # ours alone

One device (a 1x1 mesh: the step is the one train.py jits). The step is ours as configs/tsd.py
runs it: bf16 base, float32 LoRA (student r64 + VAE-encoder r64, teacher r64, fake score r64),
one shared base, remat of the transformer blocks, cuDNN attention on a GPU. Each row runs in its
own process, so that its peak is its own; then ``--reference`` (the official step: diffusers +
peft, fp16 autocast, two transformer copies: the script ``baseline_train_torch.py`` that
comes with the PyTorch reference benchmarks, given by path) runs in another. Prints one
table: compile seconds, median seconds per step and peak device memory of each, and the
ratios. ``--compile-only`` compiles the step from shapes alone (nothing is allocated, so it runs
on a small CPU too) and prints XLA's FLOP count and buffer sizes instead.
With ``--tiny`` both sides use tiny models of different shapes: the ratios mean nothing there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.diffusion.denoiser import Networks, Prompts
from tsdsr_jax.io.model_dir import TINY_TRANSFORMER, TINY_VAE
from tsdsr_jax.models import lora, mmdit, vae
from tsdsr_jax.models import lpips as lpips_model
from tsdsr_jax.models.targets import STUDENT_TARGETS, vae_encoder_targets
from tsdsr_jax.training import optim, steps, tsd


def build(tiny: bool, dtype, attention: str | None, remat: str | None, abstract: bool = False):
    """Random frozen base, LPIPS, prompts and adapters, made on the device (or only their
    shapes, ``abstract``)."""
    t_cfg = TINY_TRANSFORMER if tiny else mmdit.MMDiTConfig.sd3_medium()
    t_cfg = dataclasses.replace(t_cfg, dtype=dtype, attention_impl=attention, remat_policy=remat)
    v_cfg = dataclasses.replace(TINY_VAE if tiny else vae.VAEConfig.sd3(), dtype=dtype)
    nets = Networks(mmdit.MMDiT(t_cfg), vae.AutoencoderKL(v_cfg))
    prompt_len = 8 if tiny else 333
    k = jax.random.split(jax.random.PRNGKey(0), 8)

    @jax.jit
    def make():
        cast = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)  # noqa: E731
        base = {"transformer": cast(mmdit.init_params(k[0], t_cfg)),
                "vae": cast(vae.init_params(k[1], v_cfg))}
        prompts = lambda key: Prompts(  # noqa: E731
            jax.random.normal(key, (prompt_len, t_cfg.joint_attention_dim)),
            jax.random.normal(key, (t_cfg.pooled_projection_dim,)))
        teacher = lora.init_adapter(k[2], base["transformer"], STUDENT_TARGETS, 64)
        frozen = steps.Frozen(base, teacher, prompts(k[3]), prompts(k[4]),
                                cast(lpips_model.init_params(k[5], "alex")))
        student = (lora.init_adapter(k[6], base["transformer"], STUDENT_TARGETS, 64),
                   lora.init_adapter(k[7], base["vae"], vae_encoder_targets(base["vae"]), 64))
        return frozen, student

    frozen, student = jax.eval_shape(make) if abstract else make()
    return nets, frozen, student, prompt_len


def batch_of(b: int, side: int, prompt_len: int, nets: Networks, abstract: bool = False
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


def run(args: argparse.Namespace, b: int, n: int) -> dict[str, float | None]:
    """One row of ours: compile, then time ``args.steps`` steps of batch ``b`` with DASM ``n``."""
    gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if gpu or args.compile_only else jnp.float32
    remat = None if args.remat == "none" else args.remat
    nets, frozen, student, prompt_len = build(args.tiny, dtype, "cudnn" if gpu else None, remat,
                                              abstract=args.compile_only)
    opt = optim.optimizer(optim.OptimConfig(learning_rate=5e-6, total_steps=200_000))
    fake_opt = optim.optimizer(optim.OptimConfig(learning_rate=1e-6, total_steps=200_000))
    init = functools.partial(steps.init_state, jax.random.PRNGKey(1), opt_student=opt,
                             opt_fake=fake_opt, fake_rank=64)
    state = (jax.eval_shape(init, frozen.base, student) if args.compile_only
             else init(frozen.base, student))
    batch = batch_of(b, 64 if args.tiny else 512, prompt_len, nets, args.compile_only)
    step = jax.jit(functools.partial(steps.train_step, nets=nets,
                                     config=tsd.TSDConfig(dasm_steps=n), opt_student=opt,
                                     opt_fake=fake_opt), donate_argnums=0)
    tic = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    row = {"compile_s": time.perf_counter() - tic, "device": jax.devices()[0].device_kind,
           "base": jnp.dtype(dtype).name}
    if args.compile_only:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        memory = compiled.memory_analysis()
        return {**row, "tflop": float(cost.get("flops", float("nan"))) / 1e12,
                "temp_gib": getattr(memory, "temp_size_in_bytes", float("nan")) / 2 ** 30}
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        tic = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - tic)
    return {**row, "s_per_step": float(np.median(times)), "peak_gib": peak_gib()}


def reference(script: Path, tiny: bool) -> dict[tuple[int, int], dict]:
    """The official step's rows, {(batch, N): {s_per_step, peak_mem_gb} or {error}}."""
    proc = subprocess.run([sys.executable, str(script)] + (["--tiny"] if tiny else []),
                          capture_output=True, text=True, check=False)
    rows = {}
    for line in proc.stdout.splitlines():
        row = json.loads(line) if line.startswith("{") else {}
        if "batch" in row:
            rows[(row["batch"], row["dasm_N"])] = row
            if "error" in row:  # the table shows n/a; say why
                print(f"reference batch {row['batch']}, N = {row['dasm_N']}: {row['error']}",
                      file=sys.stderr)
    if proc.returncode or not rows:
        print(f"reference {script} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}",
              file=sys.stderr)
    return rows


def fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def table(args: argparse.Namespace, ours: dict, official: dict) -> None:
    if args.compile_only:
        print("| batch | DASM N | compile s | XLA's count per step | XLA's buffers GiB |")
        print("|---|---|---|---|---|")
        for (b, n), r in ours.items():
            print(f"| {b} | {n} | {r['compile_s']:.1f} | {r['tflop']:.1f} TFLOP "
                  f"| {r['temp_gib']:.1f} |")
        return
    print("| batch | DASM N | compile s | s / step | peak GiB | official s / step "
          "| official peak GiB | speed-up | memory, of official |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (b, n), r in ours.items():
        ref = official.get((b, n), {})
        ref_s, ref_peak = ref.get("s_per_step"), ref.get("peak_mem_gb")
        speedup = ref_s / r["s_per_step"] if ref_s else None
        share = 100 * r["peak_gib"] / ref_peak if ref_peak and r["peak_gib"] else None
        print(f"| {b} | {n} | {r['compile_s']:.1f} | {r['s_per_step']:.3f} "
              f"| {fmt(r['peak_gib'], '.1f')} | {fmt(ref_s, '.3f')} | {fmt(ref_peak, '.1f')} "
              f"| {fmt(speedup, '.2f', '×')} | {fmt(share, '.0f', ' %')} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", default="1,2")
    p.add_argument("--dasm", default="1,4")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="full", help="none | full | dots")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--reference", type=Path,
                   help="the official step's script (baseline_train_torch.py); none: ours alone")
    p.add_argument("--row", action="store_true", help="(internal) one row of ours, as JSON")
    args = p.parse_args()
    if args.row:
        print(json.dumps(run(args, int(args.batch), int(args.dasm))), flush=True)
        return
    ours = {}  # (this process never touches a device: the rows and the reference get all of it)
    for b in map(int, args.batch.split(",")):
        for n in map(int, args.dasm.split(",")):
            argv = [sys.executable, __file__, "--row", "--batch", str(b), "--dasm", str(n),
                    "--steps", str(args.steps), "--remat", args.remat]
            argv += (["--tiny"] if args.tiny else []) + (["--compile-only"] if args.compile_only
                                                         else [])
            out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
            ours[(b, n)] = json.loads(out.strip().splitlines()[-1])
    official = {}
    if not args.compile_only and args.reference:
        official = reference(args.reference, args.tiny)
    first = next(iter(ours.values()))
    print(f"jax {jax.__version__} on {first['device']}; {64 if args.tiny else 512}² crops, "
          f"{first['base']} base, remat {args.remat}")
    table(args, ours, official)


if __name__ == "__main__":
    main()
