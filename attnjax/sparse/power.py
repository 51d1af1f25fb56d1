"""PowerAttention: a local window plus the blocks at power-of-two distances.

Chen et al. 2025, "PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse
Attention". With key blocks at distances 1, 2, 4, …, 2^k, stacking ``d`` layers lets a token reach
any token up to ``2^d`` blocks back (every distance is a sum of distinct powers of two), at a
cost of ``O(log n)`` blocks per query block, close to a sliding window's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from attnjax import registry
from attnjax.sparse.static import StaticSelector, block_distance, check_nonnegative


def power_blocks(T: int, S: int, block_q: int, block_kv: int, window_blocks: int,
                 causal: bool = False) -> np.ndarray:
    """PowerAttention's block pattern, bool ``[nq, nk]``.

    Key block ``J`` is listed for query block ``I`` iff ``|δ| ≤ window_blocks`` or ``|δ|`` is a power
    of two (``|δ| = 2^k``, ``k ≥ 0``), where ``δ`` is the signed distance *in blocks* between ``J``
    and the query block's own key block(s) (``attnjax.sparse.static``; ``δ = I − J`` when
    ``bq = bk`` and ``T = S``); causal keeps ``δ ≥ 0``. A causal row lists at most
    ``w + 1 + #{k : w < 2^k < nk}`` blocks, so the density is at most ``(w + 1 + log2 nk) / nk``.
    """
    check_nonnegative(window_blocks=window_blocks)
    d = block_distance(T, S, block_q, block_kv)
    dist = np.abs(d)
    power_of_two = (dist > 0) & ((dist & (dist - 1)) == 0)
    return ((dist <= window_blocks) | power_of_two) & ((d >= 0) | (not causal))


@registry.register
@dataclasses.dataclass(frozen=True)
class Power(StaticSelector):
    """PowerAttention (Chen et al. 2025): ``J`` listed iff ``|δ(I, J)| ≤ w`` or ``|δ(I, J)| = 2^k``.

    ``δ`` is measured in key blocks from the query block's own block (``attnjax.sparse.static``);
    ``mask=Causal()`` keeps the blocks before the query (``δ ≥ 0``). Causal density at most
    ``(w + 1 + log2 nk) / nk``: ``O(n log n)`` work, close to a sliding window's ``O(n w)``.

    Attributes:
      window_blocks: ``w``, the local window in blocks on each side.
      block_q, block_kv: tile sizes.
    """

    window_blocks: int = 4
    block_q: int = 64
    block_kv: int = 64

    name: ClassVar[str] = "power"
    paper: ClassVar[str] = "PowerAttention (Chen et al. 2025)"

    def __post_init__(self):
        super().__post_init__()
        check_nonnegative(window_blocks=self.window_blocks)

    def pattern(self, T: int, S: int, num_heads: int = 1) -> np.ndarray:
        return power_blocks(T, S, self.block_q, self.block_kv, self.window_blocks)


__all__ = ["Power", "power_blocks"]
