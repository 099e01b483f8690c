"""Inference speed: the jitted one-step pipeline, ms per image, first-call time, peak memory.

    python bench/infer.py                 # full-size SD3-medium + SD3 VAE, random weights (GPU)
    python bench/infer.py --tiny          # the tiny random model, small sizes (checks the script)
    python bench/infer.py --case "512² b1" --case "1024² b1"   # some cases only

Times ``Pipeline.network`` (uint8 LR → bicubic ×4 → encode → one transformer step → decode →
wavelet colour fix → uint8 SR, LoRA merged) on device arrays; the PyTorch references in
../shared/bench time their networks without the colour fix. Prints one table. Run those
references in the same GPU call (bench/RESULTS.md has the command) and report the ratios.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline
from tsdsr_jax.io import model_dir
from tsdsr_jax.models import mmdit, vae

FULL = [  # (case, batch, LR side, pipeline options)
    ("512² b1", 1, 128, {}),
    ("512² b8", 8, 128, {}),
    ("1024² b1", 1, 256, {}),
    ("2048² b1 tiled", 1, 512, {"vae_encoder_tile": 1024, "vae_decoder_tile": 128}),
]
TINY = [("128² b1", 1, 32, {}), ("128² b4", 4, 32, {}),
        ("256² b1 tiled", 1, 64, {"latent_tile": 16, "vae_encoder_tile": 128,
                                  "vae_decoder_tile": 16})]


def random_model(tiny: bool, prompt_len: int = 333) -> model_dir.Model:
    """Random weights at the real sizes (or the tiny model)."""
    if tiny:
        return model_dir.tiny()
    t_cfg, v_cfg = mmdit.MMDiTConfig.sd3_medium(), vae.VAEConfig.sd3()
    k = jax.random.split(jax.random.key(0), 4)
    params = {"transformer": mmdit.init_params(k[0], t_cfg), "vae": vae.init_params(k[1], v_cfg)}
    emb = {"default": {"prompt_embeds": jax.random.normal(k[2], (prompt_len, 4096)),
                       "pooled_prompt_embeds": jax.random.normal(k[3], (2048,))}}
    return model_dir.Model(None, t_cfg, v_cfg, params, {}, emb)


def median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        tic = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - tic) * 1e3)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--attention", default=None, help="xla | cudnn (default: cuDNN on a GPU)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--case", action="append", help="only these cases (default: all)")
    args = p.parse_args()
    cases = [c for c in (TINY if args.tiny else FULL) if not args.case or c[0] in args.case]
    model = random_model(args.tiny)
    device = jax.devices()[0]
    print(f"device: {device.device_kind}; jax {jax.__version__}; precision {args.precision}")
    print("| case | ms/image | ms/batch | first call s | second call s | planned GB "
          "| device peak GB | GFLOP/image | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, side, options in cases:
        pipe = Pipeline(model, InferenceConfig(precision=args.precision, vae_posterior="sample",
                                               attention_impl=args.attention, **options))
        lr = np.asarray(jax.random.randint(jax.random.key(1), (batch, side, side, 3), 0, 256,
                                           jnp.uint8))
        inputs = pipe.inputs(list(lr), range(batch), jax.random.key(2))
        call = lambda: pipe.network(*inputs)  # noqa: E731
        tic = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - tic
        tic = time.perf_counter()
        jax.block_until_ready(call())
        second = time.perf_counter() - tic
        ms = median_ms(call, args.iters)
        compiled = pipe.network.lower(*inputs).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        gflop = float(cost.get("flops", 0.0)) / 1e9 / batch if cost else float("nan")
        mem = compiled.memory_analysis()  # weights + inputs + outputs + XLA's scratch
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                + mem.temp_size_in_bytes) / 2**30 if mem else float("nan")
        stats = device.memory_stats() or {}  # the process's peak so far (GPUs only)
        used = (f"{stats['peak_bytes_in_use'] / 2**30:.2f}" if "peak_bytes_in_use" in stats
                else "-")
        print(f"| {name} | {ms / batch:.2f} | {ms:.2f} | {first:.1f} | {second:.2f} | {peak:.2f} "
              f"| {used} | {gflop:.4g} | {gflop * batch / ms:.3g} |", flush=True)


if __name__ == "__main__":
    main()
