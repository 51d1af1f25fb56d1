"""Sparse MoE feed-forward layers routed through a graph of tokens, as Flax NNX modules.

Nguyen, Tran, Nguyen and Baraniuk, "Improving Routing in Sparse Mixture of Experts with Graph of
Tokens", 2025 (arXiv:2505.00792). ``GraphMoE`` is the (S)MoE layer with a softmax, similarity-aware
(S-MoE, Section 2) or attention-aware (A-MoE, Section 3) router; ``GraphMoEBlock`` is the
(S)MoE-Attention block of Section 3: pre-norm attention, then the MoE layer routed through that
attention's own attention matrix. The math is ``attnjax.heads.graph_routing``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.dispatch import check_implementation
from attnjax.heads.graph_routing import (DEFAULT_TAU, ROUTERS, attention_mix, expert_capacity, load_balancing_loss,
                                         moe_ffn_dispatch, moe_ffn_reference, similarity_mix, top_k_routing)
from attnjax.nn.attention import KVCache, MultiHeadAttention
from attnjax.nn.checks import check_chunk, check_input, check_positive, check_step
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE

EXPERT_PATHS = ("dispatch", "reference")
""""dispatch": capacity dispatch (``moe_ffn_dispatch``); "reference": every expert on every token, masked."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RouterCache:
    """Router logits of the tokens decoded so far, for ``GraphMoE.decode``.

    Attributes:
      logits: ``[B, max_len, E]`` router logits; slots ``>= length`` are unused.
      length: int32 scalar, the position of the next token.
    """

    logits: jax.Array
    length: jax.Array


class GraphMoE(nnx.Module):
    """A sparse MoE feed-forward layer whose router mixes probabilities across a graph of tokens.

    ``P = softmax(x W_g)``, ``P̃ = P`` ("softmax", plain SMoE), ``S·P`` ("similarity", S-MoE with
    ``S_ij = softmax_j(ℓ_i·ℓ_j / τ)`` over the router logits ``ℓ = x W_g``) or ``Ā·P`` ("attention",
    A-MoE with the head-averaged attention matrix of the preceding attention layer); each token then
    goes to its ``top_k`` experts by ``P̃`` with gates ``P̃`` (``top_k_routing``), and
    ``y = Σ_e g_e·(W2_e·GELU(W1_e·x + b1_e) + b2_e)``.

    The "attention" router needs that layer's q and k: call ``attention_routed(x, q, k, mask=...)``
    (``GraphMoEBlock`` does); ``__call__`` serves the other two. ``load_balancing_loss`` gives the
    Switch auxiliary loss of the same routing.

    Example::

      moe = GraphMoE(64, 8, d_ff=128, router="similarity", rngs=nnx.Rngs(0))
      y = moe(x, mask=masks.Causal())                     # x, y: [B, T, 64]
      aux = moe.load_balancing_loss(x, mask=masks.Causal())

    Args:
      d_model: features of ``x`` and of the output.
      num_experts: experts ``E``.
      d_ff: hidden width of each expert.
      top_k: experts per token (2, GLaM's and fastmoe's default).
      router: one of ``ROUTERS``.
      tau: temperature of the similarity graph (``router="similarity"``).
      renormalize: divide the ``top_k`` gates by their sum (``top_k_routing``).
      capacity_factor: expert capacity ``ceil(factor·k·N/E)`` tokens of the ``N`` in a call, the rest
        dropped (GShard); None (default) drops nothing, so causal calls and decoding stay exact.
      experts: "dispatch" (capacity dispatch, O(E·C·d·d_ff)) or "reference" (every expert on every token).
      implementation: of the ``attnjax.attention`` calls that mix the probabilities.
      dtype, param_dtype: computation and parameter dtypes; rngs: ``params`` initializes the weights.
    """

    def __init__(self, d_model: int, num_experts: int, *, d_ff: int, top_k: int = 2, router: str = "similarity",
                 tau: float = DEFAULT_TAU, renormalize: bool = False, capacity_factor: Optional[float] = None,
                 experts: str = "dispatch", implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(d_model=d_model, num_experts=num_experts, d_ff=d_ff, top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be at most num_experts ({num_experts})")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if experts not in EXPERT_PATHS:
            raise ValueError(f"experts must be one of {EXPERT_PATHS}, got {experts!r}")
        expert_capacity(1, num_experts, 1, capacity_factor)  # checks capacity_factor
        check_implementation(implementation)
        self.d_model, self.num_experts, self.d_ff, self.top_k = d_model, num_experts, d_ff, top_k
        self.router, self.tau, self.renormalize, self.capacity_factor = router, tau, renormalize, capacity_factor
        self.experts, self.implementation = experts, implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        self.gate = nnx.Linear(d_model, num_experts, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype,
                               rngs=rngs)
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.w1 = nnx.Param(init(rngs.params(), (num_experts, d_model, d_ff), param_dtype))
        self.b1 = nnx.Param(jnp.zeros((num_experts, d_ff), param_dtype))
        self.w2 = nnx.Param(init(rngs.params(), (num_experts, d_ff, d_model), param_dtype))
        self.b2 = nnx.Param(jnp.zeros((num_experts, d_model), param_dtype))

    def router_logits(self, x: jax.Array) -> jax.Array:
        """``ℓ = x W_g``, float32 ``[..., E]``."""
        return self.gate(x.astype(jnp.float32))

    def mixed_probabilities(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                            attention: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
        """``P̃ [B, T, E]`` float32: the probabilities top-k reads.

        Args:
          x: ``[B, T, d_model]``.
          mask: the token graph's mask (``masks.Causal()`` for a decoder).
          attention: ``(q [B, T, Hq, D], k [B, T, Hkv, D])`` of the preceding attention layer, for
            ``router="attention"`` only.
        """
        check_input("x", x, self.d_model)
        if (attention is None) != (self.router != "attention"):
            raise ValueError(f"router {self.router!r} " + ("needs attention=(q, k) of the preceding attention layer"
                                                          if attention is None else "takes no attention=(q, k)"))
        logits = self.router_logits(x)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.router == "softmax":
            return probs
        if self.router == "similarity":
            return similarity_mix(logits, logits, probs, tau=self.tau, mask=mask, implementation=self.implementation)
        q, k = attention
        return attention_mix(q, k, probs, mask=mask, implementation=self.implementation)

    def _experts(self, x: jax.Array, probs: jax.Array) -> jax.Array:
        indices, weights = top_k_routing(probs, self.top_k, renormalize=self.renormalize)
        x = x if self.dtype is None else x.astype(self.dtype)
        params = (self.w1[...], self.b1[...], self.w2[...], self.b2[...])
        params = tuple(p.astype(x.dtype) for p in params)
        if self.experts == "reference":
            return moe_ffn_reference(x, indices, weights, *params)
        num_tokens = x.shape[0] * x.shape[1]
        capacity = expert_capacity(num_tokens, self.num_experts, self.top_k, self.capacity_factor)
        return moe_ffn_dispatch(x, indices, weights, *params, capacity=capacity)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """The MoE layer on ``x [B, T, d_model]`` with the "softmax" or "similarity" router.

        ``mask`` masks the similarity graph (``masks.Causal()``: token ``t`` mixes the probabilities of
        tokens ``<= t`` only). Returns ``[B, T, d_model]``.
        """
        if self.router == "attention":
            raise NotImplementedError("router 'attention' reads the preceding attention layer's q and k: call "
                                      "attention_routed(x, q, k, mask=...) or use GraphMoEBlock")
        return self._experts(x, self.mixed_probabilities(x, mask=mask))

    def attention_routed(self, x: jax.Array, q: jax.Array, k: jax.Array, *,
                         mask: Optional[masks.Mask] = None) -> jax.Array:
        """The A-MoE layer: ``x [B, T, d_model]`` routed by ``Ā·P`` with the preceding attention layer's
        ``q [B, T, Hq, D]``, ``k [B, T, Hkv, D]`` and ``mask``. Returns ``[B, T, d_model]``."""
        return self._experts(x, self.mixed_probabilities(x, mask=mask, attention=(q, k)))

    def load_balancing_loss(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                            attention: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
        """The Switch load-balancing loss ``E·Σ_e f_e·p̄_e`` of this layer's routing of ``x`` (on ``P̃``,
        the probabilities top-k reads; ``attention_routed``'s q, k go in ``attention``). A float32 scalar."""
        probs = self.mixed_probabilities(x, mask=mask, attention=attention)
        indices, _ = top_k_routing(probs, self.top_k)
        return load_balancing_loss(probs, indices)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> RouterCache:
        """An empty ``RouterCache``: zeros ``[batch, max_len, E]`` and length 0. ``dtype`` defaults to
        the module's ``dtype``, else ``param_dtype``; routing reads the cached logits in float32."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        return RouterCache(jnp.zeros((batch, max_len, self.num_experts), dtype), jnp.zeros((), jnp.int32))

    def _cached_probabilities(self, x: jax.Array, cache: RouterCache, attention) -> tuple[jax.Array, RouterCache]:
        """``P̃`` of the tokens ``x [B, T, d_model]`` at positions ``cache.length …``: their router logits written
        into the cache, each token's graph restricted to the cached tokens up to its own position."""
        T = x.shape[1]
        logits_x = self.router_logits(x).astype(cache.logits.dtype)
        written = jax.lax.dynamic_update_slice(cache.logits, logits_x, (0, cache.length, 0))
        new = RouterCache(written, cache.length + T)
        logits_x, logits = logits_x.astype(jnp.float32), written.astype(jnp.float32)
        if self.router == "softmax":
            return jax.nn.softmax(logits_x, axis=-1), new
        seen = jnp.arange(logits.shape[1])[None, :] <= (cache.length + jnp.arange(T))[:, None]
        filled = masks.Explicit(seen[None, None])
        probs = jax.nn.softmax(logits, axis=-1)
        if self.router == "similarity":
            return similarity_mix(logits_x, logits, probs, tau=self.tau, mask=filled,
                                  implementation=self.implementation), new
        q, k_all = attention
        return attention_mix(q, k_all, probs, mask=filled, implementation=self.implementation), new

    def decode(self, x_t: jax.Array, cache: RouterCache) -> tuple[jax.Array, RouterCache]:
        """One step of the causal layer (``router`` "softmax" or "similarity"): equals row ``t`` of
        ``self(x, mask=masks.Causal())`` when nothing is dropped (``capacity_factor=None``).

        Args:
          x_t: ``[B, 1, d_model]``; cache: from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)`` with the token's router logits written at ``cache.length``.
        """
        check_step("x_t", x_t, self.d_model, cache.logits.shape[0])
        return self.prefill(x_t, cache)

    def prefill(self, x: jax.Array, cache: RouterCache) -> tuple[jax.Array, RouterCache]:
        """``x [B, T, d_model]`` at positions ``cache.length …`` in one pass (``router`` "softmax" or
        "similarity"): equal to ``T`` calls of ``decode`` when nothing is dropped (``capacity_factor=None``; the
        capacity is counted over the ``B·T`` tokens of the call). Returns ``(y [B, T, d_model], cache)``."""
        if self.router == "attention":
            raise NotImplementedError("router 'attention' decodes with the attention layer's keys: use "
                                      "decode_attention_routed or GraphMoEBlock.decode")
        check_chunk("x", x, self.d_model, cache.logits.shape[0])
        probs, cache = self._cached_probabilities(x, cache, None)
        return self._experts(x, probs), cache

    def decode_attention_routed(self, x: jax.Array, cache: RouterCache, q: jax.Array,
                                k: jax.Array) -> tuple[jax.Array, RouterCache]:
        """A-MoE on ``x [B, T, d_model]`` at positions ``cache.length …`` (one step or a prefill chunk): ``q [B, T,
        Hq, D]`` is the attention layer's queries of these tokens and ``k [B, max_len, Hkv, D]`` its key cache with
        their keys written from ``cache.length``."""
        if self.router != "attention":
            raise ValueError(f"decode_attention_routed is for router 'attention', not {self.router!r}")
        check_chunk("x", x, self.d_model, cache.logits.shape[0])
        probs, cache = self._cached_probabilities(x, cache, (q, k))
        return self._experts(x, probs), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class GraphMoEBlockCache:
    """``GraphMoEBlock``'s decoding state: the attention's ``KVCache`` and the router's ``RouterCache``."""

    attention: KVCache
    router: RouterCache


class GraphMoEBlock(nnx.Module):
    """The (S)MoE-Attention block with attention-aware routing (A-MoE, Section 3).

    ``u = x + MHA(LN(x))``, ``y = u + MoE(LN(u))`` where the MoE layer routes by ``Ā·P`` with ``Ā`` the
    head-averaged attention matrix of this block's ``MHA`` (its own q and k, RoPE included, and mask).
    Pre-norm LayerNorms as in GPT-2 / Switch.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads, num_kv_heads, rope: of the ``MultiHeadAttention``.
      num_experts, d_ff, top_k, renormalize, capacity_factor, experts: of the ``GraphMoE`` layer.
      implementation: of every ``attnjax.attention`` call.
      dtype, param_dtype, rngs: as in ``MultiHeadAttention``.
    """

    def __init__(self, d_model: int, num_heads: int, num_experts: int, *, d_ff: int, top_k: int = 2,
                 num_kv_heads: Optional[int] = None, rope: Optional[RoPE] = None, renormalize: bool = False,
                 capacity_factor: Optional[float] = None, experts: str = "dispatch", implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.d_model = d_model
        self.attention_norm = nnx.LayerNorm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.attention = MultiHeadAttention(d_model, num_heads, num_kv_heads=num_kv_heads, rope=rope,
                                            implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)
        self.moe_norm = nnx.LayerNorm(d_model, param_dtype=param_dtype, rngs=rngs)
        self.moe = GraphMoE(d_model, num_experts, d_ff=d_ff, top_k=top_k, router="attention", renormalize=renormalize,
                            capacity_factor=capacity_factor, experts=experts, implementation=implementation,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """The block on ``x [B, T, d_model]``; ``mask`` is the attention's (and so the routing graph's),
        ``positions`` its RoPE positions (default ``arange(T)``). Returns ``[B, T, d_model]``."""
        check_input("x", x, self.d_model)
        mha = self.attention
        xn = self.attention_norm(x)
        q, k = mha.query(xn), mha.key(xn)
        if mha.rope is not None:
            positions = jnp.arange(x.shape[1]) if positions is None else positions
            q, k = mha.rope(q, positions), mha.rope(k, positions)
        u = x + mha(xn, mask=mask, positions=positions)
        return u + self.moe.attention_routed(self.moe_norm(u), q, k, mask=mask).astype(u.dtype)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> GraphMoEBlockCache:
        """The attention's ``KVCache`` and the router's ``RouterCache`` (see their ``init_cache``)."""
        return GraphMoEBlockCache(self.attention.init_cache(batch, max_len, dtype),
                                  self.moe.init_cache(batch, max_len, dtype))

    def decode(self, x_t: jax.Array, cache: GraphMoEBlockCache) -> tuple[jax.Array, GraphMoEBlockCache]:
        """One step, equal to row ``t`` of ``self(x, mask=masks.Causal())`` (with ``capacity_factor=None``).

        Args:
          x_t: ``[B, 1, d_model]``; cache: from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.attention.k.shape[0])
        return self._cached(x_t, cache, "decode")

    def prefill(self, x: jax.Array, cache: GraphMoEBlockCache) -> tuple[jax.Array, GraphMoEBlockCache]:
        """``x [B, T, d_model]`` at the cache's next ``T`` positions in one pass (``MultiHeadAttention.prefill``, then
        the routing of the ``T`` tokens over the cached keys): equal to ``T`` calls of ``decode`` (with
        ``capacity_factor=None``). Returns ``(y [B, T, d_model], cache)``."""
        check_chunk("x", x, self.d_model, cache.attention.k.shape[0])
        return self._cached(x, cache, "prefill")

    def _cached(self, x: jax.Array, cache: GraphMoEBlockCache, method: str) -> tuple[jax.Array, GraphMoEBlockCache]:
        mha = self.attention
        xn = self.attention_norm(x)
        q = mha.query(xn).astype(cache.attention.k.dtype)
        if mha.rope is not None:
            q = mha.rope(q, cache.attention.length + jnp.arange(x.shape[1]))
        y_attention, kv = getattr(mha, method)(xn, cache.attention)
        u = x + y_attention
        y, router = self.moe.decode_attention_routed(self.moe_norm(u), cache.router, q, kv.k)
        return u + y.astype(u.dtype), GraphMoEBlockCache(kv, router)


register_module(ModuleSpec(
    "graph_moe", GraphMoE, dict(d_model=16, num_experts=4, d_ff=24), (2, 9, 16), kind="layer",
    paper="Nguyen et al. 2025 (Improving Routing in Sparse MoE with Graph of Tokens; S-MoE)", causal=True,
    decodes=True))
register_module(ModuleSpec(
    "graph_moe", GraphMoEBlock, dict(d_model=16, num_heads=4, num_experts=4, d_ff=24, num_kv_heads=2,
                                     rope=RoPE(base=100.0)), (2, 9, 16), kind="block",
    paper="Nguyen et al. 2025 (Improving Routing in Sparse MoE with Graph of Tokens; A-MoE)", causal=True,
    decodes=True))
