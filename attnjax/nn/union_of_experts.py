"""Union of Experts' selective multi-head attention (SMHA) as a Flax NNX module.

Yang, Lian and Li, "Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed
Transformer" (2025, arXiv:2503.02495; official code ``language_modeling/model/attention/SMHA_v3.py``).
Each head is an expert; a router sends each token to its top-k heads, and each head attends only among
the tokens routed to it; optionally a sample-level router first keeps ``sample_top_k`` heads per sequence
(hierarchical routing). The math, and the choices made where the paper was not available, are in
``attnjax.heads.union_of_experts``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.api import attention
from attnjax.heads.bam import load_balancing_loss
from attnjax.heads.union_of_experts import (sample_routing, selective_attention, selective_attention_reference,
                                            token_routing)
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module

IMPLEMENTATIONS = ("auto", "reference")
""""reference": ``selective_attention_reference`` (every head masked); "auto": ``selective_attention``
(each head gathers its tokens)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SelectiveCache:
    """Per-expert keys and values of the tokens routed to each expert, for ``decode``.

    Attributes:
      k, v: ``[B, L, E, D]``; expert ``e``'s tokens fill slots ``0 .. counts[:, e] - 1`` in order.
      counts: int32 ``[B, E]``, the tokens each expert holds.
      length: int32 scalar, the number of tokens decoded so far.
    """

    k: jax.Array
    v: jax.Array
    counts: jax.Array
    length: jax.Array


class SelectiveMultiHeadAttention(nnx.Module):
    """SMHA: multi-head attention whose heads are experts routed per token (and optionally per sample).

    ``y_t = Σ_e g_{t,e} · attention(q^e_t, K^e_{S_e}, V^e_{S_e}) W_o^e`` over the experts ``e`` that token
    ``t`` is routed to, where ``S_e`` are the tokens routed to ``e`` and ``g`` the router probabilities
    (``attnjax.heads.union_of_experts``). The experts partition ``MultiHeadAttention``'s weights (the
    equivalent decomposition): with every token routed to every head and unit gates, the core is MHA.
    ``load_balancing_loss`` gives the router's auxiliary loss.

    Example::

      layer = SelectiveMultiHeadAttention(64, 8, top_k=4, capacity=64, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                     # x, y: [B, T, 64]
      aux = layer.load_balancing_loss(x)

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: heads = experts ``E``.
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      top_k: experts per token (default ``num_heads // 2``, the official code's).
      capacity: tokens per expert (Switch-style, first come by position), or ``None`` for no limit.
      sample_top_k: experts kept per sample by the sample-level router (``None``: no sample routing);
        it reads the whole sequence, so such a layer is not causal.
      causal: the layer's attention is causal when called with ``mask=None``.
      implementation: "auto" or "reference" (see ``IMPLEMENTATIONS``).
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections and routers.
    """

    def __init__(self, d_model: int, num_heads: int, *, head_dim: Optional[int] = None, top_k: Optional[int] = None,
                 capacity: Optional[int] = None, sample_top_k: Optional[int] = None, causal: bool = True,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        top_k = max(num_heads // 2, 1) if top_k is None else top_k
        check_positive(top_k=top_k)
        if top_k > num_heads:
            raise ValueError(f"top_k ({top_k}) must be at most num_heads ({num_heads})")
        if capacity is not None:
            check_positive(capacity=capacity)
        if sample_top_k is not None:
            check_positive(sample_top_k=sample_top_k)
            if not top_k <= sample_top_k <= num_heads:
                raise ValueError(f"sample_top_k ({sample_top_k}) must be in [top_k, num_heads] = [{top_k}, "
                                 f"{num_heads}]")
            if causal:
                raise ValueError("sample_top_k routes on the whole sequence, so the layer can't be causal; "
                                 "pass causal=False")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"SelectiveMultiHeadAttention implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.top_k, self.capacity, self.sample_top_k = top_k, capacity, sample_top_k
        self.causal, self.implementation = causal, implementation
        self.dtype, self.param_dtype = dtype, param_dtype

        def linear():
            return nnx.LinearGeneral(d_model, (num_heads, head_dim), use_bias=False, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.router = nnx.Linear(d_model, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.sample_router = (None if sample_top_k is None else
                              nnx.Linear(d_model, num_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        self.query, self.key, self.value = linear(), linear(), linear()
        init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,))
        self.out_kernel = nnx.Param(init(rngs.params(), (num_heads, head_dim, d_model), param_dtype))

    def routing(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(selected [B, T, E] bool, gates [B, T, E], probs [B, T, E])`` for ``x [B, T, d_model]``.

        The sample router (if any) keeps ``sample_top_k`` experts per sequence from the mean token; the
        token router picks ``top_k`` of those per token, capped at ``capacity`` tokens per expert;
        gates are the token router's probabilities times the sample router's. ``probs``: the token
        router's softmax over the allowed experts (for the load-balancing loss).
        """
        return self._route(x, self.capacity)

    def _route(self, x: jax.Array, capacity: Optional[int]) -> tuple[jax.Array, jax.Array, jax.Array]:
        allowed, sample_gates = None, None
        if self.sample_router is not None:
            allowed, sample_gates = sample_routing(self.sample_router(jnp.mean(x, axis=1)), self.sample_top_k)
        logits = self.router(x).astype(jnp.float32)
        selected, gates = token_routing(logits, self.top_k, capacity=capacity, allowed=allowed)
        if sample_gates is not None:
            gates = gates * sample_gates[:, None, :]
            logits = jnp.where(allowed[:, None, :], logits, -jnp.inf)
        return selected, gates, jax.nn.softmax(logits, axis=-1)

    def load_balancing_loss(self, x: jax.Array) -> jax.Array:
        """Switch's ``E · Σ_e f_e P_e`` over the tokens of ``x [B, T, d_model]`` (float32 scalar), with
        ``f`` the share of the tokens' top-k choices (before the capacity cap) that go to each expert
        and ``P`` the token router's mean probability (``attnjax.heads.bam.load_balancing_loss``)."""
        check_input("x", x, self.d_model)
        selected, _, probs = self._route(x, None)
        return load_balancing_loss(probs, selected)

    def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        w = (self.query.kernel[...], self.key.kernel[...], self.value.kernel[...], self.out_kernel[...])
        return w if self.dtype is None else tuple(a.astype(self.dtype) for a in w)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``.

        ``mask``: ``None`` (the layer's ``causal`` setting) or ``masks.Causal()``; any other mask raises
        ``NotImplementedError`` (the routing decides which tokens each head sees).
        """
        check_input("x", x, self.d_model)
        check_causal_mask("SelectiveMultiHeadAttention", mask)
        causal = self.causal or mask is not None
        if causal and self.sample_router is not None:
            raise NotImplementedError("a SelectiveMultiHeadAttention with sample_top_k routes on the whole "
                                      "sequence, so it can't be causal (mask=masks.Causal())")
        selected, gates, _ = self.routing(x)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        args = (x, *self._weights(), selected, gates)
        if self.implementation == "reference":
            return selective_attention_reference(*args, causal=causal)
        return selective_attention(*args, causal=causal, capacity=self.capacity)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> SelectiveCache:
        """An empty ``SelectiveCache``: zeros ``[batch, L, E, D]`` with ``L = min(max_len, capacity)``, zero
        counts and length 0; ``dtype`` defaults to ``dtype``, else ``param_dtype``."""
        check_positive(batch=batch, max_len=max_len)
        if not self.causal or self.sample_router is not None:
            raise NotImplementedError("decoding needs a causal layer without sample routing (causal=True, "
                                      "sample_top_k=None)")
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        slots = max_len if self.capacity is None else min(max_len, self.capacity)
        shape = (batch, slots, self.num_heads, self.head_dim)
        return SelectiveCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                              jnp.zeros((batch, self.num_heads), jnp.int32), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: SelectiveCache) -> tuple[jax.Array, SelectiveCache]:
        """One step: route ``x_t``, append its keys/values to its experts, attend within each expert.

        Equal, position by position, to ``self(x, mask=masks.Causal())``: an expert already holding
        ``capacity`` tokens drops the new one, as in the parallel call.

        Args:
          x_t: ``[B, 1, d_model]``; cache: a ``SelectiveCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        B, L, E, D = cache.k.shape
        w_q, w_k, w_v, w_o = self._weights()
        routed, gates = token_routing(self.router(x_t).astype(jnp.float32), self.top_k)
        kept = routed[:, 0] & (cache.counts < L)                                          # [B, E]
        q, k, v = (jnp.einsum("btd,dek->btek", x_t, w).astype(dtype) for w in (w_q, w_k, w_v))
        write = (jnp.arange(L)[None, :, None] == cache.counts[:, None, :]) & kept[:, None, :]   # [B, L, E]
        k_all = jnp.where(write[..., None], k, cache.k)
        v_all = jnp.where(write[..., None], v, cache.v)
        counts = cache.counts + kept.astype(jnp.int32)
        visible = masks.Explicit((jnp.arange(L)[None, None, :] < counts[:, :, None])[:, :, None, :])
        out = attention(q, k_all, v_all, mask=visible)                                   # [B, 1, E, D]
        weight = jnp.where(kept, gates[:, 0], 0.0).astype(jnp.float32)
        y = jnp.einsum("bted,be,edm->btm", out.astype(jnp.float32), weight, w_o.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
        return y.astype(x_t.dtype), SelectiveCache(k_all, v_all, counts, cache.length + 1)


register_module(ModuleSpec(
    "smha", SelectiveMultiHeadAttention, dict(d_model=16, num_heads=4, top_k=2, capacity=6), (2, 9, 16),
    kind="layer", paper="Yang et al. 2025 (Union of Experts: hierarchical routing, selective multi-head attention)",
    causal=True, decodes=True))
register_module(ModuleSpec(
    "smha_hierarchical", SelectiveMultiHeadAttention,
    dict(d_model=16, num_heads=4, top_k=1, sample_top_k=3, causal=False), (2, 9, 16), kind="layer",
    paper="Yang et al. 2025 (Union of Experts: expert selection per sample, data selection per token)"))
