"""ALiBi: Press et al., "Train Short, Test Long: Attention with Linear Biases Enables Input Length
Extrapolation" (ICLR 2022). The bias ``-m_h·|i - j|`` is computed per tile from positions and never
materialized as ``[T, S]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.bias import Bias
from attnjax.masks import query_positions


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes ``m_h`` (float32, ``[num_heads]``), as in Press et al. 2022.

    For ``n`` a power of two, ``m_h = 2^(-8h/n)`` for ``h = 1..n``. Otherwise the slopes of the
    nearest lower power of two are followed by every other slope of the next power of two.
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")

    def power_of_two(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    lower = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(lower)
    if lower < num_heads:
        slopes += power_of_two(2 * lower)[0::2][: num_heads - lower]
    return np.asarray(slopes, np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ALiBi(Bias):
    """ALiBi bias ``-m_h · |pos_q - pos_k|`` computed per tile from positions.

    Pass as ``attention(..., bias=ALiBi(alibi_slopes(H)))``. Positions follow the library's
    bottom-right alignment (see ``attnjax.masks``). The slopes are constants: blocked paths
    return no gradient for them.

    Args:
      slopes: ``[H]`` float slopes, one per query head.
    """

    slopes: jax.Array

    def check(self, batch, num_heads, T, S):
        if jnp.ndim(self.slopes) != 1 or jnp.shape(self.slopes)[0] != num_heads:
            raise ValueError(f"ALiBi slopes have shape {jnp.shape(self.slopes)}, expected ({num_heads},)")

    def tile(self, q_idx, kv_idx, T, S):
        qp = query_positions(q_idx, T, S)
        distance = jnp.abs(qp[:, None] - kv_idx[None, :]).astype(jnp.float32)
        slopes = jax.lax.stop_gradient(jnp.asarray(self.slopes, jnp.float32))
        return -slopes[None, :, None, None] * distance[None, None]


__all__ = ["alibi_slopes", "ALiBi"]
