"""Low-rank factorized multi-head attention with a global context vector (LAMA) as a Flax NNX module.

Mehta, Rangwala and Ramakrishnan, "Low Rank Factorization for Compact Multi-Head Self-Attention"
(arXiv:1912.00835): head ``h`` pools the tokens with ``softmax_i tanh((p_h · c)(q_h · x_i))``, where ``c``
is a learned global context vector and ``P, Q ∈ R^{d×H}`` factorize the affinity matrix; the heads'
pooled vectors (the structured embedding ``M = A X``) are concatenated and projected back to
``d_model``. The math, and what was inferred where the paper text was not available, are in
``attnjax.heads.low_rank``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.heads.low_rank import low_rank_attention, low_rank_attention_reference, low_rank_scores
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step
from attnjax.nn.registry import ModuleSpec, register_module

IMPLEMENTATIONS = ("auto", "reference")
""""reference": ``low_rank_attention_reference`` (dense ``[T, T]`` weights); "auto": ``low_rank_attention``
(one pooling, or prefix sums when causal)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class LowRankCache:
    """Running sums of the causal pooling, for ``LowRankAttention.decode``.

    Attributes:
      numerator: ``[B, H, d]``, ``Σ_{i<t} e^{s_{i,h}} x_i``.
      denominator: ``[B, H]``, ``Σ_{i<t} e^{s_{i,h}}``.
      length: int32 scalar, the number of tokens decoded so far.
    """

    numerator: jax.Array
    denominator: jax.Array
    length: jax.Array


class LowRankAttention(nnx.Module):
    """LAMA as a token mixer: ``y_t = concat_h(M_{t,h}) W_o (+ b_o)`` with ``M_{t,h}`` head ``h``'s pooling.

    Non-causal: every position gets the whole sequence's pooling (the paper's sentence embedding);
    causal: position ``t`` pools tokens ``<= t``, and decoding keeps two running sums (no KV cache).

    Example::

      layer = LowRankAttention(64, 8, causal=True, rngs=nnx.Rngs(0))
      y = layer(x)                                         # x, y: [B, T, 64]
      cache = layer.init_cache(B, max_len); y_t, cache = layer.decode(x_t, cache)

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: attention distributions ``H`` (the rank of the factorization).
      causal: pool over the prefix when called with ``mask=None``.
      out_bias: a bias in the output projection ``[H·d_model] -> d_model``.
      implementation: "auto" or "reference" (see ``IMPLEMENTATIONS``).
      dtype: computation dtype; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes ``P, Q, c`` (Glorot uniform, as the PyTorch port) and the projection.
    """

    def __init__(self, d_model: int, num_heads: int, *, causal: bool = False, out_bias: bool = False,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(d_model=d_model, num_heads=num_heads)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"LowRankAttention implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        self.d_model, self.num_heads, self.causal, self.implementation = d_model, num_heads, causal, implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        glorot = nnx.initializers.glorot_uniform()
        self.context_factor = nnx.Param(glorot(rngs.params(), (d_model, num_heads), param_dtype))
        self.token_factor = nnx.Param(glorot(rngs.params(), (d_model, num_heads), param_dtype))
        limit = math.sqrt(6.0 / (d_model + 1))
        self.context = nnx.Param(jax.random.uniform(rngs.params(), (d_model,), param_dtype, -limit, limit))
        self.out = nnx.LinearGeneral((num_heads, d_model), d_model, axis=(-2, -1), use_bias=out_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

    def _factors(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.context_factor[...], self.token_factor[...], self.context[...]

    def attention_weights(self, x: jax.Array) -> jax.Array:
        """The paper's attention matrix ``A [B, H, T]``: ``softmax`` over all tokens of ``x [B, T, d_model]``."""
        check_input("x", x, self.d_model)
        return jax.nn.softmax(jnp.swapaxes(low_rank_scores(x, *self._factors()), 1, 2), axis=-1)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``.

        ``mask``: ``None`` (the layer's ``causal`` setting) or ``masks.Causal()``; any other mask raises
        ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("LowRankAttention", mask)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        pool = low_rank_attention_reference if self.implementation == "reference" else low_rank_attention
        return self.out(pool(x, *self._factors(), causal=self.causal or mask is not None))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> LowRankCache:
        """Empty running sums ``[batch, H, d_model]`` and ``[batch, H]`` (float32 unless ``dtype`` is
        given); ``max_len`` is checked and otherwise unused, since the state does not grow."""
        check_positive(batch=batch, max_len=max_len)
        dtype = jnp.float32 if dtype is None else dtype
        return LowRankCache(jnp.zeros((batch, self.num_heads, self.d_model), dtype),
                            jnp.zeros((batch, self.num_heads), dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: LowRankCache) -> tuple[jax.Array, LowRankCache]:
        """One step: add ``e^{s_t} x_t`` and ``e^{s_t}`` to the sums, output their ratio, projected.

        Equal, position by position, to ``self(x, mask=masks.Causal())``.

        Args:
          x_t: ``[B, 1, d_model]``; cache: a ``LowRankCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.numerator.shape[0])
        w = jnp.exp(low_rank_scores(x_t, *self._factors()))[:, 0]                       # [B, H]
        numerator = cache.numerator + (w[:, :, None] * x_t.astype(jnp.float32)).astype(cache.numerator.dtype)
        denominator = cache.denominator + w.astype(cache.denominator.dtype)
        pooled = numerator.astype(jnp.float32) / denominator.astype(jnp.float32)[:, :, None]
        dtype = x_t.dtype if self.dtype is None else self.dtype
        y = self.out(pooled[:, None].astype(dtype))
        return y, LowRankCache(numerator, denominator, cache.length + 1)


register_module(ModuleSpec(
    "low_rank", LowRankAttention, dict(d_model=16, num_heads=3, causal=True), (2, 9, 16), kind="layer",
    paper="Mehta et al. 2019 (Low Rank Factorization for Compact Multi-Head Self-Attention)",
    causal=True, decodes=True))
