"""LPIPS weights: a torchvision ImageNet backbone plus the ``lpips`` package's v0.1 linear heads.

The backbone is ``alexnet-*.pth`` or ``vgg16-*.pth`` as torchvision downloads it (its
``classifier.*`` tensors are not used); the heads are ``lpips/weights/v0.1/{alex,vgg}.pth``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from tsdsr_jax.conversion.torch_layout import ConversionError, OutputFile, plan_tree
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.tree import flatten
from tsdsr_jax.models import lpips

_FILE_PREFIX = {"alexnet": "alex", "vgg16": "vgg"}


def _torch_load(file: Path) -> dict[str, Any]:
    import torch  # only the converter needs torch, to read the checkpoints

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConversionError(f"{file}: cannot read as a torch checkpoint ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{file}: not a state dict of tensors")
    return state


def backbone_net(state: dict[str, Any], file: Path) -> str:
    """``'alex'`` or ``'vgg'``: told by the tensors (VGG16 has ``features.28``, AlexNet an 11x11
    ``features.0``), else by the file name (``alexnet-*`` / ``vgg16-*``)."""
    if "features.28.weight" in state:
        return "vgg"
    first = state.get("features.0.weight")
    if first is not None and tuple(first.shape[2:]) == (11, 11):
        return "alex"
    for prefix, net in _FILE_PREFIX.items():
        if file.name.lower().startswith(prefix):
            return net
    raise ConversionError(f"{file}: neither a torchvision AlexNet nor a VGG16 checkpoint "
                          "(no features.28 or 11x11 features.0; name not alexnet-* or vgg16-*)")


def heads_file(net: str) -> Path:
    """The installed ``lpips`` package's v0.1 linear heads for ``net``."""
    try:
        import lpips as lpips_package
    except ImportError:
        raise ConversionError("the LPIPS heads come from the `lpips` package: "
                              "pip install lpips") from None
    return Path(lpips_package.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def plan_lpips(backbone: Path) -> tuple[OutputFile, dict[str, str]]:
    """Checks the backbone and the heads; returns ``lpips.safetensors`` (float32) and its
    config.json entry ``{'net': ..., 'source': ...}``."""
    if not backbone.is_file():
        raise ConversionError(f"{backbone}: no such file")
    state = _torch_load(backbone)
    net = backbone_net(state, backbone)
    heads = heads_file(net)
    source = state | _torch_load(heads)
    keys = {k for k in source if not k.startswith("classifier.")}
    expected = flatten(lpips.abstract_params(net))
    planned = plan_tree(model_dir.LPIPS, expected, source, f"{backbone} + {heads}",
                        np.float32, keys=keys)
    return planned, {"net": net, "source": str(backbone)}
