"""ComplexFormer's Complex Multi-Head Attention (CMHA) as a causal language-model layer.

Shao et al., "ComplexFormer: Disruptively Advancing Transformer Inference Ability via Head-Specific
Complex Vector Attention", arXiv:2505.10222 (2025; withdrawn, so the method section could not be read:
the exact form, parameters and initializations follow the authors' released code,
``attention/cmha_with_kv_cache.py`` of github.com/shaojintian/complexFormer). The math is in
``attnjax.relative.complexformer``: per head, the projected query and key become polar complex vectors
(Euler transform), and the score ``Σ_r ρ^q ρ^k cos(δ_h,r(φ^q − φ^k) + β_h,r + (m − n)·ω_r)`` rotates by
the adapted semantic angle difference plus the relative position delta.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.api import attention
from attnjax.dispatch import check_implementation
from attnjax.nn.attention import KVCache, attention_projections
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.relative.complexformer import (DEFAULT_BASE, DEFAULT_EPS, DEFAULT_SCALE, check_cmha_options,
                                            cmha_attention, cmha_attention_reference, cmha_transform)


class ComplexMultiHeadAttention(nnx.Module):
    """CMHA: ``y = W_o · concat_h softmax_n(s^h_mn | mask) v^h_n`` with ComplexFormer's complex scores.

    ``s^h_mn = scale · Σ_r ρ^q_m,r ρ^k_n,r cos(δ_g,r(φ^q_m,r − φ^k_n,r) + β_h,r + (p_m − p_n)·ω_r)``, where
    ``(ρ, φ)`` is the polar form of the projected ``q``/``k`` head read as ``x[r] + i·x[r + D/2]``
    and ``g`` is the K/V head of query head ``h``. Learned per head: ``δ`` (``delta``, ``[Hkv, D/2]``,
    init ``N(0, 1/√(D/2))``) and ``β`` (``beta``, ``[Hq, D/2]``, init 0), the released code's shapes and
    inits; with GQA a query group shares its K/V head's ``δ`` (it multiplies the key's phase too).
    Projections ``W_q, W_k, W_v, W_o`` are bias-free with Xavier-uniform init, as in the released code.

    The fast path transforms q and k per token and runs softmax attention
    (``attnjax.relative.complexformer.cmha_attention``), so memory is the chosen path's (O(T·tile) for
    "xla") and the ``KVCache`` holds transformed keys ``k̃`` (like RoPE's rotated keys).

    Example::

      layer = ComplexMultiHeadAttention(64, 8, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                     # x, y: [B, T, 64]
      cache = layer.init_cache(B, max_len)
      y_t, cache = layer.decode(x_t, cache)                 # x_t, y_t: [B, 1, 64]

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads ``Hq``.
      num_kv_heads: K/V heads ``Hkv`` (default ``num_heads``); must divide ``num_heads``.
      head_dim: features per head ``D``, even (default ``d_model // num_heads``).
      base: ``ω_r = base^(−2r/D)`` (10000, the released code's).
      eps: ``ε`` in ``ρ = sqrt(re² + im² + ε)`` (1e-9, the released code's).
      scale: logit scale (1: the released code applies no ``1/√D``).
      implementation: "auto", "xla" or "pallas" (``cmha_attention`` through ``attnjax.attention``), or
        "reference" (``cmha_attention_reference``, dense ``[T, S, D/2]``).
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections and ``δ``.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, base: float = DEFAULT_BASE, eps: float = DEFAULT_EPS,
                 scale: float = DEFAULT_SCALE, implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (D/2 complex components per head), got {head_dim}")
        check_cmha_options(scale=scale, base=base, eps=eps)
        check_implementation(implementation)
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.base, self.eps, self.scale = base, eps, scale
        self.implementation = implementation
        self.dtype, self.param_dtype = dtype, param_dtype

        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)
        half = head_dim // 2
        self.delta = nnx.Param(nnx.initializers.normal(1.0 / math.sqrt(half))(rngs.params(), (num_kv_heads, half),
                                                                                 param_dtype))
        self.beta = nnx.Param(jnp.zeros((num_heads, half), param_dtype))

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, called like ``MultiHeadAttention``.

        Args:
          x: ``[B, T, d_model]`` floating-point tokens.
          mask: an ``attnjax.masks`` value (``masks.Causal()`` for a language model; ``None``: all pairs).
          positions: ``[T]`` or ``[B, T]`` token positions ``p`` (default ``arange(T)``); only
            differences ``p_m − p_n`` reach the scores.
        """
        check_input("x", x, self.d_model)
        q, k, v = self.query(x), self.key(x), self.value(x)
        if positions is None:
            positions = jnp.arange(x.shape[1])
        kwargs = dict(q_positions=positions, kv_positions=positions, mask=mask, scale=self.scale, base=self.base,
                      eps=self.eps)
        if is_capturing():  # the transformed q̃, k̃ that cmha_attention hands to attnjax.attention
            delta, group = self.delta[...], self.num_heads // self.num_kv_heads
            sow_attention_inputs(self, cmha_transform(q, positions, jnp.repeat(delta, group, axis=0), self.beta[...],
                                                      base=self.base, eps=self.eps),
                                 cmha_transform(k, positions, delta, base=self.base, eps=self.eps), mask=mask,
                                 scale=self.scale, mechanism="softmax")
        if self.implementation == "reference":
            out = cmha_attention_reference(q, k, v, self.delta[...], self.beta[...], **kwargs)
        else:
            out = cmha_attention(q, k, v, self.delta[...], self.beta[...], implementation=self.implementation,
                                 **kwargs)
        return self.out(out)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache``: transformed keys ``k̃`` and values, each ``[batch, max_len, Hkv, D]``, length 0.

        ``dtype`` defaults to ``dtype`` of the module, else ``param_dtype``.
        """
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step at position ``cache.length``: equal to ``self(x, mask=masks.Causal())`` position by position.

        The token's query and key are transformed at their position (``cmha_transform``), its ``k̃`` and
        ``v`` written to the cache, and the query attends to the filled slots. Decoding past ``max_len``
        tokens is undefined (the write clamps to the last slot).

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``KVCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        q, k, v = (p(x_t).astype(dtype) for p in (self.query, self.key, self.value))
        position = cache.length[None]
        delta = self.delta[...]
        group = self.num_heads // self.num_kv_heads
        q = cmha_transform(q, position, jnp.repeat(delta, group, axis=0), self.beta[...], base=self.base,
                           eps=self.eps)
        k = cmha_transform(k, position, delta, base=self.base, eps=self.eps)
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
        filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
        out = attention(q, k_all, v_all, mask=filled, scale=self.scale, implementation=self.implementation)
        return self.out(out), KVCache(k_all, v_all, cache.length + 1)


register_module(ModuleSpec(
    "complexformer", ComplexMultiHeadAttention, dict(d_model=16, num_heads=4, num_kv_heads=2), (2, 9, 16),
    kind="layer", paper="Shao et al. 2025 (ComplexFormer: Complex Multi-Head Attention, arXiv:2505.10222; "
                        "withdrawn, form from the authors' released code)", causal=True, decodes=True))
