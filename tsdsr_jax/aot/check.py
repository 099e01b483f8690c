"""Compiles the tiny configs for an H200 with the real GPU settings (bf16, cuDNN attention, remat
full): every inference path and every training step, on one GPU and sharded; with ``--tpu``, for
a TPU v5e slice of 8 chips with the TPU settings (bf16, splash attention): inference split over
the 8 chips, and the TSD step sharded over them.
Any trace or compile error is reported for its case. The suite runs it (tests/test_gpu_compile.py,
tests/test_tpu_compile.py) in the environment that has the GPU and TPU compilers:

    .venv-gpu/bin/python -m tsdsr_jax.aot.check --json plans.json [--tpu]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")              # compile for the GPU, run nothing
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402

from configs import tiny  # noqa: E402
from tsdsr_jax.aot import programs, tpus  # noqa: E402
from tsdsr_jax.aot.plan import gpu_devices  # noqa: E402
from tsdsr_jax.inference.pipeline import InferenceConfig  # noqa: E402

CARD = "h200"
TPU_SLICE = "v5e-8"
GPU_INFERENCE = InferenceConfig(precision="bf16", attention_impl="cudnn")
TPU_INFERENCE = InferenceConfig(precision="bf16", attention_impl="splash", process_size=128)


def _train_config(stage: str, attention: str = "cudnn", **overrides):
    config = tiny.get_config(stage)
    config.precision, config.attention_impl, config.remat_policy = "bf16", attention, "full"
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _inference(lr_side: int, gpus: int = 1, batch: int = 1, **options) -> Callable:
    config = InferenceConfig(**{**vars(GPU_INFERENCE), **options})
    return lambda: programs.inference(programs.abstract_model("tiny"), config, batch,
                                      (lr_side, lr_side), gpu_devices(CARD, gpus))


def _training(stage: str, gpus: int = 1, **overrides) -> Callable:
    return lambda: programs.training(_train_config(stage, **overrides), gpu_devices(CARD, gpus))


def _tpu_inference() -> programs.Program:
    return programs.inference(programs.abstract_model("tiny"), TPU_INFERENCE, 8, (32, 32),
                              tpus.devices(TPU_SLICE))


def _tpu_training() -> programs.Program:
    config = _train_config("tsd", "splash", batch_size=8, **{
        "sharding.data": 4, "sharding.fsdp": 2, "sharding.min_shard_size": 256})
    return programs.training(config, tpus.devices(TPU_SLICE))


CASES: dict[str, Callable] = {
    "infer untiled": _inference(32),
    "infer latent tiles": _inference(64, latent_tile=16, latent_overlap=4),
    "infer tiled VAE": _inference(64, vae_encoder_tile=128, vae_decoder_tile=16),
    "infer --devices 2": _inference(32, gpus=2, batch=2),
    "tsd N=1": _training("tsd", **{"tsd.dasm_steps": 1}),
    "tsd N=4": _training("tsd", **{"tsd.dasm_steps": 4}),
    "teacher": _training("teacher"),
    "tsd 8 GPUs data 4 x fsdp 2": _training(
        "tsd", gpus=8, batch_size=8, **{"sharding.data": 4, "sharding.fsdp": 2,
                                        "sharding.min_shard_size": 256}),
}
TPU_CASES: dict[str, Callable] = {
    f"infer {TPU_SLICE} --devices 8": _tpu_inference,
    f"tsd {TPU_SLICE} data 4 x fsdp 2": _tpu_training,
}


def run(names: list[str]) -> dict[str, dict]:
    """Each case's plan (bytes, kernels, FLOPs, the fused-attention kernels) or its error."""
    results = {}
    for name in names:
        try:
            plan = {**CASES, **TPU_CASES}[name]().plan()
        except Exception as e:  # reported per case: the test names the failing one
            results[name] = {"error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc(limit=-6)}
            continue
        results[name] = {"peak_bytes": plan.peak_bytes, "temp_bytes": plan.temp_bytes,
                         "kernels": plan.kernels, "flops": plan.flops,
                         "collective_bytes": plan.collective_bytes, "compile_s": plan.compile_s,
                         "fmha": plan.hlo.count('custom_call_target="__cudnn$fmhaSoftmax"'),
                         "fmha_backward": plan.hlo.count(
                             'custom_call_target="__cudnn$fmhaSoftmaxBackward"'),
                         "pallas": plan.hlo.count('custom_call_target="tpu_custom_call"')}
        print(f"{name}: {results[name]['peak_bytes'] / 2**20:.1f} MiB, "
              f"{plan.kernels} kernels, {plan.compile_s:.1f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--case", action="append", choices=sorted({**CASES, **TPU_CASES}),
                        help="only these cases (default: all of the platform)")
    parser.add_argument("--tpu", action="store_true", help="the TPU cases (libtpu)")
    args = parser.parse_args()
    results = run(args.case or list(TPU_CASES if args.tpu else CASES))
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
