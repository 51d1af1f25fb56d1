"""StreamingLLM: a rolling KV cache of attention sinks plus a window, with positions assigned in the cache.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024), Sec. 3.2 "Rolling KV
Cache with Attention Sinks": the cache keeps the first ``num_sinks`` tokens (the attention sinks; 4 in the
paper) and the most recent ``window`` tokens, so memory and time per token stay constant however long the
stream. Positions are those *within the cache*, not in the text: with cached tokens [0, 1, 2, 3, 6, 7, 8]
decoding token 9, the paper assigns positions [0, 1, 2, 3, 4, 5, 6, 7]. For RoPE the keys are cached before
rotation and rotated at every step by their positions in the cache (text order within the cache).

Here the window includes the current token (as the official code's ``StartRecentKVCache.evict_for_space``
before appending it, mit-han-lab/streaming-llm): token ``t`` attends to tokens ``0 .. num_sinks − 1`` and
``t − window + 1 .. t``, at most ``num_sinks + window`` keys, at cache positions ``0 .. n − 1`` in text
order, itself at ``n − 1`` (as the official ``llama_pos_shift_attention_forward``: queries at the cache
length, keys at ``arange`` of the cache). While fewer than ``num_sinks + window`` tokens have been seen the
cache holds all of them and the positions equal the text positions, so decoding equals
``MultiHeadAttention.decode``.

The window is a ring buffer (slot ``num_sinks + (t − num_sinks) mod window``), so a step writes one slot and
reads the ``num_sinks + window`` cached keys, rotating all of them: ``O((num_sinks + window)·(Hq + Hk)·D)``
per token and layer, as in the paper.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive, describe
from attnjax.inference.layer_checks import check_decoding_layer
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.checks import check_input, check_step


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class StreamingCache:
    """StreamingLLM's rolling cache for ``streaming_decode``: sinks, then a ring buffer of the recent tokens.

    Attributes:
      k: ``[B, num_sinks + window, Hk, D]`` keys *before* RoPE; slots ``0 .. num_sinks − 1`` hold the sinks,
        the others the last ``window`` tokens in ring order (token ``t >= num_sinks`` at slot
        ``num_sinks + (t − num_sinks) mod window``).
      v: ``[B, num_sinks + window, Hv, Dv]`` values.
      length: int32 scalar, the tokens seen so far (the text position of the next token; not reduced).
      num_sinks: number of sink slots (static).
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array
    num_sinks: int = dataclasses.field(metadata=dict(static=True))

    @property
    def window(self) -> int:
        """Slots of the rolling window, ``k.shape[1] − num_sinks``."""
        return self.k.shape[1] - self.num_sinks


def _check_sizes(num_sinks: int, window: int) -> None:
    if not isinstance(num_sinks, int) or isinstance(num_sinks, bool) or num_sinks < 0:
        raise ValueError(f"num_sinks must be a non-negative int, got {describe(num_sinks)}")
    check_positive(window=window)


def init_streaming_cache(layer: MultiHeadAttention, batch: int, *, window: int, num_sinks: int = 4,
                         dtype: Optional[jax.typing.DTypeLike] = None) -> StreamingCache:
    """An empty ``StreamingCache`` for ``layer``: zeros ``[batch, num_sinks + window, Hk, D]`` and
    ``[batch, num_sinks + window, Hv, Dv]``, length 0.

    Args:
      layer: a ``MultiHeadAttention`` with RoPE or no positional scheme (``check_decoding_layer``).
      batch: positive int.
      window: recent tokens kept, the current one included (positive).
      num_sinks: first tokens kept for good (4 in the paper; 0 gives plain window attention with positions
        reassigned in the cache).
      dtype: default the layer's ``dtype``, else its ``param_dtype`` (as ``MultiHeadAttention.init_cache``).
    """
    check_decoding_layer(layer, "init_streaming_cache")
    check_positive(batch=batch)
    _check_sizes(num_sinks, window)
    if dtype is None:
        dtype = layer.param_dtype if layer.dtype is None else layer.dtype
    size = num_sinks + window
    return StreamingCache(jnp.zeros((batch, size, layer.num_kv_heads, layer.head_dim), dtype),
                          jnp.zeros((batch, size, layer.num_v_heads, layer.v_head_dim), dtype),
                          jnp.zeros((), jnp.int32), num_sinks)


def streaming_decode(layer: MultiHeadAttention, x_t: jax.Array,
                     cache: StreamingCache) -> tuple[jax.Array, StreamingCache]:
    """One StreamingLLM step of ``layer`` (Xiao et al. 2024, Sec. 3.2), with its projections, RoPE and output.

    Token ``t = cache.length`` is projected, its un-rotated key and value written at its slot (over the
    oldest window token once the cache is full), and it attends to the ``n = min(t + 1, num_sinks + window)``
    cached tokens with RoPE at cache positions: sink ``j`` at ``j``, a window token ``a`` steps older than
    ``t`` at ``n − 1 − a``, the query at ``n − 1``. ``layer.scale_qv`` gets the query's cache position too.
    Equal to ``layer.decode`` while ``t < num_sinks + window``, and to ``streaming_reference`` throughout.

    Args:
      layer: the ``MultiHeadAttention`` (``check_decoding_layer``: softmax; RoPE or no positional scheme).
      x_t: ``[B, 1, d_model]``, the next token.
      cache: a ``StreamingCache`` from ``init_streaming_cache`` or the previous step.
    Returns:
      ``(y_t [B, 1, d_model], cache)``, the cache of the same shapes with ``length + 1``.
    """
    check_decoding_layer(layer, "streaming_decode")
    if not isinstance(cache, StreamingCache):
        raise TypeError(f"cache must be a StreamingCache (init_streaming_cache), got {type(cache).__name__}")
    check_step("x_t", x_t, layer.d_model, cache.k.shape[0])
    sinks, window, size = cache.num_sinks, cache.window, cache.k.shape[1]
    t = cache.length
    dtype = cache.k.dtype
    q, k, v = (p(x_t).astype(dtype) for p in (layer.query, layer.key, layer.value))
    n = jnp.minimum(t + 1, size)
    q, v = layer.scale_qv(q, v, (n - 1)[None])
    slot = jnp.where(t < sinks, t, sinks + (t - sinks) % window)
    k_all = jax.lax.dynamic_update_slice(cache.k, k, (0, slot, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache.v, v, (0, slot, 0, 0))
    slots = jnp.arange(size)
    k_rot = k_all
    if layer.rope is not None:
        positions = jnp.where(slots < sinks, slots, n - 1 - (t - slots) % window)
        q, k_rot = layer.rope(q, (n - 1)[None]), layer.rope(k_all, positions)
    filled = masks.Explicit((slots <= t)[None, None, None, :])
    out = attention(q, k_rot, v_all, mechanism=layer.mechanism, mask=filled, implementation=layer.implementation)
    return layer.out(out), StreamingCache(k_all, v_all, t + 1, sinks)


def streaming_reference(layer: MultiHeadAttention, x: jax.Array, *, window: int, num_sinks: int = 4) -> jax.Array:
    """The outputs of ``streaming_decode`` over a whole sequence, every token with its own cache, from the
    definition (Xiao et al. 2024, Sec. 3.2).

    Token ``t`` sees the tokens ``j <= t`` with ``j < num_sinks`` or ``j > t − window``, ``n`` of them; their
    un-rotated keys get RoPE at their cache positions ``0 .. n − 1`` in text order (``j`` for a sink,
    ``n − 1 − (t − j)`` for a window token) and the query at ``n − 1``. Each token's keys are rotated
    separately, ``O(B·T²·Hk·D)`` memory, so this is for tests and short sequences (e.g. the perplexity of a
    streaming model on a short text in one call).

    Args:
      layer: as ``streaming_decode``.
      x: ``[B, T, d_model]``.
      window, num_sinks: as ``init_streaming_cache``.
    Returns:
      ``[B, T, d_model]``.
    """
    check_decoding_layer(layer, "streaming_reference")
    check_input("x", x, layer.d_model)
    _check_sizes(num_sinks, window)
    B, T, _ = x.shape
    t, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    kept = (j <= t) & ((j < num_sinks) | (j > t - window))                    # [T (query), T (key)]
    n = jnp.minimum(t + 1, num_sinks + window)[:, 0]                          # cached tokens per query
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    q, v = layer.scale_qv(q, v, n - 1)
    keys = jnp.broadcast_to(k[:, None], (B, T) + k.shape[1:]).reshape((B * T,) + k.shape[1:])
    if layer.rope is not None:
        positions = jnp.where(j < num_sinks, j, n[:, None] - 1 - (t - j))
        q, keys = layer.rope(q, n - 1), layer.rope(keys, jnp.tile(positions, (B, 1)))
    values = jnp.broadcast_to(v[:, None], (B, T) + v.shape[1:]).reshape((B * T,) + v.shape[1:])
    mask = masks.Explicit(jnp.tile(kept, (B, 1))[:, None, None, :])
    out = attention(q.reshape(B * T, 1, *q.shape[2:]), keys, values, mechanism=layer.mechanism, mask=mask,
                    implementation=layer.implementation)
    return layer.out(out.reshape(B, T, *out.shape[2:]))


__all__ = ["StreamingCache", "init_streaming_cache", "streaming_decode", "streaming_reference"]
