"""Rematerialisation: which activations a rematerialised block keeps for the backward pass (the
rest it recomputes), by name, for the models' ``remat_policy`` config fields."""

from __future__ import annotations

import jax

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,                  # least memory
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def check(policy: str | None) -> None:
    """A ValueError unless ``policy`` is None or a name in :data:`POLICIES`."""
    if policy not in (None, *POLICIES):
        raise ValueError(f"unsupported remat_policy {policy!r} "
                         f"(supported: None, {', '.join(POLICIES)})")
