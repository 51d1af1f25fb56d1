"""Learned relative position embeddings read by the queries: Shaw et al.'s logits, Music Transformer's skewing.

Shaw et al., "Self-Attention with Relative Position Representations" (NAACL 2018), eq. 5 and §3.2: the
logit of query ``i`` and key ``j`` gains ``q_i·a_ij`` with ``a_ij = w_clip(j − i, k)``, ``clip(x, k) =
max(−k, min(k, x))``: ``2k + 1`` learned embeddings. Huang et al., "Music Transformer" (ICLR 2019), §3.2
(eq. 3): ``RelativeAttention = softmax((QKᵀ + S_rel)/√D_h)·V`` with ``S_rel[i, j] = q_i·E_r[j − i]``, causal
(offsets ``−L+1 … 0``), one table per head; §3.4: ``S_rel = Skew(Q·E_rᵀ)`` ("pad a dummy column, reshape,
slice"), O(L·D) extra memory instead of gathering ``[L, L, D]``.

Embeddings ``E`` are ``[R, D]`` (shared by the heads, as Shaw et al. §3.3) or ``[R, H, D]`` (one table per
query head, as Music Transformer). Row ``r`` holds offset ``r − k``, offsets clipped to ``[−k, k]``
(bidirectional, ``R = 2k + 1``) or ``[−k, 0]`` (causal, ``R = k + 1``), so ``k`` (the maximum distance) is
read off the table's shape. In the causal form a key after its query (offset > 0) gets 0: the causal mask
removes it anyway, and so the skewing trick's wrapped entries never matter. Query positions follow
``attnjax.masks``' bottom-right alignment (``i + S − T``), or ``query_offset + i`` when given.

The functions here return the raw ``q·E`` term; ``RelativeEmbeddingBias`` scales it like the logits.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.bias import Bias
from attnjax.masks import query_positions


def relative_max_distance(num_rows: int, *, causal: bool) -> int:
    """The clipping distance ``k`` of a table with ``num_rows`` rows: ``R − 1`` (causal) or ``(R − 1)/2``
    (bidirectional, ``R`` odd). ``ValueError`` naming ``embeddings`` when ``R`` doesn't fit the form."""
    if num_rows < 1 or (not causal and num_rows % 2 == 0):
        expected = "k + 1 >= 1 (causal)" if causal else "2k + 1, odd (bidirectional)"
        raise ValueError(f"embeddings have {num_rows} rows, expected {expected}")
    return num_rows - 1 if causal else (num_rows - 1) // 2


def relative_embedding_index(offset: jax.Array, *, causal: bool, max_distance: int) -> jax.Array:
    """The embedding row of each ``offset = key_position − query_position`` (int32, same shape).

    Shaw et al. §3.2's clipping: row ``clip(offset, −k, k) + k`` (bidirectional), or
    ``clip(offset, −k, 0) + k`` (causal: rows for offsets ``−k … 0``, Music Transformer's order).
    """
    offset = jnp.asarray(offset, jnp.int32)
    return jnp.clip(offset, -max_distance, 0 if causal else max_distance) + max_distance


def check_relative_inputs(q: jax.Array, embeddings: jax.Array, *, causal: bool, heads_axis: int = 2) -> int:
    """Check ``q`` (rank 4, heads on ``heads_axis``, head dim last) against ``embeddings`` ``[R, D]`` or
    ``[R, H, D]``; return the maximum distance. ``ValueError``/``TypeError`` naming the argument."""
    if jnp.ndim(q) != 4:
        raise ValueError(f"q must be rank 4 with heads on axis {heads_axis}, got shape {tuple(jnp.shape(q))}")
    shape = tuple(jnp.shape(embeddings))
    heads, dim = q.shape[heads_axis], q.shape[-1]
    if len(shape) not in (2, 3) or shape[-1] != dim or (len(shape) == 3 and shape[1] not in (1, heads)):
        raise ValueError(f"embeddings have shape {shape}, expected [R, D] = [R, {dim}] (shared by the heads) or "
                         f"[R, H, D] = [R, {heads}, {dim}] (one table per query head)")
    if not jnp.issubdtype(jnp.result_type(embeddings), jnp.floating):
        raise TypeError(f"embeddings must be a float array, got {jnp.result_type(embeddings)}")
    return relative_max_distance(shape[0], causal=causal)


def _positions(T: int, S: int, query_offset: Optional[jax.Array]) -> jax.Array:
    q_idx = jnp.arange(T)
    return query_positions(q_idx, T, S) if query_offset is None else q_idx + query_offset


def _per_head(embeddings: jax.Array) -> jax.Array:
    """``[R, D]`` or ``[R, H, D]`` -> ``[R, H or 1, D]``."""
    return embeddings[:, None] if embeddings.ndim == 2 else embeddings


def _check_num_keys(num_keys: int) -> None:
    if not isinstance(num_keys, int) or isinstance(num_keys, bool) or num_keys < 1:
        raise ValueError(f"num_keys must be a positive int, got {num_keys!r}")


def relative_logits_reference(q: jax.Array, embeddings: jax.Array, *, causal: bool, num_keys: Optional[int] = None,
                              query_offset: Optional[jax.Array] = None) -> jax.Array:
    """Explicit relative logits ``S_rel[b, h, i, j] = q[b, i, h]·E[r(j − p_i)]`` for every ``(i, j)``.

    Shaw et al. 2018, eq. 5 (the ``x_i W^Q a_ij^Kᵀ`` term, ``a_ij^K = w^K_clip(j − i, k)``): the
    embedding of every pair is gathered, ``[T, S, H, D]`` memory. ``p_i = i + S − T`` (bottom-right) or
    ``query_offset + i``; ``r`` is ``relative_embedding_index``; causal: 0 where ``j > p_i``.

    Args:
      q: ``[B, T, H, D]`` queries (the library's layout), unscaled.
      embeddings: ``[R, D]`` or ``[R, H, D]`` float.
      causal: offsets ``−k … 0`` (``R = k + 1``) or ``−k … k`` (``R = 2k + 1``).
      num_keys: ``S`` (default ``T``).
      query_offset: ``None`` or an int scalar, the position of query row 0.
    Returns:
      ``[B, H, T, S]`` float32.
    """
    num_keys = q.shape[1] if num_keys is None else num_keys
    _check_num_keys(num_keys)
    k = check_relative_inputs(q, embeddings, causal=causal)
    T, S = q.shape[1], num_keys
    offsets = jnp.arange(S)[None, :] - _positions(T, S, query_offset)[:, None]  # [T, S]
    table = jnp.take(_per_head(jnp.asarray(embeddings)), relative_embedding_index(offsets, causal=causal,
                                                                                   max_distance=k), axis=0)
    logits = jnp.einsum("bihd,ijhd->bhij", q, table, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    return jnp.where(offsets > 0, 0.0, logits) if causal else logits


def skew(x: jax.Array, num_keys: int) -> jax.Array:
    """Music Transformer's skewing (Huang et al. 2018, §3.4): ``x [..., T, M]`` -> ``y [..., T, num_keys]``
    with ``y[..., i, j] = x[..., i, j − i + T − 1]`` where ``0 <= j − i + T − 1 < M`` (elsewhere ``y`` holds
    another row's values). With column ``m`` of ``x = Q·Eᵀ`` for offset ``o_0 + m`` (``o_0``: key 0 seen from
    the last query), ``y[i, j]`` is the logit of offset ``o_0 + j + T − 1 − i``, key ``j`` seen from query
    ``i``. Pad a zero column on the left, flatten the last two axes, drop the first ``T`` entries, reshape
    to ``[T, M]``, keep the first ``num_keys`` columns. With ``T = M = num_keys`` this is the paper's
    pad–reshape–drop-the-first-row. No gather; needs ``num_keys <= M``.
    """
    T, M = x.shape[-2:]
    if num_keys > M:
        raise ValueError(f"skew needs num_keys <= M, got num_keys {num_keys} and x of shape {tuple(x.shape)}")
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)])
    flat = padded.reshape(*x.shape[:-2], T * (M + 1))[..., T:]
    return flat.reshape(*x.shape[:-2], T, M)[..., :num_keys]


def _skewed(q: jax.Array, embeddings: jax.Array, first_offset: jax.Array, num_columns: int, num_keys: int,
            causal: bool, max_distance: int) -> jax.Array:
    """``q [B, H, T, D]`` -> ``[B, H, T, num_keys]``: column ``m`` of ``Q·Eᵀ`` holds offset
    ``first_offset + m`` of row ``T − 1`` (the last query), then ``skew``."""
    rows = relative_embedding_index(first_offset + jnp.arange(num_columns), causal=causal, max_distance=max_distance)
    return skew(_relative_scores(q, embeddings, rows), num_keys)


def _relative_scores(q: jax.Array, embeddings: jax.Array, rows: jax.Array) -> jax.Array:
    """``q [B, H, T, D]`` against the embedding ``rows [M]`` -> ``[B, H, T, M]`` float32."""
    table = jnp.take(_per_head(jnp.asarray(embeddings)), rows, axis=0)  # [M, H or 1, D]
    return jnp.einsum("bhid,mhd->bhim", q, table, preferred_element_type=jnp.float32)


ROW_CHUNK = 128
"""Query rows per skewed product in a tile: ``c`` rows need ``c + tk − 1`` offsets, so the tile's
``q·Eᵀ`` costs ``tq·(c + tk − 1)·D``, ``(c + tk − 1)/tk`` times one ``q·kᵀ`` (1.25 for 512-wide tiles;
instead of two for ``c = tq``). 128, not fewer: on CPU a product of 64 rows runs at about 60% of the
speed of 128 or more (XLA's dot, one interleaved microbenchmark on 2 cores), more than the flops it saves."""


def _row_chunk(tq: int) -> int:
    """The largest divisor of ``tq`` up to ``ROW_CHUNK``, or ``tq`` itself when that divisor is below
    ``ROW_CHUNK // 8`` (few-row chunks would gather ``~[tq, tk, D]`` embedding rows)."""
    c = max(d for d in range(1, min(tq, ROW_CHUNK) + 1) if tq % d == 0)
    return c if c >= min(tq, ROW_CHUNK // 8) else tq


def chunked_relative_logits(q: jax.Array, columns: jax.Array, num_keys: int) -> jax.Array:
    """``q_i·columns[:, j + tq − 1 − i]`` for every query row ``i`` and key ``j`` of a tile, by row chunks and skewing.

    ``q [B, H, tq, D]`` and ``columns [H or 1, tq + num_keys − 1, D]`` (heads first; column ``m``: the embedding of the
    ``m``-th smallest key-minus-query offset of the tile, consecutive rows and keys) -> ``[B, H, tq, num_keys]``
    float32. The rows are cut into chunks of ``c`` (``_row_chunk``); chunk ``n`` multiplies the ``c + num_keys − 1``
    columns its offsets need (a static slice, no copy of the windows) and is skewed on its own (Huang et al. 2018,
    §3.4; every pair of the chunk is inside its window, so nothing wraps): ``tq·(c + num_keys − 1)·D``
    multiply-adds, ``(c + num_keys − 1)/num_keys`` times one ``q·kᵀ`` instead of two for one skew of the whole tile.
    """
    tq = q.shape[2]
    c = _row_chunk(tq)
    width = c + num_keys - 1
    chunks = []
    for n in range(tq // c):  # chunk n's last row sees key 0 at column tq − c − n·c
        window = columns[:, tq - c - n * c: tq - c - n * c + width]
        rows = q[:, :, n * c:(n + 1) * c]
        if columns.shape[0] == 1:
            x = jnp.einsum("bhcd,md->bhcm", rows, window[0], preferred_element_type=jnp.float32)
        else:
            x = jnp.einsum("bhcd,hmd->bhcm", rows, window, preferred_element_type=jnp.float32)
        chunks.append(skew(x, num_keys))
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=2)


def _tile_logits(q: jax.Array, embeddings: jax.Array, first_offset: jax.Array, num_keys: int, causal: bool,
                 max_distance: int, scale: float) -> jax.Array:
    """``scale ×`` the relative logits of one tile, ``q [B, H, tq, D]`` -> ``[B, H, tq, num_keys]``; query row
    ``i`` sees key column ``j`` at offset ``first_offset + j + tq − 1 − i`` (consecutive rows and columns).

    The ``tq + tk − 1`` embedding rows of the tile's offsets are gathered once and multiplied by chunks of rows
    (``chunked_relative_logits``). A table with fewer rows than a chunk's window (clipping, ``R`` small) is
    multiplied whole, ``q·Eᵀ [tq, R]``, and its columns gathered per chunk instead. Causal: an offset > 0 reads
    an out-of-range row, filled with 0, so the tile needs no extra select. The scale multiplies the embedding
    rows (or ``q·Eᵀ``), not the tile.
    """
    B, H, tq, D = q.shape
    c = _row_chunk(tq)
    n, width = tq // c, c + num_keys - 1
    table = _per_head(jnp.asarray(embeddings))

    def rows_of(offsets):
        rows = relative_embedding_index(offsets, causal=causal, max_distance=max_distance)
        return jnp.where(offsets > 0, table.shape[0], rows) if causal else rows  # past the end: filled with 0

    if table.shape[0] >= width:
        columns = jnp.take(jnp.moveaxis(table, 1, 0), rows_of(first_offset + jnp.arange(tq + num_keys - 1)), axis=1,
                           mode="fill", fill_value=0) * scale
        return chunked_relative_logits(q, columns, num_keys)
    # offsets of chunk n's skewed columns: its last row sees key 0 at first_offset + (tq − 1 − (n·c + c − 1))
    rows = rows_of(first_offset + (tq - c) - c * jnp.arange(n)[:, None] + jnp.arange(width))
    scores = _relative_scores(q, embeddings, jnp.arange(table.shape[0])) * scale
    x = jnp.take_along_axis(scores.reshape(B, H, n, c, -1), rows[None, None, :, None, :], axis=-1,
                            mode="fill", fill_value=0.0)
    return skew(x, num_keys).reshape(B, H, tq, num_keys)


def _edge_logits(q: jax.Array, embeddings: jax.Array, row: int, num_keys: int, scale: float) -> jax.Array:
    """A tile whose every offset clips to embedding ``row``: ``scale·q_i·E[row]`` for every key, O(tq·D)."""
    s = _relative_scores(q, embeddings, jnp.full((1,), row)) * scale
    return jnp.broadcast_to(s, s.shape[:-1] + (num_keys,))


def relative_logits_skewed(q: jax.Array, embeddings: jax.Array, *, causal: bool, num_keys: Optional[int] = None,
                           query_offset: Optional[jax.Array] = None) -> jax.Array:
    """``relative_logits_reference`` by the skewing trick (Huang et al. 2018, §3.4).

    ``X = Q·Eᵀ`` over the distinct offsets of the call (``Q·E_rᵀ [T, R]``, its columns gathered with
    Shaw's clipping into the ``M`` offsets ``j − p_i`` can take), then ``skew``: ``S_rel[i, j] =
    X[i, j − i + T − 1]``. ``M = S`` in the causal bottom-right case (offsets ``−(S−1) … 0``, the paper's
    ``[L, L]`` when ``T = S = L``), else ``M = T + S − 1``. Memory ``O(T·(R + M))`` besides the output,
    never ``[T, S, D]``; compute ``O(T·R·D)``.

    Args and returns as ``relative_logits_reference``.
    """
    num_keys = q.shape[1] if num_keys is None else num_keys
    _check_num_keys(num_keys)
    k = check_relative_inputs(q, embeddings, causal=causal)
    T, S = q.shape[1], num_keys
    positions = _positions(T, S, query_offset)
    columns = S if causal and query_offset is None else T + S - 1
    logits = _skewed(q.transpose(0, 2, 1, 3), embeddings, -positions[-1], columns, S, causal, k)
    if causal:
        logits = jnp.where(jnp.arange(S)[None, :] > positions[:, None], 0.0, logits)
    return logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RelativeEmbeddingBias(Bias):
    """Learned relative embeddings as a logit term reading the queries: ``b[b, h, i, j] = scale·q_i·E[r(j − p_i)]``.

    Music Transformer's ``(QKᵀ + S_rel)/√D_h`` (Huang et al. 2018, §3.2, eq. 3) is ``scale·q·kᵀ + b``
    with ``scale = 1/√D_h``: the engine adds the bias to the already scaled ``q·kᵀ``, so the rule scales
    its own term. ``scale=None`` uses ``1/√D`` (D from the queries), the default logit scale of
    ``attnjax.attention``; pass the same ``scale`` as the attention call otherwise.

    Pass as ``attention(q, k, v, bias=RelativeEmbeddingBias(E, causal=True), mask=masks.Causal())``.
    ``query_tile`` computes a tile's ``[tq, tk]`` logits from the tile's queries and only the rows of ``E``
    its offsets need, never ``[T, S, D]`` (nor ``[T, S]`` beyond its tiles):

    - a tile whose offsets all clip to one row (every key farther than ``k``): ``q_i·E[±k]`` broadcast over
      the keys, ``O(tq·D)``;
    - else, per chunk of ``c`` query rows (``ROW_CHUNK``), ``X = q·E_windowᵀ`` over the ``c + tk − 1``
      offsets the chunk sees, then ``skew`` (§3.4): ``O(tq·(c + tk)·D)``, 1.25 ``q·kᵀ`` tiles at c = 128, tk = 512; a
      table with fewer rows than the window is multiplied whole (``q·Eᵀ [tq, R]``) and gathered.

    The blocked ``xla`` paths pull gradients back to ``q`` and ``E`` through it. It assumes what every
    blocked path passes: ``q_idx`` and ``kv_idx`` are runs of consecutive indices.

    Args:
      embeddings: ``[R, D]`` (shared by the heads) or ``[R, H, D]`` (one table per query head), float.
      causal: rows for offsets ``−k … 0`` (``R = k + 1``; keys after the query get 0) or ``−k … k``
        (``R = 2k + 1``); offsets beyond ``k`` are clipped (Shaw et al. §3.2).
      scale: multiplier of ``q·E`` (``None``: ``1/√D``).
      query_offset: ``None`` (bottom-right alignment) or an int scalar: query row ``i`` sits at
        position ``query_offset + i`` (a decode step against a cache whose first ``length`` slots are
        filled passes ``query_offset=length``).
    """

    embeddings: jax.Array
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    scale: Optional[float] = dataclasses.field(default=None, metadata=dict(static=True))
    query_offset: Optional[jax.Array] = None
    differentiable = True
    reads_queries = True

    @property
    def max_distance(self) -> int:
        """The clipping distance ``k``, read off the table's rows."""
        return relative_max_distance(jnp.shape(self.embeddings)[0], causal=self.causal)

    def check(self, batch, num_heads, T, S):
        shape = tuple(jnp.shape(self.embeddings))
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[1] not in (1, num_heads)):
            raise ValueError(f"RelativeEmbeddingBias embeddings have shape {shape}, expected [R, D] or "
                             f"[R, {num_heads}, D] (one table per query head)")
        if not jnp.issubdtype(jnp.result_type(self.embeddings), jnp.floating):
            raise TypeError(f"RelativeEmbeddingBias embeddings must be a float array, got "
                            f"{jnp.result_type(self.embeddings)}")
        relative_max_distance(shape[0], causal=self.causal)

    def query_tile(self, q, q_idx, kv_idx, T, S):
        k = check_relative_inputs(q, self.embeddings, causal=self.causal, heads_axis=1)
        tk = kv_idx.shape[0]
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        rows = query_positions(q_idx, T, S) if self.query_offset is None else q_idx + self.query_offset
        first, last = kv_idx[0] - rows[-1], kv_idx[-1] - rows[0]  # the tile's smallest and largest offsets
        branches = [lambda q: _edge_logits(q, self.embeddings, 0, tk, scale),
                    lambda q: _tile_logits(q, self.embeddings, first, tk, self.causal, k, scale)]
        branch = jnp.where(last <= -k, 0, 1)
        if not self.causal:
            branches.append(lambda q: _edge_logits(q, self.embeddings, 2 * k, tk, scale))
            branch = jnp.where(first >= k, 2, branch)
        return jax.lax.switch(branch, branches, q)


__all__ = ["relative_max_distance", "relative_embedding_index", "check_relative_inputs", "relative_logits_reference",
           "skew", "relative_logits_skewed", "ROW_CHUNK", "chunked_relative_logits", "RelativeEmbeddingBias"]
