"""SnapKV: compress a prompt's KV cache to the prefix positions its last queries vote for.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024, arXiv:2404.14469).
The last ``window`` prompt tokens form the observation window. Their queries' softmax attention weights over
the prefix (the keys before the window) are summed over the window's queries, the paper's voting
``C = Σ_i W_obs[:, i, :]`` (Sec. 4.1, Eq. 1), smoothed by a 1-D pooling of width ``pool_kernel`` that keeps
the neighbours of a selected position ("efficient clustering via pooling", Sec. 4.2), and each KV head keeps
its top-``keep`` positions, ``I = Top_k(C, k)`` (Eq. 2). The compressed cache is the kept prefix positions
followed by the whole window (Fig. 1), and generation continues on it.

Details follow the official code (FasterDecoding/SnapKV, ``snapkv_utils.py``, ``SnapKVCluster.update_kv``)
where the paper text leaves them open: the window's queries see the whole prefix and are causal among
themselves, the softmax runs over all prompt keys (prefix and window), ``avg`` pooling divides by
``pool_kernel`` including the zero padding (PyTorch's ``avg_pool1d`` with ``padding = pool_kernel // 2``),
and ``max`` pooling equals PyTorch's ``max_pool1d`` (zero padding and its ``-inf`` padding agree, since the
votes are non-negative). Two differences from that code: (1) under GQA the official code repeats K/V per
query head and selects per query head; here selection is per KV head, with the votes of a group's query
heads averaged before pooling (as the GQA-aware SnapKV variants do), so the compressed cache stays
``[B, ·, Hkv, D]``; (2) the weights stay float32 (the official code casts them to the query dtype).
The paper scores every layer's cache with that layer's own queries; here one call compresses one layer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention
from attnjax.blocked.scores import allowed, raw_logits, score_spec, to_groups
from attnjax.checks import check_positive, check_qk, concrete_values, describe
from attnjax.inference.layer_checks import check_decoding_layer
from attnjax.nn.attention import KVCache, MultiHeadAttention
from attnjax.nn.checks import check_input, check_step

Pooling = Literal["avg", "max"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SnapKVCache:
    """A compressed KV cache for ``snapkv_decode``: slots and text positions counted apart.

    Slot ``j < keep`` of KV head ``h`` holds the prompt token ``indices[b, h, j]`` (each head its own
    positions), slots ``keep .. keep + window − 1`` the observation window, and decoded tokens follow. Keys
    carry the RoPE rotation of their original text position, applied when they were computed.

    Attributes:
      k: ``[B, capacity, Hk, D]`` keys (RoPE applied); slots ``>= length`` are unused.
      v: ``[B, capacity, Hv, Dv]`` values.
      length: int32 scalar, filled slots: the slot of the next token.
      position: int32 scalar, the text position of the next token (its RoPE angle): the prompt length plus the
        tokens decoded since compression.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array
    position: jax.Array


def _check_prompt(q: jax.Array, k: jax.Array) -> None:
    check_qk(q, k)
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q [B, T, Hq, D] holds the prompt's last T queries, so T <= S of k [B, S, Hkv, D]; got q "
                         f"{list(q.shape)}, k {list(k.shape)}")


def _check_window(window: int, keep: Optional[int], queries: int, length: int) -> None:
    check_positive(window=window)
    if window > queries:
        raise ValueError(f"window ({window}) must be <= the number of queries given ({queries}) and the prompt "
                         f"length S ({length})")
    if keep is not None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            raise ValueError(f"keep must be a non-negative int, got {describe(keep)}")
        if keep > length - window:
            raise ValueError(f"keep ({keep}) must be <= S - window = {length} - {window} = {length - window}, the "
                             "prefix positions there are to choose from")


def snapkv_scores(q: jax.Array, k: jax.Array, *, window: int, pool_kernel: int = 7, pooling: Pooling = "avg",
                  scale: Optional[float] = None) -> jax.Array:
    """SnapKV's pooled votes for the prefix positions (Li et al. 2024, Sec. 4.1 Eq. 1 and Sec. 4.2).

    ``W = softmax(scale·q_win·kᵀ)`` over all ``S`` prompt keys for the last ``window`` queries (causal: window
    query ``i`` sees keys ``<= S − window + i``), ``C[b, h, j] = mean_g Σ_i W[b, h·G + g, i, j]`` for the prefix
    ``j < S − window`` (``G = Hq / Hkv`` query heads per KV head), then a 1-D pooling of width ``pool_kernel``
    with ``pool_kernel // 2`` zeros on each side: ``avg`` (sum / ``pool_kernel``) or ``max``.

    Args:
      q: ``[B, T, Hq, D]`` queries (RoPE applied) of the prompt's last ``T`` tokens, ``window <= T <= S``;
        only the last ``window`` rows are read, so the window's queries alone are enough.
      k: ``[B, S, Hkv, D]`` keys (RoPE applied) of the whole prompt; ``Hq % Hkv == 0``.
      window: observation window length ``w``.
      pool_kernel: odd pooling width (1: no pooling).
      pooling: "avg" or "max".
      scale: logit scale, default ``1/√D`` (that of ``attnjax.attention``).
    Returns:
      float32 ``[B, Hkv, S − window]``. Costs ``O(B·Hq·window·S)`` time and memory (never an ``[S, S]`` map).
    """
    _check_prompt(q, k)
    _check_window(window, None, q.shape[1], k.shape[1])
    check_positive(pool_kernel=pool_kernel)
    if pool_kernel % 2 == 0:
        raise ValueError(f"pool_kernel must be odd (the pooled votes keep the prefix length with pool_kernel // 2 "
                         f"padding on each side), got {pool_kernel}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    S, Hkv = k.shape[1], k.shape[2]
    q_win = q[:, q.shape[1] - window:]
    spec = score_spec(q_win, k, scale)
    q_idx, kv_idx = jnp.arange(window), jnp.arange(S)
    logits = raw_logits(to_groups(q_win.transpose(0, 2, 1, 3), Hkv), k.transpose(0, 2, 1, 3), q_idx, kv_idx, None,
                        spec)                                                   # [B, Hkv, G, w, S]
    logits = jnp.where(allowed(masks.Causal(), q_idx, kv_idx, spec), logits, -jnp.inf)
    votes = jax.nn.softmax(logits, axis=-1).sum(axis=3).mean(axis=2)[..., :S - window]
    half = pool_kernel // 2
    padded = jnp.pad(votes, ((0, 0), (0, 0), (half, half)))
    if pooling == "avg":
        return jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1, 1, pool_kernel), (1, 1, 1), "VALID") / pool_kernel
    return jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, (1, 1, pool_kernel), (1, 1, 1), "VALID")


def snapkv_select(q: jax.Array, k: jax.Array, *, window: int, keep: int, pool_kernel: int = 7,
                  pooling: Pooling = "avg", scale: Optional[float] = None) -> jax.Array:
    """The prefix positions SnapKV keeps per KV head: ``I = Top_k(C, keep)`` (Li et al. 2024, Sec. 4.1 Eq. 2).

    ``C`` is ``snapkv_scores(q, k, window=window, pool_kernel=pool_kernel, pooling=pooling, scale=scale)``;
    ties go to the earlier position (``jax.lax.top_k``).

    Args:
      q, k, window, pool_kernel, pooling, scale: as ``snapkv_scores``.
      keep: prefix positions kept per KV head, ``0 <= keep <= S − window``.
    Returns:
      int32 ``[B, Hkv, keep]``: positions in ``[0, S − window)``, sorted ascending within each head (so the
      compressed cache keeps the prompt order).
    """
    _check_prompt(q, k)
    _check_window(window, keep, q.shape[1], k.shape[1])
    scores = snapkv_scores(q, k, window=window, pool_kernel=pool_kernel, pooling=pooling, scale=scale)
    return jnp.sort(jax.lax.top_k(scores, keep)[1], axis=-1).astype(jnp.int32)


def snapkv_compress(cache: KVCache, indices: jax.Array, *, window: int, max_new_tokens: int) -> SnapKVCache:
    """A prefilled ``KVCache`` compressed to the selected prefix positions followed by the window (Fig. 1).

    Slot ``j < keep`` of head ``h`` gets the cached token ``indices[b, h, j]``; slots ``keep + i`` the window
    token ``cache.length − window + i``. The next token is decoded at slot ``keep + window`` and text position
    ``cache.length`` (``snapkv_decode``).

    Args:
      cache: a ``KVCache`` holding the prompt at slots ``0 .. cache.length − 1`` (``MultiHeadAttention.decode``
        steps or ``snapkv_prefill``); K and V must share the head count (``indices`` are per KV head).
      indices: int ``[B, Hk, keep]``, positions ``< cache.length − window`` (``snapkv_select``); checked when
        ``cache.length`` and ``indices`` are concrete (outside jit).
      window: observation window length.
      max_new_tokens: slots left for decoding; the cache holds ``keep + window + max_new_tokens`` tokens.
    Returns:
      ``SnapKVCache`` of that capacity, ``length = keep + window``, ``position = cache.length``.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an attnjax.nn.KVCache, got {type(cache).__name__}")
    B, max_len, Hk, _ = cache.k.shape
    if cache.v.shape[2] != Hk:
        raise NotImplementedError(f"snapkv_compress selects positions per KV head; K and V head counts differ "
                                  f"(k {list(cache.k.shape)}, v {list(cache.v.shape)})")
    check_positive(window=window)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {describe(max_new_tokens)}")
    indices = jnp.asarray(indices)
    if indices.ndim != 3 or indices.shape[:2] != (B, Hk) or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be int [B, Hk, keep] = [{B}, {Hk}, keep] for k {list(cache.k.shape)}, got "
                         f"{describe(indices)}")
    if window > max_len:
        raise ValueError(f"window ({window}) must be <= the cached prompt length, got a cache of {max_len} slots")
    length, found = concrete_values(cache.length), concrete_values(indices)
    if length is not None:
        if window > int(length):
            raise ValueError(f"window ({window}) must be <= the cached prompt length cache.length ({int(length)})")
        if found is not None and found.size and (found.min() < 0 or found.max() >= int(length) - window):
            raise ValueError(f"indices must lie in [0, cache.length - window) = [0, {int(length) - window}), got "
                             f"values in [{found.min()}, {found.max()}]")
    keep = indices.shape[2]
    capacity = keep + window + max_new_tokens
    start = cache.length - window

    def compact(x: jax.Array) -> jax.Array:
        kept = jnp.take_along_axis(x, indices.transpose(0, 2, 1)[..., None], axis=1)
        recent = jax.lax.dynamic_slice_in_dim(x, start, window, axis=1)
        out = jnp.zeros((B, capacity) + x.shape[2:], x.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.concatenate([kept, recent], axis=1), 0, axis=1)

    return SnapKVCache(compact(cache.k), compact(cache.v), jnp.asarray(keep + window, jnp.int32),
                       jnp.asarray(cache.length, jnp.int32))


def snapkv_prefill(layer: MultiHeadAttention, x: jax.Array, *, window: int, keep: int, max_new_tokens: int,
                   pool_kernel: int = 7, pooling: Pooling = "avg",
                   dtype: Optional[jax.typing.DTypeLike] = None) -> tuple[jax.Array, SnapKVCache]:
    """Prefill a prompt through ``layer`` and compress its cache with SnapKV (Li et al. 2024, Sec. 4).

    The output is the layer's full causal self-attention, ``layer(x, mask=masks.Causal(), deterministic=True)``;
    the window's queries then select ``keep`` prefix positions per KV head (``snapkv_select``) and the cache
    keeps them and the window (``snapkv_compress``). One projection and one attention pass over the prompt.

    Args:
      layer: a ``MultiHeadAttention`` (softmax, RoPE or no positions; see ``check_decoding_layer``).
      x: ``[B, S, d_model]`` prompt.
      window, keep, pool_kernel, pooling: as ``snapkv_select``.
      max_new_tokens: decoding slots after the prompt (``snapkv_compress``).
      dtype: cache dtype; default the layer's ``dtype``, else its ``param_dtype`` (as ``init_cache``).
    Returns:
      ``(y [B, S, d_model], SnapKVCache)``; decode on with ``snapkv_decode``.
    """
    check_decoding_layer(layer, "snapkv_prefill")
    check_input("x", x, layer.d_model)
    B, S, _ = x.shape
    _check_window(window, keep, S, S)
    if dtype is None:
        dtype = layer.param_dtype if layer.dtype is None else layer.dtype
    positions = jnp.arange(S)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    q, v = layer.scale_qv(q, v, positions)
    if layer.rope is not None:
        q, k = layer.rope(q, positions), layer.rope(k, positions)
    y = layer.out(attention(q, k, v, mechanism=layer.mechanism, mask=masks.Causal(),
                            implementation=layer.implementation))
    indices = snapkv_select(q, k, window=window, keep=keep, pool_kernel=pool_kernel, pooling=pooling)
    full = KVCache(k.astype(dtype), v.astype(dtype), jnp.asarray(S, jnp.int32))
    return y, snapkv_compress(full, indices, window=window, max_new_tokens=max_new_tokens)


def snapkv_decode(layer: MultiHeadAttention, x_t: jax.Array, cache: SnapKVCache) -> tuple[jax.Array, SnapKVCache]:
    """One decoding step of ``layer`` on a ``SnapKVCache``: ``MultiHeadAttention.decode`` with slot and
    position apart.

    The token is rotated by RoPE at its text position ``cache.position`` (the positions continue from the
    uncompressed prompt, whose kept keys keep their original rotation) and written at slot ``cache.length``;
    it attends to itself and the filled slots. ``MultiHeadAttention.decode`` uses one counter for both, so it
    can't run on a compacted cache. With every prefix position kept, this equals ``layer.decode`` step by step.
    Decoding past the capacity is undefined (the write clamps to the last slot).

    Args:
      layer: the ``MultiHeadAttention`` that filled the cache (``check_decoding_layer``).
      x_t: ``[B, 1, d_model]``, the next token.
      cache: a ``SnapKVCache`` from ``snapkv_compress``/``snapkv_prefill`` or the previous step.
    Returns:
      ``(y_t [B, 1, d_model], cache)`` with ``length`` and ``position`` advanced by one.
    """
    check_decoding_layer(layer, "snapkv_decode")
    if not isinstance(cache, SnapKVCache):
        raise TypeError(f"cache must be a SnapKVCache (snapkv_compress / snapkv_prefill), got {type(cache).__name__}")
    check_step("x_t", x_t, layer.d_model, cache.k.shape[0])
    q, k_all, v_all = layer.write_cache(x_t, cache.k, cache.v, slot=cache.length, positions=cache.position[None])
    filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
    out = attention(q, k_all, v_all, mechanism=layer.mechanism, mask=filled, implementation=layer.implementation)
    return layer.out(out), SnapKVCache(k_all, v_all, cache.length + 1, cache.position + 1)


__all__ = ["Pooling", "SnapKVCache", "snapkv_scores", "snapkv_select", "snapkv_compress", "snapkv_prefill",
           "snapkv_decode"]
