"""Thought anchors: sentence-level attention, blockwise, its vertical scores and receiver heads.

Bogdan, Macar, Nanda & Conmy, "Thought Anchors: Which LLM Reasoning Steps Matter?", arXiv:2506.19143,
2025, sec. 4 (attention aggregation), with the defaults of the authors' code
(``whitebox-analyses/attention_analysis/{attn_funcs,receiver_head_funcs}.py``):

- sentence map: ``M_ij = (1/(|S_i|·|S_j|)) Σ_{t∈S_i} Σ_{s∈S_j} A_ts``, the mean of the token map over the block
  of sentence ``i``'s query tokens and sentence ``j``'s key tokens (masked pairs count as 0, as the code's
  block mean does);
- vertical score of sentence ``j``: ``v_j = mean_{i ≥ j + d} M_ij``, the mean attention it receives from the
  sentences at least ``d`` after it (``proximity_ignore``, ``d = 4``); undefined (NaN) for the last ``d``
  sentences;
- receiver heads: the ``top_k = 20`` heads whose vertical scores have the highest kurtosis (Fisher, biased,
  NaN omitted; the code averages each head's kurtosis over the traces before ranking); a sentence's
  receiver-head score is its vertical score averaged over those heads.

Sentences are given as one id per token (``-1`` for tokens in no sentence, e.g. the prompt), so the
``[n, n]`` sums are accumulated one query tile at a time, never forming the ``[T, S]`` map. Choices: spans
are taken exactly (the authors' code clips a span end to ``T − 1``, dropping the last token), and the code's
optional rank normalisation (``control_depth``, off in its receiver-head analysis) is left out.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.bias import Bias
from attnjax.checks import check_positive, check_qk, describe
from attnjax.masks import Mask

PROXIMITY_IGNORE = 4
"""``d``: vertical scores ignore the ``d − 1`` sentences right after a sentence (receiver_head_funcs.py)."""

RECEIVER_TOP_K = 20
"""Receiver heads kept (receiver_head_funcs.py, ``get_top_k_receiver_heads``)."""

_HIGHEST = jax.lax.Precision.HIGHEST


def _checked_segment_ids(segment_ids: jax.Array, batch: int, length: int) -> jax.Array:
    """``segment_ids`` (int ``[S]`` or ``[B|1, S]``) as int32 ``[B, S]``."""
    ids = jnp.asarray(segment_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be integers (a sentence id per token, -1 for none), got {describe(ids)}")
    ids2 = ids[None] if ids.ndim == 1 else ids
    if ids2.ndim != 2 or ids2.shape[0] not in (1, batch) or ids2.shape[1] != length:
        raise ValueError(f"segment_ids must have shape [S] or [B, S] = [{batch}, {length}] (one id per key token), "
                         f"got {list(ids.shape)}")
    return jnp.broadcast_to(ids2.astype(jnp.int32), (batch, length))


def _counts(ids: jax.Array, num_sentences: int) -> jax.Array:
    """Tokens per sentence, ``[B, L] -> [B, n]`` float32 (ids outside ``[0, n)`` are dropped)."""
    return jax.vmap(lambda i: jax.ops.segment_sum(jnp.ones(i.shape, jnp.float32), i, num_segments=num_sentences))(ids)


def _block_means(sums: jax.Array, q_counts: jax.Array, k_counts: jax.Array) -> jax.Array:
    """``sums / (|S_i|·|S_j|)``, 0 for an empty sentence."""
    size = q_counts[..., :, None] * k_counts[..., None, :]
    return jnp.where(size > 0, sums / jnp.maximum(size, 1.0), 0.0)


def segment_ids_from_spans(spans: Sequence[tuple[int, int]], length: int) -> np.ndarray:
    """One sentence id per token from half-open token spans ``[(start, end), ...]``: token ``t`` gets ``i``
    when ``start_i <= t < end_i``, else ``-1``. Spans must lie in ``[0, length]`` and not overlap.

    Returns an int32 NumPy array ``[length]``.
    """
    check_positive(length=length)
    ids = np.full(length, -1, np.int32)
    for i, span in enumerate(spans):
        start, end = (int(x) for x in span)
        if not 0 <= start <= end <= length:
            raise ValueError(f"spans[{i}] = ({start}, {end}) must satisfy 0 <= start <= end <= length = {length}")
        if np.any(ids[start:end] >= 0):
            raise ValueError(f"spans[{i}] = ({start}, {end}) overlaps an earlier span")
        ids[start:end] = i
    return ids


def sentence_attention(q: jax.Array, k: jax.Array, segment_ids: jax.Array, num_sentences: int, *,
                       mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                       scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                       block_q: int = 128) -> jax.Array:
    """The sentence × sentence map ``M_ij``: the mean attention from sentence ``i``'s tokens to sentence ``j``'s.

    Per query tile, the softmax rows are summed into key-sentence bins and the rows into query-sentence
    bins, so memory is ``O(B·Hq·block_q·S + B·Hq·n²)``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``.
      segment_ids: int ``[S]`` or ``[B, S]``: the sentence of each key token in ``[0, num_sentences)``, ``-1``
        (or any id outside that range) for none. Query row ``t`` is token ``t + S − T`` (bottom-right
        alignment; ``T == S`` for a whole trace).
      num_sentences: ``n``, static.
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention`` (usually ``mask=masks.Causal()``).
      block_q: query rows per step.

    Returns:
      ``[B, Hq, n, n]`` float32 (0 in a row or column of a sentence with no token).
    """
    check_qk(q, k)
    check_positive(num_sentences=num_sentences)
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    ids = _checked_segment_ids(segment_ids, B, S)
    q_ids = ids[:, S - T:]

    def columns(log_p, logits, q_idx, kv_idx):
        to_keys = jax.vmap(lambda p, i: jax.ops.segment_sum(jnp.moveaxis(p, -1, 0), i, num_segments=num_sentences))(
            jnp.exp(log_p), ids)
        rows = jax.nn.one_hot(jnp.take(q_ids, q_idx, axis=1, mode="clip"), num_sentences, dtype=jnp.float32)
        return None, jnp.einsum("bqi,bjhq->bhij", rows, to_keys, precision=_HIGHEST)

    sums = scan_query_tiles(q, k, columns, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[1]
    return _block_means(sums, _counts(q_ids, num_sentences)[:, None], _counts(ids, num_sentences)[:, None])


def sentence_attention_of_map(probabilities: jax.Array, segment_ids: jax.Array, num_sentences: int) -> jax.Array:
    """``M_ij`` from a dense map ``[..., T, S] -> [..., n, n]``.

    ``segment_ids``: int ``[..., S]`` broadcastable against the map's leading axes (e.g. ``[S]``, or
    ``[B, 1, S]`` for a ``[B, H, T, S]`` map); query row ``t`` is token ``t + S − T``.
    """
    check_positive(num_sentences=num_sentences)
    p = jnp.asarray(probabilities, jnp.float32)
    ids = jnp.asarray(segment_ids)
    T, S = p.shape[-2:]
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be integers, got {describe(ids)}")
    if ids.ndim < 1 or ids.shape[-1] != S:
        raise ValueError(f"segment_ids must end in the key axis S = {S}, got shape {list(ids.shape)}")
    keys = jax.nn.one_hot(ids, num_sentences, dtype=jnp.float32)
    rows = keys[..., S - T:, :]
    sums = jnp.matmul(jnp.matmul(jnp.swapaxes(rows, -1, -2), p, precision=_HIGHEST), keys, precision=_HIGHEST)
    return _block_means(sums, jnp.sum(rows, axis=-2), jnp.sum(keys, axis=-2))


def vertical_scores(sentence_map: jax.Array, proximity_ignore: int = PROXIMITY_IGNORE) -> jax.Array:
    """The attention each sentence receives from later ones: ``v_j = mean_{i ≥ j + d} M_ij``.

    Args:
      sentence_map: ``[..., n, n]``, e.g. ``sentence_attention(...)``.
      proximity_ignore: ``d >= 0`` (4 in the paper's receiver-head analysis; 0 includes the sentence itself).

    Returns:
      ``[..., n]`` float32; NaN for the last ``d`` sentences, which no sentence that far after them attends.
    """
    if not isinstance(proximity_ignore, int) or isinstance(proximity_ignore, bool) or proximity_ignore < 0:
        raise ValueError(f"proximity_ignore must be a non-negative int, got {describe(proximity_ignore)}")
    m = jnp.asarray(sentence_map, jnp.float32)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"sentence_map must be square [..., n, n], got shape {list(m.shape)}")
    n = m.shape[-1]
    far = (jnp.arange(n)[:, None] - jnp.arange(n)[None, :]) >= proximity_ignore
    count = jnp.sum(far, axis=0, dtype=jnp.float32)
    return jnp.where(count > 0, jnp.sum(jnp.where(far, m, 0.0), axis=-2) / jnp.maximum(count, 1.0), jnp.nan)


def receiver_head_kurtosis(vertical: jax.Array) -> jax.Array:
    """The excess kurtosis of each head's vertical scores over sentences, NaN entries omitted:
    ``E[(v − μ)⁴] / E[(v − μ)²]² − 3`` with population moments (``scipy.stats.kurtosis(fisher=True,
    bias=True, nan_policy="omit")``, as the authors' code).

    ``vertical``: ``[..., n]`` -> ``[...]`` float32; NaN where no score is defined or all are equal.
    """
    v = jnp.asarray(vertical, jnp.float32)
    valid = ~jnp.isnan(v)
    count = jnp.sum(valid, axis=-1, keepdims=True, dtype=jnp.float32)
    mean = jnp.sum(jnp.where(valid, v, 0.0), axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    dev = jnp.where(valid, v - mean, 0.0)
    var = jnp.sum(dev ** 2, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    z = dev / jnp.sqrt(jnp.where(var > 0, var, 1.0))
    kurt = jnp.sum(z ** 4, axis=-1) / jnp.maximum(count[..., 0], 1.0) - 3.0
    return jnp.where((count[..., 0] > 0) & (var[..., 0] > 0), kurt, jnp.nan)


def receiver_heads(kurtosis: jax.Array, top_k: int = RECEIVER_TOP_K) -> np.ndarray:
    """The receiver heads: the ``top_k`` heads of highest kurtosis, NaN skipped.

    Args:
      kurtosis: one value per head, any head layout (e.g. ``[L, H]``), averaged over the traces.
      top_k: heads kept (20 in the authors' code); fewer when fewer values are defined.

    Returns:
      Int NumPy array ``[k, kurtosis.ndim]``: each row indexes one head, highest kurtosis first.
    """
    check_positive(top_k=top_k)
    kurt = np.asarray(kurtosis, np.float64)
    if kurt.ndim == 0:
        raise ValueError("kurtosis must have at least one head axis, got a scalar")
    flat = kurt.ravel()
    valid = np.flatnonzero(~np.isnan(flat))
    chosen = valid[np.argsort(-flat[valid], kind="stable")][:top_k]
    return np.stack(np.unravel_index(chosen, kurt.shape), axis=-1).astype(np.int64)


def receiver_head_scores(vertical: jax.Array, heads: np.ndarray) -> jax.Array:
    """Each sentence's vertical score averaged over the receiver heads (``get_receiver_head_scores``).

    Args:
      vertical: ``[*head_axes, ..., n]``: leading axes index heads as the columns of ``heads`` do (e.g.
        ``[L, H, B, n]``); the others are kept.
      heads: ``[k, len(head_axes)]`` from ``receiver_heads``.

    Returns:
      ``[..., n]`` float32.
    """
    v = jnp.asarray(vertical, jnp.float32)
    idx = np.asarray(heads)
    if idx.ndim != 2 or idx.shape[0] == 0 or idx.shape[1] >= v.ndim or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"heads must be a non-empty int array [k, m] with m < vertical.ndim = {v.ndim}, got "
                         f"{describe(idx)}")
    return jnp.mean(v[tuple(idx.T)], axis=0)


__all__ = ["PROXIMITY_IGNORE", "RECEIVER_TOP_K", "segment_ids_from_spans", "sentence_attention",
           "sentence_attention_of_map", "vertical_scores", "receiver_head_kurtosis", "receiver_heads",
           "receiver_head_scores"]
