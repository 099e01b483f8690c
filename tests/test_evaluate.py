"""The evaluation command: PSNR/SSIM against pyiqa on real photos, LPIPS, GRID, bad inputs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from test_lpips import reference, save_backbone

from tsdsr_jax.evaluation.evaluate import COLUMNS, main
from tsdsr_jax.evaluation.grid import grid_score
from tsdsr_jax.io import model_dir

DATA = Path(__file__).parent / "data"


def degrade(image: Image.Image, kind: str) -> Image.Image:
    if kind == "blur+jpeg":
        buf = io.BytesIO()
        image.filter(ImageFilter.GaussianBlur(1.5)).save(buf, format="JPEG", quality=30)
        return Image.open(buf).convert("RGB")
    if kind == "noise":
        noise = np.random.default_rng(0).normal(0, 10, (image.height, image.width, 3))
        return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    small = image.resize((image.width // 4, image.height // 4), Image.BICUBIC)
    return small.resize(image.size, Image.BICUBIC)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """``sr/`` (degraded copies, PNG) and ``gt/`` (the photos) with matching stems."""
    root = tmp_path_factory.mktemp("eval")
    for name, kind in (("astronaut_256.png", "blur+jpeg"), ("coffee.png", "noise"),
                       ("chelsea.jpg", "bicubic x4")):
        photo = Image.open(DATA / name).convert("RGB")
        stem = Path(name).stem
        (root / "gt").mkdir(exist_ok=True)
        (root / "sr").mkdir(exist_ok=True)
        photo.save(root / "gt" / f"{stem}.png")
        degrade(photo, kind).save(root / "sr" / f"{stem}.png")
    return root / "sr", root / "gt"


def read_csv(file: Path) -> dict[str, dict[str, float]]:
    with open(file) as f:
        rows = list(csv.DictReader(f))
    return {row.pop("image"): {k: float(v) for k, v in row.items()} for row in rows}


def tensor(file: Path) -> torch.Tensor:
    return torch.tensor(np.asarray(Image.open(file).convert("RGB")).transpose(2, 0, 1)[None] / 255,
                        dtype=torch.float32)


@pytest.mark.parametrize("space", ["ycbcr", "yiq"])
def test_psnr_ssim_match_pyiqa(folders, tmp_path, space):
    pyiqa = pytest.importorskip("pyiqa")
    sr, gt = folders
    assert main(["--sr", str(sr), "--gt", str(gt), "--out", str(tmp_path), "--y", space]) == 0
    got = read_csv(tmp_path / "metrics.csv")
    psnr = pyiqa.create_metric("psnry", color_space=space, device="cpu")
    ssim = pyiqa.create_metric("ssim", color_space=space, device="cpu")
    assert sorted(got) == ["astronaut_256", "chelsea", "coffee"]
    for stem, row in got.items():
        x, y = tensor(sr / f"{stem}.png"), tensor(gt / f"{stem}.png")
        assert row["PSNR"] == pytest.approx(psnr(x, y).item(), rel=1e-4)
        assert row["SSIM"] == pytest.approx(ssim(x, y).item(), rel=1e-4)
    assert 0.3 < row["SSIM"] < 0.99 and 15 < row["PSNR"] < 40
    table = (tmp_path / "summary.md").read_text()
    assert table.splitlines()[0] == "| images | " + " | ".join(COLUMNS) + " |"
    cells = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert cells[0] == "3" and cells[3:-1] == ["-"] * 7  # no LPIPS weights given
    assert float(cells[1]) == pytest.approx(np.mean([r["PSNR"] for r in got.values()]), abs=5e-3)


def test_lpips_from_backbone(folders, tmp_path, capsys):
    sr, gt = folders
    backbone = save_backbone(tmp_path, "alex")
    assert main(["--sr", str(sr), "--gt", str(gt), "--out", str(tmp_path / "r"),
                 "--lpips-backbone", str(backbone)]) == 0
    got = read_csv(tmp_path / "r" / "metrics.csv")
    model = reference(backbone, "alex")
    for stem, row in got.items():
        with torch.no_grad():
            want = model(tensor(sr / f"{stem}.png"), tensor(gt / f"{stem}.png"), normalize=True)
        assert row["LPIPS"] == pytest.approx(want.item(), rel=1e-5)
    assert "| - |" in capsys.readouterr().out  # DISTS onwards


def test_grid_column_scores_the_sr_images(folders, tmp_path, capsys):
    sr, gt = folders
    assert main(["--sr", str(sr), "--gt", str(gt), "--out", str(tmp_path)]) == 0
    got = read_csv(tmp_path / "metrics.csv")
    for stem, row in got.items():
        want = grid_score(np.asarray(Image.open(sr / f"{stem}.png").convert("RGB")))
        assert row["GRID"] == pytest.approx(want, rel=1e-7, abs=1e-7)
    cells = [c.strip() for c in (tmp_path / "summary.md").read_text().splitlines()[2].split("|")]
    assert cells[-2] == f"{np.mean([r['GRID'] for r in got.values()]):.2f}"
    assert "GRID" not in capsys.readouterr().err


def test_grid_column_left_out_under_64_px(folders, tmp_path, capsys):
    sr, gt = copy_folders(folders, tmp_path)
    for folder in (sr, gt):
        Image.open(folder / "chelsea.png").crop((0, 0, 100, 63)).save(folder / "chelsea.png")
    assert main(["--sr", str(sr), "--gt", str(gt), "--out", str(tmp_path / "r")]) == 0
    assert "GRID" not in read_csv(tmp_path / "r" / "metrics.csv")["coffee"]
    assert (tmp_path / "r" / "summary.md").read_text().splitlines()[2].endswith("| - |")
    err = capsys.readouterr().err
    assert f"GRID needs 64 px a side; not computed ({sr / 'chelsea.png'})" in err


def test_model_dir_without_lpips_is_an_error(folders, tmp_path, capsys):
    sr, gt = folders
    (tmp_path / model_dir.CONFIG).write_text(json.dumps(
        {"format": model_dir.FORMAT, "version": model_dir.VERSION, "adapters": {}}))
    assert main(["--sr", str(sr), "--gt", str(gt), "--model", str(tmp_path)]) == 2
    assert "has no LPIPS weights" in capsys.readouterr().err


def copy_folders(folders, tmp_path) -> tuple[Path, Path]:
    sr, gt = (shutil.copytree(f, tmp_path / f.name) for f in folders)
    return Path(sr), Path(gt)


def run_error(folders, tmp_path, capsys) -> str:
    sr, gt = folders
    assert main(["--sr", str(sr), "--gt", str(gt), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    return capsys.readouterr().err


def test_unpaired_files_are_listed(folders, tmp_path, capsys):
    sr, gt = copy_folders(folders, tmp_path)
    (sr / "coffee.png").rename(sr / "coffee_x4.png")
    err = run_error((sr, gt), tmp_path, capsys)
    assert f"{sr / 'coffee_x4.png'}: no ground truth" in err
    assert f"{gt / 'coffee.png'}: no SR image" in err


def test_size_mismatch_names_both_files(folders, tmp_path, capsys):
    sr, gt = copy_folders(folders, tmp_path)
    Image.open(sr / "chelsea.png").crop((0, 0, 100, 70)).save(sr / "chelsea.png")
    err = run_error((sr, gt), tmp_path, capsys)
    assert f"{sr / 'chelsea.png'} is 100x70 but {gt / 'chelsea.png'} is 113x75" in err


def test_unreadable_image_is_named(folders, tmp_path, capsys):
    sr, gt = copy_folders(folders, tmp_path)
    (gt / "coffee.png").write_bytes(b"not a png")
    assert f"{gt / 'coffee.png'}: cannot read image" in run_error((sr, gt), tmp_path, capsys)


def test_empty_or_missing_folder_is_named(folders, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no images" in run_error((folders[0], empty), tmp_path, capsys)
    missing = tmp_path / "missing"
    assert f"{missing}: not a folder" in run_error((missing, folders[1]), tmp_path, capsys)


class FakeMetric:
    """A stand-in for a pyiqa metric: a score made of the file name."""

    def __init__(self, name: str):
        self.name, self.metric_mode = name, "FR" if name in ("dists", "fid") else "NR"

    def __call__(self, x: str, y: str | None = None) -> torch.Tensor:
        assert (y is not None) == (self.metric_mode == "FR")
        return torch.tensor([12.5 if self.name == "fid" else len(Path(x).stem) + 0.25])


def test_pyiqa_metrics_fill_the_table(folders, tmp_path, monkeypatch, capsys):
    fake = types.SimpleNamespace(create_metric=lambda name, device: FakeMetric(name))
    monkeypatch.setitem(sys.modules, "pyiqa", fake)
    sr, gt = folders
    assert main(["--sr", str(sr), "--gt", str(gt), "--out", str(tmp_path), "--pyiqa"]) == 0
    got = read_csv(tmp_path / "metrics.csv")
    assert got["coffee"]["DISTS"] == got["coffee"]["MUSIQ"] == 6.25
    assert "FID" not in got["coffee"]
    cells = capsys.readouterr().out.splitlines()[2].strip("|").split("|")
    grid = f"{np.mean([r['GRID'] for r in got.values()]):.2f}"
    assert [c.strip() for c in cells][3:] == ["-", "8.9167", "12.50", "8.9167", "8.9167", "8.9167",
                                              "8.9167", grid]  # (13 + 7 + 6) / 3 + 0.25


def test_pyiqa_missing_is_an_error(folders, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    sr, gt = folders
    assert main(["--sr", str(sr), "--gt", str(gt), "--pyiqa"]) == 2
    assert "--pyiqa needs pyiqa" in capsys.readouterr().err
