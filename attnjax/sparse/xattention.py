"""XAttention: antidiagonal block scoring and cumulative-threshold block selection.

Xu, Guo, Xiao, Han, "XAttention: Block Sparse Attention with Antidiagonal Scoring", 2025
(https://github.com/mit-han-lab/x-attention). A block's importance is estimated from the sums of
QKᵀ along antidiagonals (lower-left to upper-right) taken every ``stride`` positions inside the
block: every row and every column of the block meets one of them, so both vertical and slash
patterns are seen, from a ``[T/s, S/s]`` logit matrix (``1/s²`` of the entries and ``1/s`` of the
multiply-adds of QKᵀ, ``s = stride``).

The strided reshape makes the sampling a plain matmul: group the queries in
runs of ``s`` *reversed* and the keys in runs of ``s``, each run flattened to ``s·D`` features::

    q̃_a = [q_{as+s-1}, …, q_{as}],   k̃_b = [k_{bs}, …, k_{bs+s-1}],
    q̃_a·k̃_b = Σ_j q_{as+s-1-j} · k_{bs+j}       (the antidiagonal of the s×s sub-block (a, b))

The ``[T/s, S/s]`` matrix ``scale·q̃k̃ᵀ/s`` is softmax-normalised along each row (each row is one
run of queries; sub-blocks the mask rules out are dropped), then summed inside each
``block_q × block_kv`` block. Each query block keeps its highest-scoring key blocks, after the
forced ones (the first block and the diagonal one), until their cumulative score reaches
``threshold`` times the row's total (``find_blocks_chunked`` in the authors' code).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.checks import describe
from attnjax.masks import EMPTY, Mask, query_positions
from attnjax.blocked.scores import to_groups
from attnjax.sparse.engine import BlockSelector, covers_allowed, fits_top_k
from attnjax.blocked.lists import BlockSparse, allowed_blocks, from_block_mask
from attnjax.tiling import num_tiles

PAPER = "Xu et al., XAttention: Block Sparse Attention with Antidiagonal Scoring, 2025"


def _stride_runs(x: jax.Array, stride: int, length: int, reverse: bool) -> jax.Array:
    """``[B, L, H, D]`` zero-padded to ``length`` -> ``[B, H, length/stride, stride·D]`` runs."""
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
    B, L, H, D = x.shape
    runs = x.reshape(B, L // stride, stride, H, D)
    if reverse:
        runs = runs[:, :, ::-1]
    return runs.transpose(0, 3, 1, 2, 4).reshape(B, H, L // stride, stride * D)


def _run_mask(mask: Optional[Mask], T: int, S: int, stride: int, rows: int, cols: int) -> jax.Array:
    """Which ``stride × stride`` sub-blocks the mask allows, ``[Bm, Hm, rows, cols]`` (padding False)."""
    if mask is None:
        ok = np.ones((1, 1, num_tiles(T, stride), num_tiles(S, stride)), bool)
    else:
        ok = mask.block_summary(T, S, stride, stride) != EMPTY
    xp = np if isinstance(ok, np.ndarray) else jnp
    widths = ((0, 0), (0, 0), (0, rows - ok.shape[2]), (0, cols - ok.shape[3]))
    return xp.pad(ok, widths, constant_values=False)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "stride", "scale", "query_chunk"))
def antidiagonal_scores(
    q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int, stride: int, mask: Optional[Mask] = None,
    scale: Optional[float] = None, query_chunk: Optional[int] = None,
) -> jax.Array:
    """XAttention's block importance from strided antidiagonal sums (Xu et al., 2025).

    With runs of ``s = stride`` tokens, ``A[a, b] = scale/s · Σ_j q_{as+s-1-j}·k_{bs+j}`` (q and k
    zero-padded to whole blocks), ``P = softmax_b(A[a, :])`` over the sub-blocks that ``mask``
    allows (a row with none is 0; padded rows are 0), and the score of block ``(i, c)`` is the sum
    of ``P`` over the runs inside it. Only ``[T/s, S/s]`` logits are formed, never ``[T, S]``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` with ``Hq % Hkv == 0``.
      block_q, block_kv: block sizes, multiples of ``stride``.
      mask: optional ``attnjax.masks`` value, applied per ``stride × stride`` sub-block.
      scale: logit scale, default ``1/sqrt(D)`` (then divided by ``stride`` as in the paper).
      query_chunk: score this many query blocks at a time (memory ``O(chunk·block_q·S/s²)``);
        default all at once. With a structural mask each chunk also skips the key blocks that the
        mask rules out for all its rows (about half of the work under a causal mask, as in the
        authors' causal kernel).
    Returns:
      float32 ``[B, Hq, nq, nk]``; each query block's row sums to its number of non-empty runs.
    """
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block % stride:
            raise ValueError(f"{name}={block} must be a multiple of stride={stride}")
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    chunk = nq if query_chunk is None else max(1, min(query_chunk, nq))
    rows_per_block, cols_per_block = block_q // stride, block_kv // stride
    rows, cols = nq * rows_per_block, nk * cols_per_block
    scale = (D ** -0.5 if scale is None else scale) / stride

    qr = to_groups(_stride_runs(q, stride, rows * stride, reverse=True), Hkv)  # [B, Hkv, G, rows, sD]
    kr = _stride_runs(k, stride, cols * stride, reverse=False)  # [B, Hkv, cols, sD]
    ok = _run_mask(mask, T, S, stride, rows, cols)  # [Bm, Hm, rows, cols], NumPy when structural
    chunks = []
    for first in range(0, nq, chunk):
        last = min(first + chunk, nq)
        r0, r1 = first * rows_per_block, last * rows_per_block
        ok_chunk = ok[:, :, r0:r1]
        c0, c1 = 0, nk
        if isinstance(ok_chunk, np.ndarray):  # key blocks some row of the chunk may see
            seen = np.flatnonzero(ok_chunk.any(axis=(0, 1, 2)))
            c0, c1 = (seen[0] // cols_per_block, seen[-1] // cols_per_block + 1) if seen.size else (0, 0)
        scores = jnp.zeros((B, Hkv, Hq // Hkv, last - first, nk), jnp.float32)
        if c1 > c0:
            keys = slice(c0 * cols_per_block, c1 * cols_per_block)
            block_scores = _run_softmax_block_sums(qr[..., r0:r1, :], kr[..., keys, :],
                                                   to_groups(jnp.asarray(ok_chunk[..., keys]), Hkv), scale,
                                                   rows_per_block, cols_per_block)
            scores = scores.at[..., c0:c1].set(block_scores)
        chunks.append(scores)
    return jnp.concatenate(chunks, axis=3).reshape(B, Hq, nq, nk)


def _run_softmax_block_sums(qr, kr, ok, scale, rows_per_block, cols_per_block):
    """Row softmax of the run logits ``[B, Hkv, G, r, c]`` over allowed runs, summed per block."""
    logits = jnp.einsum("bhgrd,bhcd->bhgrc", qr, kr, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(ok, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.where(ok, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    p = p.reshape(*p.shape[:3], -1, rows_per_block, p.shape[-1] // cols_per_block, cols_per_block)
    return p.sum(axis=(4, 6))


@functools.partial(jax.jit, static_argnames="max_blocks")
def cumulative_threshold_select(
    scores: jax.Array, threshold: float, *, allowed=None, forced=None, max_blocks: Optional[int] = None,
) -> jax.Array:
    """Per row, the fewest top-scoring blocks whose cumulative score reaches ``threshold·total``.

    Forced blocks come first, then the others in descending score; a block is kept while the
    cumulative score of the blocks before it is below ``threshold`` times the row's total, so the
    block that crosses the threshold is kept (``find_blocks_chunked`` in XAttention's code). At most
    ``max_blocks`` blocks per row, in that order. Sort + cumsum, so it runs under jit with no host
    sync.

    Args:
      scores: ``[..., nq, nk]`` non-negative block scores.
      threshold: ``τ`` in (0, 1]; ``τ = 1`` keeps every allowed block with a positive score.
      allowed: bool broadcastable to ``scores``: blocks that may be kept (default all).
      forced: bool broadcastable to ``scores``: blocks always kept when allowed.
      max_blocks: static cap on kept blocks per row (default ``nk``).
    Returns:
      bool ``[..., nq, nk]``, the kept blocks.
    """
    scores = jnp.asarray(scores, jnp.float32)
    nk = scores.shape[-1]
    allowed = jnp.broadcast_to(True if allowed is None else jnp.asarray(allowed), scores.shape)
    forced = jnp.broadcast_to(False if forced is None else jnp.asarray(forced), scores.shape) & allowed
    values = jnp.where(allowed, scores, 0.0)
    priority = jnp.where(forced, jnp.inf, jnp.where(allowed, values, -1.0))
    order = jnp.argsort(-priority, axis=-1, stable=True)
    sorted_values = jnp.take_along_axis(values, order, axis=-1)
    running = jnp.cumsum(sorted_values, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(running[..., :1]), running[..., :-1]], axis=-1)
    total = running[..., -1:]
    keep = jnp.take_along_axis(forced, order, axis=-1) | (before < threshold * total)
    keep &= jnp.take_along_axis(allowed, order, axis=-1)
    if max_blocks is not None:
        keep &= jnp.arange(nk) < max_blocks
    return jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)


def sink_and_diagonal_blocks(T: int, S: int, block_q: int, block_kv: int, sink: bool, diagonal: bool) -> np.ndarray:
    """Bool ``[nq, nk]``: block 0 and/or, per query block, the key block holding its last position.

    Positions are bottom-right aligned (``attnjax.masks``); the diagonal block is clipped to
    ``[0, nk)``. These are the blocks XAttention always keeps under a causal mask.
    """
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    out = np.zeros((nq, nk), bool)
    if sink:
        out[:, 0] = True
    if diagonal:
        last = np.asarray(query_positions(np.minimum(np.arange(1, nq + 1) * block_q, T) - 1, T, S))
        out[np.arange(nq), np.clip(last // block_kv, 0, nk - 1)] = True
    return out


@registry.register
@dataclasses.dataclass(frozen=True)
class XAttention(BlockSelector):
    """XAttention block selection (Xu et al., 2025): antidiagonal scores, cumulative threshold.

    Args:
      block_q, block_kv: block sizes (multiples of ``stride``).
      threshold: ``τ`` in (0, 1]: each query block keeps blocks until their share of its total
        antidiagonal score reaches ``τ`` (the paper uses 0.9 to 0.95).
      stride: antidiagonal stride ``S`` (the paper uses 8 or 16).
      max_blocks: static upper bound on blocks per query block (default all ``nk``).
      keep_sink, keep_diagonal: always keep the first block and the query block's own (diagonal)
        block, as the authors' code does under a causal mask.
      query_chunk: score this many query blocks at a time: bounds the scoring memory and, under a
        causal mask, skips the future keys of each chunk.
    The lists are dynamic (computed from q and k inside jit), per batch and query head.
    """

    block_q: int = 64
    block_kv: int = 64
    threshold: float = 0.9
    stride: int = 8
    max_blocks: Optional[int] = None
    keep_sink: bool = True
    keep_diagonal: bool = True
    query_chunk: Optional[int] = 16

    name: ClassVar[str] = "xattention"
    paper: ClassVar[str] = PAPER

    def __post_init__(self):
        for field in ("block_q", "block_kv", "stride"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"XAttention.{field} must be a positive int, got {describe(value)}")
        if self.block_q % self.stride or self.block_kv % self.stride:
            raise ValueError(f"XAttention block sizes ({self.block_q}, {self.block_kv}) must be multiples "
                             f"of stride={self.stride}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"XAttention.threshold must be in (0, 1], got {self.threshold!r}")
        if self.max_blocks is not None and self.max_blocks <= 0:
            raise ValueError(f"XAttention.max_blocks must be positive or None, got {self.max_blocks!r}")

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        """Dynamic lists ``[B, Hq, nq, K]`` with ``K = min(max_blocks, nk)``."""
        indices, counts = _xattention_lists(q, k, mask, self)
        return BlockSparse(indices, counts, self.block_q, self.block_kv, num_tiles(k.shape[1], self.block_kv))

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when the forced blocks (sink, diagonal) are every block the mask allows and no row
        allows more than ``max_blocks``; otherwise the threshold decides from the scores (data)."""
        forced = sink_and_diagonal_blocks(T, S, self.block_q, self.block_kv, self.keep_sink, self.keep_diagonal)
        cap = num_tiles(S, self.block_kv) if self.max_blocks is None else self.max_blocks
        return (covers_allowed(forced, mask, T, S, self.block_q, self.block_kv)
                and fits_top_k(cap, mask, T, S, self.block_q, self.block_kv))


@functools.partial(jax.jit, static_argnums=3)
def _xattention_lists(q: jax.Array, k: jax.Array, mask: Optional[Mask], config: XAttention):
    """``XAttention.select`` as one compiled function: ``(indices, counts)``."""
    T, S = q.shape[1], k.shape[1]
    bq, bk = config.block_q, config.block_kv
    nk = num_tiles(S, bk)
    scores = antidiagonal_scores(q, k, block_q=bq, block_kv=bk, stride=config.stride, mask=mask,
                                 query_chunk=config.query_chunk)
    forced = sink_and_diagonal_blocks(T, S, bq, bk, config.keep_sink, config.keep_diagonal)
    max_blocks = nk if config.max_blocks is None else min(config.max_blocks, nk)
    keep = cumulative_threshold_select(scores, config.threshold, allowed=allowed_blocks(mask, T, S, bq, bk),
                                       forced=forced, max_blocks=max_blocks)
    blocks = from_block_mask(keep, bq, bk, max_blocks=max_blocks)
    return blocks.indices, blocks.counts


__all__ = ["XAttention", "antidiagonal_scores", "cumulative_threshold_select", "sink_and_diagonal_blocks"]
