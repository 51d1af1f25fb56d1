"""S2-Attention: each head sees a strided shard of the context plus a local window.

Lin et al. 2024, "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads". The key
blocks are dealt into ``n`` shards by index modulo ``n``; head ``h`` attends to its shard
``J ≡ h (mod n)`` and to a local window, so no head sees the whole context but the heads together
do. (The authors' DKernel / vLLM ``get_sparse_attn_mask`` writes the shard test as
``(J + h·step + 1) % vert_stride == 0``, the same partition with another numbering.)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from attnjax import registry
from attnjax.checks import check_positive
from attnjax.sparse.static import StaticSelector, block_distance, check_nonnegative
from attnjax.tiling import num_tiles


def effective_shards(num_shards: int, num_heads: int) -> int:
    """``min(num_shards, num_heads)``: with fewer heads than shards the stride is the head count,
    so that the union over heads still covers the context."""
    check_positive(num_shards=num_shards, num_heads=num_heads)
    return min(num_shards, num_heads)


def s2_blocks(T: int, S: int, block_q: int, block_kv: int, num_heads: int, num_shards: int,
              window_blocks: int, causal: bool = False) -> np.ndarray:
    """S2-Attention's per-head block pattern, bool ``[num_heads, nq, nk]``.

    Head ``h`` lists key block ``J`` for query block ``I`` iff ``J ≡ h (mod n)`` (its shard) or
    ``|δ(I, J)| ≤ window_blocks`` (the local window; ``δ`` as in ``attnjax.sparse.static``), with
    ``n = min(num_shards, num_heads)``; causal keeps ``δ ≥ 0``. The union over heads is every
    block. Causal density per head ``≈ 1 / (2n) + (w + 1) / nk``.
    """
    check_nonnegative(window_blocks=window_blocks)
    n = effective_shards(num_shards, num_heads)
    d = block_distance(T, S, block_q, block_kv)
    heads = np.arange(num_heads)[:, None, None]
    shard = np.arange(num_tiles(S, block_kv))[None, None, :] % n == heads % n
    local = np.abs(d) <= window_blocks
    return (shard | local[None]) & ((d >= 0) | (not causal))[None]


@registry.register
@dataclasses.dataclass(frozen=True)
class S2(StaticSelector):
    """S2-Attention (Lin et al. 2024): head ``h`` lists ``J`` iff ``J ≡ h (mod n)`` or ``|δ(I, J)| ≤ w``.

    Lists are per query head (``Hl = Hq``; heads sharing a KV head under GQA read different
    shards). ``n = min(num_shards, Hq)`` so the heads' union covers every allowed block.
    Causal density per head ``≈ 1 / (2n) + (w + 1) / nk``.

    Attributes:
      num_shards: ``n``, the stride of each head's shard of key blocks.
      window_blocks: ``w``, the local window in blocks on each side of the own block.
      block_q, block_kv: tile sizes.
    """

    num_shards: int = 8
    window_blocks: int = 8
    block_q: int = 64
    block_kv: int = 64

    name: ClassVar[str] = "s2"
    paper: ClassVar[str] = "S2-Attention (Lin et al. 2024)"

    def __post_init__(self):
        super().__post_init__()
        check_positive(num_shards=self.num_shards)
        check_nonnegative(window_blocks=self.window_blocks)

    def pattern(self, T: int, S: int, num_heads: int = 1) -> np.ndarray:
        return s2_blocks(T, S, self.block_q, self.block_kv, num_heads, self.num_shards, self.window_blocks)


__all__ = ["S2", "s2_blocks", "effective_shards"]
