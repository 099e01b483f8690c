"""The GPU compiler's plan of every full-size program: SD3-medium and the SD3 VAE, compiled for
an H200 from shapes alone on this host (no GPU; `make .venv-gpu/.aot`, then run with its python).

    .venv-gpu/bin/python bench/compile.py                  # every case (hours on 2 cores)
    .venv-gpu/bin/python bench/compile.py --case "tsd b2 N=4" --case "infer 512² b1"
    .venv-gpu/bin/python bench/compile.py --tiny           # the tiny model (checks the script)

Per program and per GPU: arguments, temporaries and peak GiB, kernel launches, TFLOP, the bytes
its kernels move, its roofline bound (H200: 790 TFLOP/s, 4.2 TB/s; tsdsr_jax.aot.plan), the bytes
the collectives move, and the compile seconds on this host. Results accumulate in ``--json``
(one entry per case, so cases can run one at a time); after each case the table in
bench/RESULTS.md (between its ``compile`` markers) is written anew from them.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from configs import teacher, tiny, tsd  # noqa: E402
from tsdsr_jax.aot import programs  # noqa: E402
from tsdsr_jax.aot.cards import GIB  # noqa: E402
from tsdsr_jax.aot.plan import gpu_devices  # noqa: E402
from tsdsr_jax.inference.pipeline import InferenceConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CARD = "h200"
# The README's large-image flags: the VAE tiled, one window at a time.
LARGE = {"vae_encoder_tile": 1024, "vae_decoder_tile": 128, "vae_max_tiles": 1}
# The official step's peak on an H200 (../shared/bench, 2026-11-26), GB.
OFFICIAL = {"tsd b1 N=1": 20.6, "tsd b2 N=1": 30.9, "tsd b2 N=4": 30.9,
            "tsd b2 N=4, remat none": 30.9}
BEGIN, END = "<!-- compile:begin -->", "<!-- compile:end -->"


def inference_case(side: int, batch: int, tiny_model: bool, **options):
    model = "tiny" if tiny_model else "sd3-medium"
    config = InferenceConfig(precision="bf16", attention_impl="cudnn", **options)
    return lambda: programs.inference(programs.abstract_model(model), config, batch,
                                      (side // 4, side // 4), gpu_devices(CARD, 1))


def training_case(stage: str, batch: int, tiny_model: bool, gpus: int = 1, remat: str = "full",
                  **overrides):
    def build():
        config = (tiny.get_config(stage) if tiny_model else
                  (tsd if stage == "tsd" else teacher).get_config())
        config.model = "tiny" if tiny_model else "sd3-medium"
        config.precision, config.attention_impl = "bf16", "cudnn"
        config.remat_policy = remat
        config.batch_size = batch
        for key, value in overrides.items():
            parent, leaf = key.split(".")
            config[parent][leaf] = value
        return programs.training(config, gpu_devices(CARD, gpus))
    return build


def cases(tiny_model: bool) -> dict:
    s = 128 if tiny_model else 512  # the training crop / the first inference side
    i, t = (lambda *a, **k: inference_case(*a, tiny_model, **k),
            lambda *a, **k: training_case(*a, tiny_model=tiny_model, **k))
    return {
        "infer 512² b1": i(s, 1), "infer 512² b8": i(s, 8), "infer 1024² b1": i(2 * s, 1),
        "infer 2048² b1": i(4 * s, 1), "infer 4096² b1, untiled VAE": i(8 * s, 1),
        "infer 4096² b1, large-image flags": i(8 * s, 1, **(
            {"vae_encoder_tile": 256, "vae_decoder_tile": 16, "vae_max_tiles": 1}
            if tiny_model else LARGE)),
        "tsd b1 N=1": t("tsd", 1, **{"tsd.dasm_steps": 1}),
        "tsd b1 N=4": t("tsd", 1, **{"tsd.dasm_steps": 4}),
        "tsd b2 N=1": t("tsd", 2, **{"tsd.dasm_steps": 1}),
        "tsd b2 N=4": t("tsd", 2, **{"tsd.dasm_steps": 4}),
        "tsd b2 N=4, remat none": t("tsd", 2, remat="none", **{"tsd.dasm_steps": 4}),
        "teacher b2": t("teacher", 2),
        "tsd 8 GPUs x b2, fsdp 8, N=4": t("tsd", 16, gpus=8, **{
            "tsd.dasm_steps": 4, "sharding.data": 1, "sharding.fsdp": 8}),
    }


def table(results: dict) -> str:
    rows = ["| program (per GPU) | args GiB | temp GiB | peak GiB | official peak GB | kernels "
            "| TFLOP | GB moved | roofline ms | collectives GB | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | fails: {r['error'][:120]} | | | | | | | | | |")
            continue
        moved = f"{r['bytes_moved'] / 1e9:.1f}" if "bytes_moved" in r else "n/a"
        bound = f"{r['roofline_ms']:.1f}" if "roofline_ms" in r else "n/a"
        rows.append(
            f"| {name} | {r['argument_bytes'] / GIB:.2f} | {r['temp_bytes'] / GIB:.2f} "
            f"| {r['peak_bytes'] / GIB:.2f} | {OFFICIAL.get(name, '')} | {r['kernels']:,} "
            f"| {r['flops'] / 1e12:.2f} | {moved} | {bound} "
            f"| {r['collective_bytes'] / 1e9:.2f} | {r['compile_s']:.0f} |")
    return "\n".join(rows)


def write_results(path: Path, results: dict, header: str) -> None:
    text = path.read_text()
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{before}{BEGIN}\n{header}\n\n{table(results)}\n{END}{after}")
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny model (checks the script)")
    p.add_argument("--case", action="append", help="only these cases (default: all)")
    p.add_argument("--json", type=Path, default=None,
                   help="accumulated results (default: bench/compile[-tiny].json)")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"),
                   help="the markdown file whose compile table is rewritten ('' for none)")
    args = p.parse_args()
    all_cases = cases(args.tiny)
    unknown = sorted(set(args.case or []) - set(all_cases))
    if unknown:
        p.error(f"unknown --case {unknown}; known: {list(all_cases)}")
    store = args.json or ROOT / "bench" / f"compile{'-tiny' if args.tiny else ''}.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    for name in args.case or all_cases:
        try:
            plan = all_cases[name]().plan()
            results[name] = {k: getattr(plan, k) for k in (
                "argument_bytes", "temp_bytes", "peak_bytes", "kernels", "flops", "bytes_moved",
                "collective_bytes", "compile_s")}
            results[name]["roofline_ms"] = plan.roofline_s() * 1e3
        except Exception as e:  # a program that does not compile is a result too
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results = {k: results[k] for k in all_cases if k in results}
        store.write_text(json.dumps(results, indent=1) + "\n")
        print(name, results[name], flush=True)
        if args.results and not args.tiny:
            header = (f"H200 target (`1x1x1`; 8 GPUs: `1x1x8`), jax {jax.__version__} and its "
                      f"CUDA plugin, compiled on a {os.cpu_count()}-core {platform.machine()} "
                      f"CPU host, last case {datetime.date.today()}: "
                      "`.venv-gpu/bin/python bench/compile.py [--case NAME]` (the cases "
                      "accumulate in bench/compile.json). Memory per GPU from the compiler's "
                      "buffer assignment; official peaks: ../shared/bench on an H200.")
            write_results(Path(args.results), results, header)
    print(table(results))


if __name__ == "__main__":
    main()
