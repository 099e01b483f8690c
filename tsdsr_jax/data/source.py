"""Reading one training sample: images to [-1, 1] float32 NHWC, tensors checked by shape."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tsdsr_jax.data import degrade as degrade_lib
from tsdsr_jax.data.layout import DataError, Record
from tsdsr_jax.io.images import ImageError, load_image
from tsdsr_jax.io.safetensors import SafeTensors, SafetensorsError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """The shapes every sample must have (defaults: SD3 at 512²)."""

    resolution: int = 512
    prompt_shape: tuple[int, int] = (333, 4096)
    pooled_dim: int = 2048
    latent_channels: int = 16
    vae_factor: int = 8

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_factor
        return (side, side, self.latent_channels)


def read_tensor(path: str) -> np.ndarray:
    """A tensor file as a float32 array: ours (safetensors with one tensor, or .npy) or the
    official torch ``.pt`` (loaded with ``weights_only=True``: no pickled code runs)."""
    try:
        if path.endswith(".safetensors"):
            tensors = SafeTensors(path)
            if len(tensors) != 1:
                raise DataError(f"{path}: holds {len(tensors)} tensors, expected one")
            return np.array(next(iter(tensors.values())), np.float32)
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False).astype(np.float32)
        import torch  # only for the official files

        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise DataError(f"{path}: holds a {type(tensor).__name__}, not a tensor")
        return tensor.float().numpy()
    except DataError:
        raise
    except (OSError, ValueError, SafetensorsError, RuntimeError, EOFError) as e:
        raise DataError(f"{path}: cannot read tensor ({e})") from None


def _squeeze_to(array: np.ndarray, shape: Sequence[int], path: str, nchw: bool = False
                ) -> np.ndarray:
    """``array`` without leading unit axes, checked against ``shape``; ``nchw`` also accepts
    the official channels-first latent layout and transposes it."""
    while array.ndim > len(shape) and array.shape[0] == 1:
        array = array[0]
    if nchw and array.shape == (shape[2], shape[0], shape[1]):
        array = np.ascontiguousarray(array.transpose(1, 2, 0))
    if array.shape != tuple(shape):
        raise DataError(f"{path}: shape {array.shape}, expected {tuple(shape)}")
    return array


def _image(path: str, side: int) -> np.ndarray:
    """An image file as (side, side, 3) uint8, or a ``DataError`` naming it."""
    try:
        image = load_image(Path(path))
    except ImageError as e:
        raise DataError(str(e)) from None
    if image.shape[:2] != (side, side):
        raise DataError(f"{path}: size {image.shape[1]}x{image.shape[0]}, expected {side}x{side}")
    return image


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] to float32 [-1, 1], as the official ``ToTensor() * 2 - 1``."""
    return image.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def load_sample(record: Record, index: int, spec: SampleSpec,
                degradation: degrade_lib.DegradeConfig | None, seed: tuple[int, ...]
                ) -> dict[str, Any]:
    """One training sample. With ``degradation`` the LR is made from the HR, deterministically
    from (``*seed``, ``index``); otherwise it is read from ``lr_bicubic/``, if the record has
    one (the teacher stage reads none)."""
    side = spec.resolution
    hr = _image(record.hr, side)
    sample = {
        "hr": to_unit(hr),
        "prompt_embeds": _squeeze_to(read_tensor(record.prompt_embeds), spec.prompt_shape,
                                     record.prompt_embeds),
        "pooled_prompt_embeds": _squeeze_to(read_tensor(record.pooled_prompt_embeds),
                                            (spec.pooled_dim,), record.pooled_prompt_embeds),
    }
    if degradation is not None:
        sample["lr"] = degrade_lib.degrade(hr, degradation, degrade_lib.rng(*seed, index))
    elif record.lr is not None:
        sample["lr"] = to_unit(_image(record.lr, side))
    if record.latent_hr is not None:
        sample["latent_hr"] = _squeeze_to(read_tensor(record.latent_hr), spec.latent_shape,
                                          record.latent_hr, nchw=True)
    return sample


@dataclasses.dataclass(frozen=True)
class SampleLoader:
    """``(index, record) -> sample``, picklable for grain's worker processes. With
    ``skip_invalid`` a broken sample is logged by name and dropped (None), and appended to the
    file ``report`` (name, tab, reason: one line each, from any process); else it raises."""

    spec: SampleSpec
    degradation: degrade_lib.DegradeConfig | None
    seed: tuple[int, ...]  # with the stream position, seeds the degradation
    skip_invalid: bool
    report: str | None = None

    def __call__(self, index: int, record: Record) -> dict[str, Any] | None:
        try:
            return load_sample(record, index, self.spec, self.degradation, self.seed)
        except DataError as e:
            if not self.skip_invalid:
                raise
            log.warning("skipping sample %s: %s", record.name, e)
            if self.report:
                reason = " ".join(str(e).split())
                with open(self.report, "a") as f:  # one short append: whole lines
                    f.write(f"{record.name}\t{reason}\n")
            return None
