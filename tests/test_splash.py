"""The Pallas splash-attention kernel that runs SD3's attention on a TPU, in Pallas's
interpreter on the CPU, against torch's SDPA: forward and gradients, float32, with the joint
sequence padded to the kernel's blocks and the padding (a prefix's rest, or around a region)
masked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from test_sharding import cpu_env

from tsdsr_jax.models.splash import BLOCK, splash_attention

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def real_tokens(case: str, b: int, length: int) -> np.ndarray | None:
    """None (all), each sample's first tokens (the MMDiT's lengths), or a region of a 2D grid
    in row-major order (the VAE's latent extent): (B, L) bools."""
    if case == "full":
        return None
    if case == "lengths":
        return np.arange(length)[None] < np.asarray([150, 97])[:, None]
    rows, cols = np.divmod(np.arange(length), 13)  # 157 positions of a 13-wide grid
    return np.stack([(rows < 9) & (cols < 5), (rows < 12) & (cols < 11)])


@pytest.mark.parametrize("case", ["full", "lengths", "region"])
def test_splash_attention_matches_torch(case):
    b, length, heads, dim = 2, 157, 2, 64  # padded to 256: two blocks, the second part padding
    rng = np.random.default_rng(0)
    q, k, v, cot = (rng.standard_normal((b, length, heads, dim), dtype=np.float32)
                    for _ in range(4))
    real = real_tokens(case, b, length)
    keep = np.ones((b, length), bool) if real is None else real
    cot = cot * keep[:, :, None, None]  # the rows of padding tokens are the caller's

    def loss(q, k, v):
        out = splash_attention(q, k, v, real, interpret=True)
        return jnp.sum(out * cot), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    tq, tk, tv = (torch.tensor(a).transpose(1, 2).requires_grad_() for a in (q, k, v))
    mask = torch.tensor(keep[:, None, None, :])  # the padding's keys are masked out
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
    ref.backward(torch.tensor(cot).transpose(1, 2))
    want = ref.transpose(1, 2).detach().numpy()
    assert rel_err(np.asarray(out) * keep[:, :, None, None],
                   want * keep[:, :, None, None]) <= TOL
    for name, g, t in zip("qkv", grads, (tq, tk, tv)):
        err = rel_err(np.asarray(g), t.grad.transpose(1, 2).numpy())
        assert err <= TOL, (name, err)
    assert -length % BLOCK  # the padding path is the one tested



SPLIT = """
import jax, jax.numpy as jnp, numpy as np
from tsdsr_jax import sharding
from tsdsr_jax.models.splash import splash_attention
mesh = sharding.make_mesh(sharding.ShardingConfig(data=2, fsdp=2), jax.devices())
q, k, v = (np.random.default_rng(i).standard_normal((4, 130, 2, 32), dtype=np.float32)
           for i in range(3))
real = np.arange(130)[None] < np.asarray([130, 100, 64, 1])[:, None]
alone = splash_attention(q, k, v, real, interpret=True)
with sharding.activate(mesh):
    split = jax.jit(lambda q, k, v, r: splash_attention(q, k, v, r, interpret=True))(
        q, k, v, real)
keep = real[:, :, None, None]
print(np.abs(np.asarray(split) - np.asarray(alone))[np.broadcast_to(keep, alone.shape)].max())
"""


def test_splash_attention_splits_the_batch_over_a_mesh():
    """Under a mesh of 4 CPU devices each runs the kernel on its own samples (XLA cannot split a
    Pallas kernel): the same result as on one device."""
    done = subprocess.run([sys.executable, "-c", SPLIT], cwd=ROOT, env=cpu_env(4),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[0]) <= 1e-6
