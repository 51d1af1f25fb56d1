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

**Per-token MoBA** (``Moba(granularity="token")``) is the paper's rule itself (Lu et al. 2025,
§2.2: the gate ``g_i = 1`` iff ``s_i ∈ Topk({s_j}, k)`` with ``s_i = ⟨q, mean_pool(K[I_i])⟩``, the
query's current block always kept and future blocks never), as ``moba_naive.py`` computes it
(``gate`` +inf on the own block, -inf on later ones, ``torch.topk`` per token): every query token
``t`` keeps its own ``top_k`` key blocks. It runs exactly on the
block engine: the lists of a query tile are the union of its tokens' choices, and a fine mask
(``TokenBlocks``) lets row ``t`` see only the blocks it chose itself (``routed_attention``).
Which blocks compete is decided per row from the request's mask: a block competes for row ``t``
when the mask allows some key of it to ``t`` (under ``Causal()``, blocks that start at or before
``t``'s position; the own block, which also holds later keys, is cut by the mask element by
element).

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
import functools
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.masks import EMPTY, PARTIAL, Causal, Mask
from attnjax.checks import check_positive, check_qkv, describe
from attnjax.sparse.engine import (PATHS, BlockSelector, block_sparse_attention, covers_allowed, fits_top_k,
                                   warn_if_dense)
from attnjax.blocked.lists import BlockSparse, allowed_blocks, from_block_mask
from attnjax.sparse.paro import GridPermutedSelector, check_grid
from attnjax.sparse.seer import select_topk
from attnjax.sparse.static import block_distance
from attnjax.tiling import num_tiles, pad_axis

MOBA_PAPER = "Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs"
VMOBA_PAPER = "Wu et al. 2025, VMoBA: Mixture-of-Block Attention for Video Diffusion Models"
POOLS = ("mean", "max")
GRANULARITIES = ("block", "token")


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
    s = token_gate(q, k, block_kv)
    tiles = pad_axis(s, 2, block_q).reshape(B, Hq, nq, block_q, -1)
    valid = (np.arange(nq * block_q) < T).reshape(1, 1, nq, block_q, 1)
    return jnp.where(valid, tiles, -jnp.inf).max(3)


def token_gate(q: jax.Array, k: jax.Array, block_kv: int) -> jax.Array:
    """MoBA's gate per query token (Lu et al. 2025, Eq. 4): float32 ``[B, Hq, T, nk]``,
    ``s[b, h, t, n] = q[b, t, h] · mean(k[b, block n, h // G])``. No gradient flows through it."""
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, Hq // Hkv, D)
    return jnp.einsum("btkgd,bnkd->bkgtn", qg, block_means(k, block_kv)).reshape(B, Hq, T, -1)


def own_blocks(T: int, S: int, block_q: int, block_kv: int) -> np.ndarray:
    """Bool ``[nq, nk]``: key blocks that hold a position of each query block (bottom-right aligned)."""
    return block_distance(T, S, block_q, block_kv) == 0


# ----------------------------------------------------------------------------- per-token selection

@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TokenBlocks(Mask):
    """The key blocks each query row chose, as a fine mask: row ``t`` may see key ``s`` iff block
    ``s // block`` is among ``ids[b, h, t]`` (per-token routing on the block engine).

    Attributes:
      ids: int32 ``[Bm, Hm, T, K]`` (``Bm ∈ {1, B}``, ``Hm ∈ {1, Hq}``): the chosen key blocks of
        each row; ``-1`` marks an unused slot.
      block: the key-block size the ids count in (static).

    ``tile`` compares each row's ``K`` ids with the key blocks of the tile. ``block_summary`` is
    conservative: PARTIAL for a tile where some row of the query tile chose a block that overlaps
    the key tile, EMPTY elsewhere, never FULL.
    """

    ids: jax.Array
    block: int

    def __repr__(self) -> str:
        return f"TokenBlocks(ids={self.ids.dtype}{list(self.ids.shape)}, block={self.block})"

    def check(self, batch: int, num_heads: int, T: int, S: int) -> None:
        shape = tuple(self.ids.shape)
        if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, num_heads) or shape[2] != T:
            raise ValueError(f"TokenBlocks.ids has shape {shape}, expected [1 or {batch}, 1 or {num_heads}, {T}, K]")
        if not jnp.issubdtype(self.ids.dtype, jnp.integer):
            raise TypeError(f"TokenBlocks.ids must be integers, got {self.ids.dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        rows = jnp.take(self.ids, q_idx, axis=2, mode="clip")  # [Bm, Hm, tq, K]
        return (rows[..., None] == (kv_idx // self.block)[None, None, None, None, :]).any(-2)

    def union(self, S: int, block_q: int) -> jax.Array:
        """Bool ``[Bm, Hm, ceil(T/block_q), ceil(S/block)]``: the blocks some row of each query tile chose."""
        Bm, Hm, T, _ = self.ids.shape
        nk = num_tiles(S, self.block)
        ids = jnp.where(self.ids >= 0, self.ids, nk)  # unused slots fall outside and are dropped
        rows = (jnp.arange(T) // block_q)[None, None, :, None]
        out = jnp.zeros((Bm, Hm, num_tiles(T, block_q), nk), bool)
        return out.at[jnp.arange(Bm)[:, None, None, None], jnp.arange(Hm)[None, :, None, None], rows, ids].set(
            True, mode="drop")

    def block_summary(self, T, S, block_q, block_kv):
        chosen = self.union(S, block_q)
        if block_kv != self.block:
            chosen = jnp.einsum("bhin,nj->bhij", chosen.astype(jnp.float32),
                                jnp.asarray(_block_overlap(S, self.block, block_kv), jnp.float32)) > 0
        return jnp.where(chosen, PARTIAL, EMPTY).astype(jnp.int8)


jax.tree_util.register_dataclass(TokenBlocks, data_fields=["ids"], meta_fields=["block"])


def _block_overlap(S: int, block: int, tile: int) -> np.ndarray:
    """Bool ``[ceil(S/block), ceil(S/tile)]``: whether key block ``n`` and key tile ``j`` share a position."""
    start_n = np.arange(num_tiles(S, block)) * block
    start_j = np.arange(num_tiles(S, tile)) * tile
    end_n, end_j = np.minimum(start_n + block, S), np.minimum(start_j + tile, S)
    return (start_n[:, None] < end_j[None, :]) & (end_n[:, None] > start_j[None, :])


def top_blocks_per_token(scores: jax.Array, forced, allowed, k: int) -> jax.Array:
    """Each row's ``k`` chosen key blocks: int32 ``[B, H, T, k]``, ``-1`` for unused slots.

    Args:
      scores: float ``[B, H, T, nk]`` block scores per query row.
      forced: bool broadcastable to ``scores``: blocks always kept (if allowed).
      allowed: bool broadcastable to ``scores``: the blocks that may be kept at all.
      k: blocks per row (``1 ≤ k ≤ nk``), forced ones included.
    Returns:
      The forced allowed blocks, then the highest-scoring other allowed blocks (ties to the lower
      id), ``k`` slots in all; a row with fewer allowed blocks lists them and leaves ``-1``.
    """
    allowed = jnp.broadcast_to(jnp.asarray(allowed), scores.shape)
    ranked = jnp.where(allowed & jnp.asarray(forced), jnp.inf, jnp.where(allowed, scores, -jnp.inf))
    values, ids = lax.top_k(ranked, k)
    return jnp.where(values > -jnp.inf, ids, -1).astype(jnp.int32)


def row_allowed_blocks(mask: Optional[Mask], T: int, S: int, block_kv: int):
    """Bool ``[Bm, Hm, T | 1, nk]``: the key blocks ``mask`` allows some key of, for each query row.

    ``None`` allows every block; ``Causal()`` the blocks that start at or before the row's
    position (bottom-right aligned); any other mask its block summary at one row per tile.
    """
    nk = num_tiles(S, block_kv)
    if mask is None:
        return np.ones((1, 1, 1, nk), bool)
    if isinstance(mask, Causal):
        positions = jnp.arange(T) + (S - T)
        return (jnp.arange(nk)[None, :] * block_kv <= positions[:, None])[None, None]
    return allowed_blocks(mask, T, S, 1, block_kv)


def own_block_per_token(T: int, S: int, block_kv: int) -> jax.Array:
    """Bool ``[T, nk]``: the key block that holds each query row's position (bottom-right aligned)."""
    own = (jnp.arange(T) + (S - T)) // block_kv
    return own[:, None] == jnp.arange(num_tiles(S, block_kv))[None, :]


def union_lists(chosen: TokenBlocks, T: int, S: int, block_q: int) -> BlockSparse:
    """Block lists whose query tile ``i`` lists the union of its rows' chosen blocks (dynamic,
    ``K = min(nk, block_q · slots)``), with ``block_kv = chosen.block``."""
    nk = num_tiles(S, chosen.block)
    max_blocks = min(nk, block_q * chosen.ids.shape[-1])
    return from_block_mask(chosen.union(S, block_q), block_q, chosen.block, max_blocks=max_blocks)


def routed_attention(selector, implementation: str, q: jax.Array, k: jax.Array, v: jax.Array, *,
                     mask: Optional[Mask] = None, scale: Optional[float] = None,
                     logits_soft_cap: Optional[float] = None, return_lse: bool = False):
    """``attnjax.attention`` signature after the two bound arguments, for selectors with a ``route``.

    ``selector.route(q, k, v, mask=mask)`` returns the block lists and an optional fine mask
    (e.g. ``TokenBlocks`` for per-token selection); the engine runs under ``mask & fine``. Warns
    like ``attnjax.sparse.selected_attention`` when the config lists every allowed block.
    """
    check_qkv(q, k, v)
    blocks, fine = selector.route(q, k, v, mask=mask)
    warn_if_dense(selector, q.shape[1], k.shape[1], q.shape[2], mask)
    if fine is not None:
        mask = fine if mask is None else mask & fine
    return block_sparse_attention(q, k, v, blocks, mask=mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                  return_lse=return_lse, implementation=implementation)


# ----------------------------------------------------------------------------- MoBA

@registry.register
@dataclasses.dataclass(frozen=True)
class Moba(BlockSelector):
    """MoBA block selection (Lu et al. 2025) for the block-sparse engine; see the module docstring.

    ``granularity="block"`` (default): each query block keeps ``top_k`` key blocks: its own
    block(s), always, and the best of the others that the mask allows by the pooled gate
    ``q · mean(K_block)``. Dynamic lists with ``K = min(nk, max(top_k, own blocks per query
    block))``; GQA: query head ``h`` gates the mean keys of KV head ``h // G``, lists are per query head.

    ``granularity="token"``: the paper's per-token rule: each query token keeps its own ``top_k``
    key blocks (own block forced in, blocks the mask rules out for that row never). The lists are
    the union over each query tile's tokens (``K = min(nk, block_q · top_k)``) and a ``TokenBlocks``
    fine mask restricts every row to its own blocks, so the engine computes exactly the per-token
    rule. Cost: the gate is ``[B, Hq, T, nk]`` (per token), and the union lists visit more tiles
    than ``top_k`` per query tile when the tokens of a tile disagree. The Pallas path does not
    evaluate the data-dependent fine mask (NotImplementedError; "auto" falls back to xla).

    Attributes:
      block_q, block_kv: tile sizes (``block_kv`` is MoBA's block size; default 64).
      top_k: blocks per query block or per query token, own block included (MoBA's ``moba_topk``).
      query_pool: "mean" or "max" of the per-token gates over a query block (block granularity).
      granularity: "block" or "token".
    """

    name: ClassVar[str] = "moba"
    paper: ClassVar[str] = MOBA_PAPER

    block_q: int = 64
    block_kv: int = 64
    top_k: int = 3
    query_pool: str = "mean"
    granularity: str = "block"

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv, top_k=self.top_k)
        if self.query_pool not in POOLS:
            raise ValueError(f"Moba.query_pool must be one of {POOLS}, got {self.query_pool!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Moba.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        """The block lists (with ``granularity="token"``: the union of each query tile's token choices)."""
        T, S = q.shape[1], k.shape[1]
        if self.granularity == "token":
            return union_lists(self.token_blocks(q, k, mask=mask), T, S, self.block_q)
        gate = block_gate(q, k, self.block_q, self.block_kv, self.query_pool)
        own = own_blocks(T, S, self.block_q, self.block_kv)
        ok = allowed_blocks(mask, T, S, self.block_q, self.block_kv)
        K = self.list_length(T, S)
        return select_topk(jnp.where(own, jnp.inf, gate), K, ok, block_q=self.block_q, block_kv=self.block_kv)

    def token_blocks(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> TokenBlocks:
        """Per-token MoBA: the ``top_k`` key blocks of every query row, ``TokenBlocks`` with ids
        ``[B, Hq, T, min(top_k, nk)]``: the own block, then the highest ``q_t · mean(K_block)`` among
        the blocks ``row_allowed_blocks(mask)`` gives the row."""
        T, S = q.shape[1], k.shape[1]
        K = min(self.top_k, num_tiles(S, self.block_kv))
        ids = top_blocks_per_token(token_gate(q, k, self.block_kv), own_block_per_token(T, S, self.block_kv),
                                   row_allowed_blocks(mask, T, S, self.block_kv), K)
        return TokenBlocks(ids, self.block_kv)

    def route(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None):
        """``(lists, fine mask or None)`` for ``routed_attention``."""
        if self.granularity == "token":
            chosen = self.token_blocks(q, k, mask=mask)
            return union_lists(chosen, q.shape[1], k.shape[1], self.block_q), chosen
        return self.select(q, k, mask=mask), None

    def implementations(self):
        return {name: functools.partial(routed_attention, self, name) for name in PATHS}

    def list_length(self, T: int, S: int) -> int:
        """``K = min(nk, max(top_k, own blocks per query block))``: blocks listed per query block
        (block granularity)."""
        own = own_blocks(T, S, self.block_q, self.block_kv)
        return min(num_tiles(S, self.block_kv), max(self.top_k, int(own.sum(-1).max(initial=0))))

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when no query-block row (query token, with ``granularity="token"``) allows more
        blocks than it keeps: the top-k then takes them all (e.g. ``top_k · block_kv ≥ S``)."""
        if self.granularity == "token":
            return fits_top_k(self.top_k, mask, T, S, 1, self.block_kv)
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
