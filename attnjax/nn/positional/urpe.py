"""URPE attention as a Flax NNX layer: multi-head self-attention with a learned post-softmax Toeplitz weight.

Luo et al., "Your Transformer May Not be as Powerful as You Expect" (NeurIPS 2022), §4:
``y = W_o · concat_h (softmax(q_h k_hᵀ/√D + B_h) ⊙ C_h) v_h`` with ``C_h[i, j] = c[i − j, h]``, optionally
with a relative bias ``B`` inside the softmax (the paper's experiments pair URPE with a learned RPE; here
``position_bias=``, e.g. T5's table). The functional core is ``attnjax.relative.urpe``.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.bias import Bias
from attnjax.nn.attention import KVCache, attention_projections
from attnjax.nn.capture import refuse_capture
from attnjax.nn.checks import check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.relative.urpe import urpe_attention, urpe_attention_reference

IMPLEMENTATIONS = ("auto", "reference", "xla")
""""reference": dense ``[B, H, T, S]``; "xla" (and "auto"): the blocked ``urpe_attention``, O(T·tile) memory."""


class URPEAttention(nnx.Module):
    """Multi-head URPE self-attention with GQA, an optional relative bias ``B`` and a KV cache.

    The Toeplitz table ``c`` is a parameter ``[num_offsets, num_heads]`` (one column per head, as the
    official code's ``nn.Embedding(num_offsets, num_attention_heads)``), initialized to 1 (the official
    ``--constant-init-ur-attn``), so a fresh layer is plain softmax attention. Offsets ``|i − j|`` beyond
    ``max_distance`` share the end entries. The official code builds one table in the encoder and
    passes it to every layer; here each layer owns its table (assign one layer's ``c`` to the others
    to share it).

    Example::

      layer = URPEAttention(64, 8, bidirectional=False, max_distance=512,
                            position_bias=functools.partial(T5RelativeBias, bidirectional=False), rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                     # x, y: [B, T, 64]
      cache = layer.init_cache(B, max_len)
      y_t, cache = layer.decode(x_t, cache)                 # x_t, y_t: [B, 1, 64]

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads ``Hq``.
      num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      bidirectional: the table covers offsets ``−R..R`` (``2R + 1`` rows, encoders, the paper's setting)
        or ``0..R`` (``R + 1`` rows, causal decoders), ``R = max_distance``.
      max_distance: ``R``; 128 is the official code's ``--ur-max-rp`` default.
      position_bias: ``None``, or a factory ``(num_heads, rngs=rngs) -> module`` whose call
        ``module(query_offset=None)`` returns an ``attnjax.bias.Bias`` (the RPE ``B``), as in
        ``MultiHeadAttention``; e.g. ``functools.partial(T5RelativeBias, bidirectional=False)``.
      qkv_bias, out_bias: biases of the input and output projections.
      implementation: "auto", "reference" or "xla".
      block_q, block_kv: tile sizes of the "xla" path.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections (and the bias module).
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bidirectional: bool = True, max_distance: int = 128,
                 position_bias: Optional[Callable[..., nnx.Module]] = None, qkv_bias: bool = False,
                 out_bias: bool = False, implementation: str = "auto", block_q: int = 512, block_kv: int = 512,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_kv_heads=num_kv_heads, max_distance=max_distance, block_q=block_q, block_kv=block_kv)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"URPEAttention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.bidirectional, self.max_distance = bidirectional, max_distance
        self.implementation, self.block_q, self.block_kv = implementation, block_q, block_kv
        self.dtype, self.param_dtype = dtype, param_dtype

        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, out_bias=out_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)
        num_offsets = 2 * max_distance + 1 if bidirectional else max_distance + 1
        self.c = nnx.Param(jnp.ones((num_offsets, num_heads), param_dtype))
        self.position_bias = None if position_bias is None else position_bias(num_heads, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """Self-attention of ``x [B, T, d_model] -> [B, T, d_model]``; ``mask`` an ``attnjax.masks`` value
        (``masks.Causal()`` for a language model)."""
        check_input("x", x, self.d_model)
        refuse_capture("URPEAttention (its map softmax(q·kᵀ/√D + B) ⊙ C is a softmax times a learned Toeplitz "
                       "matrix: rows need not sum to 1, and AttentionInputs holds no post-softmax weight)")
        q, k, v = self.query(x), self.key(x), self.value(x)
        bias = None if self.position_bias is None else self.position_bias()
        return self.out(self._attend(q, k, v, mask=mask, bias=bias, query_offset=None))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache`` (keys and values ``[batch, max_len, Hkv, D]`` of zeros, length 0) for ``decode``;
        ``dtype`` defaults to ``dtype`` of the module, else ``param_dtype``."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step at position ``cache.length``: equal, position by position, to ``self(x, mask=masks.Causal())``.

        ``x_t [B, 1, d_model]`` -> ``(y_t [B, 1, d_model], cache)``; ``C`` and ``B`` read the query's
        position ``cache.length``. Decoding past ``max_len`` tokens is undefined.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        q, k, v = (p(x_t).astype(cache.k.dtype) for p in (self.query, self.key, self.value))
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
        filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
        bias = None if self.position_bias is None else self.position_bias(query_offset=cache.length)
        out = self._attend(q, k_all, v_all, mask=filled, bias=bias, query_offset=cache.length)
        return self.out(out), KVCache(k_all, v_all, cache.length + 1)

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[masks.Mask],
                bias: Optional[Bias], query_offset: Optional[jax.Array]) -> jax.Array:
        kwargs = dict(mask=mask, bias=bias, bidirectional=self.bidirectional, query_offset=query_offset)
        if self.implementation == "reference":
            return urpe_attention_reference(q, k, v, self.c[...], **kwargs)
        return urpe_attention(q, k, v, self.c[...], block_q=self.block_q, block_kv=self.block_kv, **kwargs)


register_module(ModuleSpec(
    "urpe", URPEAttention,
    dict(d_model=16, num_heads=4, num_kv_heads=2, bidirectional=False, max_distance=6, block_q=4, block_kv=4,
         position_bias=functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=16)),
    (2, 9, 16), kind="layer",
    paper="Luo et al. 2022 (Your Transformer May Not be as Powerful as You Expect), §4: URPE-based attention",
    causal=True, decodes=True))
