"""Does it fit? The GPU or TPU compiler's memory plan of a training config or an inference size
on a card or a TPU slice, and the largest batch that fits, on any host (no GPU or TPU needed;
`make .venv-gpu/.aot`, which holds both compilers):

    tsdsr-fit --gpu rtx4090 --config configs/tsd.py [--config.key=value ...]
    tsdsr-fit --gpu a100-40g --infer --size 4096 --vae-encoder-tile 1024 ...
    tsdsr-fit --tpu v5e-8 --config configs/tsd.py --config.sharding.fsdp=8

Training takes the config's model (its config.json only; SD3-medium's shapes when the folder is
absent), its mesh over ``--gpus`` GPUs and ``batch_size`` as the global batch. Inference takes
infer.py's network flags and the output side ``--size``. A program fits when its peak (arguments,
outputs and temporaries, per GPU) is within the share of the card's memory that JAX takes
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, 0.75 by default; on a TPU, the chip's whole HBM). On a
TPU slice, training's mesh spans all its chips, and figures are per chip. The largest batch is
read off the line through two compiles (memory grows about linearly with the batch), narrowed by
a few more, and checked by compiling its next batch.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")              # compile for the GPU, run nothing
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from tsdsr_jax import cli  # noqa: E402
from tsdsr_jax.aot import programs, tpus  # noqa: E402
from tsdsr_jax.aot.cards import CARDS, GIB  # noqa: E402
from tsdsr_jax.aot.plan import NoGPUCompiler, Plan, gpu_devices  # noqa: E402
from tsdsr_jax.io import model_dir  # noqa: E402
from tsdsr_jax.models import set_matmul_precision  # noqa: E402
from tsdsr_jax.models.mmdit import resolve_attention  # noqa: E402
from tsdsr_jax.training import (
    run_config,  # noqa: E402
    stages,  # noqa: E402
)
from tsdsr_jax.training.run_config import ConfigError  # noqa: E402

MAX_BATCH = 4096


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = cli.ArgumentParser(prog="tsdsr-fit",
                           description=__doc__.split("\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--gpu", choices=sorted(CARDS))
    target.add_argument("--tpu", help=f"a Cloud TPU slice: {', '.join(tpus.CHIPS)} and a count "
                                      "(v5e-8, v5p-8, v6e-64, ...)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs on one host (training's mesh)")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="the share of a device's memory JAX takes (default: as JAX would; "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75 on a GPU, 1 on a TPU)")
    p.add_argument("--no-search", action="store_true", help="only the given batch")
    p.add_argument("--infer", action="store_true", help="inference instead of training")
    p.add_argument("--size", type=int, default=512, help="--infer: the output side in pixels")
    p.add_argument("--model", default="sd3-medium",
                   help="--infer: a model directory (its config.json), or sd3-medium")
    cli.add_network_flags(p)
    args, rest = p.parse_known_args(argv)
    if args.mem_fraction is None:
        args.mem_fraction = 1.0 if args.tpu else float(
            os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))
    if not 0 < args.mem_fraction <= 1:
        p.error(f"--mem-fraction {args.mem_fraction}: between 0 and 1")
    for name in ("gpus", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.infer and rest:
        p.error(f"--infer takes no training config: {' '.join(rest)}")
    if not args.infer and not any(a.startswith("--config") for a in rest):
        p.error("give --config FILE (training) or --infer")
    return args, rest


def training_runner(config, devices: list) -> tuple[Callable[[int], Plan], int, str]:
    """Compiles the step at a per-GPU batch; the config's own per-GPU batch; a description."""
    if config.model != "tiny" and not Path(config.model).is_dir():
        print(f"note: {config.model} not found: SD3-medium's shapes")
        config.model = "sd3-medium"
    _, mesh = stages.make_mesh(config, devices)
    config.attention_impl = resolve_attention(config.attention_impl, programs.platform(devices))

    def compile_at(per_gpu: int) -> Plan:
        config.batch_size = per_gpu * mesh.size
        return programs.training(config, devices).plan()

    what = (f"{config.stage} step, {config.model}, {config.precision}, attention "
            f"{config.attention_impl}, remat {config.remat_policy}, mesh data="
            f"{mesh.shape['data']} x fsdp={mesh.shape['fsdp']}")
    return compile_at, config.batch_size // mesh.size, what


def inference_runner(args: argparse.Namespace, devices: list
                     ) -> tuple[Callable[[int], Plan], int, str]:
    config = cli.inference_config(args, attention_impl=args.attention or (
        resolve_attention("auto", programs.platform(devices)) if args.precision != "fp32"
        else None))
    if args.size % config.upscale:
        raise ConfigError(f"--size {args.size} is not a multiple of "
                                 f"--upscale {config.upscale}")
    model = programs.abstract_model(args.model)
    lr = args.size // config.upscale

    def compile_at(per_gpu: int) -> Plan:
        return programs.inference(model, config, per_gpu * args.devices, (lr, lr),
                                  devices[:args.devices]).plan()

    what = f"inference {args.size}² ×{config.upscale}, {args.model}, {config.precision}"
    return compile_at, args.batch_size // args.devices, what


def largest_batch(compile_at: Callable[[int], Plan], plans: dict[int, Plan], budget: float
                  ) -> int | None:
    """The largest per-GPU batch (at most ``MAX_BATCH``) whose peak fits ``budget``, with the
    fewest compiles: each next batch is read off the line through the two nearest compiled
    peaks (memory grows about linearly with the batch), or halves the range between the
    largest batch that fits and the smallest that does not when a guess did not halve it. The
    answer's next batch is compiled too, so the answer is checked, not extrapolated."""
    def fits(b: int) -> bool:  # compiles batch b the first time it is asked
        if b not in plans:
            plans[b] = compile_at(b)
        return plans[b].peak_bytes <= budget

    def bracket() -> tuple[int, int]:
        """The largest batch known to fit, and the smallest above it known not to."""
        lo = max(b for b in plans if fits(b))
        return lo, min([b for b in plans if b > lo] + [MAX_BATCH + 1])

    if not fits(1):
        return None
    fits(2)  # two points for the first line
    halve = False
    while True:
        lo, hi = bracket()
        if hi - lo <= 1:
            return lo
        if halve and hi <= MAX_BATCH:
            guess = (lo + hi) // 2
        else:
            low, high = (lo, hi) if hi in plans else (max(b for b in plans if b < lo), lo)
            slope = (plans[high].peak_bytes - plans[low].peak_bytes) / (high - low)
            guess = (hi - 1 if slope <= 0
                     else lo + int((budget - plans[lo].peak_bytes) // slope))
        fits(min(max(guess, lo + 1), hi - 1))
        new_lo, new_hi = bracket()
        halve = new_hi - new_lo > (hi - lo) / 2


def target(args: argparse.Namespace) -> tuple[str, str, int, list]:
    """The card or slice: its name, its description, a device's memory and the devices."""
    if args.tpu:
        tpu = tpus.parse(args.tpu)
        what = (f"{args.tpu} ({tpu.chips} chip(s) of {tpu.chip.description}, {tpu.hosts} "
                "host(s))")
        return args.tpu, what, tpu.chip.memory_bytes, tpus.devices(args.tpu)
    card = CARDS[args.gpu]
    return (args.gpu, card.description, card.memory_bytes,
            gpu_devices(args.gpu, max(args.gpus, args.devices)))


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    unit = "chip" if args.tpu else "GPU"
    try:
        name, what_device, memory, devices = target(args)
        budget = args.mem_fraction * memory
        if args.infer:
            set_matmul_precision(args.matmul_precision)
            compile_at, given, what = inference_runner(args, devices)
        else:
            config = run_config.read(rest)
            set_matmul_precision(config.matmul_precision)
            compile_at, given, what = training_runner(config, devices)
        print(f"{what_device}: {memory / GIB:.1f} GiB per {unit}, JAX takes "
              f"{args.mem_fraction:.0%} = {budget / GIB:.1f} GiB. {what}")
        plans = {given: compile_at(given)}
        best = None if args.no_search else largest_batch(compile_at, plans, budget)
    except (ConfigError, NoGPUCompiler, tpus.NoTPUCompiler, ValueError,
            model_dir.ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'batch/' + unit:>10} {'args GiB':>9} {'temp GiB':>9} {'peak GiB':>9}  fits")
    for b, plan in sorted(plans.items()):
        print(f"{b:>10} {plan.argument_bytes / GIB:>9.2f} {plan.temp_bytes / GIB:>9.2f} "
              f"{plan.peak_bytes / GIB:>9.2f}  {'yes' if plan.peak_bytes <= budget else 'no'}")
    fits = plans[given].peak_bytes <= budget
    print(f"batch {given} per {unit} {'fits' if fits else 'does NOT fit'} on the {name}")
    if not args.no_search:
        print(f"largest batch per {unit} that fits: {best}" if best else
              "not even batch 1 fits" + (": tile it (see the README's large-image flags)"
                                         if args.infer else ""))
    return 0 if fits else 1

if __name__ == "__main__":
    sys.exit(main())
