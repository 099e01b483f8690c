"""`tsdsr_jax.aot.plan.hlo_counts` reads the collectives of compiled programs: of XLA's own
compile over 4 CPU devices (combined ones too), and in the forms of TPU and GPU programs
(collectives inside fusions, asynchronous and combined ones, instructions whose text runs over
several lines, loops without a known trip count); and the FLOPs of XLA's convolutions, as
XLA's own cost analysis counts them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from test_sharding import cpu_env

from tsdsr_jax.aot.plan import hlo_counts

ROOT = Path(__file__).resolve().parents[1]

# An all-gather of f32[1024] (4 KiB delivered) and an all-reduce of an f32[64] (256 B).
GATHER_AND_SUM = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((4,), ("d",))
split, whole = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
f = jax.jit(lambda x, y: (x, y.reshape(4, 64).sum(0)), in_shardings=(split, split),
            out_shardings=(whole, whole))
x = jax.ShapeDtypeStruct((1024,), jnp.float32)
print(f.lower(x, jax.ShapeDtypeStruct((256,), jnp.float32)).compile().as_text())
"""


def test_collective_bytes_of_a_compiled_program():
    done = subprocess.run([sys.executable, "-c", GATHER_AND_SUM], cwd=ROOT, env=cpu_env(4),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all-gather" in done.stdout and "all-reduce" in done.stdout
    assert hlo_counts(done.stdout).collective_bytes == 4096 + 256


# One psum of two arrays (XLA combines them into one all-reduce of f32[64] and f32[32]: 384 B)
# and a ppermute of f32[16] (64 B), each per device.
COMBINED = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((4,), ("d",))
def body(a, b, c):
    pairs = [(i, (i + 1) % 4) for i in range(4)]
    return (*jax.lax.psum((a, b), "d"), jax.lax.ppermute(c, "d", pairs))
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("d"),) * 3, out_specs=(P("d"),) * 3))
split = NamedSharding(mesh, P("d"))
print(f.lower(*[jax.ShapeDtypeStruct((n,), jnp.float32, sharding=split)
                for n in (256, 128, 64)]).compile().as_text())
"""


def test_a_combined_collective_delivers_all_its_results():
    done = subprocess.run([sys.executable, "-c", COMBINED], cwd=ROOT, env=cpu_env(4),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(f32[64]{0}, f32[32]{0}) all-reduce(" in done.stdout
    assert hlo_counts(done.stdout).collective_bytes == 4 * (64 + 32 + 16)


# Async starts: a TPU program's collective-permute (libtpu 0.0.48: input, output and two
# contexts) and combined all-reduce (layouts, an index comment), and a GPU program's combined
# all-gather ((inputs), (outputs)), as XLA's own tests write it.
ASYNC_FORMS = """HloModule jit_step, is_scheduled=true

ENTRY %main (p0: f32[2,31,31,256], p1: bf16[1536,64], p2: bf16[64,3072], p3: f32[2], \
p4: bf16[2]) -> f32[2,31,31,256] {
  %p0 = f32[2,31,31,256]{3,0,2,1:T(2,128)} parameter(0)
  %p1 = bf16[1536,64]{0,1:T(8,128)(2,1)} parameter(1)
  %p2 = bf16[64,3072]{1,0:T(8,128)(2,1)} parameter(2)
  %p3 = f32[2]{0} parameter(3)
  %p4 = bf16[2]{0} parameter(4)
  %collective-permute-start.20 = (f32[2,31,31,256]{3,0,2,1:T(2,128)}, \
f32[2,31,31,256]{3,0,2,1:T(2,128)S(1)}, u32[]{:S(2)}, u32[]{:S(2)}) \
collective-permute-start(%p0), channel_id=23, source_target_pairs={{0,1},{1,2},{2,4},{3,6}}
  %all-reduce.939 = (bf16[1536,64]{0,1:T(8,128)(2,1)}, \
/*index=1*/bf16[64,3072]{1,0:T(8,128)(2,1)}) all-reduce(%p1, %p2), channel_id=27, \
replica_groups=[1,8]<=[8], to_apply=%add
  %start = ((f32[2]{0}, bf16[2]{0}), (f32[4]{0}, bf16[4]{0})) all-gather-start(%p3, %p4), \
dimensions={0}
  %done = (f32[4]{0}, bf16[4]{0}) all-gather-done(%start)
  ROOT %collective-permute-done.20 = f32[2,31,31,256]{3,0,2,1:T(2,128)} \
collective-permute-done(%collective-permute-start.20)
}
"""


def test_async_and_combined_collectives_count_their_outputs():
    permute, reduce, gather = 4 * 2 * 31 * 31 * 256, 2 * (1536 * 64 + 64 * 3072), 4 * 4 + 2 * 4
    assert hlo_counts(ASYNC_FORMS).collective_bytes == permute + reduce + gather


# The shapes of a TPU program's text (libtpu 0.0.48): a Pallas kernel whose config runs over
# lines, one of which starts with "}}", then an all-gather inside a collective fusion.
TPU_FORMS = """HloModule jit_step, is_scheduled=true

%gather (param_0: bf16[128,32]) -> bf16[256,32] {
  %param_0 = bf16[128,32]{0,1:T(8,128)(2,1)} parameter(0)
  ROOT %all-gather.1 = bf16[256,32]{0,1:T(8,128)(2,1)} all-gather(%param_0), channel_id=6, \
replica_groups=[4,2]<=[8], dimensions={0}
}

ENTRY %main (p0: bf16[128,32], p1: f32[8,128]) -> (bf16[256,32], f32[8,128]) {
  %p0 = bf16[128,32]{0,1:T(8,128)(2,1)} parameter(0)
  %p1 = f32[8,128]{1,0:T(8,128)} parameter(1)
  %custom-call.1 = f32[8,128]{1,0:T(8,128)} custom-call(%p1), \
custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "AAAA",
"cost_estimate": {"flops": 8},
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="splash"}
  %fusion.1 = bf16[256,32]{0,1:T(8,128)(2,1)} fusion(%p0), kind=kCustom, calls=%gather
  ROOT %tuple.1 = (bf16[256,32]{0,1:T(8,128)(2,1)}, f32[8,128]{1,0:T(8,128)}) \
tuple(%fusion.1, %custom-call.1)
}
"""


def test_collectives_inside_fusions_after_a_kernel_config_of_several_lines():
    counts = hlo_counts(TPU_FORMS)
    assert counts.collective_bytes == 256 * 32 * 2
    assert counts.kernels == 2  # the Pallas kernel and the fusion


# A TPU program's while loop (libtpu 0.0.48) carries no known_trip_count: its condition compares
# the counter with a constant, and the counter starts from a constant (through a copy) in the
# loop's initial tuple. Here from 1 to 4: three trips of a 8x16 by 16x32 dot.
TPU_LOOP = """HloModule jit_step, is_scheduled=true

%body (param: (s32[], f32[8,16], f32[16,32])) -> (s32[], f32[8,16], f32[16,32]) {
  %param = (s32[]{:T(128)}, f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%param), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%param), index=1
  %w = f32[16,32]{1,0} get-tuple-element(%param), index=2
  %dot.1 = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %out = (s32[]{:T(128)}, f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%next, %x, %w)
}

%cond (param.1: (s32[], f32[8,16], f32[16,32])) -> pred[] {
  %constant.2 = s32[]{:T(128)} constant(4)
  %param.1 = (s32[]{:T(128)}, f32[8,16]{1,0}, f32[16,32]{1,0}) parameter(0)
  %counter = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%counter, %constant.2), direction=LT, \
backend_config={"flag_configs":[]}
}

ENTRY %main (p0: f32[8,16], p1: f32[16,32]) -> (s32[], f32[8,16], f32[16,32]) {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,32]{1,0} parameter(1)
  %constant.1 = s32[]{:T(128)} constant(1)
  %copy.1 = s32[]{:T(128)} copy(%constant.1)
  %tuple.1 = (s32[]{:T(128)}, f32[8,16]{1,0}, f32[16,32]{1,0}) tuple(%copy.1, %p0, %p1)
  ROOT %while.1 = (s32[]{:T(128)}, f32[8,16]{1,0}, f32[16,32]{1,0}) while(%tuple.1), \
condition=%cond, body=%body
}
"""


def test_a_tpu_loop_counts_its_trips():
    counts = hlo_counts(TPU_LOOP)
    assert counts.flops == 3 * 2 * 8 * 32 * 16
    assert counts.kernels == 1 + 3 * 2  # the copy; the dot and the add, each trip


CONVOLUTIONS = {
    "same padding": dict(padding="SAME"),
    "strided": dict(padding="SAME", window_strides=(2, 2)),
    "dilated input": dict(padding=((0, 0), (0, 0)), lhs_dilation=(2, 3)),
    "padded, both dilated": dict(padding=((1, 2), (0, 1)), lhs_dilation=(2, 1),
                                 rhs_dilation=(1, 2)),
}


@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_convolution_flops_are_xlas_own(name):
    """A 3x3 convolution of 5 to 7 channels on 2 images of 9x11, in XLA's own `convolution` op
    (the form a TPU program's GEMMs take too): the FLOPs of XLA's own cost analysis, which counts
    only the taps that meet real inputs (not padding, not a dilated input's zeros)."""
    x = jax.ShapeDtypeStruct((2, 9, 11, 5), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 5, 7), jnp.float32)
    args = dict(window_strides=(1, 1), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, **args | CONVOLUTIONS[name])).lower(x, w).compile()
    assert " convolution(" in conv.as_text()
    assert hlo_counts(conv.as_text()).flops == xla_flops(conv) > 0


def test_a_batched_matmul_as_a_tpu_writes_it():
    """XLA's TPU compiler writes attention's einsum BNTS,BSNH->BTNH as a convolution whose batch
    dimensions (B, N) are window dimensions over an input dilated by the window's size (window
    4x3, stride 3x2): one real tap per output, 2*B*N*T*S*H FLOPs."""
    b, n, t, s, h = 4, 3, 6, 5, 2
    lhs = jax.ShapeDtypeStruct((b, s, n, h), jnp.float32)     # dims 0, f, 1, b
    kernel = jax.ShapeDtypeStruct((b, n, t, s), jnp.float32)  # dims 0, 1, o, i
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, window_strides=(3, 2), padding=((0, 0), (0, 0)), lhs_dilation=(b, n),
        dimension_numbers=("HCWN", "HWOI", "HWNC"))).lower(lhs, kernel).compile()
    assert "lhs_dilate=4x3" in conv.as_text()
    assert hlo_counts(conv.as_text()).flops == xla_flops(conv) == 2 * b * n * t * s * h


def xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
