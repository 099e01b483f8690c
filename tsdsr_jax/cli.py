"""Command-line flags shared by the commands that build the inference network (infer.py and the
fit check), and the :class:`~tsdsr_jax.inference.pipeline.InferenceConfig` they give."""

from __future__ import annotations

import argparse
import sys

from tsdsr_jax.checks import SEEDS
from tsdsr_jax.inference.pipeline import InferenceConfig
from tsdsr_jax.models import MATMUL_PRECISIONS, PRECISIONS


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (no usage block) and exit 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def seed(text: str) -> int:
    """An argparse type: a seed, in [0, 2**32)."""
    value = int(text)
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"{value}: must be >= 0 and < 2**32")
    return value


def add_network_flags(p: argparse.ArgumentParser) -> None:
    """The flags that shape the jitted network: sizes, precision, batching and tiling."""
    p.add_argument("--upscale", type=int, default=4)
    p.add_argument("--process-size", type=int, default=512)
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16",
                   help="compute precision (fp32's matmuls and convolutions are TF32 on "
                        "Ampere and Hopper GPUs: see --matmul-precision)")
    p.add_argument("--matmul-precision", choices=list(MATMUL_PRECISIONS), default="default",
                   help="float32 matmuls and convolutions: XLA's default (TF32 on Ampere and "
                        "Hopper GPUs) or highest (true float32, slower)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images of one size class per call")
    p.add_argument("--size-classes", type=int, default=2,
                   help="size classes per octave of a side: images of one class share a "
                        "compiled program (0: a program per size)")
    p.add_argument("--devices", type=int, default=1,
                   help="split each batch over this many devices (a multiple of them)")
    p.add_argument("--latent-tile", type=int, default=64)
    p.add_argument("--latent-overlap", type=int, default=8)
    p.add_argument("--vae-encoder-tile", type=int, default=None,
                   help="tile the VAE encoder (image pixels), for very large images")
    p.add_argument("--vae-decoder-tile", type=int, default=None,
                   help="tile the VAE decoder (latent pixels), for very large images")
    p.add_argument("--latent-max-tiles", type=int, default=None,
                   help="latent tiles per transformer call (default: all; fewer use less memory)")
    p.add_argument("--vae-max-tiles", type=int, default=None,
                   help="VAE windows per call (default: all, exact); fewer use less memory, "
                        "with GroupNorm statistics estimated from a downscaled copy")
    p.add_argument("--attention", choices=["xla", "cudnn", "splash"], default=None,
                   help="attention kernel (default: cuDNN on a GPU and splash on a TPU in "
                        "bf16/fp16, else XLA)")


# InferenceConfig fields whose flag is not the field's name
FLAG_NAMES = {"attention_impl": "attention", "vae_posterior": "vae",
              "size_class_steps": "size_classes"}


def inference_config(args: argparse.Namespace, **overrides) -> InferenceConfig:
    """The config of :func:`add_network_flags`' flags (plus ``overrides``), with the batch and
    devices flags checked; a ``ValueError`` names the flag."""
    if args.devices < 1 or args.batch_size < 1:
        name = "--devices" if args.devices < 1 else "--batch-size"
        raise ValueError(f"{name} {min(args.devices, args.batch_size)}: must be at least 1")
    if args.batch_size % args.devices:
        raise ValueError(f"--batch-size {args.batch_size} is not a multiple of "
                         f"--devices {args.devices}")
    try:
        return InferenceConfig(**{
            "upscale": args.upscale, "process_size": args.process_size,
            "precision": args.precision, "latent_tile": args.latent_tile,
            "latent_overlap": args.latent_overlap, "vae_encoder_tile": args.vae_encoder_tile,
            "vae_decoder_tile": args.vae_decoder_tile, "latent_max_tiles": args.latent_max_tiles,
            "vae_max_tiles": args.vae_max_tiles, "attention_impl": args.attention,
            "size_class_steps": args.size_classes, **overrides})
    except ValueError as e:
        raise flag_error(e) from None


def flag_error(error: ValueError) -> ValueError:
    """An :class:`InferenceConfig` check's "field=value: why" as "--flag value: why"."""
    field, _, rest = str(error).partition("=")
    return ValueError(f"--{FLAG_NAMES.get(field, field).replace('_', '-')} {rest}")
