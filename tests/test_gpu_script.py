"""bench/gpu.sh, the one prepared GPU call, end to end on this CPU with tiny models (its
--dry-run), so that the script cannot rot before a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import subprocess

from processes import ROOT, env


def test_gpu_script_dry_run(tmp_path, jax_cache):
    out = tmp_path / "out"
    run = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", str(out)], cwd=ROOT,
                         env=env(jax_cache), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["card"] == "cpu (dry run)" and results["jax"] != "absent"
    steps = {s["step"]: s for s in results["steps"]}
    assert set(steps) == {"infer", "infer_cached", "torch_infer", "train", "models",
                          "torch_best"}
    assert steps["torch_infer"]["skipped"] == steps["torch_best"]["skipped"] == "needs a GPU"
    for name in ("infer", "infer_cached", "train", "models"):
        step = steps[name]
        assert step["rc"] == 0, (name, (out / f"{name}.log").read_text()[-3000:])
        assert any(line.startswith("|") for line in step["lines"]), name
    # both tiny inference cases timed, the second process from the persistent cache
    for name in ("infer", "infer_cached"):
        rows = [line for line in steps[name]["lines"] if line.startswith(("| 128", "| 256"))]
        assert len(rows) == 2, steps[name]["lines"]
    assert any(line.startswith("| 2 | 1 |") for line in steps["train"]["lines"])  # b2, N = 1
    assert results["infer_over_bounds"] == []  # the tiny cases have no H200 plan


def test_inference_times_over_the_plans_bounds():
    spec = importlib.util.spec_from_file_location("gpu_results", ROOT / "bench" / "gpu_results.py")
    gpu_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_results)
    bound = json.loads((ROOT / "bench" / "compile.json").read_text())["infer 512² b1"]
    lines = ["| case | ms/image | ms/batch | first call s |", "|---|---|---|---|",
             "| 512² b1 | 20.00 | 20.00 | 30.1 |", "| 2048² b1 tiled | 900 | 900 | 80 |"]
    [ratio] = gpu_results.over_bounds(lines)
    assert ratio == {"case": "512² b1", "ms_per_batch": 20.0,
                     "h200_bound_ms": bound["roofline_ms"],
                     "over_bound": round(20.0 / bound["roofline_ms"], 2)}
