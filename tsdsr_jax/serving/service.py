"""One request of the server, without the web layer: read the upload, choose the pipeline of its
options, run it through the :class:`~tsdsr_jax.serving.batcher.Batcher`, write the PNGs.

A request's options (colour fix, upscale, tiling) pick one of a few pipelines that share one
copy of the weights (:meth:`Pipeline.with_options
<tsdsr_jax.inference.pipeline.Pipeline.with_options>`). Tiling ``auto`` tiles the VAE (1024-px
encoder windows, 128-px decoder windows, one at a time) when the output has more than
:data:`TILE_ABOVE` pixels; the transformer's latent tiles are automatic in every mode (the
official rule). Every problem is a :class:`RequestError`, one line that names the upload.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tsdsr_jax.checks import in_range, one_of
from tsdsr_jax.inference import colorfix
from tsdsr_jax.inference.pipeline import MAX_UPSCALE, Pipeline
from tsdsr_jax.io.images import ImageError, load_photo, save_image
from tsdsr_jax.serving.batcher import Batcher

TILINGS = ("auto", "off", "on")
TILE_ABOVE = 2048 * 2048  # output pixels above which tiling "auto" tiles the VAE
VAE_TILES = {"vae_encoder_tile": 1024, "vae_decoder_tile": 128, "vae_max_tiles": 1}


class RequestError(ValueError):
    """A request that cannot be served; the message is for the client."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What a request may choose."""

    color_fix: str = "wavelet"  # wavelet | adain | none
    upscale: int = 4
    tiling: str = "auto"        # auto | off | on (the VAE's)

    def __post_init__(self):
        one_of(self, "color_fix", colorfix.COLOR_FIXES)
        in_range(self, "upscale", 1, MAX_UPSCALE)
        one_of(self, "tiling", TILINGS)

    def tiled(self, lr_shape: tuple[int, int]) -> bool:
        """Whether an LR image of ``lr_shape`` runs with a tiled VAE."""
        pixels = self.upscale ** 2 * lr_shape[0] * lr_shape[1]
        return self.tiling == "on" or (self.tiling == "auto" and pixels > TILE_ABOVE)


class Output(NamedTuple):
    before: Path  # the LR enlarged by nearest neighbour to the output's size (PNG)
    after: Path   # the SR (PNG, the input's ICC profile carried)


class Service:
    """The server's work. ``pipe`` gives the default options' pipeline and the weights;
    ``folder`` (a temporary folder of the server's) receives the outputs."""

    def __init__(self, pipe: Pipeline, batcher: Batcher, folder: Path, max_pixels: int):
        self.pipe, self.batcher, self.folder, self.max_pixels = pipe, batcher, folder, max_pixels
        c = pipe.config
        self._pipelines = {(c.color_fix, c.upscale, c.tiled_vae): pipe}
        self._lock = threading.Lock()

    def pipeline(self, options: Options, lr_shape: tuple[int, int]) -> Pipeline:
        """The pipeline of ``options`` for an LR image of ``lr_shape``, made once."""
        tiled = options.tiled(lr_shape)
        key = (options.color_fix, options.upscale, tiled)
        with self._lock:
            if key not in self._pipelines:
                changes = {"color_fix": options.color_fix, "upscale": options.upscale}
                if tiled:
                    changes.update(VAE_TILES)
                self._pipelines[key] = self.pipe.with_options(**changes)
            return self._pipelines[key]

    def super_resolve(self, upload: str | Path | None, options: Options) -> Output:
        """Super-resolves the uploaded file ``upload``; its name keys the posterior noise, as
        ``tsdsr-infer -i NAME`` does."""
        if upload is None:
            raise RequestError("no photo: upload one first")
        path = Path(upload)
        try:
            photo = load_photo(path, self.max_pixels)
        except ImageError as e:
            raise RequestError(str(e).replace(str(path), path.name)) from None
        lr = photo.pixels
        pipe = self.pipeline(options, lr.shape[:2])
        result = self.batcher.submit(pipe, path.name, lr).result()
        if result.problem:  # the pipeline's advice names tsdsr-infer's flags: this is ours
            problem = result.problem.partition("; try")[0]
            raise RequestError(f"{path.name}: {problem}; try tiling 'on', or a smaller photo")
        out = self.folder / uuid.uuid4().hex
        before = np.kron(lr, np.ones((options.upscale, options.upscale, 1), np.uint8))
        after = out / f"{path.stem}_x{options.upscale}.png"
        save_image(result.sr, after, icc_profile=photo.icc_profile)
        save_image(before, out / f"{path.stem}_lr.png", compress_level=1,
                   icc_profile=photo.icc_profile)
        return Output(out / f"{path.stem}_lr.png", after)

    def prune(self, age_s: float) -> None:
        """Removes the outputs older than ``age_s`` seconds."""
        if not self.folder.is_dir():
            return
        for out in self.folder.iterdir():
            if time.time() - out.stat().st_mtime > age_s:
                shutil.rmtree(out, ignore_errors=True)
