"""A paged KV cache for ``MultiHeadAttention``: one pool of pages shared by a batch of sequences.

PagedAttention / vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving
with PagedAttention", §4.1-4.3): the keys and values of every sequence live in fixed-size pages of one
pool, a page table (vLLM's block table) lists each sequence's pages in order, and a page is allocated
only when a sequence's last page is full, so a cache wastes less than one page per sequence. A
finished sequence's pages return to a free list and serve new sequences (§4.2-4.3). Attention reads the
pages in place: ``attnjax.softmax.paged_attention``.

Everything is an array (``PagedKVCache``: pages, page table, lengths, active flags and the free list
as a stack), so ``prefill``, ``paged_decode``, ``append`` and ``free`` run under ``jax.jit`` with the
cache as an ordinary pytree. Sizes are fixed at ``init_paged_cache``: ``max_batch`` sequence slots,
``num_pages`` pages of ``page_size`` tokens, at most ``max_pages_per_seq`` pages per sequence.

A request that does not fit (more new pages than the free list holds, or a sequence past
``max_pages_per_seq · page_size`` tokens) raises ``ValueError`` when the values are known (called
outside jit). Under jit it can't raise: the whole request is then dropped (nothing written or
allocated, lengths unchanged) and ``cache.overflow`` becomes True for good; check it between steps.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

from attnjax.checks import check_positive, concrete_values, describe
from attnjax.inference.layer_checks import check_decoding_layer
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.checks import check_input, check_step
from attnjax.softmax.paged import paged_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PagedKVCache:
    """The page pool and its bookkeeping, all arrays (a pytree; no static fields).

    Attributes:
      k_pages: ``[num_pages, page_size, Hk, D]`` keys (RoPE applied), ``v_pages``: ``[num_pages, page_size, Hv, Dv]``
        values; token ``j`` of sequence ``s`` is at slot ``j % page_size`` of page ``page_table[s, j // page_size]``.
      page_table: int32 ``[max_batch, max_pages_per_seq]``, each slot's pages in order; -1 where it has none.
      lengths: int32 ``[max_batch]``, tokens in each slot's sequence.
      active: bool ``[max_batch]``, slots that hold a sequence (set by ``prefill``, cleared by ``free``);
        ``paged_decode`` steps the active slots only.
      free_pages: int32 ``[num_pages]``, a stack: ``free_pages[:num_free]`` are the free pages, the last on top.
      num_free: int32 scalar, pages on the free list.
      overflow: bool scalar, set once a request under jit did not fit and was dropped (module docstring).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    active: jax.Array
    free_pages: jax.Array
    num_free: jax.Array
    overflow: jax.Array

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self.k_pages.shape[1]

    @property
    def num_pages(self) -> int:
        """Pages in the pool."""
        return self.k_pages.shape[0]

    @property
    def max_batch(self) -> int:
        """Sequence slots."""
        return self.page_table.shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        """The most pages one sequence can hold (page-table columns)."""
        return self.page_table.shape[1]


def _dims(layer_or_dims) -> tuple[tuple[int, int, int, int], Optional[Dtype]]:
    if isinstance(layer_or_dims, MultiHeadAttention):
        layer = layer_or_dims
        dtype = layer.param_dtype if layer.dtype is None else layer.dtype
        return (layer.num_kv_heads, layer.head_dim, layer.num_v_heads, layer.v_head_dim), dtype
    dims = tuple(layer_or_dims) if isinstance(layer_or_dims, (tuple, list)) else None
    if dims is None or len(dims) not in (2, 4):
        raise TypeError(f"layer_or_dims must be a MultiHeadAttention or a tuple (Hk, D) or (Hk, D, Hv, Dv), got "
                        f"{describe(layer_or_dims)}")
    dims = dims if len(dims) == 4 else dims * 2
    check_positive(**dict(zip(("Hk", "D", "Hv", "Dv"), dims)))
    return dims, None


def init_paged_cache(layer_or_dims: Union[MultiHeadAttention, Sequence[int]], num_pages: int, page_size: int,
                     max_batch: int, *, max_pages_per_seq: Optional[int] = None,
                     dtype: Optional[Dtype] = None) -> PagedKVCache:
    """An empty paged cache: every page free, every slot inactive and empty.

    Args:
      layer_or_dims: a ``MultiHeadAttention`` (its K/V head counts and dims, and its dtype), or ``(Hk, D)`` /
        ``(Hk, D, Hv, Dv)``.
      num_pages: pages in the pool; page_size: tokens per page; max_batch: sequence slots.
      max_pages_per_seq: page-table columns, the most pages one sequence can hold (default ``num_pages``).
      dtype: of the pages; default the layer's ``dtype``, else its ``param_dtype``, else float32.
    Returns:
      ``PagedKVCache`` with ``k_pages [num_pages, page_size, Hk, D]``, ``v_pages [num_pages, page_size, Hv, Dv]``
      of zeros and ``num_pages · page_size · (Hk·D + Hv·Dv)`` elements.
    """
    (Hk, D, Hv, Dv), layer_dtype = _dims(layer_or_dims)
    max_pages_per_seq = num_pages if max_pages_per_seq is None else max_pages_per_seq
    check_positive(num_pages=num_pages, page_size=page_size, max_batch=max_batch,
                   max_pages_per_seq=max_pages_per_seq)
    dtype = dtype or layer_dtype or jnp.float32
    return PagedKVCache(
        k_pages=jnp.zeros((num_pages, page_size, Hk, D), dtype),
        v_pages=jnp.zeros((num_pages, page_size, Hv, Dv), dtype),
        page_table=jnp.full((max_batch, max_pages_per_seq), -1, jnp.int32),
        lengths=jnp.zeros((max_batch,), jnp.int32), active=jnp.zeros((max_batch,), bool),
        free_pages=jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32),  # page 0 on top
        num_free=jnp.asarray(num_pages, jnp.int32), overflow=jnp.asarray(False))


def _check_cache(cache) -> None:
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache (init_paged_cache), got {type(cache).__name__}")


def _seq_ids(seq_ids, cache: PagedKVCache, name: str = "seq_ids") -> jax.Array:
    """int32 ``[n]`` slot ids; ValueError unless 1-D integers, and (when known) distinct slots in range."""
    ids = jnp.asarray(seq_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be a 1-D integer array of slots, got {describe(seq_ids)}")
    known = concrete_values(ids)
    if known is not None:
        if known.size and (known.min() < 0 or known.max() >= cache.max_batch):
            raise ValueError(f"{name} must be slots in [0, {cache.max_batch}) (max_batch), got {known.tolist()}")
        if len(set(known.tolist())) != known.size:
            raise ValueError(f"{name} must be distinct slots, got {known.tolist()}")
    return ids.astype(jnp.int32)


def append(cache: PagedKVCache, k: jax.Array, v: jax.Array, seq_ids, counts: Optional[jax.Array] = None
           ) -> PagedKVCache:
    """Write new keys and values after the tokens the sequences already hold, allocating pages as they fill.

    Row ``i`` writes its first ``counts[i]`` tokens as tokens ``lengths[s] ..`` of slot ``s = seq_ids[i]``. A
    sequence takes a new page from the top of the free list when its last page is full (PagedAttention, Kwon
    et al. 2023, §4.2-4.3); new pages are handed out in row order. ``active`` is not changed.

    Args:
      cache: the ``PagedKVCache``.
      k: ``[n, T, Hk, D]``; v: ``[n, T, Hv, Dv]`` (cast to the pages' dtype).
      seq_ids: int ``[n]``, distinct slots.
      counts: int ``[n]``, tokens of each row to write (``0 .. T``); default ``T``.
    Returns:
      The cache with the tokens written, pages allocated and lengths advanced; or, if the request does not fit
      (module docstring), unchanged with ``overflow`` set (under jit; eagerly it raises ValueError).
    """
    _check_cache(cache)
    ids = _seq_ids(seq_ids, cache)
    n, (Hk, D), (Hv, Dv) = ids.shape[0], cache.k_pages.shape[2:], cache.v_pages.shape[2:]
    if k.ndim != 4 or v.ndim != 4 or k.shape[0] != n or v.shape[:2] != k.shape[:2] or k.shape[2:] != (Hk, D) \
            or v.shape[2:] != (Hv, Dv):
        raise ValueError(f"k must be [n, T, Hk, D] = [{n}, T, {Hk}, {D}] and v [n, T, Hv, Dv] = [{n}, T, {Hv}, {Dv}] "
                         f"for {n} seq_ids and this cache, got k {list(k.shape)}, v {list(v.shape)}")
    T = k.shape[1]
    P, ps, M = cache.num_pages, cache.page_size, cache.max_pages_per_seq
    counts = jnp.full((n,), T, jnp.int32) if counts is None else jnp.clip(jnp.asarray(counts, jnp.int32), 0, T)
    old = cache.lengths[ids]
    have, total = -(-old // ps), -(-(old + counts) // ps)
    need = total - have
    fits = jnp.all(total <= M) & (jnp.sum(need) <= cache.num_free)
    _raise_if_known_not_fitting(fits, total, need, ids, cache)
    need, counts = jnp.where(fits, need, 0), jnp.where(fits, counts, 0)

    # pop sum(need) pages: row i's j-th new page is the (start_i + j)-th from the top of the stack
    j = jnp.arange(-(-T // ps))[None, :]
    take = j < need[:, None]
    depth = (jnp.cumsum(need) - need)[:, None] + j
    pages = cache.free_pages[jnp.clip(cache.num_free - 1 - depth, 0, P - 1)]
    table = cache.page_table.at[jnp.where(take, ids[:, None], cache.max_batch), have[:, None] + j].set(
        pages, mode="drop")

    position = old[:, None] + jnp.arange(T)[None, :]
    written = jnp.arange(T)[None, :] < counts[:, None]
    page = jnp.where(written, table[ids[:, None], jnp.minimum(position // ps, M - 1)], P)  # P: dropped
    slot = position % ps
    return dataclasses.replace(
        cache, page_table=table, lengths=cache.lengths.at[ids].add(counts),
        k_pages=cache.k_pages.at[page, slot].set(k.astype(cache.k_pages.dtype), mode="drop"),
        v_pages=cache.v_pages.at[page, slot].set(v.astype(cache.v_pages.dtype), mode="drop"),
        num_free=cache.num_free - jnp.sum(need), overflow=cache.overflow | ~fits)


def _raise_if_known_not_fitting(fits, total, need, ids, cache: PagedKVCache) -> None:
    if concrete_values(fits) is None or bool(fits):
        return
    total, need, ids = (np.asarray(x) for x in (total, need, ids))
    over = np.flatnonzero(total > cache.max_pages_per_seq)
    if over.size:
        i = int(over[0])
        raise ValueError(f"sequence {int(ids[i])} would need {int(total[i])} pages, more than max_pages_per_seq = "
                         f"{cache.max_pages_per_seq} ({cache.max_pages_per_seq * cache.page_size} tokens of "
                         f"{cache.page_size} per page)")
    raise ValueError(f"out of pages: the request needs {int(need.sum())} new pages, the pool has "
                     f"{int(cache.num_free)} free of {cache.num_pages}; free finished sequences first")


def free(cache: PagedKVCache, seq_id) -> PagedKVCache:
    """End the sequence in slot ``seq_id``: its pages go back on the free list (top of the stack, so the next
    allocations reuse them), its page-table row becomes -1, its length 0, and the slot inactive.

    ``seq_id``: an int or int32 scalar (may be traced). Freeing an empty slot changes nothing else.
    """
    _check_cache(cache)
    seq_id = _seq_ids(jnp.reshape(jnp.asarray(seq_id), (1,)), cache, "seq_id")[0]
    count = -(-cache.lengths[seq_id] // cache.page_size)
    j = jnp.arange(cache.max_pages_per_seq)
    stack = jnp.where(j < count, cache.num_free + j, cache.num_pages)  # num_pages: dropped
    return dataclasses.replace(
        cache, free_pages=cache.free_pages.at[stack].set(cache.page_table[seq_id], mode="drop"),
        num_free=cache.num_free + count, page_table=cache.page_table.at[seq_id].set(-1),
        lengths=cache.lengths.at[seq_id].set(0), active=cache.active.at[seq_id].set(False))


def _check_layer_cache(layer: MultiHeadAttention, cache: PagedKVCache) -> None:
    expected_k, expected_v = (layer.num_kv_heads, layer.head_dim), (layer.num_v_heads, layer.v_head_dim)
    if cache.k_pages.shape[2:] != expected_k or cache.v_pages.shape[2:] != expected_v:
        raise ValueError(f"the cache holds K heads x dim {cache.k_pages.shape[2:]} and V {cache.v_pages.shape[2:]}, "
                         f"the layer needs K {expected_k} and V {expected_v} (init_paged_cache(layer, ...))")


def _attend(layer: MultiHeadAttention, x: jax.Array, cache: PagedKVCache, ids: jax.Array, counts: jax.Array,
            implementation: str) -> tuple[jax.Array, PagedKVCache]:
    """Project ``x [n, T, d_model]`` (row ``i``'s first ``counts[i]`` tokens are real), write their keys and values
    after each sequence's tokens, and attend from them over each whole sequence; padding rows give 0."""
    n, T = x.shape[:2]
    dtype = cache.k_pages.dtype
    q, k, v = (p(x).astype(dtype) for p in (layer.query, layer.key, layer.value))
    positions = cache.lengths[ids][:, None] + jnp.arange(T)[None, :]
    q, v = layer.scale_qv(q, v, positions)
    if layer.rope is not None:
        q, k = layer.rope(q, positions), layer.rope(k, positions)
    cache = append(cache, k, v, ids, counts)
    # paged_attention puts a row's T queries at the end of its sequence: shift the real ones there
    shift = (T - counts)[:, None]
    t = jnp.arange(T)[None, :]
    q = jnp.take_along_axis(q, ((t - shift) % T)[:, :, None, None], axis=1)
    out = paged_attention(q, cache.k_pages, cache.v_pages, cache.page_table[ids], cache.lengths[ids],
                          implementation=implementation)
    out = jnp.take_along_axis(out, ((t + shift) % T)[:, :, None, None], axis=1)
    y = layer.out(out)
    return jnp.where((t < counts[:, None])[..., None], y, 0), cache


def prefill(layer: MultiHeadAttention, x: jax.Array, cache: PagedKVCache, seq_ids, lengths: Optional[jax.Array] = None,
            *, implementation: str = "auto") -> tuple[jax.Array, PagedKVCache]:
    """Write a ragged batch of prompts into their slots (activating them) and return the layer's outputs.

    Row ``i`` holds ``lengths[i]`` real tokens of slot ``seq_ids[i]`` (right-padded to ``T``). They continue
    whatever the slot holds (an empty slot starts a sequence; a held one gets the next chunk of its prompt),
    at positions ``cache.lengths[s] ..`` for RoPE, and each attends causally over its whole sequence, as
    ``layer(x, mask=masks.Causal())`` does for a fresh sequence (Vaswani et al. 2017; paged as in Kwon et al.
    2023).

    All ``T`` query rows attend in one ``paged_attention`` call (the xla path holds ``[n, T, Hq, block]`` logits
    per step); feed a long prompt in chunks, each call continuing the sequence.

    Args:
      layer: the ``MultiHeadAttention`` (``check_decoding_layer``: softmax, RoPE or no positional scheme).
      x: ``[n, T, d_model]``; cache: the ``PagedKVCache``; seq_ids: int ``[n]``, distinct slots.
      lengths: int ``[n]``, real tokens per row (``0 .. T``), default ``T``.
      implementation: for ``attnjax.softmax.paged_attention``.
    Returns:
      ``(y [n, T, d_model], cache)``; padding positions of ``y`` are 0.
    """
    check_decoding_layer(layer, "prefill")
    _check_cache(cache)
    check_input("x", x, layer.d_model)
    ids = _seq_ids(seq_ids, cache)
    n, T = x.shape[:2]
    if ids.shape[0] != n:
        raise ValueError(f"seq_ids must have one slot per row of x [n, T, d_model] = {list(x.shape)}, got "
                         f"{ids.shape[0]} slots")
    if lengths is None:
        counts = jnp.full((n,), T, jnp.int32)
    else:
        counts = jnp.asarray(lengths)
        if counts.shape != (n,) or not jnp.issubdtype(counts.dtype, jnp.integer):
            raise ValueError(f"lengths must be an integer array [n] = [{n}], got {describe(lengths)}")
        known = concrete_values(counts)
        if known is not None and (known.min() < 0 or known.max() > T):
            raise ValueError(f"lengths must be in [0, T] = [0, {T}] (x {list(x.shape)}), got {known.tolist()}")
        counts = counts.astype(jnp.int32)
    _check_layer_cache(layer, cache)
    cache = dataclasses.replace(cache, active=cache.active.at[ids].set(True))
    return _attend(layer, x, cache, ids, counts, implementation)


def paged_decode(layer: MultiHeadAttention, x_t: jax.Array, cache: PagedKVCache, seq_ids=None, *,
                 implementation: str = "auto") -> tuple[jax.Array, PagedKVCache]:
    """One autoregressive step of every active sequence in ``seq_ids`` (default: all slots).

    Row ``i``'s token sits at position ``cache.lengths[s]`` of slot ``s = seq_ids[i]`` (its RoPE angle and
    cache slot), is written to the pages and attends to itself and every cached token of its sequence:
    for each sequence, the same as ``layer.decode`` with a contiguous ``KVCache``. Inactive slots are
    skipped (nothing written, output 0).

    Args:
      layer: the ``MultiHeadAttention`` (``check_decoding_layer``).
      x_t: ``[n, 1, d_model]``; cache: the ``PagedKVCache``; seq_ids: int ``[n]`` distinct slots, or None
        for all ``max_batch`` slots.
      implementation: for ``attnjax.softmax.paged_attention``.
    Returns:
      ``(y_t [n, 1, d_model], cache)``.
    """
    check_decoding_layer(layer, "paged_decode")
    _check_cache(cache)
    ids = jnp.arange(cache.max_batch, dtype=jnp.int32) if seq_ids is None else _seq_ids(seq_ids, cache)
    check_step("x_t", x_t, layer.d_model, ids.shape[0])
    _check_layer_cache(layer, cache)
    return _attend(layer, x_t, cache, ids, cache.active[ids].astype(jnp.int32), implementation)


__all__ = ["PagedKVCache", "init_paged_cache", "append", "free", "prefill", "paged_decode"]
