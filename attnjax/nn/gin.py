"""GIN attention as a Flax NNX module (Buehler 2025, "Graph-Aware Isomorphic Attention for Adaptive
Dynamics in Transformers", arXiv:2501.02393, Fig. 1A and Fig. 3; official code ``LlamaAttentionGIN``).

Per head ``h``: the attention matrix ``A_h = softmax(q_h k_hᵀ/√D)`` is the adjacency matrix of a
graph over the tokens, and a GIN layer (Xu et al. 2019, eq. 4.1) replaces the value product::

    y = concat_h MLP_h((1 + ε_h)·x_h + A_h·x_h)

with ``x_h`` the ``h``-th ``d_model / H`` slice of the input (the official code feeds the hidden
states to the GIN without a value projection) and ``MLP_h = W2·SiLU(RMSNorm(W1·z + b1)) + b2`` of
width ``mlp_ratio·D`` (the official ``GINLayer``, multiplier 2). ``A·x`` and its top-k sparse variant
are ``attnjax.heads.gin.gin_aggregate``: blocked, never storing ``[T, T]``.
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
from attnjax.heads.gin import TOP_K_WEIGHTS, gin_aggregate, gin_combine, gin_head_mlp
from attnjax.nn.checks import check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class GINCache:
    """Keys and node features of the tokens decoded so far, for ``GINAttention.decode``.

    Attributes:
      k: ``[B, max_len, H, D]`` keys (RoPE already applied); slots ``>= length`` are unused.
      h: ``[B, max_len, H, D]`` node features ``x_h`` (the input split into heads).
      length: int32 scalar, the number of filled slots, i.e. the position of the next token.
    """

    k: jax.Array
    h: jax.Array
    length: jax.Array


class GINAttention(nnx.Module):
    """GIN attention: ``y = concat_h MLP_h((1 + ε_h)·x_h + A_h·x_h)``, dense or top-k sparse ``A``.

    Example::

      layer = GINAttention(64, 4, top_k=8, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                  # x, y: [B, T, 64]
      cache = layer.init_cache(B, max_len)
      y_t, cache = layer.decode(x_t, cache)

    Args:
      d_model: features of ``x`` and of the output; split into ``num_heads`` node-feature heads.
      num_heads: heads ``H`` (``d_model % H == 0``); each has its own q/k projection, ``ε`` and MLP.
      top_k: keep each row's ``top_k`` largest attention weights (Sparse-GIN); None keeps all.
      top_k_weights: "attention" (kept edges keep ``A_ij``) or "binary" (weight 1); see ``attnjax.heads.gin``.
      epsilon_init: initial ``ε`` (0, as GIN-0 and the official code).
      mlp_ratio: MLP width ``mlp_ratio·D`` (the official default 2).
      qkv_bias: add a bias to the q/k projections (Llama's ``attention_bias=False``).
      out_proj: add an output projection ``d_model -> d_model`` after the heads (the official
        ``attention_GIN_MLP_o_proj_at_end``; off by default as in its ``GNNConfig``).
      rope: rotary embedding of q and k (the official code applies Llama's RoPE); None for none.
      implementation: of the ``attnjax.attention`` calls ("auto", "reference", "xla", "pallas").
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the weights.
    """

    def __init__(self, d_model: int, num_heads: int, *, top_k: Optional[int] = None,
                 top_k_weights: str = "attention", epsilon_init: float = 0.0, mlp_ratio: int = 2,
                 qkv_bias: bool = False, out_proj: bool = False, rope: Optional[RoPE] = None,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, None)
        check_positive(mlp_ratio=mlp_ratio)
        if top_k is not None:
            check_positive(top_k=top_k)
        if top_k_weights not in TOP_K_WEIGHTS:
            raise ValueError(f"top_k_weights must be one of {TOP_K_WEIGHTS}, got {top_k_weights!r}")
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(head_dim)
        check_implementation(implementation)
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.top_k, self.top_k_weights, self.rope, self.implementation = top_k, top_k_weights, rope, implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        H, D, F = num_heads, head_dim, mlp_ratio * head_dim

        def linear(out_features):
            return nnx.LinearGeneral(d_model, out_features, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)

        self.query, self.key = linear((H, D)), linear((H, D))
        self.epsilon = nnx.Param(jnp.full((H,), epsilon_init, param_dtype))
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.w1 = nnx.Param(init(rngs.params(), (H, D, F), param_dtype))
        self.b1 = nnx.Param(jnp.zeros((H, F), param_dtype))
        self.norm_scale = nnx.Param(jnp.ones((H, F), param_dtype))
        self.w2 = nnx.Param(init(rngs.params(), (H, F, D), param_dtype))
        self.b2 = nnx.Param(jnp.zeros((H, D), param_dtype))
        self.out = (nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                    if out_proj else None)

    def _update(self, h: jax.Array, aggregated: jax.Array, dtype) -> jax.Array:
        """``concat_h MLP_h((1 + ε_h)·h + A·h)`` (then the output projection, if any)."""
        z = gin_combine(h, aggregated, self.epsilon[...])
        y = gin_head_mlp(z, self.w1[...], self.b1[...], self.norm_scale[...], self.w2[...], self.b2[...])
        y = y.reshape(*y.shape[:2], self.d_model).astype(dtype)
        return y if self.out is None else self.out(y)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:2], self.num_heads, self.head_dim)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """GIN attention of ``x`` over itself.

        Args:
          x: ``[B, T, d_model]`` floating point.
          mask: an ``attnjax.masks`` value over ``[B, H, T, T]`` (``masks.Causal()`` for a decoder); a
            masked pair is no edge.
          positions: int ``[B, T]`` or ``[T]`` RoPE positions (default ``arange(T)``).
        Returns:
          ``[B, T, d_model]`` in x's dtype (the projections' ``dtype`` if set).
        """
        check_input("x", x, self.d_model)
        q, k, h = self.query(x), self.key(x), self._heads(x)
        if self.rope is not None:
            positions = jnp.arange(x.shape[1]) if positions is None else positions
            q, k = self.rope(q, positions), self.rope(k, positions)
        h = h.astype(q.dtype)
        aggregated = gin_aggregate(q, k, h, mask=mask, top_k=self.top_k, top_k_weights=self.top_k_weights,
                                   implementation=self.implementation)
        return self._update(h, aggregated, q.dtype)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> GINCache:
        """An empty ``GINCache``: zeros ``[batch, max_len, H, D]`` keys and node features, length 0.
        ``dtype`` defaults to the module's ``dtype``, else ``param_dtype``."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (batch, max_len, self.num_heads, self.head_dim)
        return GINCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: GINCache) -> tuple[jax.Array, GINCache]:
        """One step: token ``x_t`` at position ``cache.length`` links to itself and every cached token.

        ``A·h`` at step ``t`` needs the keys and node features of every earlier token, so the cache
        holds both; the step equals row ``t`` of ``self(x, mask=masks.Causal())``, top-k included (the
        kept keys are chosen among the same ``t + 1`` allowed ones).

        Args:
          x_t: ``[B, 1, d_model]``; cache: from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)`` with the token's key and features written at ``cache.length``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        q, k, h = self.query(x_t).astype(dtype), self.key(x_t).astype(dtype), self._heads(x_t).astype(dtype)
        position = cache.length[None]
        if self.rope is not None:
            q, k = self.rope(q, position), self.rope(k, position)
        start = (0, cache.length, 0, 0)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, start)
        h_all = jax.lax.dynamic_update_slice(cache.h, h, start)
        filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
        aggregated = gin_aggregate(q, k_all, h_all, mask=filled, top_k=self.top_k, top_k_weights=self.top_k_weights,
                                   implementation=self.implementation)
        return self._update(h, aggregated, dtype), GINCache(k_all, h_all, cache.length + 1)


register_module(ModuleSpec(
    "gin", GINAttention, dict(d_model=16, num_heads=2, rope=RoPE(base=100.0)), (2, 9, 16), kind="layer",
    paper="Buehler 2025 (Graph-Aware Isomorphic Attention, GIN-Attention)", causal=True, decodes=True))
register_module(ModuleSpec(
    "sparse_gin", GINAttention, dict(d_model=16, num_heads=2, top_k=3), (2, 9, 16), kind="layer",
    paper="Buehler 2025 (Graph-Aware Isomorphic Attention, Sparse-GIN top-k)", causal=True, decodes=True))
