"""TSD-SR as a web page and an HTTP API (Gradio): upload a photo, see it before and after.

    tsdsr-serve --model MODEL_DIR [--port 7860] [--host 127.0.0.1] [--max-batch-size 8]
    tsdsr-serve --model tiny           # no weights: a tiny random model

The page shows the result as a before/after slider (the LR enlarged by nearest neighbour | the
SR) with a download of the PNG. The API is ``/super_resolve``:

    from gradio_client import Client, handle_file
    png = Client("http://127.0.0.1:7860/").predict(handle_file("photo.jpg"),
                                                    api_name="/super_resolve")

Concurrent requests of one size class run as one batched device call
(:mod:`tsdsr_jax.serving.batcher`); the size classes of ``--warm-up`` are compiled before the
port opens. A bad upload gets one line, on the page and in the API, and the server goes on.
Uploads and outputs live in a temporary folder, removed when the server stops. Needs the
``serve`` extra: ``pip install -e '.[serve]'``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import jax

from tsdsr_jax import cli
from tsdsr_jax.inference import colorfix
from tsdsr_jax.inference.command import load_model
from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline, attention_impl
from tsdsr_jax.models import MATMUL_PRECISIONS, PRECISIONS, set_matmul_precision
from tsdsr_jax.models.mmdit import not_runnable_here
from tsdsr_jax.serving.batcher import Batcher
from tsdsr_jax.serving.service import (
    TILE_ABOVE,
    TILINGS,
    Options,
    Output,
    RequestError,
    Service,
)

MAX_PIXELS = 1024 * 1024
# LR sizes whose size classes start-up compiles: squares, 3:4 and 4:3 at 256 and 512 px
WARM_UP = "256x256,192x256,256x192,512x512,384x512,512x384"
WARM_UP_TINY = "128x128"
UPSCALES = (1, 2, 3, 4)
KEEP_S = 3600  # how long uploads and outputs stay in the temporary folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="model directory from `tsdsr-convert`, or 'tiny' (random weights)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="requests of one size class per device call (calls are padded to 1, "
                        "2, 4, ... this)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"larger uploads are refused (default {MAX_PIXELS:,}: 1024x1024, "
                        "a 4096x4096 output)")
    p.add_argument("--warm-up", default=None,
                   help="HxW,... LR sizes whose size classes are compiled, at every batch "
                        f"size, before the port opens ('none': none; default {WARM_UP}, "
                        f"and {WARM_UP_TINY} for --model tiny, whose compiles on a CPU take "
                        "seconds each)")
    p.add_argument("--color-fix", choices=list(colorfix.COLOR_FIXES), default="wavelet",
                   help="the page's default")
    p.add_argument("--upscale", type=int, choices=UPSCALES, default=4, help="the page's default")
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    p.add_argument("--matmul-precision", choices=list(MATMUL_PRECISIONS), default="default")
    p.add_argument("--attention", choices=["xla", "cudnn", "splash"], default=None,
                   help="attention kernel (default: cuDNN on a GPU and splash on a TPU in "
                        "bf16/fp16, else XLA)")
    p.add_argument("--size-classes", type=int, default=2,
                   help="size classes per octave of a side (see tsdsr-infer)")
    p.add_argument("--process-size", type=int, default=512)
    p.add_argument("--seed", type=cli.seed, default=42)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tsdsr_jax",
                   help="JAX's persistent compilation cache (a restart compiles nothing)")
    return p.parse_args(argv)


def warm_up_sizes(text: str) -> list[tuple[int, int]]:
    """``--warm-up``'s ``HxW,...`` as (height, width) pairs; a ValueError names the flag."""
    if text == "none":
        return []
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().partition("x")
        if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
            raise ValueError(f"--warm-up {text}: {item!r} is not HxW (for example 256x192)")
        sizes.append((int(h), int(w)))
    return sizes


def check(args: argparse.Namespace) -> tuple[InferenceConfig, list[tuple[int, int]]]:
    """The flags, before anything loads: the pipeline's config and the warm-up sizes."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port}: must be 1 to 65535")
    try:  # free now, so that the compiles are not for nothing
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there "
                         f"({e.strerror or e})") from None
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size {args.max_batch_size}: must be at least 1")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels {args.max_pixels}: must be at least 1")
    sizes = warm_up_sizes(args.warm_up or (WARM_UP_TINY if args.model == "tiny" else WARM_UP))
    for h, w in sizes:
        if h * w > args.max_pixels:
            raise ValueError(f"--warm-up {h}x{w}: more pixels than --max-pixels "
                             f"{args.max_pixels}")
    try:
        config = InferenceConfig(upscale=args.upscale, color_fix=args.color_fix,
                                 precision=args.precision, attention_impl=args.attention,
                                 size_class_steps=args.size_classes,
                                 process_size=args.process_size)
    except ValueError as e:
        raise cli.flag_error(e) from None
    if why := not_runnable_here(config.attention_impl):
        raise ValueError(f"--attention {config.attention_impl}: {why}; use --attention xla")
    return config, sizes


def page(service: Service, args: argparse.Namespace, gr) -> object:
    """The Gradio Blocks of the page and of the ``/super_resolve`` API."""

    def serve(photo: str | None, color_fix: str, upscale: int | str, tiling: str) -> Output:
        try:
            return service.super_resolve(photo, Options(color_fix, int(upscale), tiling))
        except (RequestError, ValueError) as e:
            raise gr.Error(str(e), print_exception=False) from None

    def on_page(*request) -> tuple[tuple[str, str], str]:  # the slider's pair, the download
        output = serve(*request)
        return (str(output.before), str(output.after)), str(output.after)

    def on_api(photo: str | None, color_fix: str, upscale: int | str, tiling: str) -> str:
        return str(serve(photo, color_fix, upscale, tiling).after)

    tiny = args.model == "tiny"
    with gr.Blocks(title="TSD-SR", delete_cache=(KEEP_S // 2, KEEP_S)) as demo:
        gr.Markdown(
            "# TSD-SR: one-step super-resolution\n"
            "Upload a photo and press **Super-resolve**; drag the slider to compare the photo "
            "(enlarged pixel by pixel) with the result. "
            f"Photos up to {args.max_pixels:,} pixels. [TSD-SR](https://arxiv.org/abs/2411.18263)"
            " in JAX (tsdsr-jax).")
        if tiny:
            gr.Markdown("**This server runs a tiny RANDOM model (`--model tiny`)**: its outputs "
                        "show the service working, not super-resolution. Start it with a "
                        "converted model for real results.", elem_id="tiny-warning")
        with gr.Row():
            with gr.Column(scale=1):
                # a file, not gr.Image, which opens uploads itself: the server reads them
                # (one line naming a file that is not an image, too large or truncated)
                photo = gr.File(label="Photo", file_types=["image"], type="filepath",
                                elem_id="photo")
                with gr.Accordion("Options", open=False):
                    color_fix = gr.Radio(list(colorfix.COLOR_FIXES), value=args.color_fix,
                                         label="Colour fix")
                    upscale = gr.Radio(list(UPSCALES), value=args.upscale, label="Upscale")
                    tiling = gr.Radio(list(TILINGS), value="auto", label="VAE tiling",
                                      info=f"auto: above {TILE_ABOVE:,} output pixels "
                                           "(tiled sizes compile once each)")
                button = gr.Button("Super-resolve", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="Before | after", type="filepath", format="png",
                                        interactive=False, elem_id="slider")
                download = gr.File(label="The result (PNG)", interactive=False,
                                   elem_id="download")
        api_output = gr.Image(label="SR", type="filepath", format="png", visible=False)
        options = [photo, color_fix, upscale, tiling]
        button.click(on_page, options, [slider, download], api_visibility="private",
                     concurrency_id="device")
        gr.Button(visible=False).click(on_api, options, api_output, api_name="super_resolve",
                                       concurrency_id="device")
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config, sizes = check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="tsdsr-serve-"))
    # Gradio keeps its uploads and copies of outputs where this says (read as it imports)
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio as gr
    except ImportError:
        shutil.rmtree(folder)
        print("error: tsdsr-serve needs gradio: pip install -e '.[serve]'", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return serve(args, config, sizes, folder, gr)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve(args: argparse.Namespace, config: InferenceConfig, sizes: list[tuple[int, int]],
          folder: Path, gr) -> int:
    """Loads the model, compiles the warm-up classes, then serves until stopped."""
    if note := attention_impl(config)[1]:
        print(note, file=sys.stderr)
    set_matmul_precision(args.matmul_precision)
    jax.config.update("jax_compilation_cache_dir", str(args.cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        pipe = Pipeline(load_model(args.model), config)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batcher = Batcher(args.max_batch_size, args.seed, log=lambda line: print(line, flush=True))
    tic = time.perf_counter()
    programs = batcher.warm_up(pipe, sizes)
    print(f"warm-up: {programs} program(s) in {time.perf_counter() - tic:.0f} s", flush=True)
    service = Service(pipe, batcher, folder / "outputs", args.max_pixels)
    demo = page(service, args, gr)
    demo.queue(default_concurrency_limit=4 * args.max_batch_size)
    try:
        demo.launch(server_name=args.host, server_port=args.port, show_error=True,
                    max_file_size=8 * args.max_pixels + (1 << 20), prevent_thread_lock=True)
    except OSError as e:  # the port was taken while the model loaded
        print(f"error: --host {args.host} --port {args.port}: {e}", file=sys.stderr)
        batcher.close()
        return 2
    print(f"uploads and outputs in the temporary folder {folder} (removed when the server "
          "stops)", flush=True)
    print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1)
            service.prune(KEEP_S)
    finally:
        demo.close()
        batcher.close()
