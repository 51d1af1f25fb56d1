"""The paged layout contract and the block math shared by the paged decode kernels and the XLA path.

Layout (vLLM's PagedAttention, Kwon et al. 2023, "Efficient Memory Management for Large Language
Model Serving with PagedAttention", §4.1-4.2, in attnjax's ``[..., heads, head_dim]`` order):

- ``q``: ``[B, Hq, D]`` (one decode token per sequence) or ``[B, Tq, Hq, D]`` (the last ``Tq``
  tokens of each sequence: a few speculative tokens, or a prompt chunk).
- ``k_pages``: ``[P, page_size, Hk, D]`` and ``v_pages``: ``[P, page_size, Hv, Dv]``, a pool of
  ``P`` pages of ``page_size`` tokens shared by every sequence.
- ``page_table``: int ``[B, M]``; token ``j`` of sequence ``b`` sits at slot ``j % page_size`` of
  page ``page_table[b, j // page_size]``. Columns past a sequence's last page are ignored (any
  value, e.g. -1 for "no page"; they are clipped into ``[0, P)`` before any read).
- ``lengths``: int ``[B]``, tokens in each sequence (ragged), queries included.

Query ``t`` of ``Tq`` sits at position ``lengths[b] − Tq + t`` and sees keys ``j`` with
``j < lengths[b] − Tq + 1 + t`` (bottom-right causal alignment, as ``attnjax.masks.Causal`` for
``T != S``); a row that sees no key gives 0. GQA: query head ``h`` reads K head ``h // (Hq/Hk)``
and V head ``h // (Hq/Hv)``.

Block math (FlashAttention-2's online softmax, Dao 2023, Alg. 1): ``softmax_update`` folds one
block of logits into the running max ``m``, normalizer ``l`` and float32 accumulator, and
``merge_partials`` combines split-K partial results; both run in XLA, Triton and Mosaic.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.checks import concrete_values


class PagedDims(NamedTuple):
    """Sizes of one paged attention call: batch ``B``, query tokens ``Tq``, query heads ``Hq``, key
    dim ``D``, pool pages ``P``, ``page_size``, K heads ``Hk``, V heads ``Hv``, value dim ``Dv``, and
    page-table columns ``M`` (the most pages a sequence can hold)."""

    B: int
    Tq: int
    Hq: int
    D: int
    P: int
    page_size: int
    Hk: int
    Hv: int
    Dv: int
    M: int

    @property
    def capacity(self) -> int:
        """The most tokens a sequence can hold: ``M · page_size``."""
        return self.M * self.page_size


def check_paged(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                lengths: jax.Array) -> PagedDims:
    """Check the paged layout (module docstring) and return its sizes.

    Shapes and dtypes are always checked. Values are checked when they are known at trace time
    (not under jit): ``0 <= lengths <= M·page_size``, and every page-table entry that holds one of
    a sequence's tokens is a page index in ``[0, P)``.

    Raises:
      ValueError naming the argument, the shape seen and the shape expected; TypeError for dtypes.
    """
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages), ("page_table", page_table),
                    ("lengths", lengths)):
        if not hasattr(x, "ndim"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if q.ndim not in (3, 4):
        raise ValueError(f"q must be [B, Hq, D] (one decode token) or [B, Tq, Hq, D], got shape {q.shape}")
    for name, x, what in (("k_pages", k_pages, "[num_pages, page_size, Hk, D]"),
                          ("v_pages", v_pages, "[num_pages, page_size, Hv, Dv]")):
        if x.ndim != 4:
            raise ValueError(f"{name} must be {what}, got shape {x.shape}")
    for name, x in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if not q.dtype == k_pages.dtype == v_pages.dtype:
        raise TypeError(f"q, k_pages, v_pages must share one dtype, got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
    B, Hq, D = q.shape[0], q.shape[-2], q.shape[-1]
    Tq = 1 if q.ndim == 3 else q.shape[1]
    P, page_size, Hk, Dk = k_pages.shape
    if v_pages.shape[:2] != (P, page_size):
        raise ValueError(f"k_pages and v_pages must agree on [num_pages, page_size]: k_pages {k_pages.shape}, "
                         f"v_pages {v_pages.shape}")
    Hv, Dv = v_pages.shape[2:]
    if Dk != D:
        raise ValueError(f"k_pages head_dim {Dk} != q head_dim {D}: q {q.shape}, k_pages {k_pages.shape}")
    for name, heads in (("k_pages", Hk), ("v_pages", Hv)):
        if heads == 0 or Hq % heads:
            raise ValueError(f"q heads ({Hq}) must be a multiple of {name} heads ({heads}): q {q.shape}, "
                             f"k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    for name, x, shape in (("page_table", page_table, "[B, max_pages_per_seq]"), ("lengths", lengths, "[B]")):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
        ndim = 2 if name == "page_table" else 1
        if x.ndim != ndim or x.shape[0] != B:
            raise ValueError(f"{name} must be {shape} with B={B} (q {q.shape}), got shape {x.shape}")
    dims = PagedDims(B, Tq, Hq, D, P, page_size, Hk, Hv, Dv, page_table.shape[1])
    _check_values(page_table, lengths, dims)
    return dims


def _check_values(page_table, lengths, dims: PagedDims) -> None:
    lens, table = concrete_values(lengths), concrete_values(page_table)
    if lens is None:
        return
    bad = np.flatnonzero((lens < 0) | (lens > dims.capacity))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"lengths[{b}] = {int(lens[b])} does not fit the page table: page_table "
                         f"{list(page_table.shape)} holds at most {dims.M} pages of {dims.page_size} tokens = "
                         f"{dims.capacity} tokens per sequence (page table too short, or a negative length)")
    if table is None:
        return
    used = np.arange(dims.M)[None, :] < -(-lens[:, None] // dims.page_size)
    bad = np.argwhere(used & ((table < 0) | (table >= dims.P)))
    if bad.size:
        b, c = (int(i) for i in bad[0])
        raise ValueError(f"page_table[{b}, {c}] = {int(table[b, c])} is not a page of the pool (k_pages has "
                         f"{dims.P} pages), but sequence {b} of length {int(lens[b])} stores tokens there")


def as_tokens(q: jax.Array) -> jax.Array:
    """``[B, Hq, D]`` -> ``[B, 1, Hq, D]``; a ``[B, Tq, Hq, D]`` query is returned as is."""
    return q[:, None] if q.ndim == 3 else q


def padded_page_table(page_table: jax.Array, num_pages: int, columns: int) -> jax.Array:
    """int32 ``[B, columns]``: the table clipped into ``[0, num_pages)`` (so that columns past a
    sequence's last page read a real page, whose tokens the length mask removes) and padded with
    page 0 up to ``columns``."""
    table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
    return jnp.pad(table, ((0, 0), (0, columns - table.shape[1])))


def key_limit(length, token, tq: int):
    """Exclusive bound on the keys query ``token`` (of ``tq`` trailing queries) sees:
    ``length − tq + 1 + token``."""
    return length - tq + 1 + token


def row_token(row, tq: int, group: int):
    """Query token of row ``r = t·group + g`` in the kernels' row layout (a query head group of one
    KV head, token-major), by comparisons only (no vector integer division in the kernels):
    ``t = Σ_{u=1}^{tq−1} [r ≥ u·group]``."""
    token = jnp.zeros_like(row)
    for u in range(1, tq):
        token = token + (row >= u * group).astype(row.dtype)
    return token


def row_limits(length, row, tq: int, group: int):
    """Exclusive key bound of each kernel row (``row_token``); 0 (no key) for padding rows ``r ≥ tq·group``."""
    return jnp.where(row < tq * group, key_limit(length, row_token(row, tq, group), tq), 0)


def softmax_update(m: jax.Array, l: jax.Array, acc: jax.Array, s: jax.Array,
                   weighted_values: Callable[[jax.Array], jax.Array]):
    """One online-softmax step over a block of logits (FlashAttention-2, Dao 2023, Alg. 1, the inner loop's update).

    Args:
      m, l: ``[..., R, 1]`` float32 running max and normalizer (``m = -inf``, ``l = 0`` before any key).
      acc: ``[..., R, Dv]`` float32 unnormalized output.
      s: ``[..., R, bk]`` float32 logits, ``-inf`` where masked.
      weighted_values: ``p [..., R, bk] (float32) -> p·V [..., R, Dv]`` float32.
    Returns:
      ``(m, l, acc)`` after the block; rows that have seen no key keep ``m = -inf``, ``l = 0``, ``acc = 0``.
    """
    m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_use)
    p = jnp.exp(s - m_use)
    return m_new, alpha * l + p.sum(axis=-1, keepdims=True), alpha * acc + weighted_values(p)


def normalize(acc: jax.Array, l: jax.Array) -> jax.Array:
    """``acc / l``, and 0 on rows with ``l = 0`` (no key seen)."""
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def merge_partials(acc: jax.Array, m: jax.Array, l: jax.Array, axis: int) -> jax.Array:
    """Normalized output from split-K partials along ``axis`` (Flash-Decoding's reduction; Dao, Haziza,
    Massa, Sizov 2023, "Flash-Decoding for long-context inference"):
    ``Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} l_s`` with ``M = max_s m_s``.

    ``acc [..., S, ..., R, Dv]``, ``m`` and ``l`` ``[..., S, ..., R, 1]`` float32 (``S`` at ``axis``).
    """
    m_max = m.max(axis=axis, keepdims=True)
    w = jnp.exp(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))
    return normalize((w * acc).sum(axis=axis), (w * l).sum(axis=axis))


__all__ = ["PagedDims", "check_paged", "as_tokens", "padded_page_table", "key_limit", "row_token", "row_limits",
           "softmax_update", "normalize", "merge_partials"]
