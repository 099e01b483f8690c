"""Bad input, drawn by hypothesis: any mix of good and bad flags of `infer.py`, and of config
overrides of `train.py`, ends with exit code 0, 1 or 2, never an exception (a traceback) or a
native crash (which would end this process), and leaves no partial output. A refused value
(exit 2) is refused before anything is written, in one line that names it."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tsdsr_jax.inference.command import main as infer_main
from tsdsr_jax.training.command import main as train_main

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
# Each good mix of inference flags compiles a program of its own (about a minute here).
INFER_SETTINGS = settings(SETTINGS, max_examples=5)


def flag(name: str, good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """``[]`` (left out), ``[name, value]`` with a good value, or with a bad one."""
    return st.one_of(st.just([]), st.tuples(st.just(name), st.one_of(good, bad)).map(list))


def ints(low: int, high: int, bad: list) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    return st.integers(low, high).map(str), st.sampled_from([str(b) for b in bad])


INFER_FLAGS = st.tuples(
    flag("--upscale", *ints(1, 4, [0, -1, 17, "x", 2.5])),
    flag("--process-size", *ints(16, 96, [0, -3, "big"])),
    flag("--precision", st.sampled_from(["fp32", "bf16"]), st.sampled_from(["fp8", ""])),
    flag("--batch-size", *ints(1, 2, [0, -1, "two"])),
    flag("--devices", *ints(1, 1, [0, 2, 1000])),
    flag("--latent-tile", st.sampled_from(["8", "10", "12"]), st.sampled_from(["0", "7", "-2"])),
    flag("--latent-overlap", *ints(0, 3, [-1, 64, 12])),
    flag("--vae-encoder-tile", *ints(128, 160, [0, 3, -128])),
    flag("--vae-decoder-tile", *ints(16, 24, [0, 3, 15])),
    flag("--latent-max-tiles", *ints(1, 3, [0, -1])),
    flag("--vae-max-tiles", *ints(1, 2, [0, -4])),
    flag("--color-fix", st.sampled_from(["wavelet", "adain", "none"]), st.just("sepia")),
    flag("--vae", st.sampled_from(["sample", "mean"]), st.just("mode")),
    flag("--seed", *ints(0, 5, [-1, 2 ** 32, "seed"])),
    flag("--attention", st.just("xla"), st.sampled_from(["cudnn", "splash", "flash"])),
).map(lambda groups: [a for g in groups for a in g])


GOOD_INFER_FLAGS = ["--precision", "fp32", "--process-size", "64", "--latent-tile", "8",
                    "--latent-overlap", "2", "--vae-encoder-tile", "128", "--vae-decoder-tile",
                    "16", "--vae-max-tiles", "1", "--batch-size", "2", "--attention", "xla"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (20, 24)), ("b.jpg", (20, 24))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(folder / name)
    return folder


def call(main, argv: list[str]) -> tuple[int, str]:
    """``main(argv)``'s exit code and what it wrote to stderr; an exception fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code
    return code, err.getvalue()


def check_outcome(code: int, err: str, out: Path) -> None:
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err, err
    written = sorted(out.rglob("*")) if out.exists() else []
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert not written, written
    else:
        partial = [p for p in written if p.name.startswith(".") or "tmp" in p.name]
        assert not partial, partial
        for png in out.rglob("*.png"):
            with Image.open(png) as im:
                im.verify()


@INFER_SETTINGS
@given(flags=INFER_FLAGS)
@example(flags=["--latent-overlap", "64"])
@example(flags=["--vae-decoder-tile", "3"])
@example(flags=["--process-size", "0"])
@example(flags=GOOD_INFER_FLAGS)
def test_infer_flags(photos, tmp_path_factory, flags):
    out = tmp_path_factory.mktemp("out") / "sr"
    code, err = call(infer_main, ["--model", "tiny", "-i", str(photos), "-o", str(out),
                                  "--cache-dir", str(out.parent / "cache"), *flags])
    check_outcome(code, err, out)
    assert code == 0 or flags != GOOD_INFER_FLAGS, err
    if code == 0:
        assert {p.name for p in out.iterdir()} == {"a.png", "b.png"}


# ------------------------------------------------------------------ train.py


def override(key: str, good: list, bad: list) -> st.SearchStrategy:
    return st.one_of(st.just([]), st.sampled_from(good + bad).map(
        lambda v: [f"--config.{key}={v}"]))


GOOD_OVERRIDES = ["--config.tsd.dasm_steps=1", "--config.seed=3", "--config.model=tiny"]
TRAIN_OVERRIDES = st.tuples(
    override("tsd.dasm_steps", [1, 2], [0, 7, "x"]),
    override("tsd.dasm_weights", ["(1.0,0.5)"], ["()"]),
    override("tsd.index_low", [10], [-1, 990]),
    override("tsd.lambda_vsd", [0.5], [1.5, "nan"]),
    override("tsd.weighting_scheme", ["mode"], ["foo"]),
    override("optim_student.schedule", ["constant_with_warmup"], ["linearx"]),
    override("optim_fake_score.learning_rate", [1e-4], [-1, "inf"]),
    override("precision", ["fp32"], ["fp8"]),
    override("remat_policy", ["full"], ["some"]),
    override("attention_impl", ["xla", "auto"], ["cudnn", "splash", "flash"]),
    override("batch_size", [1], [0, -2]),
    override("seed", [3], [-1]),
    override("data.resolution", [64], [50, 0]),
    override("data.roots", ["tests/data/train"], ["", "/nonexistent"]),
    override("data.num_workers", [0], [-1]),
    override("sharding.fsdp", [1], [0, 3]),
    override("sharding.adapters", ["fsdp"], ["zero3"]),
    override("keep_checkpoints", [1], [0]),
    override("model", ["tiny"], ["", "/nonexistent/model"]),
    override("teacher", ["sd3"], ["lora", "/nonexistent/ckpt"]),
    override("init_student", ["random"], ["model", "other"]),
    override("bogus", [], [1]),
    override("tsd.bogus", [], [1]),
).map(lambda groups: [a for g in groups for a in g])


@settings(SETTINGS, max_examples=15)  # refusals are cheap: only a valid config compiles
@given(overrides=TRAIN_OVERRIDES)
@example(overrides=["--config.tsd.dasm_steps=7"])
@example(overrides=["--config.precision=fp8"])
@example(overrides=["--config.bogus=1"])
@example(overrides=["--config.optim_student.schedule=linearx"])
@example(overrides=["--config.tsd.weighting_scheme=foo"])
@example(overrides=GOOD_OVERRIDES)
def test_train_config_overrides(tmp_path_factory, overrides):
    workdir = tmp_path_factory.mktemp("run") / "workdir"
    code, err = call(train_main, ["--config", "configs/tiny.py", f"--config.workdir={workdir}",
                                  "--config.total_steps=1", "--config.log_every=1",
                                  "--config.validate_every=1000", *overrides])
    assert code in (0, 2), (code, err)
    assert code == 0 or overrides != GOOD_OVERRIDES, err
    check_outcome(code, err, workdir)
    if code == 0:
        assert (workdir / "checkpoints" / "1").is_dir()


# ------------------------------------------------------------------ the messages


@pytest.mark.parametrize("flags, needle", [
    (["--latent-overlap", "64"], "--latent-overlap 64: must be >= 0 and < 64"),
    (["--upscale", "0"], "--upscale 0: must be >= 1 and <= 16"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--vae-decoder-tile", "3"], "--vae-decoder-tile 3: must be >= 16"),
    (["--process-size", "0"], "--process-size 0: must be >= 1"),
    (["--attention", "cudnn"], "--attention cudnn: needs a GPU"),
    (["--devices", "1000"], "--batch-size 1 is not a multiple of --devices 1000"),
])
def test_infer_names_the_flag(photos, tmp_path, flags, needle):
    code, err = call(infer_main, ["--model", "tiny", "-i", str(photos), "-o",
                                  str(tmp_path / "out"), *flags])
    assert code == 2 and needle in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, needle", [
    ("tsd.dasm_steps=7", "config.tsd.dasm_steps=7: needs as many dasm_weights, got 4"),
    ("precision=fp8", "config.precision='fp8': one of 'bf16', 'fp16', 'fp32'"),
    ("bogus=1", "--config: the config has no key 'bogus' (--config.bogus=1)"),
    ("optim_student.schedule=linearx", "config.optim_student.schedule='linearx': one of "
                                       "'constant_with_warmup', 'cosine'"),
    ("tsd.weighting_scheme=foo", "config.tsd.weighting_scheme='foo': one of 'logit_normal'"),
    ("sharding.adapters=zero3", "config.sharding.adapters='zero3': one of 'replicated'"),
    ("data.resolution=50", "config.data.resolution=50: must be a multiple of 16"),
    ("tsd.lambda_vsd=nan", "config.tsd.lambda_vsd=nan: must be a finite number"),
])
def test_train_names_the_key(tmp_path, override, needle):
    code, err = call(train_main, ["--config", "configs/tiny.py",
                                  f"--config.workdir={tmp_path / 'run'}", f"--config.{override}"])
    assert code == 2 and needle in err, err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
