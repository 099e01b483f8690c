"""``tsdsr-evaluate``: the paper's metrics of SR images against ground truth.

    tsdsr-evaluate --sr SR_DIR --gt GT_DIR [--out REPORT_DIR] \\
        [--model MODEL_DIR | --lpips-backbone alexnet-*.pth] [--y ycbcr|yiq] [--pyiqa]

Images are paired by file stem. PSNR and SSIM are on the luma (see
``tsdsr_jax.evaluation.metrics``); LPIPS (AlexNet, v0.1) needs weights: a model directory
converted with ``--lpips-backbone``, or the torchvision checkpoint itself. ``--pyiqa`` adds
DISTS, FID (of the folders), NIQE, MUSIQ, MANIQA and CLIPIQA through pyiqa (installed
separately; it fetches its own weights). GRID, last, is the 16-px grid score of the SR images
in dB (``tsdsr_jax.evaluation.grid``; above ``GRID_WARNING``, 3 dB, a grid shows), left out
when an image is under 64 px a side. Prints the summary table in the paper's column order
(metrics not computed shown as ``-``); ``--out`` also writes ``metrics.csv`` (per image) and
``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tsdsr_jax import cli
from tsdsr_jax.conversion.lpips import plan_lpips
from tsdsr_jax.conversion.torch_layout import ConversionError
from tsdsr_jax.evaluation import grid, metrics
from tsdsr_jax.inference.canvas import ladder
from tsdsr_jax.io import model_dir
from tsdsr_jax.io.images import ImageError, list_images, load_image
from tsdsr_jax.io.tree import nest
from tsdsr_jax.models.lpips import lpips

COLUMNS = ("PSNR", "SSIM", "LPIPS", "DISTS", "FID", "NIQE", "MUSIQ", "MANIQA", "CLIPIQA",
           "GRID")
PYIQA = {"DISTS": "dists", "NIQE": "niqe", "MUSIQ": "musiq", "MANIQA": "maniqa",
         "CLIPIQA": "clipiqa"}


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names every offending file."""


def _by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: not a folder")
    files = list_images(folder)
    if not files:
        raise EvaluationError(f"{folder}: no images")
    stems: dict[str, Path] = {}
    clashes = []
    for f in files:
        if f.stem in stems:
            clashes.append(f"{stems[f.stem]} and {f}: same name")
        stems[f.stem] = f
    if clashes:
        raise EvaluationError("\n".join(clashes))
    return stems


def pair(sr: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    """``(stem, sr file, gt file)`` for every image, or an error listing all unpaired files."""
    a, b = _by_stem(sr), _by_stem(gt)
    unpaired = [f"{a[s]}: no ground truth in {gt}" for s in sorted(a.keys() - b.keys())]
    unpaired += [f"{b[s]}: no SR image in {sr}" for s in sorted(b.keys() - a.keys())]
    if unpaired:
        raise EvaluationError("unpaired files:\n  " + "\n  ".join(unpaired))
    return [(s, a[s], b[s]) for s in sorted(a)]


def load_pairs(pairs: list[tuple[str, Path, Path]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reads every pair; raises naming every unreadable file and every size mismatch."""
    images, problems = [], []

    def read(path: Path) -> np.ndarray | None:
        try:
            return load_image(path)
        except ImageError as e:
            problems.append(str(e))
            return None

    for _, sr, gt in pairs:
        x, y = read(sr), read(gt)
        if x is None or y is None:
            continue
        if x.shape != y.shape:
            problems.append(f"{sr} is {x.shape[1]}x{x.shape[0]} but {gt} is "
                            f"{y.shape[1]}x{y.shape[0]}")
        elif min(x.shape[:2]) < metrics.WINDOW:
            problems.append(f"{sr}: smaller than SSIM's {metrics.WINDOW}x{metrics.WINDOW} window")
        images.append((x, y))
    if problems:
        raise EvaluationError("\n".join(problems))
    return images


def lpips_params(args: argparse.Namespace) -> Any:
    """The AlexNet LPIPS parameters from ``--model`` or ``--lpips-backbone``; None if neither."""
    if args.model:
        net, params = model_dir.load_lpips(args.model, jnp.float32)
    elif args.lpips_backbone:
        try:
            planned, entry = plan_lpips(args.lpips_backbone)
        except ConversionError as e:
            raise EvaluationError(str(e)) from None
        net, params = entry["net"], nest({k: jnp.asarray(planned.fetch(k)) for k in planned.specs})
    else:
        return None
    if net != "alex":
        raise EvaluationError(f"{args.model or args.lpips_backbone}: LPIPS weights are {net}; "
                              "the paper's LPIPS is AlexNet")
    return params


def evaluate(images: list[tuple[np.ndarray, np.ndarray]], params: Any, space: str,
             with_grid: bool = True) -> list[dict[str, float]]:
    """Per image ``{'PSNR': ..., 'SSIM': ..., 'LPIPS': ..., 'GRID': ...}`` (LPIPS only with
    ``params``, GRID of the SR image only ``with_grid``)."""
    rows = [{"PSNR": metrics.psnr(x, y, space), "SSIM": metrics.ssim(x, y, space)}
            for x, y in images]
    if with_grid:
        for row, (x, _) in zip(rows, images):
            row["GRID"] = grid.grid_score(x)
    if params is not None:
        for i, d in lpips_distances(images, params).items():
            rows[i]["LPIPS"] = d
    return rows


LPIPS_BATCH = 4


def lpips_distances(images: list[tuple[np.ndarray, np.ndarray]], params: Any
                    ) -> dict[int, float]:
    """LPIPS of each (SR, GT) pair, :data:`LPIPS_BATCH` pairs of one size class at a time
    (:func:`tsdsr_jax.inference.canvas.ladder`: a compile per class, not per size), all
    dispatched before any is waited for."""
    distance = jax.jit(lpips)
    by_class: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, (x, _) in enumerate(images):
        by_class[tuple(ladder(s, 2) for s in x.shape[:2])].append(i)
    running = []
    for canvas, members in by_class.items():
        for start in range(0, len(members), LPIPS_BATCH):
            chunk = members[start:start + LPIPS_BATCH]
            chunk += chunk[-1:] * (LPIPS_BATCH - len(chunk))
            pair = np.zeros((2, len(chunk), *canvas, 3), np.float32)
            for b, i in enumerate(chunk):
                for k, im in enumerate(images[i]):
                    pair[k, b, :im.shape[0], :im.shape[1]] = im / np.float32(255)
            extent = np.array([images[i][0].shape[:2] for i in chunk], np.int32)
            running.append((chunk, distance(params, pair[0], pair[1], extent=extent)))
    return {i: float(d) for chunk, out in running for i, d in zip(chunk, np.asarray(out))}


def pyiqa_scores(pairs: list[tuple[str, Path, Path]], sr: Path, gt: Path
                 ) -> tuple[list[dict[str, float]], float]:
    """Per image ``{'DISTS': ..., 'NIQE': ..., ...}`` and the FID of ``sr`` against ``gt``."""
    try:
        import pyiqa
        import torch
    except ImportError:
        raise EvaluationError("--pyiqa needs pyiqa: pip install pyiqa") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict[str, float]] = [{} for _ in pairs]
    try:
        for column, name in PYIQA.items():
            metric = pyiqa.create_metric(name, device=device)
            for row, (_, x, y) in zip(rows, pairs):
                score = metric(str(x), str(y)) if metric.metric_mode == "FR" else metric(str(x))
                row[column] = float(score)
        fid = float(pyiqa.create_metric("fid", device=device)(str(sr), str(gt)))
    except (OSError, RuntimeError, ValueError) as e:
        raise EvaluationError(f"pyiqa failed: {e}") from None
    return rows, fid


def summary(rows: list[dict[str, float]], totals: dict[str, float] | None = None) -> str:
    """A Markdown table of the means (and ``totals``), in the paper's column order."""
    def cell(column: str) -> str:
        if column in (totals or {}):
            value = totals[column]
        elif column in rows[0]:
            value = float(np.mean([r[column] for r in rows]))
        else:
            return "-"
        return f"{value:.2f}" if column in ("PSNR", "FID", "GRID") else f"{value:.4f}"

    return ("| images | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1) + "\n"
            + f"| {len(rows)} | " + " | ".join(cell(c) for c in COLUMNS) + " |\n")


def write_report(out: Path, names: list[str], rows: list[dict[str, float]], table: str) -> None:
    """``out/metrics.csv`` (a row per image) and ``out/summary.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in COLUMNS if c in rows[0]]
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *columns])
        writer.writerows([name, *(f"{r[c]:.8g}" for c in columns)] for name, r in zip(names, rows))
    (out / "summary.md").write_text(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="tsdsr-evaluate",
                           description=__doc__.split("\n")[0])
    p.add_argument("--sr", type=Path, required=True, help="folder of super-resolved images")
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth images")
    p.add_argument("--out", type=Path, help="folder for metrics.csv and summary.md")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--model", type=Path, help="model directory with LPIPS weights")
    weights.add_argument("--lpips-backbone", type=Path,
                         help="torchvision alexnet-*.pth (LPIPS heads from the lpips package)")
    p.add_argument("--y", choices=metrics.SPACES, default="ycbcr",
                   help="luma for PSNR/SSIM: BT.601 YCbCr (paper, default) or pyiqa's YIQ")
    p.add_argument("--pyiqa", action="store_true",
                   help="also DISTS, FID, NIQE, MUSIQ, MANIQA, CLIPIQA through pyiqa")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pairs = pair(args.sr, args.gt)
        params = lpips_params(args)
        images = load_pairs(pairs)
        small = [str(sr) for (_, sr, _), (x, _) in zip(pairs, images)
                 if min(x.shape[:2]) < grid.MIN_SIDE]
        rows = evaluate(images, params, args.y, with_grid=not small)
        totals: dict[str, float] = {}
        if args.pyiqa:
            extra, totals["FID"] = pyiqa_scores(pairs, args.sr, args.gt)
            rows = [r | e for r, e in zip(rows, extra)]
    except (EvaluationError, ImageError, model_dir.ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if params is None:
        print("note: no LPIPS weights (--model or --lpips-backbone); LPIPS not computed",
              file=sys.stderr)
    if small:
        print(f"note: GRID needs {grid.MIN_SIDE} px a side; not computed ({', '.join(small)})",
              file=sys.stderr)
    table = summary(rows, totals)
    print(table, end="")
    if args.out:
        write_report(args.out, [name for name, _, _ in pairs], rows, table)
        print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
