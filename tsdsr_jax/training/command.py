"""``tsdsr-train`` (or ``tsdsr-train``): ``--config FILE [--config.key=value ...]``.

Two stages share it: ``tsd`` (the one-step student, configs/tsd.py) and ``teacher`` (the
teacher LoRA on SD3's flow-matching loss, configs/teacher.py); see the README.

Exit codes (each but 0 with one line on stderr):

- 0 done;
- 2 a bad flag, config value, work directory, model, dataset or checkpoint (before anything
  compiles), or a work directory that another run holds;
- 65 the data stopped it (a sample that cannot be read, with ``data.skip_invalid=False``, or more
  than ``data.max_skipped`` of them): the step it reached is checkpointed;
- 74 a checkpoint that the run needed could not be written (the disk);
- 75 preempted (SIGTERM or Ctrl-C): the step it was on is checkpointed;
- 130 a second Ctrl-C: stopped at once, without a checkpoint.

After 65, 74, 75 and 130 the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import ml_collections

from tsdsr_jax import cli
from tsdsr_jax.data.layout import DataError
from tsdsr_jax.io import model_dir
from tsdsr_jax.training import run_config
from tsdsr_jax.training.checkpoint import CheckpointError
from tsdsr_jax.training.loop import Stopped, train
from tsdsr_jax.training.preemption import EXIT_CODE as PREEMPTED
from tsdsr_jax.training.run_config import ConfigError
from tsdsr_jax.training.workdir import WorkdirError

INTERRUPTED = 130  # 128 + SIGINT, as a shell gives


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, ml_collections.ConfigDict]:
    """The multi-process flags, and the config with its overrides; all checked."""
    p = cli.ArgumentParser(prog="tsdsr-train", allow_abbrev=False,
                           description="--config FILE [--config.key=value ...]: see the README")
    p.add_argument("--coordinator", help="multi-process runs: host:port of process 0")
    p.add_argument("--num_processes", type=int, help="multi-process runs: how many processes")
    p.add_argument("--process_id", type=int, help="multi-process runs: this process's index")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-host run that jax finds on its own (a Cloud TPU slice of "
                        "several hosts, Kubernetes, Open MPI): no coordinator flags")
    args, rest = p.parse_known_args(argv)
    given = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in given) and None in given:
        p.error("--coordinator, --num_processes and --process_id go together")
    if args.distributed and args.coordinator:
        p.error("--distributed finds the coordinator itself: leave --coordinator out")
    if args.coordinator:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            p.error(f"--coordinator {args.coordinator}: must be host:port")
        if args.num_processes < 1:
            p.error(f"--num_processes {args.num_processes}: must be at least 1")
        if not 0 <= args.process_id < args.num_processes:
            p.error(f"--process_id {args.process_id}: must be >= 0 and < --num_processes "
                    f"{args.num_processes}")
    return args, run_config.read(rest)


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process run: from ``--coordinator`` etc., from SLURM's environment, or as
    jax finds it (``--distributed``)."""
    if not (args.coordinator or args.distributed or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        return
    try:  # collectives between CPU processes (tests, CPU-only runs) go through gloo
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # a jax without the option (gloo by default)
        pass
    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    else:
        jax.distributed.initialize()


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    initialize_distributed(args)
    try:
        preempted = train(config)
    except (ConfigError, WorkdirError, model_dir.ModelDirError, DataError,
            CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("interrupted: stopped at once, without a checkpoint; the same command resumes "
              "from the newest one", file=sys.stderr)
        return INTERRUPTED
    if preempted is not None:
        print(f"stopped at step {preempted}, checkpointed: run the same command to resume",
              file=sys.stderr)
        return PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
