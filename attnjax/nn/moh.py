"""MoH, mixture-of-head attention, as a Flax NNX module (Jin et al., "MoH: Multi-Head Attention as
Mixture-of-Head Attention", 2024; official code github.com/SkyworkAI/MoH).

``y = Σ_i g_i(x_t) · H^i W_O^i``: per token, ``h_s`` shared heads and the top-k of the ``h - h_s`` routed
heads, weighted by the two-stage routing scores of sec. 3.2 (see ``attnjax.heads.moh``). The router reads
the layer's input ``x_t`` (``W_s``, ``W_r``, ``W_h``, no biases, as the official MoH-ViT/DiT code). Routing
is per token and keys/values are projected for every head, so causal decoding keeps a KV cache of all
heads and attends only from the token's active heads.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.heads.moh import HeadRouting, moh_attention, moh_attention_reference, moh_balance_loss, moh_routing
from attnjax.nn.attention import KVCache, attention_projections
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE

IMPLEMENTATIONS = ("auto", "reference", "xla")
""""reference": every head computed and weighted (``moh_attention_reference``); "xla" (and "auto"): only
the active heads, packed into one blocked pass (``moh_attention``)."""


class MoHAttention(nnx.Module):
    """Mixture-of-head attention: per-token top-k routed heads plus always-on shared heads, weighted.

    Example::

      layer = MoHAttention(512, 8, num_shared_heads=2, top_k=2, rngs=nnx.Rngs(0))   # 4 of 8 heads per token
      y = layer(x, mask=masks.Causal())                     # x, y: [B, T, 512]
      loss = task_loss + BALANCE_LOSS_WEIGHT * layer.balance_loss(x)
      cache = layer.init_cache(B, max_len); y_t, cache = layer.decode(x_t, cache)

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: ``h``, all heads (shared and routed).
      num_shared_heads: ``h_s``, heads every token uses; default ``h // 2``, and ``top_k`` default ``h // 4``
        (75% of the heads active), the split of the official MoH-LLaMA3-8B code.
      top_k: ``k``, routed heads per token, ``1 <= k <= h - h_s`` (0 when ``h_s = h``).
      num_kv_heads: key/value heads (GQA); must divide ``num_heads``. Default ``num_heads``.
      head_dim: features per head (default ``d_model // num_heads``).
      qkv_bias, out_bias: biases of the projections.
      rope: rotary embedding of q and k (``None`` for none).
      official_scaling: the official code's scores (routed weights renormalized over the selected heads,
        groups scaled by their head counts) instead of the paper's equations; also for ``balance_loss``.
      implementation: "auto", "reference" or "xla" (``IMPLEMENTATIONS``).
      block_q, block_kv: tiles of the packed pass.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``params`` initializes the projections and the router.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_shared_heads: Optional[int] = None,
                 top_k: Optional[int] = None, num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 qkv_bias: bool = False, out_bias: bool = False, rope: Optional[RoPE] = None,
                 official_scaling: bool = False, implementation: str = "auto", block_q: int = 512,
                 block_kv: int = 512, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        hs = num_heads // 2 if num_shared_heads is None else num_shared_heads
        check_positive(num_kv_heads=num_kv_heads, block_q=block_q, block_kv=block_kv)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not (isinstance(hs, int) and 0 <= hs <= num_heads):
            raise ValueError(f"num_shared_heads must be an int in [0, num_heads={num_heads}], got {hs!r}")
        routed = num_heads - hs
        top_k = min(max(num_heads // 4, 1), routed) if top_k is None and routed else (0 if top_k is None else top_k)
        if routed and not (isinstance(top_k, int) and 1 <= top_k <= routed):
            raise ValueError(f"top_k must be an int in [1, {routed}] (the routed heads num_heads - num_shared_heads)"
                             f", got {top_k!r}")
        if not routed and top_k:
            raise ValueError(f"top_k={top_k} with no routed heads (num_shared_heads = num_heads = {num_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"MoHAttention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(head_dim)
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.num_shared_heads, self.top_k, self.rope = hs, top_k, rope
        self.official_scaling, self.implementation = official_scaling, implementation
        self.block_q, self.block_kv = block_q, block_kv
        self.dtype, self.param_dtype = dtype, param_dtype

        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, qkv_bias=qkv_bias, out_bias=out_bias, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)

        def linear(in_features, out_features, use_bias):
            return nnx.LinearGeneral(in_features, out_features, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.router_routed = linear(d_model, routed, use_bias=False) if routed else None
        self.router_shared = linear(d_model, hs, use_bias=False) if hs > 1 else None
        self.router_balance = linear(d_model, 2, use_bias=False) if hs and routed else None

    def route(self, x: jax.Array) -> HeadRouting:
        """The routing of each token of ``x [B, T, d_model]``: active heads and scores (``moh_routing``)."""
        check_input("x", x, self.d_model)
        return moh_routing(_apply(self.router_routed, x), self.top_k, shared_logits=_apply(self.router_shared, x),
                           balance_logits=_apply(self.router_balance, x), num_shared=self.num_shared_heads,
                           official_scaling=self.official_scaling)

    def balance_loss(self, x: jax.Array) -> jax.Array:
        """MoH's load-balance loss ``L_b = Σ_i f_i P_i`` of the routing of ``x`` (``moh_balance_loss``); add
        ``BALANCE_LOSS_WEIGHT · L_b`` (β = 0.01) to the task loss. A float32 scalar."""
        return moh_balance_loss(self.route(x), official_scaling=self.official_scaling)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``: ``Σ_i g_i H^i W_O^i`` over each token's active heads.

        ``mask``: ``None`` (bidirectional) or ``masks.Causal()``. ``positions``: int ``[T]`` or ``[B, T]``
        RoPE positions (default ``arange(T)``).
        """
        check_causal_mask("MoHAttention", mask)
        routing = self.route(x)
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.rope is not None:
            positions = jnp.arange(x.shape[1]) if positions is None else positions
            q, k = self.rope(q, positions), self.rope(k, positions)
        if self.implementation == "reference":
            heads = moh_attention_reference(q, k, v, routing.gates().astype(q.dtype), mask=mask)
        else:
            heads = moh_attention(q, k, v, routing.index, routing.weights.astype(q.dtype), mask=mask,
                                  block_q=self.block_q, block_kv=self.block_kv)
        return self.out(heads)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ``KVCache`` of every KV head: zeros ``[batch, max_len, Hkv, D]`` and length 0."""
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return KVCache.empty(batch, max_len, self.num_kv_heads, self.head_dim, dtype)

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One causal step at position ``cache.length``: the token's routing picks its heads, which attend to
        every cached key (all heads are cached); equal to ``self(x, mask=masks.Causal())`` position by position.

        Args:
          x_t: ``[B, 1, d_model]``; cache: from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)`` with the token's keys and values written at ``cache.length``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        routing = self.route(x_t)
        q, k, v = (p(x_t).astype(dtype) for p in (self.query, self.key, self.value))
        position = cache.length[None]
        if self.rope is not None:
            q, k = self.rope(q, position), self.rope(k, position)
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        v_all = jax.lax.dynamic_update_slice(cache.v, v, start)
        if self.implementation == "reference":
            filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
            heads = moh_attention_reference(q, k_all, v_all, routing.gates().astype(dtype), mask=filled)
        else:
            heads = moh_attention(q, k_all, v_all, routing.index, routing.weights.astype(dtype), mask=masks.Causal(),
                                  q_positions=position, block_q=self.block_q, block_kv=self.block_kv)
        return self.out(heads), KVCache(k_all, v_all, cache.length + 1)


def _apply(layer: Optional[nnx.Module], x: jax.Array) -> Optional[jax.Array]:
    return None if layer is None else layer(x)


register_module(ModuleSpec(
    "moh", MoHAttention, dict(d_model=16, num_heads=4, num_shared_heads=2, top_k=1, num_kv_heads=2,
                              rope=RoPE(base=100.0), block_q=8, block_kv=8), (2, 9, 16),
    kind="layer", paper="Jin et al. 2024 (MoH: Multi-Head Attention as Mixture-of-Head Attention)",
    causal=True, decodes=True))
