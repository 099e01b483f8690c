"""LPIPS against the ``lpips`` package: random torchvision backbones, the package's real heads."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import lpips as lpips_package
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageFilter

from conftest import rel_err
from tsdsr_jax.conversion.command import main as convert_main
from tsdsr_jax.conversion.lpips import plan_lpips
from tsdsr_jax.conversion.torch_layout import ConversionError
from tsdsr_jax.evaluation.evaluate import lpips_distances
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.tree import flatten, nest
from tsdsr_jax.models.lpips import lpips

DATA = Path(__file__).parent / "data"
SIZE = (64, 48)  # W, H
distance = jax.jit(lpips, static_argnames="dtype")
input_grad = jax.jit(jax.grad(lambda p, x, y, dtype=None: jnp.sum(lpips(p, x, y, dtype)),
                              argnums=1), static_argnames="dtype")
SOME = [0, 4, 8]  # one pair per photo: blurred astronaut, noisy coffee, JPEG chelsea
BACKBONES = {"alex": ("alexnet", torchvision.models.alexnet),
             "vgg": ("vgg16", torchvision.models.vgg16)}


def distorted(image: Image.Image, kind: str) -> Image.Image:
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(2))
    if kind == "noise":
        noise = np.random.default_rng(0).normal(0, 12, (SIZE[1], SIZE[0], 3))
        return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=15)
    return Image.open(buf).convert("RGB")


@pytest.fixture(scope="module")
def pairs() -> tuple[np.ndarray, np.ndarray]:
    """Three photos, each against its blurred, noisy and JPEG copy: (9, H, W, 3) in [0, 1]."""
    photos = [Image.open(DATA / n).convert("RGB").resize(SIZE, Image.BICUBIC)
              for n in ("astronaut.png", "coffee.png", "chelsea.jpg")]
    x = [np.asarray(p) for p in photos for _ in range(3)]
    y = [np.asarray(distorted(p, k)) for p in photos for k in ("blur", "noise", "jpeg")]
    return tuple(np.stack(v).astype(np.float32) / 255 for v in (x, y))


def save_backbone(folder: Path, net: str) -> Path:
    """A random torchvision ImageNet network saved as torchvision's checkpoints are."""
    stem, make = BACKBONES[net]
    torch.manual_seed(0)
    file = folder / f"{stem}-test.pth"
    torch.save(make().state_dict(), file)
    return file


def reference(file: Path, net: str) -> lpips_package.LPIPS:
    """``lpips.LPIPS`` with the backbone of ``file`` copied into its slices."""
    model = lpips_package.LPIPS(net=net, pnet_rand=True, version="0.1", verbose=False)
    backbone = torch.load(file, weights_only=True)
    slices = {int(name.split(".")[1]): name for name, _ in model.net.named_modules()
              if name.count(".") == 1}
    state = {f"net.{slices[int(k.split('.')[1])]}.{k.split('.')[2]}": v
             for k, v in backbone.items() if k.startswith("features.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(not k.startswith("net.") for k in missing)
    return model


@pytest.fixture(scope="module", params=["alex", "vgg"])
def nets(request, tmp_path_factory):
    """``(net, checkpoint file, torch reference, our params)``."""
    net = request.param
    file = save_backbone(tmp_path_factory.mktemp(net), net)
    planned, entry = plan_lpips(file)
    assert entry == {"net": net, "source": str(file)}
    params = nest({k: jnp.asarray(planned.fetch(k)) for k in planned.specs})
    return net, file, reference(file, net), params


def torch_nchw(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(x.transpose(0, 3, 1, 2), dtype=dtype)


def test_matches_lpips_package(nets, pairs):
    _, _, model, params = nets
    x, y = pairs
    with torch.no_grad():
        want = model(torch_nchw(x), torch_nchw(y), normalize=True).flatten().numpy()
    got = distance(params, jnp.asarray(x), jnp.asarray(y))
    assert got.shape == (len(x),) and got.dtype == jnp.float32
    assert np.all(want > 1e-3)
    assert rel_err(got, want) < 1e-5


def test_gradient_matches_lpips_package(nets, pairs):
    """Against torch's float64 gradient (on larger VGG inputs torch's own float32 gradient
    strays up to ~6e-3 from it, through near-ties in max-pooling)."""
    _, _, model, params = nets
    x, y = (v[SOME] for v in pairs)
    tx = torch_nchw(x, torch.float64).requires_grad_()
    copy.deepcopy(model).double()(tx, torch_nchw(y, torch.float64), normalize=True).sum().backward()
    grad = input_grad(params, jnp.asarray(x), jnp.asarray(y))
    assert rel_err(grad, tx.grad.numpy().transpose(0, 2, 3, 1)) < 1e-4


def test_bf16_stays_close(nets, pairs):
    _, _, _, params = nets
    x, y = (jnp.asarray(v[SOME]) for v in pairs)
    want = distance(params, x, y)
    bf16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    got = distance(bf16, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), jnp.bfloat16)
    assert got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-2
    grad = input_grad(bf16, x, y, jnp.bfloat16)
    assert grad.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(grad)))


def test_identical_images_are_near_zero(nets, pairs):
    _, _, _, params = nets
    x = jnp.asarray(pairs[0])
    assert np.all(np.asarray(distance(params, x, x)) < 1e-12)


def test_convert_cli_writes_lpips(release, tmp_path):
    file = save_backbone(tmp_path, "alex")
    out = tmp_path / "model"
    assert convert_main(["--sd3", str(release.sd3), "--lpips-backbone", str(file),
                         "--out", str(out), "--dtype", "fp32"]) == 0
    config = json.loads((out / model_dir.CONFIG).read_text())
    assert config["lpips"] == {"net": "alex", "source": str(file)}
    net, params = model_dir.load_lpips(out)
    state = torch.load(file, weights_only=True)
    assert net == "alex"
    np.testing.assert_array_equal(flatten(params)["features.3.kernel"],
                                  state["features.3.weight"].numpy().transpose(2, 3, 1, 0))


def test_model_dir_without_lpips(release, tmp_path):
    out = tmp_path / "model"
    assert convert_main(["--sd3", str(release.sd3), "--out", str(out), "--dtype", "fp32"]) == 0
    with pytest.raises(model_dir.ModelDirError, match="has no LPIPS weights"):
        model_dir.load_lpips(out)


def test_bad_backbone_is_reported(release, tmp_path, capsys):
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    del state["features.0.weight"]
    state["features.3.bias"] = torch.zeros(7)
    state["features.99.weight"] = torch.zeros(1)
    file = tmp_path / "alexnet-broken.pth"  # no 11x11 features.0: the name tells the net
    torch.save(state, file)
    with pytest.raises(ConversionError) as e:
        plan_lpips(file)
    for needle in ("missing tensor features.0.weight", "features.3.bias has shape (7,)",
                   "unexpected tensor features.99.weight"):
        assert needle in str(e.value)
    out = tmp_path / "model"
    assert convert_main(["--sd3", str(release.sd3), "--lpips-backbone", str(file),
                         "--out", str(out)]) != 0
    assert "features.99.weight" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_backbone_is_reported(tmp_path):
    file = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, file)
    with pytest.raises(ConversionError, match="neither a torchvision AlexNet nor a VGG16"):
        plan_lpips(file)
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read as a torch checkpoint"):
        plan_lpips(file)


def test_padded_batch_matches_lpips_package_per_pair(nets, pairs):
    """Pairs of three sizes padded into one batch (garbage beyond them) give the lpips
    package's distance of each pair alone."""
    _, _, model, params = nets
    x, y = pairs
    sizes = [(40, 56), (48, 48), (32, 64)]
    canvas = np.random.default_rng(0).random((2, 3, 56, 72, 3), dtype=np.float32)
    want = []
    for b, (h, w) in enumerate(sizes):
        canvas[0, b, :h, :w], canvas[1, b, :h, :w] = x[3 * b, :h, :w], y[3 * b + 1, :h, :w]
        with torch.no_grad():
            want.append(float(model(torch_nchw(x[3 * b:3 * b + 1, :h, :w]),
                                    torch_nchw(y[3 * b + 1:3 * b + 2, :h, :w]),
                                    normalize=True)))
    got = jax.jit(lpips)(params, canvas[0], canvas[1], extent=np.array(sizes, np.int32))
    assert rel_err(np.asarray(got), np.array(want)) < 1e-5


def test_evaluate_batches_mixed_sizes_by_class(nets, pairs):
    """tsdsr-evaluate's LPIPS of pairs of several sizes (two share a class, batched and padded)
    equals the lpips package's, pair by pair."""
    _, _, model, params = nets
    x, y = (np.rint(v * 255).astype(np.uint8) for v in pairs)
    images = [(x[0, :40, :56], y[0, :40, :56]), (x[4, :48, :48], y[4, :48, :48]),
              (x[8, :33, :64], y[8, :33, :64])]
    got = lpips_distances(images, params)
    for i, (a, b) in enumerate(images):
        with torch.no_grad():
            want = float(model(torch_nchw(a[None] / np.float32(255)),
                               torch_nchw(b[None] / np.float32(255)), normalize=True))
        assert abs(got[i] - want) <= 1e-5 * max(abs(want), 1e-3), (i, got[i], want)
