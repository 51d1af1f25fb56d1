"""MoBA and VMoBA (catalog B5): key blocks chosen by a parameter-free gate ``q · mean(K_block)``.

**MoBA** (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs",
arXiv:2502.13189; public code ``MoonshotAI/MoBA``, ``moba/moba_naive.py``). The gate of key block
``n`` for query token ``t`` is ``s_tn = q_t · k̄_n`` with ``k̄_n`` the mean key of block ``n``. Each
query keeps its ``top_k`` blocks; its own block (the one holding its position) always counts (the
public code sets its gate to +inf) and blocks in its future never do (-inf).

The engine selects per query *block*, not per query token, so this is MoBA's block version, the one
a block-sparse kernel can run: the gate of (query block ``i``, key block ``n``) is the **mean** (or,
with ``query_pool="max"``, the max) of ``s_tn`` over the valid queries ``t`` of block ``i``. The mean
equals ``q̄_i · k̄_n`` with ``q̄_i`` the mean query. "Own" key blocks are those that hold a position
of the query block (``attnjax.sparse.static.block_distance == 0``: one block when ``block_q ==
block_kv`` and ``T == S``); they are forced in. The other blocks that the request's mask allows
compete for the remaining slots, so under ``Causal()`` only blocks wholly in the past compete, as in
MoBA. Without a mask every block competes (non-causal MoBA, as in VMoBA).

**VMoBA** (Wu et al. 2025, "VMoBA: Mixture-of-Block Attention for Video Diffusion Models",
arXiv:2506.23858; public code ``KwaiVGI/VMoBA``, ``src/vmoba.py``) changes three things:

1. Layer-wise recurrent partition of a ``(frames, height, width)`` token grid: layer ``l`` uses
   ``l % 3`` = 0: 1D temporal chunks (``chunk_1d`` frames), 1: 2D spatial patches (``chunk_2d`` =
   (ph, pw), all frames), 2: 3D cubes (``chunk_3d`` = (ct, ch, cw)). Tokens are permuted so every
   partition block is contiguous (``vmoba_permutation``, as ``process_moba_input`` in the public
   code); attention runs in that order and the output is permuted back.
2. Global selection: one budget per (batch, head) over all (query block, key block) pairs, instead
   of a fixed ``k`` per query.
3. Threshold-based ``k``: gate scores are min-max normalized over the head's valid pairs (as the
   public ``_select_threshold_head_global``); the own blocks count first, then the highest other
   pairs are added until the kept share of the head's total normalized score reaches ``threshold``.
   (The public code always adds at least one other pair; here none is added if the own blocks
   already reach the threshold.)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.masks import Mask
from attnjax.checks import check_positive, describe
from attnjax.sparse.engine import BlockSelector, covers_allowed, fits_top_k
from attnjax.blocked.lists import BlockSparse, allowed_blocks, from_block_mask
from attnjax.sparse.paro import GridPermutedSelector, check_grid
from attnjax.sparse.seer import select_topk
from attnjax.sparse.static import block_distance
from attnjax.tiling import num_tiles, pad_axis

MOBA_PAPER = "Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs"
VMOBA_PAPER = "Wu et al. 2025, VMoBA: Mixture-of-Block Attention for Video Diffusion Models"
POOLS = ("mean", "max")


# ----------------------------------------------------------------------------- the gate

def block_means(x: jax.Array, block: int) -> jax.Array:
    """Mean token of each block over its valid tokens: ``[B, L, H, D]`` -> float32 ``[B, ceil(L/block), H, D]``."""
    B, L, H, D = x.shape
    n = num_tiles(L, block)
    sums = pad_axis(x.astype(jnp.float32), 1, block).reshape(B, n, block, H, D).sum(2)
    sizes = np.minimum(block, L - np.arange(n) * block).astype(np.float32)
    return sums / sizes[None, :, None, None]


def block_gate(q: jax.Array, k: jax.Array, block_q: int, block_kv: int, pool: str = "mean") -> jax.Array:
    """MoBA's gate pooled over query blocks: float32 ``[B, Hq, nq, nk]``.

    ``g[b, h, i, n] = pool_{t ∈ block i} q[b, t, h] · mean(k[b, block n, h // G])`` over the valid
    (unpadded) queries of block ``i``; ``pool`` is "mean" or "max". The mean is computed as
    ``mean(q[block i]) · mean(k[block n])`` (``block_q`` times fewer products than per token).
    No gradient flows through it.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    key_means = block_means(k, block_kv)
    if pool == "mean":
        q_means = block_means(q, block_q).reshape(B, -1, Hkv, Hq // Hkv, D)
        return jnp.einsum("bikgd,bnkd->bkgin", q_means, key_means).reshape(B, Hq, q_means.shape[1], -1)
    nq = num_tiles(T, block_q)
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, Hq // Hkv, D)
    s = jnp.einsum("btkgd,bnkd->bkgtn", qg, key_means).reshape(B, Hq, T, -1)
    tiles = pad_axis(s, 2, block_q).reshape(B, Hq, nq, block_q, -1)
    valid = (np.arange(nq * block_q) < T).reshape(1, 1, nq, block_q, 1)
    return jnp.where(valid, tiles, -jnp.inf).max(3)


def own_blocks(T: int, S: int, block_q: int, block_kv: int) -> np.ndarray:
    """Bool ``[nq, nk]``: key blocks that hold a position of each query block (bottom-right aligned)."""
    return block_distance(T, S, block_q, block_kv) == 0


# ----------------------------------------------------------------------------- MoBA

@registry.register
@dataclasses.dataclass(frozen=True)
class Moba(BlockSelector):
    """MoBA block selection (Lu et al. 2025) for the block-sparse engine; see the module docstring.

    Each query block keeps ``top_k`` key blocks: its own block(s), always, and the best of the
    others that the mask allows by the pooled gate ``q · mean(K_block)``. Dynamic lists with
    ``K = min(nk, max(top_k, own blocks per query block))``; GQA: query head ``h`` gates the mean
    keys of KV head ``h // G``, lists are per query head.

    Attributes:
      block_q, block_kv: tile sizes (MoBA's block size; default 64).
      top_k: blocks per query block, own block included (MoBA's ``moba_topk``).
      query_pool: "mean" or "max" of the per-token gates over a query block.
    """

    name: ClassVar[str] = "moba"
    paper: ClassVar[str] = MOBA_PAPER

    block_q: int = 64
    block_kv: int = 64
    top_k: int = 3
    query_pool: str = "mean"

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv, top_k=self.top_k)
        if self.query_pool not in POOLS:
            raise ValueError(f"Moba.query_pool must be one of {POOLS}, got {self.query_pool!r}")

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        T, S = q.shape[1], k.shape[1]
        gate = block_gate(q, k, self.block_q, self.block_kv, self.query_pool)
        own = own_blocks(T, S, self.block_q, self.block_kv)
        ok = allowed_blocks(mask, T, S, self.block_q, self.block_kv)
        K = self.list_length(T, S)
        return select_topk(jnp.where(own, jnp.inf, gate), K, ok, block_q=self.block_q, block_kv=self.block_kv)

    def list_length(self, T: int, S: int) -> int:
        """``K = min(nk, max(top_k, own blocks per query block))``: blocks listed per query block."""
        own = own_blocks(T, S, self.block_q, self.block_kv)
        return min(num_tiles(S, self.block_kv), max(self.top_k, int(own.sum(-1).max(initial=0))))

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when no query-block row allows more than ``list_length(T, S)`` blocks: the top-k then
        takes them all (e.g. ``top_k · block_kv ≥ S``)."""
        return fits_top_k(self.list_length(T, S), mask, T, S, self.block_q, self.block_kv)


# ----------------------------------------------------------------------------- VMoBA partitions

PARTITIONS = ("1d", "2d", "3d")


def vmoba_permutation(grid: Tuple[int, int, int], partition: str, chunk: Tuple[int, ...]) -> Tuple[np.ndarray, int]:
    """Token order that makes each VMoBA partition block contiguous, and the block size.

    Tokens are numbered frame-major, ``t = (f·H + y)·W + x`` for a ``(F, H, W)`` grid.

    - "1d", ``chunk = (ct,)``: temporal chunks of ``ct`` frames; the order is the identity and the
      last chunk may be short (``F % ct``).
    - "2d", ``chunk = (ph, pw)``: spatial patches through all frames, ordered patch by patch, each
      as ``(frame, y, x)``; ``H % ph == W % pw == 0``.
    - "3d", ``chunk = (ct, ch, cw)``: spatio-temporal cubes, cube by cube; every axis divisible.

    A chunk longer than its axis is clipped to the axis. Returns ``(perm, P)``: ``perm[i]`` is the
    original index of the token at position ``i`` (``x_permuted = x[:, perm]``), and ``P`` the
    tokens per partition block.
    """
    F, H, W = grid
    idx = np.arange(F * H * W).reshape(F, H, W)
    if partition == "1d":
        (ct,) = chunk
        return idx.ravel(), min(ct, F) * H * W
    if partition == "2d":
        ph, pw = min(chunk[0], H), min(chunk[1], W)
        _check_divides(grid, (F, ph, pw), partition)
        perm = idx.reshape(F, H // ph, ph, W // pw, pw).transpose(1, 3, 0, 2, 4)
        return perm.ravel(), F * ph * pw
    if partition == "3d":
        ct, ch, cw = min(chunk[0], F), min(chunk[1], H), min(chunk[2], W)
        _check_divides(grid, (ct, ch, cw), partition)
        perm = idx.reshape(F // ct, ct, H // ch, ch, W // cw, cw).transpose(0, 2, 4, 1, 3, 5)
        return perm.ravel(), ct * ch * cw
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")


def _check_divides(grid, chunk, partition):
    if any(g % c for g, c in zip(grid, chunk)):
        raise ValueError(f"VMoBA {partition} partition: chunk {tuple(chunk)} must divide the grid {tuple(grid)}")


# ----------------------------------------------------------------------------- VMoBA selection

def threshold_select(gate: jax.Array, forced, candidates, threshold: float) -> jax.Array:
    """VMoBA's global threshold selection over each head's whole block map.

    Args:
      gate: float ``[B, H, nq, nk]`` block scores.
      forced: bool broadcastable to ``gate``: pairs always kept (own blocks).
      candidates: bool broadcastable to ``gate``: pairs that may be added (disjoint from ``forced``).
      threshold: ``τ`` in (0, 1].
    Returns:
      bool ``[B, H, nq, nk]``: ``forced`` plus the fewest highest-scoring candidates such that the
      kept pairs hold ``≥ τ`` of the head's total min-max normalized score
      ``z = (g - min) / (max - min)`` (min and max over the head's forced and candidate pairs).
    """
    forced = jnp.broadcast_to(jnp.asarray(forced), gate.shape)
    candidates = jnp.broadcast_to(jnp.asarray(candidates), gate.shape)
    valid = forced | candidates
    lo = jnp.min(jnp.where(valid, gate, jnp.inf), axis=(-2, -1), keepdims=True)
    hi = jnp.max(jnp.where(valid, gate, -jnp.inf), axis=(-2, -1), keepdims=True)
    span = jnp.where(hi - lo > 1e-6, hi - lo, 1.0)
    z = jnp.where(valid, (gate - jnp.where(jnp.isfinite(lo), lo, 0.0)) / span, 0.0)
    need = threshold * z.sum((-2, -1)) - jnp.where(forced, z, 0.0).sum((-2, -1))
    flat = jnp.where(candidates, z, -1.0).reshape(*gate.shape[:2], -1)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    ranked = jnp.take_along_axis(flat, order, axis=-1)
    is_candidate = ranked >= 0
    before = jnp.cumsum(jnp.where(is_candidate, ranked, 0.0), axis=-1) - jnp.where(is_candidate, ranked, 0.0)
    keep_ranked = is_candidate & (before < need[..., None])
    keep = jnp.take_along_axis(keep_ranked, jnp.argsort(order, axis=-1), axis=-1)
    return forced | keep.reshape(gate.shape)


def _tiles_to_partition(n_tiles: int, block: int, part: int) -> np.ndarray:
    """Partition block of each engine tile (``part`` is a multiple of ``block``)."""
    return np.arange(n_tiles) * block // part


@registry.register
@dataclasses.dataclass(frozen=True)
class Vmoba(GridPermutedSelector):
    """VMoBA block selection (Wu et al. 2025) for the block-sparse engine; see the module docstring.

    With ``grid=None`` the tokens form a plain sequence and the partition blocks are the engine's
    tiles (any ``T``, ``S``; masks allowed): MoBA's gate with VMoBA's global threshold selection.
    With ``grid=(F, H, W)`` (self-attention, ``T = S = F·H·W``), layer ``layer_index`` uses the
    ``layer_index % 3``-th partition; the mechanism's paths permute q, k, v into partition order
    (``vmoba_permutation``), select and attend there, and permute the output back. ``select``
    itself takes q and k already in partition order and its lists refer to that order. A fine
    mask is not supported with a grid (it would have to be permuted too). Each partition block
    (``P`` tokens) must be a whole number of tiles: ``P % block_q == P % block_kv == 0``.

    Lists are dynamic with ``K = nk``.

    Attributes:
      block_q, block_kv: tile sizes (default 64).
      grid: ``(frames, height, width)`` of the token grid, or ``None``.
      layer_index: the layer's index; picks the partition 1D / 2D / 3D by ``layer_index % 3``.
      chunk_1d: frames per temporal chunk; chunk_2d: ``(ph, pw)``; chunk_3d: ``(ct, ch, cw)``.
      threshold: ``τ``, the share of the head's normalized gate mass to keep.
      query_pool: "mean" or "max" of the per-token gates over a query block.
    """

    name: ClassVar[str] = "vmoba"
    paper: ClassVar[str] = VMOBA_PAPER

    block_q: int = 64
    block_kv: int = 64
    grid: Optional[Tuple[int, int, int]] = None
    layer_index: int = 0
    chunk_1d: int = 1
    chunk_2d: Tuple[int, int] = (8, 8)
    chunk_3d: Tuple[int, int, int] = (4, 4, 4)
    threshold: float = 0.25
    query_pool: str = "mean"

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv, chunk_1d=self.chunk_1d)
        if not isinstance(self.layer_index, int) or self.layer_index < 0:
            raise ValueError(f"Vmoba.layer_index must be a non-negative int, got {self.layer_index!r}")
        for name, size in (("chunk_2d", 2), ("chunk_3d", 3)):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != size:
                raise ValueError(f"Vmoba.{name} must be a tuple of {size} ints, got {describe(value)}")
            check_positive(**{f"{name}[{i}]": c for i, c in enumerate(value)})
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"Vmoba.threshold must be in (0, 1], got {self.threshold!r}")
        if self.query_pool not in POOLS:
            raise ValueError(f"Vmoba.query_pool must be one of {POOLS}, got {self.query_pool!r}")
        if self.grid is not None:
            if not isinstance(self.grid, tuple) or len(self.grid) != 3:
                raise ValueError(f"Vmoba.grid must be (frames, height, width) or None, got {self.grid!r}")
            check_positive(frames=self.grid[0], height=self.grid[1], width=self.grid[2])
            _, P = self.permutation()
            if P % self.block_q or P % self.block_kv:
                raise ValueError(f"Vmoba {self.partition} partition blocks have {P} tokens, which must be a "
                                 f"multiple of block_q={self.block_q} and block_kv={self.block_kv}")

    @property
    def partition(self) -> str:
        """"1d", "2d" or "3d": this layer's partition (``layer_index % 3``)."""
        return PARTITIONS[self.layer_index % 3]

    def permutation(self) -> Tuple[np.ndarray, int]:
        """``(perm, P)`` of this layer's partition on ``grid`` (``vmoba_permutation``)."""
        chunk = {"1d": (self.chunk_1d,), "2d": self.chunk_2d, "3d": self.chunk_3d}[self.partition]
        return vmoba_permutation(self.grid, self.partition, chunk)

    def token_permutation(self, q: jax.Array, k: jax.Array) -> np.ndarray:
        """The shared token order ``[N]`` (static) that ``permuted_selector_attention`` applies."""
        check_grid(self.grid, q.shape[1], k.shape[1])
        return self.permutation()[0]

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        T, S = q.shape[1], k.shape[1]
        part_q, part_k = self.partition_blocks(T, S)
        gate = block_gate(q, k, part_q, part_k, self.query_pool)
        own = own_blocks(T, S, part_q, part_k)
        ok = jnp.asarray(allowed_blocks(mask, T, S, part_q, part_k))
        keep = threshold_select(gate, own & ok, ok & ~own, self.threshold)
        nq, nk = num_tiles(T, self.block_q), num_tiles(S, self.block_kv)
        keep = keep[:, :, _tiles_to_partition(nq, self.block_q, part_q)]
        keep = keep[..., _tiles_to_partition(nk, self.block_kv, part_k)]
        return from_block_mask(keep, self.block_q, self.block_kv, max_blocks=nk)

    def partition_blocks(self, T: int, S: int) -> Tuple[int, int]:
        """Tokens per partition block, query and key side: the tiles without a grid, ``P`` with one."""
        if self.grid is None:
            return self.block_q, self.block_kv
        check_grid(self.grid, T, S)
        P = self.permutation()[1]
        return P, P

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when the own partition blocks, always kept, are every block the mask allows (e.g. one
        partition block per side); otherwise the threshold decides from the gate scores (data)."""
        part_q, part_k = self.partition_blocks(T, S)
        return covers_allowed(own_blocks(T, S, part_q, part_k), mask, T, S, part_q, part_k)


__all__ = [
    "Moba", "Vmoba", "block_gate", "block_means", "own_blocks", "threshold_select", "vmoba_permutation",
    "PARTITIONS",
]
