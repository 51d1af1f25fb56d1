"""Aaren as a Flax NNX token mixer (Feng et al., "Attention as an RNN", 2024).

``y_t = W_o · concat_h Σ_{j≤t} softmax_j(q_h·k_j^h / √D) v_j^h`` with ``k = x W_k``, ``v = x W_v`` and
``q_h`` a learned query per head (Aaren's learned token, the same at every step). Training runs
the parallel prefix scan (``attnjax.softmax.aaren.aaren_scan``); decoding folds one token at a
time into a constant-size state (``aaren_step``), with no KV cache.

Aaren is a layer, not an ``attnjax.attention`` mechanism: its queries are learned tokens, not
projections of the input, so ``q [B, T, H, D]`` has no meaning for it. The functional core
(``attnjax.softmax.aaren``) takes one query per head.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.dispatch import dispatch
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.softmax.aaren import AarenState, aaren_init_state, aaren_recurrent, aaren_reference, aaren_scan, aaren_step

PATHS = {"reference": aaren_reference, "recurrent": aaren_recurrent, "xla": aaren_scan}
"""Implementations of the parallel call: "reference" (dense masked ``[T, T]`` logits), "recurrent"
(``aaren_step`` under ``lax.scan``) and "xla" (``aaren_scan``, the prefix scan; what "auto" picks)."""


class Aaren(nnx.Module):
    """Aaren: attention over every prefix from a learned query per head, causal by construction.

    Example::

      layer = Aaren(64, 4, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())             # x, y: [B, T, 64]; y[:, t] depends on x[:, :t+1]
      state = layer.init_cache(B, max_len)          # max_len is ignored: the state is O(1)
      y_t, state = layer.decode(x_t, state)         # x_t, y_t: [B, 1, 64], O(1) memory per step

    ``__call__``, ``init_cache`` and ``decode`` take ``MultiHeadAttention``'s arguments, so the layer
    swaps into a model or a generation loop written for it.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: learned queries ``H``.
      num_kv_heads: key/value heads ``Hkv`` (default ``num_heads``); must divide ``num_heads`` (GQA).
      head_dim: features per head ``D`` (default ``d_model // num_heads``).
      use_bias: bias in the key/value projections (the output projection has none).
      implementation: "auto", or a name in ``PATHS``: "xla" (prefix scan), "recurrent" or "reference".
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections and the queries (standard normal).
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, use_bias: bool = False, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation != "auto" and implementation not in PATHS:
            raise ValueError(f"Aaren implementation must be 'auto' or one of {tuple(PATHS)}, got {implementation!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.implementation = implementation

        def linear(in_features, out_features, axis=-1, bias=use_bias):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.query = nnx.Param(jax.random.normal(rngs.params(), (num_heads, head_dim), param_dtype))
        self.key = linear(d_model, (num_kv_heads, head_dim))
        self.value = linear(d_model, (num_kv_heads, head_dim))
        self.out = linear((num_heads, head_dim), d_model, axis=(-2, -1), bias=False)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; output ``t`` attends over tokens ``0..t``.

        ``mask``: ``None`` or ``masks.Causal()`` (the same, causal, result); the layer is causal by
        construction and refuses any other mask with ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("Aaren", mask)
        k, v = self.key(x), self.value(x)
        q = self.query[...].astype(k.dtype)
        if is_capturing():  # every position's prefix softmax from the one learned query per head
            sow_attention_inputs(self, jnp.broadcast_to(q, (x.shape[0], x.shape[1], *q.shape)), k,
                                 mask=masks.Causal(), scale=None, mechanism="softmax")
        return self.out(dispatch(PATHS, self.implementation, q, k, v, what="Aaren"))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> AarenState:
        """The empty state: ``m = -inf``, ``w = 0`` ``[batch, H]`` and ``u = 0`` ``[batch, H, D]``.

        ``MultiHeadAttention.init_cache``'s arguments: ``max_len`` (a positive int) is checked and
        otherwise ignored, since the state does not grow; ``dtype`` is the state's (default float32,
        the library's running-state precision), kept by ``decode``.
        """
        check_positive(batch=batch, max_len=max_len)
        state = aaren_init_state(batch, self.num_heads, self.head_dim)
        return state if dtype is None else jax.tree.map(lambda a: a.astype(dtype), state)

    def decode(self, x_t: jax.Array, cache: AarenState) -> tuple[jax.Array, AarenState]:
        """One step: fold ``x_t``'s key and value into the state, read the output.

        Equal, position by position, to ``self(x)``.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: an ``AarenState`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], state)``.
        """
        check_step("x_t", x_t, self.d_model, cache.m.shape[0])
        k, v = self.key(x_t)[:, 0], self.value(x_t)[:, 0]
        state, o = aaren_step(cache, k, v, self.query[...].astype(k.dtype))
        return self.out(o[:, None]), jax.tree.map(lambda new, old: new.astype(old.dtype), state, cache)


register_module(ModuleSpec(
    "aaren", Aaren, dict(d_model=16, num_heads=4, num_kv_heads=2), (2, 9, 16), kind="layer",
    paper="Feng et al. 2024 (Attention as an RNN)", causal=True, decodes=True))
