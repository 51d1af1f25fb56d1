"""EchoAtt's shared attention as Flax NNX modules (Rajabzadeh et al., "EchoAtt: Attend, Copy, then Adjust for
More Efficient Large Language Models", 2024).

In a shared attention block the first (anchor) layer computes its attention map from its own queries and keys;
every later layer of the block keeps only its value and output projections and applies the anchor's map to
its own values, ``out_l = softmax(q_e k_eᵀ·scale)·V_l`` (see ``attnjax.heads.echo``). ``EchoAttention`` is such
a follower layer, fed the anchor's ``(q_e, k_e)``; ``EchoAttentionStack`` is a whole block of residual attention
sublayers, ``h_{l+1} = h_l + Attn_l(h_l)``, whose KV cache holds the anchor's keys once and every layer's values.
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
from attnjax.heads.echo import attention_probabilities, echo_attention, echo_attention_reference
from attnjax.nn.capture import sow_attention_inputs
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.positional import RoPE

IMPLEMENTATIONS = ("auto", "reference", "xla")
""""reference": the anchor's ``[B, H, T, S]`` map stored and multiplied by each layer's values; "xla" (and
"auto"): the map recomputed tile by tile from ``(q_e, k_e)`` (with the anchor's log-sum-exp when ``use_lse``)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class EchoCache:
    """The decoding cache of an ``EchoAttentionStack``: the anchor's keys once, every layer's values.

    Attributes:
      k: ``[B, max_len, Hkv, D]`` anchor keys (RoPE applied); v: ``[L, B, max_len, Hkv, D]`` values of the
      ``L`` layers; length: int32 scalar, the filled slots (the next token's position). ``L + 1`` arrays of
      ``[B, max_len, Hkv, D]`` instead of ``2L`` for ``L`` plain layers.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array


def _linear(in_features, out_features, *, axis=-1, use_bias, dtype, param_dtype, rngs):
    return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=use_bias, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)


class EchoAttention(nnx.Module):
    """A follower layer of a shared attention block: the anchor's attention map on its own values.

    ``y = W_O · softmax(q_e k_eᵀ·scale) · (x W_V)`` (EchoAtt's shared attention): no query or key projection.

    Args:
      d_model, num_heads: features of ``x`` and the heads of the anchor's ``q_e``.
      num_kv_heads: value heads (default ``num_heads``), those of the anchor's ``k_e``; head_dim: per head.
      qkv_bias, out_bias: biases of the value and output projections.
      implementation: "auto", "reference" or "xla" (``IMPLEMENTATIONS``).
      block_q, block_kv: tiles of the ``lse`` pass (``echo_attention``).
      dtype, param_dtype, rngs: as ``MultiHeadAttention``.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qkv_bias: bool = False, out_bias: bool = False,
                 implementation: str = "auto", block_q: int = 512, block_kv: int = 512,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive(num_kv_heads=num_kv_heads, block_q=block_q, block_kv=block_kv)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.implementation, self.block_q, self.block_kv = implementation, block_q, block_kv
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.value = _linear(d_model, (num_kv_heads, head_dim), use_bias=qkv_bias, **common)
        self.out = _linear((num_heads, head_dim), d_model, axis=(-2, -1), use_bias=out_bias, **common)

    def __call__(self, x: jax.Array, q_shared: jax.Array, k_shared: jax.Array, *, mask: Optional[masks.Mask] = None,
                 lse: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, S, d_model]`` (this layer's input, the keys' tokens) with the anchor's ``q_shared [B, T, Hq, D]``,
        ``k_shared [B, S, Hkv, D]`` and optionally its ``lse [B, T, Hq]`` -> ``[B, T, d_model]``; ``mask`` as the
        anchor's."""
        check_input("x", x, self.d_model)
        v = self.value(x).astype(q_shared.dtype)
        sow_attention_inputs(self, q_shared, k_shared, mask=mask, scale=None, mechanism="softmax")
        if self.implementation == "reference":
            out = echo_attention_reference(attention_probabilities(q_shared, k_shared, mask=mask), v)
        else:
            out = echo_attention(q_shared, k_shared, v, lse=lse, mask=mask, block_q=self.block_q,
                                 block_kv=self.block_kv)
        return self.out(out)


class EchoAttentionStack(nnx.Module):
    """A shared attention block of ``num_layers`` residual attention sublayers: the first computes attention, the
    others reuse its map with their own values (EchoAtt's shared attention block).

    ``h_0 = x``; ``h_1 = h_0 + W_O^0 softmax(q_e k_eᵀ) V_0`` with ``q_e = h_0 W_Q``, ``k_e = h_0 W_K``;
    ``h_{l+1} = h_l + W_O^l softmax(q_e k_eᵀ) (h_l W_V^l)``; returns ``h_L``. A model's norms and MLPs between the
    sublayers are left out; build them around ``EchoAttention`` for that.

    Example::

      block = EchoAttentionStack(512, 8, num_layers=3, rope=RoPE(), rngs=nnx.Rngs(0))
      y = block(x, mask=masks.Causal())
      cache = block.init_cache(B, max_len); y_t, cache = block.decode(x_t, cache)

    Args:
      d_model, num_heads, num_kv_heads, head_dim, qkv_bias, out_bias, rope: as ``MultiHeadAttention``.
      num_layers: ``L >= 1`` sublayers sharing one map (the anchor and ``L - 1`` followers).
      use_lse: followers use the anchor's log-sum-exp (``echo_attention(..., lse=)``, no online softmax).
      implementation: "auto", "reference" or "xla" (``IMPLEMENTATIONS``).
      block_q, block_kv: tiles of the followers' ``lse`` pass.
      dtype, param_dtype, rngs: as ``MultiHeadAttention``.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_layers: int = 2, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qkv_bias: bool = False, out_bias: bool = False,
                 rope: Optional[RoPE] = None, use_lse: bool = True, implementation: str = "auto",
                 block_q: int = 512, block_kv: int = 512, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(num_layers=num_layers)
        if rope is not None:
            if not isinstance(rope, RoPE):
                raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
            rope.frequencies(resolve_head_dim(d_model, num_heads, head_dim))
        layer = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                     implementation=implementation, block_q=block_q, block_kv=block_kv, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([EchoAttention(d_model, num_heads, **layer) for _ in range(num_layers)])
        first = self.layers[0]
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = (d_model, num_heads, first.num_kv_heads,
                                                                          first.head_dim)
        self.num_layers, self.rope, self.use_lse, self.implementation = num_layers, rope, use_lse, implementation
        self.dtype, self.param_dtype = dtype, param_dtype
        common = dict(use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = _linear(d_model, (num_heads, first.head_dim), **common)
        self.key = _linear(d_model, (first.num_kv_heads, first.head_dim), **common)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 positions: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, T, d_model] -> h_L [B, T, d_model]``; ``mask``: ``None`` or ``masks.Causal()``; ``positions``:
        RoPE positions ``[T]`` or ``[B, T]`` (default ``arange(T)``)."""
        check_input("x", x, self.d_model)
        check_causal_mask("EchoAttentionStack", mask)
        q, k = self.query(x), self.key(x)
        if self.rope is not None:
            positions = jnp.arange(x.shape[1]) if positions is None else positions
            q, k = self.rope(q, positions), self.rope(k, positions)
        anchor = self.layers[0]
        v0 = anchor.value(x).astype(q.dtype)
        sow_attention_inputs(anchor, q, k, mask=mask, scale=None, mechanism="softmax")
        if self.implementation == "reference":
            p = attention_probabilities(q, k, mask=mask)
            h = x + anchor.out(echo_attention_reference(p, v0))
            for layer in self.layers[1:]:
                sow_attention_inputs(layer, q, k, mask=mask, scale=None, mechanism="softmax")
                h = h + layer.out(echo_attention_reference(p, layer.value(h).astype(q.dtype)))
            return h
        out, lse = attention(q, k, v0, mask=mask, return_lse=True, implementation=self.implementation)
        h = x + anchor.out(out)
        for layer in self.layers[1:]:
            h = h + layer(h, q, k, mask=mask, lse=lse if self.use_lse else None)
        return h

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> EchoCache:
        """An empty ``EchoCache``: the anchor's keys and every layer's values, zeros, length 0."""
        check_positive(batch=batch, max_len=max_len)
        if dtype is None:
            dtype = self.param_dtype if self.dtype is None else self.dtype
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return EchoCache(jnp.zeros(shape, dtype), jnp.zeros((self.num_layers, *shape), dtype),
                         jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: EchoCache) -> tuple[jax.Array, EchoCache]:
        """One causal step at position ``cache.length``, equal to ``self(x, mask=masks.Causal())`` position by
        position: the anchor's one-row map over the cached keys is formed once and applied to each layer's
        cached values (the literal "copy"; ``O(max_len)`` per head).

        Returns ``(h_L [B, 1, d_model], cache)`` with the token's key and values written at ``cache.length``.
        """
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        dtype = cache.k.dtype
        q, k = self.query(x_t).astype(dtype), self.key(x_t).astype(dtype)
        position = cache.length[None]
        if self.rope is not None:
            q, k = self.rope(q, position), self.rope(k, position)
        k_all = jax.lax.dynamic_update_slice(cache.k, k, (0, cache.length, 0, 0))
        filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= cache.length)[None, None, None, :])
        p = attention_probabilities(q, k_all, mask=filled)
        h, values = x_t, []
        for l, layer in enumerate(self.layers):
            v_all = jax.lax.dynamic_update_slice(cache.v[l], layer.value(h).astype(dtype), (0, cache.length, 0, 0))
            values.append(v_all)
            h = h + layer.out(echo_attention_reference(p, v_all))
        return h, EchoCache(k_all, jnp.stack(values), cache.length + 1)


def _follower_inputs(key: jax.Array) -> tuple:
    kx, kq, kk = jax.random.split(key, 3)
    return (jax.random.normal(kx, (2, 9, 16)), jax.random.normal(kq, (2, 9, 4, 4)), jax.random.normal(kk, (2, 9, 2, 4)))


register_module(ModuleSpec(
    "echo_attention", EchoAttention, dict(d_model=16, num_heads=4, num_kv_heads=2, block_q=4, block_kv=4),
    _follower_inputs, kind="other", call_kwargs={"mask": masks.Causal()}, causal=True,
    paper="Rajabzadeh et al. 2024 (EchoAtt: Attend, Copy, then Adjust)"))
register_module(ModuleSpec(
    "echo_stack", EchoAttentionStack, dict(d_model=16, num_heads=4, num_layers=3, num_kv_heads=2,
                                           rope=RoPE(base=100.0), block_q=4, block_kv=4), (2, 9, 16),
    kind="layer", paper="Rajabzadeh et al. 2024 (EchoAtt: Attend, Copy, then Adjust)", causal=True, decodes=True))
