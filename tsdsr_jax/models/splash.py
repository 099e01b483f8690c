"""Attention on a TPU through the Pallas splash-attention kernel (``jax.experimental.pallas.ops.
tpu``): flash attention's blockwise softmax, forward and backward, that never holds the
(L, L) scores in HBM.

It runs the MMDiT's joint attention (SD3 at 512²: 1357 tokens, 24 heads) and the VAE's mid-block
attention (4096 positions, one head of 512). The kernel tiles the sequence in blocks of
:data:`BLOCK`, so the sequence is zero-padded to a multiple of it. Segment ids keep the padding
out exactly: the real tokens are segment 1 and attend only to each other, the padding is
segment 0 (its rows are dropped). The kernel does not scale the logits, so the queries are
scaled first. XLA cannot split a Pallas kernel over devices itself: under a mesh
(:func:`tsdsr_jax.sharding.activate`) each device runs it on its own part of the batch
(``shard_map``). Off a TPU it runs only in Pallas's interpreter (``interpret=True``: the tests,
against torch's SDPA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from tsdsr_jax.sharding import BATCH

BLOCK = 128


def _kernel(length: int, heads: int, interpret: bool) -> kernel.SplashAttentionKernel:
    blocks = kernel.BlockSizes(block_q=BLOCK, block_kv=BLOCK, block_kv_compute=BLOCK,
                               block_q_dkv=BLOCK, block_kv_dkv=BLOCK,
                               block_kv_dkv_compute=BLOCK, block_q_dq=BLOCK, block_kv_dq=BLOCK)
    # built in each call's own trace (about 60 ms): its mask arrays become that trace's
    # constants; a kernel kept from an earlier trace (another remat block's) would leak them
    full = masks.MultiHeadMask([masks.FullMask((length, length))] * heads)
    return kernel.make_splash_mha(full, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     real: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """Softmax attention over ``(B, L, heads, head_dim)``, as ``jax.nn.dot_product_attention``;
    ``real`` (B, L) bools: only the tokens where it is true take part, attending to each other
    (the other rows' output is left undefined, for the caller to drop)."""
    b, length, heads, head_dim = q.shape
    padded = -(-length // BLOCK) * BLOCK
    scale = head_dim ** -0.5

    def prepare(x: jax.Array, factor: float = 1.0) -> jax.Array:  # (B, heads, padded, D)
        x = jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
        return (x * jnp.asarray(factor, x.dtype)).transpose(0, 2, 1, 3)

    real = jnp.ones((b, length), bool) if real is None else real
    segments = jnp.pad(real, ((0, 0), (0, padded - length))).astype(jnp.int32)
    attend = _kernel(padded, heads, interpret)
    local = jax.vmap(lambda q, k, v, s: attend(q, k, v, segment_ids=kernel.SegmentIds(s, s)))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # each device its own samples
        split = P(tuple(a for a in BATCH if a in mesh.axis_names))
        local = jax.shard_map(local, mesh=mesh, in_specs=split, out_specs=split,
                              check_vma=False)
    out = local(prepare(q, scale), prepare(k), prepare(v), segments)
    return out.transpose(0, 2, 1, 3)[:, :length]
