"""The TPU programs compile for a TPU v5e slice of 8 chips with the TPU settings (bf16, the
splash-attention Pallas kernel): inference split over the chips, and the TSD step sharded over
them (data 4 x fsdp 2). XLA's TPU compiler runs on this CPU host through libtpu
(tsdsr_jax/aot/check.py --tpu, in `.venv-gpu`, which holds libtpu beside jax's CUDA plugin).
Also the fit check's answer for a TPU slice, and the slice names."""

from __future__ import annotations

import json
import types

import pytest
from test_gpu_compile import gpu_python

from tsdsr_jax.aot import tpus
from tsdsr_jax.aot.check import TPU_CASES


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("aot") / "plans.json"
    done = gpu_python("-m", "tsdsr_jax.aot.check", "--tpu", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(TPU_CASES))
def test_compiles_for_a_tpu_slice(plans, case):
    plan = plans[case]
    assert "error" not in plan, plan.get("traceback", plan.get("error"))
    assert 0 < plan["peak_bytes"] < tpus.CHIPS["v5e"].memory_bytes
    assert plan["pallas"] > 0, "the attention is not the splash kernel"
    if case.startswith("tsd"):  # the gradients meet across the 8 chips
        assert plan["collective_bytes"] > 0


def test_fit_on_a_tpu_slice():
    done = gpu_python("-m", "tsdsr_jax.aot.fit", "--tpu", "v5e-1", "--infer", "--model", "tiny",
                      "--size", "128", "--process-size", "128", "--no-search", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "v5e-1 (1 chip(s) of TPU v5 lite, 1 host(s)): 16.0 GiB per chip, JAX takes 100%" \
        in done.stdout
    assert "batch 1 per chip fits on the v5e-1" in done.stdout


@pytest.mark.parametrize("name, topology, hosts, per_host", [
    ("v5e-1", "v5e:1x1", 1, (1, 1, 1)), ("v5e-8", "v5e:2x4", 1, (2, 4, 1)),
    ("v5e-64", "v5e:8x8", 16, (2, 2, 1)), ("v6e-8", "v6e:2x4", 1, (2, 4, 1)),
    ("v5p-8", "v5p:2x2x1", 1, (2, 2, 1)), ("v5p-32", "v5p:2x2x4", 4, (2, 2, 1)),
    ("v5p-128", "v5p:4x4x4", 16, (2, 2, 1)),
])
def test_slice_names_as_google_cloud_gives_them(name, topology, hosts, per_host):
    s = tpus.parse(name)
    assert (s.topology, s.hosts, s.chips_per_host_bounds) == (topology, hosts, per_host)


@pytest.mark.parametrize("name", ["v5e-3", "v5p-4", "v4-8", "v5e", "h100-8"])
def test_bad_slice_names(name):
    with pytest.raises(tpus.SliceError, match=f"^{name}: "):
        tpus.parse(name)


def test_the_tpu_compilers_refusal_is_a_plan_that_does_not_fit():
    """XLA's TPU compiler refuses a program that does not fit; the plan keeps what it asked."""
    from tsdsr_jax.aot.plan import compile_plan

    def refuse():
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                           "required for HLO temporaries (22.76G) exceeds available HBM "
                           "(15.75G). HLO module: jit_step.")

    jitted = types.SimpleNamespace(lower=lambda *a: types.SimpleNamespace(compile=refuse))
    plan = compile_plan(jitted, ())
    assert plan.peak_bytes == int(22.76 * 2 ** 30) > tpus.CHIPS["v5e"].memory_bytes
    assert plan.hlo == ""
    other = types.SimpleNamespace(lower=lambda *a: types.SimpleNamespace(
        compile=lambda: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        compile_plan(other, ())
