"""``make gpu-bundle``: what the GPU machine lacks, in ``gpu-bundle/`` of the checkout (ignored by
git; carry it to the GPU call, which cannot reach a registry).

    .venv/bin/python bench/bundle.py [--out gpu-bundle]

- ``wheels/``: Python 3.12 manylinux wheels (no dependencies pulled) of the packages the GPU
  image lacks or holds at other versions: our own runtime's at the versions of ``.venv-gpu``
  (the Python 3.12, jax 0.11.2 environment of the compile checks), and the PyTorch references'
  at the versions of ``.venv`` (the ones the parity tests use);
- ``shared-bench/``: a copy of ../shared/bench (the PyTorch reference benchmarks).

Fails when the bundle is over 64 MiB, what a device call carries at most.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 2**20
# (package, the environment whose version travels)
PACKAGES = [("grain", ".venv-gpu"), ("array-record", ".venv-gpu"), ("portpicker", ".venv-gpu"),
            ("ml-collections", ".venv-gpu"), ("tensorboardX", ".venv-gpu"),
            ("pillow", ".venv-gpu"),  # >= 13: the order of PIL's resize passes (pil_resize)
            ("diffusers", ".venv"), ("importlib-metadata", ".venv"), ("peft", ".venv"),
            ("lpips", ".venv")]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def version(package: str, venv: str) -> str:
    python = ROOT / venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"error: {python}: missing (make {venv}/{'.aot' if 'gpu' in venv else '.test'})")
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m, sys; "
                          "print(m.version(sys.argv[1]))", package],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"error: {package} is not installed in {venv}")
    return out.stdout.strip()


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=ROOT / "gpu-bundle")
    args = p.parse_args()
    references = ROOT.parent / "shared" / "bench"
    if not references.is_dir():
        sys.exit(f"error: {references}: missing (the PyTorch reference benchmarks)")
    wheels = args.out / "wheels"
    shutil.rmtree(args.out, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = [f"{name}=={version(name, venv)}" for name, venv in PACKAGES]
    platforms = [a for plat in PLATFORMS for a in ("--platform", plat)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    *platforms, "-d", str(wheels), *pins], check=True)
    shutil.copytree(references, args.out / "shared-bench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    total = size(args.out)
    for f in sorted(wheels.iterdir()):
        print(f"  {f.name}  {f.stat().st_size / 2**20:.1f} MiB")
    print(f"{args.out}: {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB "
          f"({len(pins)} wheels, shared-bench)")
    if total > LIMIT:
        sys.exit(f"error: {args.out} is {total / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB "
                 "a device call carries")


if __name__ == "__main__":
    main()
