"""Flowformer's Flow-Attention layer as a Flax NNX module over ``attnjax.linear.flow``.

Wu et al., "Flowformer: Linearizing Transformers with Conservation Flows", ICML 2022, §3 (the layer of the
official ``Flow_Attention`` / ``Flow_Attention_Causal``: projections, sigmoid features, Flow-Attention, output
projection). Causal decoding runs the same math as a recurrence on the running flow sums (``FlowState``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.checks import check_positive
from attnjax.dispatch import check_implementation
from attnjax.linear.flow import FLOW_CLAMP, FLOW_EPS, FlowState, flow_attention, flow_attention_step, flow_initial_state
from attnjax.nn.checks import check_causal_mask, check_input, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module


class FlowAttention(nnx.Module):
    """Flow-Attention (Flowformer, §3, eq. 4-7): ``y = FlowAttn(x W_q, x W_k, x W_v) W_o`` with ``φ = sigmoid``.

    ``FlowAttn`` conserves the incoming flow of each query (competition among the values by a softmax over
    the conserved outgoing flow) and the outgoing flow of each key (allocation by a sigmoid of the conserved
    incoming flow); see ``attnjax.linear.flow``. Linear in the sequence length.

    Example::

      layer = FlowAttention(64, 4, causal=True, rngs=nnx.Rngs(0))
      y = layer(x)                                  # x, y: [B, T, 64]
      cache = layer.init_cache(B, max_len)          # max_len is ignored: the state is O(1)
      y_t, cache = layer.decode(x_t, cache)         # x_t, y_t: [B, 1, 64]

    ``__call__``, ``init_cache`` and ``decode`` take ``MultiHeadAttention``'s arguments. The official layer's
    output dropout is left out (no dropout here, as in the other linear layers).

    Parameters: ``4·(d_model·H·D) + 3·H·D + d_model`` with biases (``4·d_model·H·D`` without).

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: heads ``H``.
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      causal: the causal variant (§3.3); ``mask=masks.Causal()`` in the call makes a non-causal layer causal.
      use_bias: biases in the four projections (the official layer has them).
      eps, clamp: of ``flow_attention`` (official defaults ``1e-6`` and ``1``).
      chunk_size, implementation: of ``flow_attention``.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections.
    """

    def __init__(self, d_model: int, num_heads: int, *, head_dim: Optional[int] = None, causal: bool = False,
                 use_bias: bool = True, eps: float = FLOW_EPS, clamp: float = FLOW_CLAMP, chunk_size: int = 64,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(chunk_size=chunk_size)
        check_implementation(implementation)
        self.d_model, self.num_heads, self.head_dim, self.causal = d_model, num_heads, head_dim, causal
        self.eps, self.clamp, self.chunk_size, self.implementation = eps, clamp, chunk_size, implementation

        def linear(in_features, out_features, axis=-1):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.query, self.key, self.value = (linear(d_model, (num_heads, head_dim)) for _ in range(3))
        self.out = linear((num_heads, head_dim), d_model, axis=(-2, -1))

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """Flow-Attention over ``x [B, T, d_model]``; returns ``[B, T, d_model]``.

        ``mask``: ``None`` (the layer's ``causal`` setting) or ``masks.Causal()`` (causal either way); any other
        mask raises ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("FlowAttention", mask)
        o = flow_attention(self.query(x), self.key(x), self.value(x), causal=self.causal or mask is not None,
                           eps=self.eps, clamp=self.clamp, chunk_size=self.chunk_size,
                           implementation=self.implementation)
        return self.out(o)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> FlowState:
        """An empty ``FlowState`` (zeros, length 0) for ``decode``.

        ``max_len`` (a positive int) is checked and otherwise ignored, since the state does not grow; ``dtype``
        is the state's (default float32, the library's running-state precision), kept by ``decode``.
        """
        check_positive(batch=batch, max_len=max_len)
        H, D = self.num_heads, self.head_dim
        return flow_initial_state(batch, H, H, D, D, jnp.float32 if dtype is None else dtype)

    def decode(self, x_t: jax.Array, cache: FlowState) -> tuple[jax.Array, FlowState]:
        """One causal step (``flow_attention_step``): equal, position by position, to ``self(x, mask=masks.Causal())``.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``FlowState`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.kv.shape[0])
        q, k, v = (p(x_t)[:, 0] for p in (self.query, self.key, self.value))
        o, cache = flow_attention_step(q, k, v, cache, eps=self.eps, clamp=self.clamp)
        return self.out(o[:, None]), cache


register_module(ModuleSpec("flow", FlowAttention, dict(d_model=16, num_heads=2, causal=True, chunk_size=4),
                           (2, 9, 16), kind="layer", causal=True, decodes=True,
                           paper="Wu et al. 2022 (Flowformer: Linearizing Transformers with Conservation Flows)"))
