"""Gathers what bench/gpu.sh left in OUT into ``OUT/results.json`` and prints a summary.

    python bench/gpu_results.py OUT [--dry-run]

results.json: the card (nvidia-smi's name), the date, the jax, flax and torch versions, each
step (exit code, seconds, budget, command, and the lines it printed: Markdown table rows and
JSON lines), and each inference case's measured ms per batch over its H200 roofline bound from
the compile plan (bench/compile.json; on another card the bound is the H200's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("infer", "infer_cached", "torch_infer", "train", "models", "torch_best")


def card() -> str:
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown GPU"


def versions() -> dict[str, str]:
    found = {}
    for name in ("jax", "flax", "torch"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "absent"
    return found


def printed(log: Path) -> list[str]:
    """The lines of a step's log that carry results: table rows, JSON lines, headers."""
    if not log.is_file():
        return []
    keep = []
    for line in log.read_text(errors="replace").splitlines():
        s = line.strip()
        if s.startswith(("|", "{", "device:", "jax ")) or s.startswith("error"):
            keep.append(s)
    return keep


def table_rows(lines: list[str]) -> list[list[str]]:
    rows = [[c.strip() for c in s.strip("|").split("|")] for s in lines if s.startswith("|")]
    return [r for r in rows if r and not set(r[0]) <= {"-"}][1:]  # without the header


def over_bounds(lines: list[str]) -> list[dict]:
    """Each inference case's ms per batch over the plan's roofline bound."""
    plan = json.loads((ROOT / "bench" / "compile.json").read_text())
    ratios = []
    for row in table_rows(lines):
        bound = plan.get(f"infer {row[0]}", {}).get("roofline_ms")
        if bound:
            measured = float(row[2])
            ratios.append({"case": row[0], "ms_per_batch": measured, "h200_bound_ms": bound,
                           "over_bound": round(measured / bound, 2)})
    return ratios


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    steps = []
    for name in STEPS:
        status = args.out / f"{name}.status"
        entry = json.loads(status.read_text()) if status.is_file() else {"step": name,
                                                                        "skipped": "not run"}
        entry["lines"] = printed(args.out / f"{name}.log")
        steps.append(entry)
    infer = next(s for s in steps if s["step"] == "infer")
    results = {"card": "cpu (dry run)" if args.dry_run else card(),
               "date": datetime.date.today().isoformat(), **versions(), "steps": steps,
               "infer_over_bounds": over_bounds(infer["lines"])}
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(f"{results['card']}; jax {results['jax']}, torch {results['torch']}")
    for s in steps:
        how = s.get("skipped") or f"exit {s['rc']} in {s['seconds']} s"
        print(f"  {s['step']}: {how}, {len(s['lines'])} result lines")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
