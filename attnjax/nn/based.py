"""BASED layers as Flax NNX modules: Taylor linear attention plus sliding-window softmax attention.

Arora et al., "Simple linear attention language models balance the recall-throughput tradeoff"
(2024). BASED mixes two cheap token mixers: linear attention with the 2nd-order Taylor feature map
``φ(x) = [1, x, x⊗x/√2]`` on small projected q/k (``feature_dim`` ≈ 16), for global recall, and
softmax attention over a small sliding window (≈ 64 tokens), for precise local shifts. Both decode
with a constant-size state: the linear state ``Σ φ(k_t)ᵀ[v_t, 1]`` and a ring buffer of the last
``window`` keys/values. ``feature_dim`` and ``window`` dial the state size, hence the
recall-throughput tradeoff.

The paper stacks the two mixers as separate layers of a hybrid stack (zoology's ``Hybrid`` picks
one mixer per layer). ``BasedBlock`` is one period of such a stack in a single module: pre-norm
residual sublayers for the linear mixer, then the sliding-window mixer, then an MLP.
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
from attnjax.linear import linear_attention
from attnjax.dispatch import check_implementation
from attnjax.nn.attention import KVCache, MultiHeadAttention
from attnjax.nn.checks import (check_causal_mask, check_chunk, check_input, check_positive, check_step,
                               resolve_head_dim)
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.nn.transnormer import LinearCache
from attnjax.positional import RoPE


class BasedLinearAttention(nnx.Module):
    """BASED's linear attention: normalized causal attention with the Taylor feature map.

    ``y_s = Σ_{t≤s} φ(q_s)·φ(k_t) v_t / Σ_{t≤s} φ(q_s)·φ(k_t)`` with ``q = x W_q``, ``k = x W_k`` of
    ``feature_dim`` features per head and ``φ(q)·φ(k) = 1 + q·k/√F + (q·k)²/(2F) ≈ exp(q·k/√F)``
    (zoology's ``TaylorExp`` scaling). The state per head is ``[1 + F + F², D + 1]``.

    ``__call__``, ``init_cache`` and ``decode`` take ``MultiHeadAttention``'s arguments, so the layer
    swaps into a model or a generation loop written for it.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: heads ``H``.
      feature_dim: q/k features per head ``F`` before the feature map (16 in the paper).
      head_dim: value features per head ``D`` (default ``d_model // num_heads``).
      chunk_size, implementation: passed to ``attnjax.linear.linear_attention``.
      dtype: computation dtype of the projections; param_dtype: dtype of the parameters.
      rngs: ``params`` initializes the projections (no biases, as in zoology).
    """

    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16, head_dim: Optional[int] = None,
                 chunk_size: int = 64, implementation: str = "auto", dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(feature_dim=feature_dim, chunk_size=chunk_size)
        check_implementation(implementation)
        self.d_model, self.num_heads, self.feature_dim, self.head_dim = d_model, num_heads, feature_dim, head_dim
        self.chunk_size, self.implementation = chunk_size, implementation

        def linear(in_features, out_features, axis=-1):
            return nnx.LinearGeneral(in_features, out_features, axis=axis, use_bias=False, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)

        self.query, self.key = linear(d_model, (num_heads, feature_dim)), linear(d_model, (num_heads, feature_dim))
        self.value = linear(d_model, (num_heads, head_dim))
        self.out = linear((num_heads, head_dim), d_model, axis=(-2, -1))

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """Causal token mixing of ``x [B, T, d_model]``; returns ``[B, T, d_model]``.

        ``mask``: ``None`` or ``masks.Causal()`` (the same, causal, result); the layer is causal by
        construction and refuses any other mask with ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("BasedLinearAttention", mask)
        o = linear_attention(self.query(x), self.key(x), self.value(x), feature_map="taylor", causal=True,
                             normalize=True, chunk_size=self.chunk_size, implementation=self.implementation)
        return self.out(o)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> LinearCache:
        """An empty ``LinearCache``: a zero state ``[batch, H, 1 + F + F², D + 1]`` and length 0.

        The last value column is the normalizer ``Σ φ(k_t)`` (``attnjax.linear`` convention).
        ``MultiHeadAttention.init_cache``'s arguments: ``max_len`` (a positive int) is checked and
        otherwise ignored, since the state does not grow; ``dtype`` is the state's (default float32,
        the library's running-state precision), kept by ``decode``.
        """
        check_positive(batch=batch, max_len=max_len)
        dk = 1 + self.feature_dim + self.feature_dim ** 2
        shape = (batch, self.num_heads, dk, self.head_dim + 1)
        return LinearCache(jnp.zeros(shape, jnp.float32 if dtype is None else dtype), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: LinearCache) -> tuple[jax.Array, LinearCache]:
        """One step on ``x_t [B, 1, d_model]``; equal, position by position, to ``self(x)``."""
        check_step("x_t", x_t, self.d_model, cache.state.shape[0])
        return self._cached(x_t, cache, "recurrent")

    def prefill(self, x: jax.Array, cache: LinearCache) -> tuple[jax.Array, LinearCache]:
        """``x [B, T, d_model]`` at the cache's next ``T`` positions in one chunked ``linear_attention`` pass from the
        cache's state (its final state the new cache): equal to ``T`` calls of ``decode``, O(T) work."""
        check_chunk("x", x, self.d_model, cache.state.shape[0])
        return self._cached(x, cache, self.implementation)

    def _cached(self, x: jax.Array, cache: LinearCache, implementation: str) -> tuple[jax.Array, LinearCache]:
        o, state = linear_attention(self.query(x), self.key(x), self.value(x), feature_map="taylor", causal=True,
                                    normalize=True, chunk_size=self.chunk_size, initial_state=cache.state,
                                    return_state=True, implementation=implementation)
        return self.out(o), LinearCache(state.astype(cache.state.dtype), cache.length + x.shape[1])


class SlidingWindowAttention(MultiHeadAttention):
    """Causal softmax attention over the last ``window`` tokens, with a ring-buffer KV cache.

    ``MultiHeadAttention`` with the mask ``masks.SlidingWindow(window − 1, 0)``: the query at
    position ``p`` sees keys ``p − window + 1 .. p``. ``decode`` keeps only the last
    ``min(window, max_len)`` keys/values: token ``p`` goes to slot ``p mod`` that size (softmax
    ignores the order of the keys, and RoPE is applied before caching, at absolute positions).
    Calls and caches take ``MultiHeadAttention``'s arguments.

    Args:
      d_model, num_heads: as in ``MultiHeadAttention``.
      window: keys each query sees, itself included (64 in BASED).
      **kwargs: the other arguments of ``MultiHeadAttention`` (``num_kv_heads``, ``head_dim``,
        ``qkv_bias``, ``rope``, ``dropout_rate``, ``implementation``, ``dtype``, ``param_dtype``);
        ``mechanism`` must support masks, and decoding needs "softmax".
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int = 64, rngs: nnx.Rngs, **kwargs):
        check_positive(window=window)
        if "context_dim" in kwargs:
            raise ValueError("SlidingWindowAttention is self-attention only; context_dim is not accepted")
        super().__init__(d_model, num_heads, rngs=rngs, **kwargs)
        self.require_support("mask")
        self.window = window

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None, positions: Optional[jax.Array] = None,
                 deterministic: Optional[bool] = None) -> jax.Array:
        """Windowed causal self-attention of ``x [B, T, d_model]``.

        Args:
          x: ``[B, T, d_model]``.
          mask: ``None``, or a mask combined (``&``) with the window, e.g. ``masks.Segments`` for packed
            sequences; ``masks.Causal()`` changes nothing (the window is causal).
          positions, deterministic: as in ``MultiHeadAttention``.
        """
        window = masks.SlidingWindow(self.window - 1, 0)
        return super().__call__(x, mask=window if mask is None else window & mask, positions=positions,
                                deterministic=deterministic)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> KVCache:
        """An empty ring buffer: ``KVCache`` with ``[batch, min(window, max_len), Hkv, D]`` zeros, length 0."""
        check_positive(max_len=max_len)
        return super().init_cache(batch, min(self.window, max_len), dtype)

    def decode(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One step: attend to the token and the ring buffer's tokens in its window, then write it at slot
        ``length mod size`` (``size = min(window, max_len)``).

        Equal, position by position, to ``self(x, deterministic=True)`` for up to ``max_len`` tokens.
        ``cache.length`` counts every token decoded so far (it is not reduced modulo the size).
        """
        self._check_decodable()
        check_step("x_t", x_t, self.d_model, cache.k.shape[0])
        return self._ring_cached(x_t, cache)

    def prefill(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """``x [B, T, d_model]`` at positions ``length … length + T − 1`` in one attention call over the ring
        buffer's ``size`` keys and the ``T`` new ones (each query sees the positions in ``(p − size, p]``), then the
        last ``min(T, size)`` tokens written at their slots: equal to ``T`` calls of ``decode``."""
        self._check_decodable()
        check_chunk("x", x, self.d_model, cache.k.shape[0])
        return self._ring_cached(x, cache)

    def _ring_cached(self, x: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        T, size = x.shape[1], cache.k.shape[1]
        positions = cache.length + jnp.arange(T)
        q, k, v = (p(x).astype(cache.k.dtype) for p in (self.query, self.key, self.value))
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        ring = cache.length - 1 - (cache.length - 1 - jnp.arange(size)) % size   # each slot's position (< 0: empty)
        keys = jnp.concatenate([ring, positions])
        query = positions[:, None]
        seen = (keys[None, :] >= 0) & (keys[None, :] <= query) & (keys[None, :] > query - size)
        out = attention(q, jnp.concatenate([cache.k, k], axis=1), jnp.concatenate([cache.v, v], axis=1),
                        mechanism=self.mechanism, mask=masks.Explicit(seen[None, None]),
                        implementation=self.implementation)
        kept = min(T, size)
        slots = positions[T - kept:] % size
        k_all, v_all = (c.at[:, slots].set(n[:, T - kept:]) for c, n in ((cache.k, k), (cache.v, v)))
        return self.out(out), KVCache(k_all, v_all, cache.length + T)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BasedCache:
    """Decoding state of a ``BasedBlock``: the linear state and the sliding-window ring buffer."""

    linear: LinearCache
    window: KVCache


class BasedBlock(nnx.Module):
    """One BASED period: ``h = x + LinAttn(LN(x))``, ``h = h + SWA(LN(h))``, ``y = h + MLP(LN(h))``.

    The BASED paper interleaves Taylor linear-attention layers and sliding-window layers in a
    hybrid stack; here one block holds one of each, in that order, each a pre-norm residual
    sublayer, followed by a GELU MLP (zoology's blocks: LayerNorm pre-norm, GELU MLP). Stacking
    ``BasedBlock``s gives the alternating stack. (The paper's stacks also use gated convolutions,
    which belong to no attention family and are left out.)

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: heads of the linear attention (small, e.g. 4 with ``feature_dim=16``).
      feature_dim: q/k features per head of the linear attention.
      window: sliding-window size in tokens.
      window_heads: heads of the sliding-window attention (default ``num_heads``).
      mlp_dim: hidden width of the MLP (default ``4·d_model``).
      rope: ``attnjax.positional.RoPE`` for the sliding-window attention, or ``None``.
      dropout_rate: attention dropout of the sliding-window attention.
      chunk_size, implementation: of both mixers.
      dtype, param_dtype, rngs: for every sublayer.
    """

    def __init__(self, d_model: int, num_heads: int, *, feature_dim: int = 16, window: int = 64,
                 window_heads: Optional[int] = None, mlp_dim: Optional[int] = None, rope: Optional[RoPE] = None,
                 dropout_rate: float = 0.0, chunk_size: int = 64, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        mlp_dim = 4 * d_model if mlp_dim is None else mlp_dim
        check_positive(d_model=d_model, mlp_dim=mlp_dim)
        self.d_model = d_model
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_attention = BasedLinearAttention(d_model, num_heads, feature_dim=feature_dim, chunk_size=chunk_size,
                                                     implementation=implementation, **common)
        self.window_attention = SlidingWindowAttention(d_model, window_heads or num_heads, window=window, rope=rope,
                                                       dropout_rate=dropout_rate, implementation=implementation,
                                                       **common)
        self.norm_linear, self.norm_window, self.norm_mlp = (nnx.LayerNorm(d_model, **common) for _ in range(3))
        self.mlp_in, self.mlp_out = nnx.Linear(d_model, mlp_dim, **common), nnx.Linear(mlp_dim, d_model, **common)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None,
                 deterministic: Optional[bool] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal.

        ``mask``: ``None`` or ``masks.Causal()`` (the same, causal, result; the linear mixer refuses
        others); ``deterministic`` as in ``MultiHeadAttention``.
        """
        check_input("x", x, self.d_model)
        h = x + self.linear_attention(self.norm_linear(x), mask=mask)
        h = h + self.window_attention(self.norm_window(h), mask=mask, deterministic=deterministic)
        return h + self._mlp(h)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> BasedCache:
        """Empty linear state and ring buffer (``init_cache`` of each mixer with these arguments)."""
        return BasedCache(self.linear_attention.init_cache(batch, max_len, dtype),
                          self.window_attention.init_cache(batch, max_len, dtype))

    def decode(self, x_t: jax.Array, cache: BasedCache) -> tuple[jax.Array, BasedCache]:
        """One step on ``x_t [B, 1, d_model]``; equal, position by position, to ``self(x, deterministic=True)``."""
        check_step("x_t", x_t, self.d_model, cache.linear.state.shape[0])
        a, linear = self.linear_attention.decode(self.norm_linear(x_t), cache.linear)
        h = x_t + a
        a, window = self.window_attention.decode(self.norm_window(h), cache.window)
        h = h + a
        return h + self._mlp(h), BasedCache(linear, window)

    def prefill(self, x: jax.Array, cache: BasedCache) -> tuple[jax.Array, BasedCache]:
        """``x [B, T, d_model]`` at the cache's next ``T`` positions, one pass per mixer (their ``prefill``);
        equal to ``T`` calls of ``decode``."""
        check_chunk("x", x, self.d_model, cache.linear.state.shape[0])
        a, linear = self.linear_attention.prefill(self.norm_linear(x), cache.linear)
        h = x + a
        a, window = self.window_attention.prefill(self.norm_window(h), cache.window)
        h = h + a
        return h + self._mlp(h), BasedCache(linear, window)

    def _mlp(self, h: jax.Array) -> jax.Array:
        return self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm_mlp(h))))


PAPER = "Arora et al. 2024 (BASED: Simple linear attention language models balance the recall-throughput tradeoff)"
register_module(ModuleSpec("based", BasedLinearAttention, dict(d_model=16, num_heads=2, feature_dim=4, chunk_size=4),
                           (2, 10, 16), kind="layer", paper=PAPER, causal=True, decodes=True))
register_module(ModuleSpec("sliding_window", SlidingWindowAttention,
                           dict(d_model=16, num_heads=2, num_kv_heads=1, window=4, rope=RoPE(base=100.0)),
                           (2, 10, 16), kind="layer", paper=PAPER, causal=True, decodes=True))
register_module(ModuleSpec("based", BasedBlock, dict(d_model=16, num_heads=2, feature_dim=4, window=4, mlp_dim=24,
                                                     chunk_size=4),
                           (2, 10, 16), kind="block", paper=PAPER, causal=True, decodes=True))
