"""Requests the tile kernels don't serve, refused with NotImplementedError so that
``implementation="auto"`` falls back to the xla path. Input validity (shapes, options) is checked
once, at the entry point (``attnjax.attention``), not here."""

from __future__ import annotations

import jax.numpy as jnp

MAX_HEAD_DIM = 256
"""The largest head dim (of q/k or v) the kernels tile."""
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
"""The input dtypes the kernels compute in."""


def refuse_unserved(kernel: str, q, v) -> None:
    """NotImplementedError unless the head dims are at most ``MAX_HEAD_DIM`` and q is in ``DTYPES``."""
    D, Dv = q.shape[-1], v.shape[-1]
    if max(D, Dv) > MAX_HEAD_DIM:
        raise NotImplementedError(f"the Pallas {kernel} kernel supports head dims up to {MAX_HEAD_DIM}, got "
                                  f"D={D}, Dv={Dv}")
    if q.dtype not in DTYPES:
        raise NotImplementedError(f"the Pallas {kernel} kernel supports float32/bfloat16/float16, got {q.dtype}")


__all__ = ["MAX_HEAD_DIM", "DTYPES", "refuse_unserved"]
