"""In-kernel score helpers on 2-D float32 tiles, shared by the GPU and TPU kernels."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def alibi_tile(slope, rows: jax.Array, cols: jax.Array, T: int, S: int) -> jax.Array:
    """ALiBi ``−m_h·|pos_q − pos_k|`` on a tile from its row/column iotas (bottom-right aligned)."""
    distance = jnp.abs(rows + (S - T) - cols).astype(jnp.float32)
    return -slope * distance


def apply_soft_cap(s: jax.Array, cap: Optional[float]) -> jax.Array:
    """``cap·tanh(s/cap)`` (identity when ``cap`` is None)."""
    return s if cap is None else cap * jnp.tanh(s / cap)


def soft_cap_grad(capped: jax.Array, cap: Optional[float]) -> jax.Array:
    """``d capped / d raw = 1 − (capped/cap)²`` (1 when ``cap`` is None)."""
    return 1.0 if cap is None else 1.0 - jnp.square(capped / cap)


__all__ = ["alibi_tile", "apply_soft_cap", "soft_cap_grad"]
