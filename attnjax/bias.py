"""Additive score biases as values: an array, or a rule computed from positions per tile."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnjax.tiling import take_tile


class Bias:
    """An additive logit term ``b[b, h, i, j]``, asked for one tile at a time.

    Subclasses implement ``tile``; a rule-based bias (ALiBi, …) never materializes ``[T, S]``.
    """

    differentiable = False
    """Whether a blocked path returns a gradient for this bias (arrays do, rules don't)."""

    def tile(self, q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int) -> jax.Array:
        """Bias for query rows ``q_idx`` [tq] and key columns ``kv_idx`` [tk]: ``[Bb, Hb, tq, tk]``."""
        raise NotImplementedError

    def check(self, batch: int, num_heads: int, T: int, S: int) -> None:
        """Raise ``ValueError`` if the bias doesn't fit ``[batch, num_heads, T, S]``."""

    def dense(self, T: int, S: int) -> jax.Array:
        """The full bias, ``[Bb, Hb, T, S]`` broadcastable to ``[B, H, T, S]``."""
        return self.tile(jnp.arange(T), jnp.arange(S), T, S)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ArrayBias(Bias):
    """A bias array broadcastable to ``[B, H, T, S]`` (rank 2 to 4)."""

    array: jax.Array
    differentiable = True

    def rank4(self) -> jax.Array:
        a = self.array
        return a.reshape((1,) * (4 - a.ndim) + a.shape)

    def check(self, batch, num_heads, T, S):
        a = self.array
        expected = (batch, num_heads, T, S)
        if not 2 <= a.ndim <= 4 or any(d not in (1, e) for d, e in zip(self.rank4().shape, expected)):
            raise ValueError(
                f"bias has shape {tuple(a.shape)}, expected one broadcastable to "
                f"[B, H, T, S] = {list(expected)}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"bias must be a float array, got {a.dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        return take_tile(self.rank4(), q_idx, kv_idx).astype(jnp.float32)


def as_bias(bias) -> Bias | None:
    """Wrap a user ``bias`` argument (None, an array, or a ``Bias``) as a ``Bias``."""
    if bias is None or isinstance(bias, Bias):
        return bias
    if isinstance(bias, (jax.Array, jnp.ndarray)) or hasattr(bias, "__array__"):
        return ArrayBias(jnp.asarray(bias))
    raise TypeError(f"bias must be an array or an attnjax Bias (e.g. positional.ALiBi), got {type(bias).__name__}")
