"""Learned absolute position embeddings (Vaswani et al. 2017, §3.5; Gehring et al. 2017; GPT, BERT)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_input
from attnjax.nn.registry import ModuleSpec, register_module


class LearnedPositionEmbedding(nnx.Module):
    """``x + P[positions]`` with a learned table ``P [max_len, features]``.

    Vaswani et al. 2017 (§3.5) found learned embeddings on par with sinusoids; GPT and BERT use them.
    Positions beyond ``max_len − 1`` are an error in eager mode and clamp under ``jit`` (JAX's gather).

    Args:
      max_len: the most positions the table covers.
      features: ``d`` of ``x``.
      stddev: the table's normal init (0.02, as GPT-2 and BERT).
    """

    def __init__(self, max_len: int, features: int, *, stddev: float = 0.02, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(max_len=max_len, features=features)
        self.max_len, self.features = max_len, features
        self.table = nnx.Param(nnx.initializers.normal(stddev)(rngs.params(), (max_len, features), param_dtype))

    def __call__(self, x: jax.Array, positions: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, features]`` plus the embeddings of int ``positions`` ``[B, T]`` or ``[T]`` (default
        ``arange(T)``; a decode step passes its position). Returns ``[B, T, features]`` in x's dtype."""
        check_input("x", x, self.features)
        T = x.shape[1]
        positions = jnp.arange(T) if positions is None else jnp.asarray(positions)
        if positions.shape[-1] != T or positions.ndim not in (1, 2):
            raise ValueError(f"positions has shape {positions.shape}, expected [B, T] or [T] with T={T}")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"positions must be integers, got {positions.dtype}")
        if T > self.max_len:
            raise ValueError(f"x has T={T} positions, more than max_len={self.max_len}")
        return x + jnp.take(self.table[...], positions, axis=0).astype(x.dtype)


register_module(ModuleSpec("learned_position", LearnedPositionEmbedding, dict(max_len=12, features=16), (2, 9, 16),
                           kind="other", paper="Vaswani et al. 2017, §3.5 (learned positional embeddings)",
                           causal=True))
