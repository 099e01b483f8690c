"""Every GPU program compiles for an H200: the tiny configs with the real GPU settings (bf16,
cuDNN attention, remat), compiled by XLA's GPU compiler on this CPU host (tsdsr_jax/aot/check.py,
run in `.venv-gpu`, which holds jax's CUDA plugin; `make test` builds it). Also the plan's
counts and the fit check, run there too."""

from __future__ import annotations

import json
import os
import subprocess
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_PYTHON = ROOT / ".venv-gpu" / "bin" / "python"
INFERENCE = ["infer untiled", "infer latent tiles", "infer tiled VAE", "infer --devices 2"]
TRAINING = ["tsd N=1", "tsd N=4", "teacher", "tsd 8 GPUs data 4 x fsdp 2"]


def gpu_python(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """``args`` run by the GPU compiler environment's python, from the repository root."""
    if not GPU_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{GPU_PYTHON} is missing: `make test` builds it")
        pytest.skip("no GPU compiler environment (make .venv-gpu/.aot)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the GPU compiler's own
    env |= {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",  # compile for a GPU, run nothing
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
    return subprocess.run([str(GPU_PYTHON), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("aot") / "plans.json"
    done = gpu_python("-m", "tsdsr_jax.aot.check", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", INFERENCE + TRAINING)
def test_compiles_for_h200(plans, case):
    plan = plans[case]
    assert "error" not in plan, plan.get("traceback", plan.get("error"))
    assert plan["peak_bytes"] > 0 and plan["kernels"] > 0 and plan["flops"] > 0
    assert plan["fmha"] > 0, "the transformer's attention is not cuDNN's fused kernel"
    if case in TRAINING:
        assert plan["fmha_backward"] > 0, "no cuDNN attention backward"
    if "GPUs" in case or "devices" in case:
        assert plan["collective_bytes"] > 0


COUNTS = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from tsdsr_jax.aot.plan import compile_plan, gpu_devices
mesh = jax.sharding.Mesh(gpu_devices("h200", 1), ("d",))
spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16,
                                           sharding=NamedSharding(mesh, PartitionSpec()))
def loss(x, w):  # a 3x3 conv, then its output as (B, T, N, H) attention inputs
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    q = y.reshape(2, 256, 4, 16)
    out = jax.nn.dot_product_attention(q, q, q, implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32))
plan = compile_plan(jax.jit(jax.grad(loss, argnums=(0, 1))), (spec(2, 16, 16, 64), spec(3, 3, 64, 64)))
print(plan.flops, plan.kernels, plan.peak_bytes)
"""


def test_plan_counts_flops_of_convolutions_and_attention():
    """The forward conv and its two backward convs, each 2·(B·H·W·Co)·(3·3·Ci) FLOPs; the fused
    attention forward 4·B·N·T²·H and its backward 2.5 times that."""
    done = gpu_python("-c", COUNTS, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    flops, kernels, peak = done.stdout.split()
    conv = 2 * (2 * 16 * 16 * 64) * (3 * 3 * 64)
    attention = 4 * 2 * 4 * 256 * 256 * 16
    assert float(flops) == 3 * conv + 3.5 * attention
    assert int(kernels) > 5 and int(peak) > 0


ROOFLINE = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from tsdsr_jax.aot.plan import compile_plan, gpu_devices
from tsdsr_jax.models.vae import NearestX2Conv
mesh = jax.sharding.Mesh(gpu_devices("h200", 1), ("d",))
spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16,
                                           sharding=NamedSharding(mesh, PartitionSpec()))
plan = compile_plan(jax.jit(lambda x: x * 2 + 1), (spec(1024, 1024),))
print(plan.kernels, plan.bytes_moved, plan.roofline_s())
plan = compile_plan(jax.jit(lambda x: x[:, :1]), (spec(1024, 1024),))
print(plan.kernels, plan.bytes_moved)
quarters = lambda x: x.reshape(1024, 4, 256)[:, 1] * 2 + x.reshape(1024, 4, 256)[:, 3]
plan = compile_plan(jax.jit(quarters), (spec(1024, 1024),))
print(plan.kernels, plan.bytes_moved)
up = NearestX2Conv(64, jnp.bfloat16)
plan = compile_plan(jax.jit(lambda p, x: up.apply({"params": p}, x)),
                    ({"kernel": spec(3, 3, 64, 64), "bias": spec(64)}, spec(1, 32, 32, 64)))
print("convBackwardInput" in plan.hlo, "[1,67,67,64]" in plan.hlo)
"""


def test_plan_bytes_roofline_and_the_upsample_kernel():
    """An elementwise kernel moves its input and output (2 x 2 MiB) and is bound by the
    bandwidth; a slice moves what it keeps, twice; a fusion that takes two quarters of its
    input (through a bitcast) reads those alone; the VAE's nearest x2 + conv compiles to cuDNN's
    transposed convolution of the input, with no zero-filled copy (32 -> 2·32 - 1 + 2·2 = 67
    pixels) built."""
    done = gpu_python("-c", ROOFLINE, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts, sliced, quarters, upsample = done.stdout.splitlines()[-4:]
    kernels, moved, bound = counts.split()
    assert int(kernels) == 1 and float(moved) == 2 * 1024 * 1024 * 2
    assert float(bound) == pytest.approx(float(moved) / 4.2e12)
    assert sliced.split() == ["1", str(2 * 1024 * 2)]  # a slice reads what it keeps
    assert quarters.split() == ["1", str(3 * 1024 * 256 * 2)]  # two quarters in, one out
    assert upsample.split() == ["True", "False"]


@pytest.mark.parametrize("card", ["rtx4090", "a100-40g", "a100-80g", "h100", "h200"])
def test_fit_inference_on_every_card(card):
    done = gpu_python("-m", "tsdsr_jax.aot.fit", "--gpu", card, "--infer", "--model", "tiny",
                      "--size", "128", "--process-size", "128", "--no-search", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 1 per GPU fits" in done.stdout


def test_fit_finds_the_largest_batch():
    done = gpu_python("-m", "tsdsr_jax.aot.fit", "--gpu", "rtx4090", "--infer", "--model", "tiny",
                      "--size", "128", "--process-size", "128", "--mem-fraction", "0.001",
                      timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] != []
            and line.split()[0].isdigit()]
    fits = {int(r[0]): r[-1] == "yes" for r in rows}
    best = int(done.stdout.rsplit("largest batch per GPU that fits: ", 1)[1].split()[0])
    assert fits[best] and best > 2 and fits.get(best + 1) is not True


@pytest.mark.parametrize("budget", [0.5, 7.0, 30.5, 399.0, 1e9])
def test_largest_batch_search_is_exact_and_short(budget):
    """On a peak that is linear, then steeper past batch 20 (so the first line overshoots), the
    search finds the largest batch that fits, checks its next one, and stops at MAX_BATCH."""
    from tsdsr_jax.aot import fit

    peak = lambda b: b + 3.0 * max(0, b - 20)  # noqa: E731
    compiled = []

    def compile_at(b):
        compiled.append(b)
        return types.SimpleNamespace(peak_bytes=peak(b))

    got = fit.largest_batch(compile_at, {}, budget)
    fitting = [b for b in range(1, fit.MAX_BATCH + 1) if peak(b) <= budget]
    assert got == (max(fitting) if fitting else None)
    if got and got < fit.MAX_BATCH:
        assert got + 1 in compiled
    assert len(compiled) == len(set(compiled)) <= 8, compiled


@pytest.mark.parametrize("args, needle", [
    (["--gpu", "h300", "--infer"], "--gpu: invalid choice: 'h300'"),
    (["--gpu", "h200"], "give --config FILE"),
    (["--gpu", "h200", "--infer", "--size", "0"], "--size 0: must be at least 1"),
    (["--gpu", "h200", "--infer", "--batch-size", "3", "--devices", "2"], "not a multiple"),
    (["--gpu", "h200", "--config", "configs/nope.py"], "No such file or directory"),
    (["--gpu", "h200", "--config", "configs/tiny.py", "--config.bogus=1"], "no key 'bogus'"),
    (["--gpu", "h200", "--config", "configs/tiny.py", "--config.batch_size=x"], "batch_size=x"),
    (["--gpu", "h200", "--config", "configs/tiny.py", "--gpus", "2", "--config.batch_size=3"],
     "does not split"),
])
def test_fit_bad_flags_get_one_line(args, needle):
    done = gpu_python("-m", "tsdsr_jax.aot.fit", *args, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert needle in done.stderr and "Traceback" not in done.stderr
