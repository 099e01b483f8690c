"""`infer.py` end to end: official parity through `python -m convert`, sizes, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import infer
from conftest import convert_release
from tsdsr_jax.inference.pipeline import InferenceConfig, Pipeline
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import load_image

DATA = __import__("pathlib").Path(__file__).parent / "data"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def official_one_step(release, lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The official inference math in PyTorch (test_tsdsr.py's `main`), posterior mean, fp32."""
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        x = (F.interpolate(x, size=size, mode="bicubic", align_corners=False) * 2 - 1).clamp(-1, 1)
        release.vae.enable_adapters()
        z = release.vae.encode(x).latent_dist.mean * release.vae.config.scaling_factor
        release.transformer.enable_adapters()
        release.transformer.set_adapter("default")
        v = release.transformer(hidden_states=z, timestep=torch.tensor([1000.0]),
                                encoder_hidden_states=release.prompt_embeds,
                                pooled_projections=release.pooled_prompt_embeds).sample
        image = release.vae.decode((z - v) / release.vae.config.scaling_factor).sample
    image = (image.clamp(-1, 1)[0] * 0.5 + 0.5).permute(1, 2, 0).numpy()
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    return convert_release(release, tmp_path_factory.mktemp("model") / "tsdsr", "lora",
                           "embeddings")


def test_parity_with_official_inference(release, converted, tmp_path):
    lr = load_image(DATA / "astronaut.png")
    want = official_one_step(release, lr, (512, 512))
    code = infer.main(["--model", str(converted), "-i", str(DATA / "astronaut.png"),
                       "-o", str(tmp_path), "--vae", "mean", "--color-fix", "none",
                       "--precision", "fp32", "--attention", "xla"])
    assert code == 0
    got = np.asarray(Image.open(tmp_path / "astronaut.png"))
    assert got.shape == want.shape == (512, 512, 3)
    print(f"PSNR vs the official math: {psnr(got, want):.1f} dB")
    assert psnr(got, want) >= 45.0, psnr(got, want)


def run_tiny(inputs, out, *extra):
    return infer.main(["--model", "tiny", "-i", str(inputs), "-o", str(out), "--precision",
                       "fp32", *extra])


def test_sizes_and_modes(tmp_path):
    """Square, odd, tiny (below 128: the official resize rule) and grayscale inputs."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("astronaut.png", "chelsea.jpg", "camera.png", "rocket.jpg"):
        shutil.copy(DATA / name, inputs)
    rgb = np.asarray(Image.open(DATA / "chelsea.jpg"))
    Image.fromarray(rgb).convert("P").save(inputs / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(inputs / "rgba.png")
    Image.fromarray((np.asarray(Image.open(DATA / "camera.png")).astype(np.uint16) * 257)).save(
        inputs / "gray16.png")
    exif = Image.fromarray(rgb).getexif()
    exif[0x0112] = 6  # rotated 90°: width and height swap
    Image.fromarray(rgb).save(inputs / "rotated.jpg", exif=exif)
    out = tmp_path / "out"
    assert run_tiny(inputs, out, "--vae", "mean") == 0
    sizes = {p.name: Image.open(p).size for p in out.glob("*.png")}
    assert sizes == {"astronaut.png": (512, 512), "chelsea.png": (452, 300),
                     "camera.png": (384, 384), "rocket.png": (284, 428),
                     "palette.png": (452, 300), "rgba.png": (452, 300),
                     "gray16.png": (384, 384), "rotated.png": (300, 452)}
    assert all(Image.open(p).mode == "RGB" for p in out.glob("*.png"))


def test_mean_posterior_is_deterministic(tmp_path):
    for run in ("a", "b"):
        assert run_tiny(DATA / "chelsea.jpg", tmp_path / run, "--vae", "mean", "--seed",
                        "1" if run == "a" else "2") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "chelsea.png")),
                                  np.asarray(Image.open(tmp_path / "b" / "chelsea.png")))


def test_bad_inputs_are_skipped_and_reported(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(DATA / "chelsea.jpg", inputs)
    (inputs / "broken.png").write_bytes((DATA / "coffee.png").read_bytes()[:200])
    (inputs / "text.jpg").write_text("not an image")
    out = inputs / "out"  # an output folder inside the input folder
    before = {p.name: p.read_bytes() for p in inputs.iterdir() if p.is_file()}
    assert run_tiny(inputs, out, "--compare") == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "text.jpg" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["chelsea.png"]
    assert (out / "compare" / "chelsea.png").exists()
    # a second run does not read its own outputs, and the inputs are untouched
    assert run_tiny(inputs, out) == 1
    assert sorted(p.name for p in out.glob("*.png")) == ["chelsea.png"]
    assert {p.name: p.read_bytes() for p in inputs.iterdir() if p.is_file()} == before
    assert not list(out.glob(".*partial*"))


def test_output_folder_equal_to_input_is_refused(tmp_path, capsys):
    shutil.copy(DATA / "chelsea.jpg", tmp_path)
    assert run_tiny(tmp_path, tmp_path) == 2
    assert "another folder" in capsys.readouterr().err


def test_tiles_a_few_at_a_time(tmp_path):
    """Latent tiles in chunks give the image of all tiles at once; VAE windows in chunks (the
    fast mode) give an image of the same size."""
    tiles = ["--vae", "mean", "--latent-tile", "16", "--latent-overlap", "4"]
    assert run_tiny(DATA / "astronaut.png", tmp_path / "all", *tiles) == 0
    assert run_tiny(DATA / "astronaut.png", tmp_path / "chunks", *tiles,
                    "--latent-max-tiles", "3") == 0
    read = lambda run: np.asarray(Image.open(tmp_path / run / "astronaut.png"))  # noqa: E731
    assert np.abs(read("all").astype(int) - read("chunks")).max() <= 1
    assert run_tiny(DATA / "astronaut.png", tmp_path / "vae", "--vae", "mean",
                    "--vae-encoder-tile", "128", "--vae-decoder-tile", "16",
                    "--vae-max-tiles", "2") == 0
    assert read("vae").shape == read("all").shape == (512, 512, 3)


def test_same_named_photos_both_get_outputs(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(DATA / "chelsea.jpg", inputs / "photo.jpg")
    Image.open(DATA / "camera.png").save(inputs / "photo.png")
    shutil.copy(DATA / "rocket.jpg", inputs / "photo_jpg.jpg")  # the first's new name, taken
    assert run_tiny(inputs, tmp_path / "out", "--compare") == 0
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "out").glob("*.png")}
    assert sizes == {"photo_jpg.png": (452, 300), "photo_png.png": (384, 384),
                     "photo_jpg_2.png": (284, 428)}
    assert len(list((tmp_path / "out" / "compare").glob("*.png"))) == 3


def test_one_class_of_sizes_matches_the_official_math_per_image(release, converted):
    """Three sizes in one padded batch of one size class: each equals the official one-step
    math of its own size."""
    pipe = Pipeline(model_dir.load(converted), InferenceConfig(
        process_size=128, vae_posterior="mean", color_fix="none", precision="fp32",
        attention_impl="xla"))
    photo = load_image(DATA / "astronaut.png")
    lrs = [photo[:40, :48], photo[50:86, 10:54], photo[60:104, 70:110]]
    assert len({pipe.size_class(*lr.shape[:2]) for lr in lrs}) == 1
    for lr, got in zip(lrs, pipe(lrs, batch_size=3)):
        want = official_one_step(release, lr, (4 * lr.shape[0], 4 * lr.shape[1]))
        assert got.shape == want.shape
        assert psnr(got, want) >= 45.0, psnr(got, want)
