"""Music Transformer's relative self-attention as a Flax NNX layer (Huang et al. 2018, "Music Transformer").

``y = W_o · concat_h softmax((q_h·k_hᵀ + S_rel^h)/√D) v_h`` with ``S_rel^h[i, j] = q_i^h·E^h[j − i]`` (§3.2,
eq. 3): learned relative embeddings, one table per head, for offsets ``−k … 0`` (causal, §3.4) or
``−k … k``, clipped beyond ``k`` (Shaw et al. 2018, §3.2). The functional core is
``attnjax.positional.relative.RelativeEmbeddingBias`` through ``attnjax.attention``: the blocked ``xla``
path computes each tile's relative logits from the tile's queries and the embedding rows it needs (the
skewing trick per tile), never ``[T, S, D]``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.api import attention
from attnjax.nn.attention import KVCache, attention_projections
from attnjax.nn.capture import sow_attention_inputs
from attnjax.nn.checks import check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional.relative import RelativeEmbeddingBias

IMPLEMENTATIONS = ("auto", "reference", "xla")
"""Paths of ``attnjax.attention`` that serve a bias reading the queries ("pallas" kernels don't)."""


class RelativeAttention(nnx.Module):
    """Multi-head self-attention with learned relative position embeddings (Music Transformer).

    Example::

      layer = RelativeAttention(64, 8, max_distance=2047, rngs=nnx.Rngs(0))
      y = layer(x)                                   # x, y: [B, T, 64], causal
      cache = layer.init_cache(B, max_len)
      y_t, cache = layer.decode(x_t, cache)          # x_t, y_t: [B, 1, 64]

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads ``H``.
      num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads`` (GQA).
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      max_distance: ``k``, the largest distance with its own embedding; farther offsets share the last
        one. Default 2047: Music Transformer learns one embedding per distance of its length-2048
        training sequences (``E_r`` for ``−L+1 … 0``, §3.4).
      share_embeddings: one ``[R, D]`` table for all heads (Shaw et al. §3.3) instead of one per head
        ``[R, H, D]`` (Music Transformer, the default).
      causal: a causal LM layer (the paper's; the mask is always ``masks.Causal()``, combined with a given
        one, and embeddings cover offsets ``−k … 0``: ``R = k + 1``) or bidirectional (the mask as given,
        offsets ``−k … k``: ``R = 2k + 1``; no ``decode``).
      qkv_bias, out_bias: biases of the q/k/v and output projections.
      implementation: "auto", "reference" or "xla", passed to ``attnjax.attention``.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections and the embeddings (normal, stddev ``D^-1/2`` as in
        tensor2tensor's ``get_relative_embeddings_left``, which the paper's code used).
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, max_distance: int = 2047, share_embeddings: bool = False,
                 causal: bool = True, qkv_bias: bool = False, out_bias: bool = False, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_kv_heads=num_kv_heads, max_distance=max_distance)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise NotImplementedError(f"RelativeAttention implementation must be one of {IMPLEMENTATIONS} (the "
                                      f"Pallas kernels take no bias that reads the queries), got {implementation!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.max_distance, self.causal, self.implementation = max_distance, causal, implementation
        self.dtype, self.param_dtype = dtype, param_dtype

        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, out_bias=out_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)
        rows = max_distance + 1 if causal else 2 * max_distance + 1
        shape = (rows, head_dim) if share_embeddings else (rows, num_heads, head_dim)
        init = nnx.initializers.normal(head_dim ** -0.5)
        self.relative_embeddings = nnx.Param(init(rngs.params(), shape, param_dtype))

    def bias(self, query_offset: Optional[jax.Array] = None) -> RelativeEmbeddingBias:
        """The ``RelativeEmbeddingBias`` rule over this layer's embeddings, at attention's default scale
        ``1/√D`` (so the logits are ``(q·kᵀ + S_rel)/√D``); ``query_offset`` places a decode step."""
        return RelativeEmbeddingBias(self.relative_embeddings[...], causal=self.causal, query_offset=query_offset)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``.

        ``mask``: with ``causal=True``, ``None`` or ``masks.Causal()`` is causal attention and any other
        mask is combined with it (``Causal() & mask``, e.g. packed ``Segments``); with ``causal=False``
        the mask as given (``None``: every key).
        """
        check_input("x", x, self.d_model)
        if self.causal:
            mask = masks.Causal() if mask is None or isinstance(mask, masks.Causal) else masks.Causal() & mask
        q, k, v, bias = self.query(x), self.key(x), self.value(x), self.bias()
        sow_attention_inputs(self, q, k, mask=mask, bias=bias, scale=None, mechanism="softmax")
        out = attention(q, k, v, mask=mask, bias=bias, implementation=self.implementation)
        return self.out(out)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache`` for ``decode``: keys and values ``[batch, max_len, Hkv, D]`` of zeros, length 0.
        ``dtype`` defaults to ``dtype`` of the module, else ``param_dtype``."""
        self._check_decodable()
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One autoregressive step, equal to ``self(x, mask=masks.Causal())`` at position ``cache.length``.

        The token's key and value go to slot ``cache.length``; the query sits at that position
        (``RelativeEmbeddingBias(query_offset=cache.length)``) and attends to the filled slots.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``KVCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        self._check_decodable()
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        q, k, v = (p(x_t).astype(cache.k.dtype) for p in (self.query, self.key, self.value))
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
        filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
        out = attention(q, k_all, v_all, mask=filled, bias=self.bias(query_offset=cache.length),
                        implementation=self.implementation)
        return self.out(out), KVCache(k_all, v_all, cache.length + 1)

    def _check_decodable(self) -> None:
        if not self.causal:
            raise NotImplementedError("RelativeAttention(causal=False) attends to later tokens: it has no decode")


register_module(ModuleSpec(
    "music", RelativeAttention, dict(d_model=16, num_heads=4, num_kv_heads=2, max_distance=5), (2, 9, 16),
    kind="layer", paper="Huang et al. 2018 (Music Transformer), §3.2 eq. 3 and §3.4: relative attention with "
                        "learned per-head relative embeddings, skewing; Shaw et al. 2018 (clipping)",
    causal=True, decodes=True))
