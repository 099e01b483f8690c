"""Full-size parity and speed of our networks against diffusers, on one device.

    python bench/models.py            # SD3-medium MMDiT + SD3 VAE, random weights (GPU)
    python bench/models.py --tiny     # tiny configs (checks the script on a CPU)

Builds diffusers' ``SD3Transformer2DModel`` and ``AutoencoderKL`` with random weights, converts
their state dicts to ours, and runs both on the same inputs: the relative error of ours against
diffusers in fp32 (and ours in bf16 against diffusers in fp32), our compile time, and the time
per call of each side. Prints one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import SD3Transformer2DModel

from tsdsr_jax.conversion.torch_layout import to_flax, torch_name
from tsdsr_jax.io.tree import flatten, nest
from tsdsr_jax.models import mmdit, vae

TINY_MMDIT = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                  caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
                  pos_embed_max_size=96)
TINY_VAE = dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, latent_channels=16,
                norm_num_groups=8)


def convert(module: torch.nn.Module, abstract) -> dict:
    state = {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}
    return nest({p: jnp.asarray(to_flax(p, state[torch_name(p)])) for p in flatten(abstract)})


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def timed(fn, iters: int = 5) -> float:
    times = []
    for _ in range(iters):
        tic = time.perf_counter()
        out = fn()
        jax.block_until_ready(out) if not isinstance(out, torch.Tensor) else None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - tic) * 1e3)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--attention", default=None, help="xla | cudnn for the bf16 run")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    jax.config.update("jax_default_matmul_precision", "highest")
    side = 16 if args.tiny else 64  # latent side: 512² images at full size
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"on {dev}; latent {side}², batch 1")
    print("| network | fp32 rel. error | bf16 rel. error | compile s (fp32 / bf16) "
          "| ms ours fp32 / bf16 | ms diffusers fp32 |")
    print("|---|---|---|---|---|---|")

    torch.manual_seed(0)
    t_kwargs = TINY_MMDIT if args.tiny else dataclasses.asdict(mmdit.MMDiTConfig.sd3_medium())
    t_kwargs = {k: v for k, v in t_kwargs.items()
                if k not in ("dtype", "attention_impl", "remat_policy")}
    ref = SD3Transformer2DModel(**t_kwargs).to(dev).eval()
    cfg = mmdit.MMDiTConfig.from_diffusers(dict(ref.config))
    params = convert(ref, mmdit.abstract_params(cfg))
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, side, side, 16)).astype(np.float32)
    prompt_len = 8 if args.tiny else 333
    c = rng.standard_normal((1, prompt_len, cfg.joint_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((1, cfg.pooled_projection_dim)).astype(np.float32)
    t = np.array([1000.0], np.float32)
    with torch.no_grad():
        inputs = dict(hidden_states=torch.from_numpy(z).permute(0, 3, 1, 2).to(dev),
                      timestep=torch.from_numpy(t).to(dev),
                      encoder_hidden_states=torch.from_numpy(c).to(dev),
                      pooled_projections=torch.from_numpy(pooled).to(dev))
        ref_call = lambda: ref(**inputs).sample  # noqa: E731
        want = ref_call().permute(0, 2, 3, 1).cpu().numpy()
        ref_ms = timed(ref_call)
    del ref
    row = []
    for dtype, impl in ((jnp.float32, "xla"), (jnp.bfloat16, args.attention)):
        model = mmdit.MMDiT(dataclasses.replace(cfg, dtype=dtype, attention_impl=impl))
        p_cast = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        fn = jax.jit(model.apply)
        tic = time.perf_counter()
        compiled = fn.lower({"params": p_cast}, z, t, c, pooled).compile()
        compile_s = time.perf_counter() - tic
        got = compiled({"params": p_cast}, z, t, c, pooled)
        row.append((rel_err(got, want), compile_s,
                    timed(lambda: compiled({"params": p_cast}, z, t, c, pooled))))  # noqa: B023
    print(f"| MMDiT | {row[0][0]:.2e} | {row[1][0]:.2e} | {row[0][1]:.1f} / {row[1][1]:.1f} "
          f"| {row[0][2]:.2f} / {row[1][2]:.2f} | {ref_ms:.2f} |", flush=True)

    v_kwargs = dict(TINY_VAE) if args.tiny else dict(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
        norm_num_groups=32)
    n = len(v_kwargs["block_out_channels"])
    ref = TorchVAE(down_block_types=("DownEncoderBlock2D",) * n,
                   up_block_types=("UpDecoderBlock2D",) * n, use_quant_conv=False,
                   use_post_quant_conv=False, **v_kwargs).to(dev).eval()
    v_cfg = vae.VAEConfig.from_diffusers(dict(ref.config))
    v_params = convert(ref, vae.abstract_params(v_cfg))
    image = rng.uniform(-1, 1, (1, side * 8, side * 8, 3)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(image).permute(0, 3, 1, 2).to(dev)
        ref_enc = lambda: ref.encode(x).latent_dist.mean  # noqa: E731
        latent = torch.from_numpy(z).permute(0, 3, 1, 2).to(dev)
        ref_dec = lambda: ref.decode(latent).sample  # noqa: E731
        want = {"encode": ref_enc().permute(0, 2, 3, 1).cpu().numpy(),
                "decode": ref_dec().permute(0, 2, 3, 1).cpu().numpy()}
        ref_ms = {"encode": timed(ref_enc), "decode": timed(ref_dec)}
    for method, inp in (("encode", image), ("decode", z)):
        row = []
        for dtype in (jnp.float32, jnp.bfloat16):
            model = vae.AutoencoderKL(dataclasses.replace(v_cfg, dtype=dtype))
            p_cast = jax.tree_util.tree_map(lambda a: a.astype(dtype), v_params)  # noqa: B023
            fn = jax.jit(lambda v, a: model.apply(v, a, method=method))  # noqa: B023
            tic = time.perf_counter()
            compiled = fn.lower({"params": p_cast}, inp).compile()
            compile_s = time.perf_counter() - tic
            out = compiled({"params": p_cast}, inp)
            out = out[0] if method == "encode" else out
            row.append((rel_err(out, want[method]), compile_s,
                        timed(lambda: compiled({"params": p_cast}, inp))))  # noqa: B023
        print(f"| VAE {method} | {row[0][0]:.2e} | {row[1][0]:.2e} | {row[0][1]:.1f} / "
              f"{row[1][1]:.1f} | {row[0][2]:.2f} / {row[1][2]:.2f} | {ref_ms[method]:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
