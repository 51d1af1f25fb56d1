"""2-simplicial attention as a Flax NNX module (Clift et al. 2019; Roy et al., "Fast and Simplex", 2025).

``y = W_o · concat_h Σ_{j,l} softmax_{(j,l)}(⟨q_i, k_j, k'_l⟩/√D) (v_j ⊙ v'_l)`` with five projections
``q, k, v, k', v'`` of the tokens (the second key/value set is what makes the attention
trilinear). Causal layers use Roy et al.'s sliding windows ``w1 × w2`` (``window1``, ``window2``)
to bring the cost from O(T³) to O(T·w1·w2); see ``attnjax.softmax.simplicial``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.nn.checks import check_causal_mask, check_chunk, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.softmax.simplicial import simplicial_attention_reference, simplicial_attention_windowed

IMPLEMENTATIONS = ("auto", "reference", "xla")
""""reference": dense O(T³) memory; "xla" (and "auto"): ``simplicial_attention_windowed``, blocked over queries."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class SimplicialCache:
    """The two key/value sets of the tokens so far, for ``SimplicialAttention.decode``/``prefill``.

    Attributes:
      k1, v1, k2, v2: ``[B, max_len, Hkv, D]``, slots ``>= length`` unused.
      length: int32 scalar, the number of filled slots (the position of the next token).
    """

    k1: jax.Array
    v1: jax.Array
    k2: jax.Array
    v2: jax.Array
    length: jax.Array


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
        return self.out(self._attend(*args, **kwargs))

    def _attend(self, *args: jax.Array, **kwargs) -> jax.Array:
        if self.implementation == "reference":
            return simplicial_attention_reference(*args, **kwargs)
        return simplicial_attention_windowed(*args, block_q=self.block_q, **kwargs)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> SimplicialCache:
        """An empty ``SimplicialCache`` of ``max_len`` slots per key/value set (``dtype``: default float32).
        ``NotImplementedError`` for a layer with ``causal=False`` (its outputs read later tokens)."""
        if not self.causal:
            raise NotImplementedError("SimplicialAttention(causal=False) does not decode: every output reads all T² "
                                      "key pairs, later tokens included")
        check_positive(batch=batch, max_len=max_len)
        zeros = jnp.zeros((batch, max_len, self.num_kv_heads, self.head_dim), jnp.float32 if dtype is None else dtype)
        return SimplicialCache(zeros, zeros, zeros, zeros, jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: SimplicialCache) -> tuple[jax.Array, SimplicialCache]:
        """One step: ``x_t [B, 1, d_model]`` at position ``cache.length``; equal to the causal call's row there.
        Returns ``(y_t [B, 1, d_model], cache)`` with the token added."""
        check_step("x_t", x_t, self.d_model, cache.k1.shape[0])
        return self._cached(x_t, cache)

    def prefill(self, x: jax.Array, cache: SimplicialCache) -> tuple[jax.Array, SimplicialCache]:
        """``x [B, T, d_model]`` at positions ``cache.length … cache.length + T − 1`` in one call, each token seeing
        the cached ones and the new ones up to itself: equal to ``T`` calls of ``decode``.
        Returns ``(y [B, T, d_model], cache)`` with the ``T`` tokens added."""
        check_chunk("x", x, self.d_model, cache.k1.shape[0])
        return self._cached(x, cache)

    def _cached(self, x: jax.Array, cache: SimplicialCache) -> tuple[jax.Array, SimplicialCache]:
        """Write the tokens' keys and values at ``cache.length``, roll the cache so the filled slots end at the last
        slot (the windows and the causal rule are relative to the query's position, bottom-right aligned), and
        mask the empty slots out of every pair through ``key_mask``. O(T·w1·w2) on the windowed path."""
        T, S = x.shape[1], cache.k1.shape[1]
        start = (0, cache.length, 0, 0)
        written = [jax.lax.dynamic_update_slice(c, p(x).astype(c.dtype), start) for c, p in
                   ((cache.k1, self.key1), (cache.v1, self.value1), (cache.k2, self.key2), (cache.v2, self.value2))]
        shift = S - T - cache.length
        rolled = [jnp.roll(a, shift, axis=1) for a in written]
        keep = jnp.arange(S) >= shift
        out = self._attend(self.query(x).astype(cache.k1.dtype), *rolled, causal=True, window1=self.window1,
                           window2=self.window2, key_mask=keep[None, None, None, :])
        return self.out(out), SimplicialCache(*written, cache.length + T)


register_module(ModuleSpec(
    "simplicial", SimplicialAttention, dict(d_model=16, num_heads=2, window1=4, window2=2, block_q=4), (2, 9, 16),
    kind="layer", paper="Clift et al. 2019 (2-simplicial Transformer); Roy et al. 2025 (Fast and Simplex)",
    causal=True, decodes=True))
