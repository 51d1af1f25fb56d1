"""2-simplicial attention as a Flax NNX module (Clift et al. 2019; Roy et al., "Fast and Simplex", 2025).

``y = W_o · concat_h Σ_{j,l} softmax_{(j,l)}(⟨q_i, k_j, k'_l⟩/√D) (v_j ⊙ v'_l)`` with five projections
``q, k, v, k', v'`` of the tokens (the second key/value set is what makes the attention
trilinear). Causal layers use Roy et al.'s sliding windows ``w1 × w2`` (``window1``, ``window2``)
to bring the cost from O(T³) to O(T·w1·w2); see ``attnjax.softmax.simplicial``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.softmax.simplicial import simplicial_attention_reference, simplicial_attention_windowed

IMPLEMENTATIONS = ("auto", "reference", "xla")
""""reference": dense O(T³) memory; "xla" (and "auto"): ``simplicial_attention_windowed``, blocked over queries."""


class SimplicialAttention(nnx.Module):
    """Multi-head 2-simplicial attention with separate ``k'``/``v'`` projections.

    Example::

      layer = SimplicialAttention(64, 4, window1=512, window2=32, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())             # x, y: [B, T, 64], causal

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: query heads ``Hq``.
      num_kv_heads: heads of ``k, v, k', v'`` (default ``num_heads``); must divide ``num_heads`` (GQA).
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      causal: pairs ``(j, l)`` at or before the query only; ``False`` attends to all ``T²`` pairs.
      window1, window2: Roy et al.'s causal windows over ``k, v`` and ``k', v'`` (``None``: the whole
        prefix, exact and cubic); they need ``causal=True``.
      block_q: queries per block of the windowed path.
      qkv_bias: bias in the five input projections (the output projection has none).
      implementation: "auto", "reference" or "xla".
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, causal: bool = True, window1: Optional[int] = None,
                 window2: Optional[int] = None, block_q: int = 64, qkv_bias: bool = False,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_kv_heads=num_kv_heads, block_q=block_q)
        for name, w in (("window1", window1), ("window2", window2)):
            if w is not None:
                check_positive(**{name: w})
                if not causal:
                    raise ValueError(f"{name}={w} needs causal=True: the windows of Roy et al. are causal")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"SimplicialAttention implementation must be one of {IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.causal, self.window1, self.window2, self.block_q = causal, window1, window2, block_q
        self.implementation = implementation

        def linear(in_features, out_features, axis=-1, use_bias=qkv_bias):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.query = linear(d_model, (num_heads, head_dim))
        self.key1, self.value1, self.key2, self.value2 = (linear(d_model, (num_kv_heads, head_dim)) for _ in range(4))
        self.out = linear((num_heads, head_dim), d_model, axis=(-2, -1), use_bias=False)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``.

        ``mask``: ``None`` (the layer's ``causal`` setting) or ``masks.Causal()`` (causal either way),
        as in ``MultiHeadAttention``'s call; any other mask raises ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("SimplicialAttention", mask)
        args = (self.query(x), self.key1(x), self.value1(x), self.key2(x), self.value2(x))
        kwargs = dict(causal=self.causal or mask is not None, window1=self.window1, window2=self.window2)
        if self.implementation == "reference":
            out = simplicial_attention_reference(*args, **kwargs)
        else:
            out = simplicial_attention_windowed(*args, block_q=self.block_q, **kwargs)
        return self.out(out)


register_module(ModuleSpec(
    "simplicial", SimplicialAttention, dict(d_model=16, num_heads=2, window1=4, window2=2, block_q=4), (2, 9, 16),
    kind="layer", paper="Clift et al. 2019 (2-simplicial Transformer); Roy et al. 2025 (Fast and Simplex)",
    causal=True))
