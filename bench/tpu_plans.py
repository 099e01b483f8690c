"""XLA's TPU compiler's plan of the full-size programs (SD3-medium and the SD3 VAE) for Cloud TPU
slices, compiled from shapes alone on this host through libtpu (no TPU; `make .venv-gpu/.aot`,
then run with its python):

    .venv-gpu/bin/python bench/tpu_plans.py --json bench/tpu_plans.json [--case NAME ...]

Per program and per chip: the peak (arguments, outputs, temporaries), the bytes its collectives
deliver, its FLOPs, and the compute floor of its time: those FLOPs over the chip's peak bf16
FLOP/s (public figures), with its price per 1000 images (inference, one chip) or 1000 steps
(training, the whole slice) at the on-demand list price.
The FLOPs are `tsdsr_jax.aot.plan`'s count of the convolutions and GEMMs in the compiled HLO, loop
bodies times their trip count; XLA's own count (printed beside) takes each loop body once. Both
leave out the Pallas attention kernel's work. XLA's "bytes accessed" (printed) counts operands
before fusion, so no bandwidth floor is drawn from it. XLA's own ``optimal_seconds`` is printed
as given. Results accumulate in ``--json``, one entry per case; the table is printed from all of
them (``--table``: only that).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from configs import tsd  # noqa: E402
from tsdsr_jax.aot import programs, tpus  # noqa: E402
from tsdsr_jax.aot.cards import GIB  # noqa: E402
from tsdsr_jax.inference.pipeline import InferenceConfig  # noqa: E402


def inference(slice_name: str, batch: int, attention: str) -> Callable:
    config = InferenceConfig(precision="bf16", attention_impl=attention)
    return lambda: programs.inference(programs.abstract_model("sd3-medium"), config, batch,
                                      (128, 128), tpus.devices(slice_name)[:1])


def training(slice_name: str, batch: int, fsdp: int, attention: str = "splash",
             remat: str | None = None) -> Callable:
    def build():
        config = tsd.get_config()
        config.model, config.attention_impl, config.batch_size = "sd3-medium", attention, batch
        config.sharding.fsdp = fsdp
        config.remat_policy = remat or config.remat_policy
        return programs.training(config, tpus.devices(slice_name))
    return build


# (case, slice, images per call, the program)
CASES: dict[str, tuple[str, int, Callable]] = {
    "infer 512² b1, v5e, splash": ("v5e-1", 1, inference("v5e-1", 1, "splash")),
    "infer 512² b1, v5e, xla": ("v5e-1", 1, inference("v5e-1", 1, "xla")),
    "infer 512² b8, v5e, splash": ("v5e-1", 8, inference("v5e-1", 8, "splash")),
    "infer 512² b8, v5e, xla": ("v5e-1", 8, inference("v5e-1", 8, "xla")),
    "infer 512² b8, v5p, splash": ("v5p-8", 8, inference("v5p-8", 8, "splash")),
    "infer 512² b8, v6e, splash": ("v6e-8", 8, inference("v6e-8", 8, "splash")),
    "tsd b8, v5e-8 fsdp 8, splash": ("v5e-8", 8, training("v5e-8", 8, 8)),
    "tsd b8, v5e-8 (no fsdp)": ("v5e-8", 8, training("v5e-8", 8, 1)),
    "tsd b8, v5e-8 fsdp 8, xla": ("v5e-8", 8, training("v5e-8", 8, 8, "xla")),
    "tsd b16, v5e-8 fsdp 8, splash": ("v5e-8", 16, training("v5e-8", 16, 8)),
    "tsd b16, v5e-8 fsdp 8, remat full": ("v5e-8", 16, training("v5e-8", 16, 8, remat="full")),
    "tsd b16, v5p-8 (4 chips)": ("v5p-8", 16, training("v5p-8", 16, 1)),
    "tsd b16, v6e-8": ("v6e-8", 16, training("v6e-8", 16, 1)),
    "tsd b64, v5e-64 (16 hosts) fsdp 8": ("v5e-64", 64, training("v5e-64", 64, 8)),
    "tsd b64, v5e-64 (16 hosts) fsdp 8, remat full": ("v5e-64", 64,
                                                      training("v5e-64", 64, 8, remat="full")),
}


def run(name: str, hlo_dir: Path | None = None) -> dict:
    slice_name, images, build = CASES[name]
    chip = tpus.parse(slice_name).chip
    try:
        plan = build().plan()
    except Exception as e:  # noqa: BLE001 -- reported in the table
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}",
                "traceback": traceback.format_exc(limit=-4)}
    if hlo_dir:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / f"{name}.hlo.gz").write_bytes(gzip.compress(plan.hlo.encode()))
    return {"slice": slice_name, "images": images, "peak_gib": plan.peak_bytes / GIB,
            "refused": not plan.hlo,  # the compiler's refusal: only its temporaries known
            "fits": plan.peak_bytes <= chip.memory_bytes,
            "collective_gib": plan.collective_bytes / GIB,
            "tflops": plan.flops / 1e12,
            "xla_tflops": plan.xla_cost.get("flops", 0.0) / 1e12,
            "bytes_gib": plan.xla_cost.get("bytes accessed", 0.0) / GIB,
            "xla_optimal_s": plan.xla_cost.get("optimal_seconds"),
            "pallas_kernels": plan.hlo.count('custom_call_target="tpu_custom_call"'),
            "compile_s": plan.compile_s}


def table(results: dict[str, dict]) -> str:
    rows = [("| program (per chip) | peak GiB | fits | collectives GiB | TFLOP | XLA TFLOP "
             "| compute floor ms | $ per 1000 at the floor | XLA bytes GiB "
             "| XLA optimal_seconds |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in CASES:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| {name} | {r['error']} | | | | | | | | |")
            continue
        if r.get("refused"):
            rows.append(f"| {name} | > {r['peak_gib']:.2f} (temporaries; the compiler refuses) "
                        "| no | | | | | | | |")
            continue
        s = tpus.parse(r["slice"])
        infer = name.startswith("infer")  # one chip per image batch; a step on the slice
        # XLA's count is whole where there is no loop: inference (the TSD step scans its N steps)
        tflops = r.get("tflops", r["xla_tflops"] if infer else None)
        chips, per = (1, r["images"]) if infer else (s.chips, 1)
        floor = usd = "not read"
        if tflops is not None:
            seconds = tflops * 1e12 / s.chip.bf16_flops
            floor = f"{seconds * 1e3:.1f}"
            usd = f"{seconds * chips * s.chip.usd_per_chip_hour / 3600 / per * 1000:.3f}"
        collectives = f"{r['collective_gib']:.2f}" if "collective_gib" in r else "not read"
        ours = f"{r['tflops']:.2f}" if "tflops" in r else "not read"
        optimal = r["xla_optimal_s"]
        optimal = f"{optimal * 1e3:.1f} ms" if optimal and optimal > 0 else f"{optimal:.0f} (void)"
        rows.append(f"| {name} | {r['peak_gib']:.2f} | {'yes' if r['fits'] else 'no'} | "
                    f"{collectives} | {ours} | {r['xla_tflops']:.2f} | {floor} | {usd} | "
                    f"{r['bytes_gib']:.0f} | {optimal} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--case", action="append", choices=list(CASES))
    p.add_argument("--table", action="store_true", help="only print the table of --json")
    p.add_argument("--hlo", type=Path, help="keep each compiled program's HLO text here")
    args = p.parse_args()
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    for name in [] if args.table else args.case or list(CASES):
        results[name] = run(name, args.hlo)
        print(name, {k: v for k, v in results[name].items() if k != "traceback"}, flush=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    print(table(results))


if __name__ == "__main__":
    main()
