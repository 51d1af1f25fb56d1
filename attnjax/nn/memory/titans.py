"""Titans: the neural long-term memory combined with attention (Behrouz, Zhong and Mirrokni, "Titans: Learning to
Memorize at Test Time", arXiv:2501.00663, 2025, Section 4): memory as a context (MAC, Sec. 4.1), as a gate (MAG,
Sec. 4.2) and as a layer (MAL, Sec. 4.3), each with persistent memory tokens (Sec. 3.3, eq. 19).

Every variant owns a ``NeuralMemoryLayer`` (``attnjax.nn.memory.neural_memory_layer``: projections, convolution,
data-dependent gates, the memory ``M`` chosen by ``memory=`` (Titans' linear or deep memory, Miras' Moneta, Yaad,
Memora), and its gated output projection), attention projections (``attention_projections``, GQA through
``num_kv_heads``) and ``N_p`` persistent tokens ``P = [p_1 … p_Np]`` (learnable ``[N_p, d_model]``). Attention is
``attnjax.attention`` (softmax). The combination ``⊗`` of eqs. 25 and 28 is, as the paper describes its
experiments for MAG, the two outputs normalized with learnable vector-valued weights and a nonlinearity:
``y ⊗ m = RMSNorm_y(y) ⊙ σ(RMSNorm_m(m))`` (σ the sigmoid, on the memory branch, as titans-pytorch's
attention-output gating by the memory). Residual connections and pre-norms are the surrounding block's.

No positional encoding is applied (the paper names none; order comes from the causal masks and the memory's
convolution and recurrence). lucidrains/titans-pytorch (unofficial; no official code is public) builds MAC
differently: learned long-term memory tokens are interleaved into each segment, the memory reads and writes the
layer input (not the attention output) and its read is added to the residual stream or gates the attention
output; it has no MAG or MAL. The variants here follow the paper's equations.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.api import attention
from attnjax.nn.attention import KVCache, attention_projections
from attnjax.nn.checks import check_causal_mask, check_input, check_positive, check_step, resolve_head_dim
from attnjax.nn.memory.neural_memory_layer import (MemoryConfig, NeuralMemoryCache, NeuralMemoryLayer, cast_floats,
                                                    prepend_persistent)
from attnjax.nn.registry import ModuleSpec, register_module

PAPER = "Behrouz, Zhong and Mirrokni 2025 (Titans: Learning to Memorize at Test Time)"


def _check_count(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


class _TitansParts:
    """The parts every variant has (a mixin of the modules below): the memory layer, attention projections,
    persistent tokens and the ⊗ norms."""

    def build(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int], head_dim: Optional[int],
                 num_persistent: int, memory_heads: Optional[int], memory_head_dim: Optional[int], chunk_size: int,
                 conv_size: int, memory: Union[str, MemoryConfig], max_lr: float, implementation: str,
                 dtype: Optional[Dtype], param_dtype: Dtype, rngs: nnx.Rngs, gate: bool):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        check_positive(num_kv_heads=num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        _check_count(num_persistent=num_persistent)
        memory_heads = num_heads if memory_heads is None else memory_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.memory = NeuralMemoryLayer(d_model, memory_heads, head_dim=memory_head_dim, chunk_size=chunk_size,
                                        conv_size=conv_size, memory=memory, max_lr=max_lr,
                                        implementation=implementation, **common)
        self.query, self.key, self.value, self.out = attention_projections(d_model, num_heads, num_kv_heads,
                                                                           head_dim, **common)
        self.persistent = (nnx.Param(jax.random.normal(rngs.params(), (num_persistent, d_model), param_dtype))
                           if num_persistent else None)
        self.attention_norm = nnx.RMSNorm(d_model, **common) if gate else None
        self.memory_norm = nnx.RMSNorm(d_model, **common) if gate else None
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.num_persistent, self.dtype, self.param_dtype = num_persistent, dtype, param_dtype

    def combine(self, y: jax.Array, m: jax.Array) -> jax.Array:
        """``y ⊗ m = RMSNorm_y(y) ⊙ σ(RMSNorm_m(m))`` (eqs. 25, 28)."""
        return self.attention_norm(y) * jax.nn.sigmoid(self.memory_norm(m))

    def persistent_kv(self, batch: int, dtype) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
        """Keys and values of the persistent tokens ``[batch, N_p, Hkv, D]`` in ``dtype`` (None without them)."""
        if self.persistent is None:
            return None, None
        p = self.persistent[...]
        if self.dtype is not None:
            p = p.astype(self.dtype)
        return tuple(jnp.broadcast_to(f(p).astype(dtype), (batch, *f(p).shape)) for f in (self.key, self.value))

    def cache_dtype(self, dtype: Optional[Dtype]):
        return (self.param_dtype if self.dtype is None else self.dtype) if dtype is None else dtype


# ---- MAC ---------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TitansMACCache:
    """Decoding state of ``TitansMAC``.

    Attributes:
      memory: the memory layer's cache after the tokens so far (its convolution rows over the attention outputs
        ``y`` and the running memory ``M_(s−1)`` updated by the current segment's tokens).
      segment_memory: the memory before the current segment, ``M_(s−1)``, which the segment's tokens read (eq. 21).
      query_conv: the memory convolution's rows over the inputs x (for the eq. 21 queries), or None.
      kv: keys and values of the current segment: slots ``0..L−1`` the memory tokens ``h`` (eq. 22), slots
        ``L..2L−1`` the segment's tokens; ``kv.length`` counts every token decoded.
    """

    memory: NeuralMemoryCache
    segment_memory: object
    query_conv: Optional[jax.Array]
    kv: KVCache


class TitansMAC(_TitansParts, nnx.Module):
    """Titans MAC, memory as a context (Titans Sec. 4.1, eqs. 21-25; Fig. 2, Fig. 3a): ``[B, T, d] -> [B, T, d]``.

    The sequence is split into segments ``S^(s)`` of ``segment_size`` L tokens. For segment s, with ``M_(s−1)`` the
    memory after the previous segments:

        h = M*_(s−1)(q),  q from S^(s) (the memory layer's query stream)                   (eq. 21)
        S̃ = [p_1 … p_Np] ‖ h ‖ S^(s)                                                         (eq. 22)
        y = Attn(S̃) at the positions of S^(s)                                               (eq. 23)
        M_s = M_(s−1)(y): the memory written with y, token by token                         (eq. 24)
        o = y ⊗ M*(y), each token reading the memory after its own write                    (eq. 25)

    ``h`` is read by the memory layer (``NeuralMemoryLayer.read`` then its gated output projection with S^(s) as
    the gate's input), so the memory tokens are ``d_model`` vectors that attention projects like the others.

    Causality, where the equations leave it open: ``h_j`` is read with the query of token j, so a token i of the
    segment attends to the persistent tokens, to ``h_0 … h_i`` and to ``S_0 … S_i`` (a plain causal mask over the
    concatenation would show token i every ``h_j``, including those computed from later tokens); and eq. 25's
    read for token i is of the memory after token i's own write (the memory after the whole segment would let
    later tokens in). With these the layer is causal, and decoding (memory writes token by token, the segment's
    attention context growing inside the segment, ``M_(s−1)`` held for the reads) equals the parallel call. The
    outputs of attention at the persistent and memory-token positions are not used.

    Args:
      d_model: features of ``x`` and of the output.
      num_heads: attention query heads; num_kv_heads: attention key/value heads (GQA; default ``num_heads``).
      segment_size: L, the attention's segment (a multiple of ``chunk_size``).
      num_persistent: ``N_p`` persistent tokens (eq. 19; 0: none).
      head_dim: attention head dim (default ``d_model // num_heads``).
      memory_heads, memory_head_dim: the memory's heads and head dim (defaults ``num_heads``,
        ``d_model // memory_heads``).
      chunk_size, conv_size, memory, max_lr, implementation: of the ``NeuralMemoryLayer``.
      dtype, param_dtype, rngs: as usual.
    """

    def __init__(self, d_model: int, num_heads: int, *, segment_size: int = 64, num_persistent: int = 4,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 memory_heads: Optional[int] = None, memory_head_dim: Optional[int] = None, chunk_size: int = 1,
                 conv_size: int = 4, memory: Union[str, MemoryConfig] = "titans_linear", max_lr: float = 1.0,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(segment_size=segment_size, chunk_size=chunk_size)
        if segment_size % chunk_size:
            raise ValueError(f"segment_size ({segment_size}) must be a multiple of chunk_size ({chunk_size}): the "
                             "memory is written segment by segment, in whole chunks")
        self.build(d_model, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, num_persistent=num_persistent,
                   memory_heads=memory_heads, memory_head_dim=memory_head_dim, chunk_size=chunk_size,
                   conv_size=conv_size, memory=memory, max_lr=max_lr, implementation=implementation, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, gate=True)
        self.segment_size = segment_size

    def segment_mask(self) -> jax.Array:
        """bool ``[L, N_p + 2L]``: token i sees every persistent token, ``h_j`` and ``S_j`` for ``j ≤ i``."""
        L = self.segment_size
        i, j = jnp.arange(L)[:, None], jnp.arange(2 * L)[None, :] % L
        return jnp.concatenate([jnp.ones((L, self.num_persistent), bool), j <= i], axis=1)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Attention of the segment queries ``q`` over ``[P ‖ h ‖ S]`` (``k``, ``v``: the ``h ‖ S`` part, ``[B, 2L,
        Hkv, D]``) under ``mask`` (``segment_mask`` rows), through the output projection: ``[B, L, d_model]``."""
        k_p, v_p = self.persistent_kv(q.shape[0], k.dtype)
        if k_p is not None:
            k, v = jnp.concatenate([k_p, k], axis=1), jnp.concatenate([v_p, v], axis=1)
        return self.out(attention(q, k, v, mask=masks.Explicit(mask)))

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal (see the class docstring); T need not be a multiple of
        L (the last segment is padded, and the padding's outputs dropped).

        ``mask``: None or ``masks.Causal()`` (the same, causal, result); other masks raise ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("TitansMAC", mask)
        B, T, _ = x.shape
        L = self.segment_size
        N = -(-T // L)
        x = jnp.pad(x, ((0, 0), (0, N * L - T), (0, 0)))
        queries, _, _, _ = self.memory.project(x)                                     # eq. 21's q, [B, N·L, H, D]
        segments = lambda a: jnp.moveaxis(a.reshape(B, N, L, *a.shape[2:]), 1, 0)  # noqa: E731
        xs = tuple(segments(a) for a in (x, queries, self.query(x), self.key(x), self.value(x)))
        mask = self.segment_mask()

        def segment(cache: NeuralMemoryCache, inputs):
            x_s, q_mem, q, k, v = inputs
            h = self.memory.output(self.memory.read(q_mem, cache.state.memory), x_s)     # eq. 21
            k_all = jnp.concatenate([self.key(h), k], axis=1)                             # eq. 22
            v_all = jnp.concatenate([self.value(h), v], axis=1)
            y = self.attend(q, k_all, v_all, mask)                                         # eq. 23
            m, cache = self.memory.scan(y, cache)                                          # eqs. 24-25
            return cache, self.combine(y, m)

        _, out = jax.lax.scan(segment, self.memory.initial_cache(B), xs)
        return jnp.moveaxis(out, 0, 1).reshape(B, N * L, -1)[:, :T]

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> TitansMACCache:
        """An empty cache: memory state, convolution rows and the segment's ``2L`` key/value slots (it does not
        grow with ``max_len``, which is checked and otherwise unused). Float leaves in ``dtype`` (default: the
        key/value slots in the module's dtype, else ``param_dtype``; the memory in float32)."""
        check_positive(batch=batch, max_len=max_len)
        kv_dtype = self.cache_dtype(dtype)
        memory = cast_floats(self.memory.initial_cache(batch), jnp.float32 if dtype is None else dtype)
        shape = (batch, 2 * self.segment_size, self.num_kv_heads, self.head_dim)
        kv = KVCache(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype), jnp.zeros((), jnp.int32))
        return TitansMACCache(memory, memory.state.memory, memory.conv, kv)

    def decode(self, x_t: jax.Array, cache: TitansMACCache) -> tuple[jax.Array, TitansMACCache]:
        """One step, equal, position by position, to ``self(x)``: at a segment's first token the segment memory
        becomes the running memory; the token's memory read ``h_t`` and its keys/values go to slots ``i`` and
        ``L + i`` (``i`` = its index in the segment); it attends to ``P``, slots ``0..i`` and ``L..L+i``; its
        attention output is written into the running memory and read back.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``TitansMACCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        check_step("x_t", x_t, self.d_model, cache.kv.k.shape[0])
        L = self.segment_size
        i = cache.kv.length % L
        running = cache.memory.state.memory
        segment_memory = jax.tree.map(lambda s, r: jnp.where(i == 0, r, s), cache.segment_memory, running)
        q_mem, _, _, query_conv = self.memory.project(x_t, cache.query_conv)
        h = self.memory.output(self.memory.read(q_mem, segment_memory), x_t)
        dtype = cache.kv.k.dtype
        write = lambda buf, a, slot: jax.lax.dynamic_update_slice(buf, a.astype(dtype), (0, slot, 0, 0))  # noqa
        k_all = write(write(cache.kv.k, self.key(h), i), self.key(x_t), L + i)
        v_all = write(write(cache.kv.v, self.value(h), i), self.value(x_t), L + i)
        valid = jnp.arange(2 * L) % L <= i
        mask = jnp.concatenate([jnp.ones((self.num_persistent,), bool), valid])[None, :]
        y = self.attend(self.query(x_t).astype(dtype), k_all, v_all, mask)
        m, memory = self.memory.advance(y, cache.memory)
        conv = None if query_conv is None else query_conv.astype(cache.query_conv.dtype)
        segment_memory = cast_floats(segment_memory, jax.tree.leaves(cache.segment_memory)[0].dtype)
        return self.combine(y, m), TitansMACCache(memory, segment_memory, conv,
                                                  KVCache(k_all, v_all, cache.kv.length + 1))


# ---- MAG and MAL ---------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TitansWindowCache:
    """Decoding state of ``TitansMAG`` / ``TitansMAL``: the memory layer's cache and a ring buffer of the
    sliding window's keys and values (``window.length`` counts the tokens decoded, persistent tokens excluded)."""

    memory: NeuralMemoryCache
    window: KVCache


class _WindowParts(_TitansParts):
    """MAG and MAL (a mixin): sliding-window attention of ``window`` keys beside or after the memory layer."""

    def build_window(self, d_model: int, num_heads: int, *, window: int, gate: bool, **kwargs):
        check_positive(window=window)
        self.build(d_model, num_heads, gate=gate, **kwargs)
        self.window = window

    def prefixed(self, x: jax.Array) -> jax.Array:
        """``x̃ = [p_1 … p_Np] ‖ x`` (eqs. 26, 29)."""
        return x if self.persistent is None else prepend_persistent(self.persistent[...], x)

    def ring(self, batch: int, size: int, dtype) -> KVCache:
        shape = (batch, size, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


class TitansMAG(_WindowParts, nnx.Module):
    """Titans MAG, memory as a gate (Titans Sec. 4.2, eqs. 26-28; Fig. 3b, Fig. 4): ``[B, T, d] -> [B, T, d]``.

        x̃ = [p_1 … p_Np] ‖ x                                                                (eq. 26)
        y = SW-Attn*(x̃): sliding-window attention with the persistent tokens as a prefix    (eq. 27)
        o = y ⊗ M(x̃): the memory layer on x̃, each token's read after its own write          (eq. 28)

    A token sees every persistent token and the last ``window`` tokens of x̃, itself included (the mask
    ``masks.SlidingWindow(window − 1, 0) | prefix``, Fig. 3b). The memory layer reads the same x̃, so the
    persistent tokens are written into the memory first. Outputs at the persistent positions are dropped.
    Decoding keeps a ring buffer of ``min(window, max_len)`` keys/values and the memory layer's state.

    Args:
      d_model, num_heads, num_kv_heads, head_dim, num_persistent, memory_heads, memory_head_dim, chunk_size,
      conv_size, memory, max_lr, implementation, dtype, param_dtype, rngs: as in ``TitansMAC``.
      window: the keys each token sees in x̃, itself included (persistent tokens always seen besides).
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int = 64, num_persistent: int = 4,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 memory_heads: Optional[int] = None, memory_head_dim: Optional[int] = None, chunk_size: int = 1,
                 conv_size: int = 4, memory: Union[str, MemoryConfig] = "titans_linear", max_lr: float = 1.0,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.build_window(d_model, num_heads, window=window, gate=True, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, num_persistent=num_persistent, memory_heads=memory_heads,
                          memory_head_dim=memory_head_dim, chunk_size=chunk_size, conv_size=conv_size, memory=memory,
                          max_lr=max_lr, implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal.

        ``mask``: None or ``masks.Causal()`` (the same, causal, result); other masks raise ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("TitansMAG", mask)
        x_tilde = self.prefixed(x)
        m, _ = self.memory.scan(x_tilde, self.memory.initial_cache(x.shape[0]))
        window = masks.SlidingWindow(self.window - 1, 0)
        if self.num_persistent:
            window = window | masks.Explicit((jnp.arange(x_tilde.shape[1]) < self.num_persistent)[None, :])
        y = self.out(attention(self.query(x), self.key(x_tilde), self.value(x_tilde), mask=window))
        return self.combine(y, m[:, self.num_persistent:])

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> TitansWindowCache:
        """The memory layer's cache after the persistent tokens (float32 unless ``dtype``) and an empty ring buffer
        of ``min(window, max_len)`` slots (the module's dtype unless ``dtype``)."""
        check_positive(batch=batch, max_len=max_len)
        prefix = None if self.persistent is None else self.persistent[...]
        _, memory = self.memory.persistent_cache(prefix, batch, dtype)
        return TitansWindowCache(memory, self.ring(batch, min(self.window, max_len), self.cache_dtype(dtype)))

    def decode(self, x_t: jax.Array, cache: TitansWindowCache) -> tuple[jax.Array, TitansWindowCache]:
        """One step, equal, position by position, to ``self(x)``: the token's keys/values go to ring slot
        ``length mod size``; it attends to the persistent tokens and the filled slots; the memory layer takes one
        step.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``TitansWindowCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        ring = cache.window
        check_step("x_t", x_t, self.d_model, ring.k.shape[0])
        dtype, size = ring.k.dtype, ring.k.shape[1]
        start = (0, ring.length % size, 0, 0)
        k_all = jax.lax.dynamic_update_slice(ring.k, self.key(x_t).astype(dtype), start)
        v_all = jax.lax.dynamic_update_slice(ring.v, self.value(x_t).astype(dtype), start)
        k, v = k_all, v_all
        k_p, v_p = self.persistent_kv(x_t.shape[0], dtype)
        filled = jnp.arange(size) <= ring.length
        if k_p is not None:
            k, v = jnp.concatenate([k_p, k], axis=1), jnp.concatenate([v_p, v], axis=1)
            filled = jnp.concatenate([jnp.ones((self.num_persistent,), bool), filled])
        y = self.out(attention(self.query(x_t).astype(dtype), k, v, mask=masks.Explicit(filled[None, :])))
        m, memory = self.memory.advance(x_t, cache.memory)
        return self.combine(y, m), TitansWindowCache(memory, KVCache(k_all, v_all, ring.length + 1))


class TitansMAL(_WindowParts, nnx.Module):
    """Titans MAL, memory as a layer (Titans Sec. 4.3, eqs. 29-31; Fig. 5): ``[B, T, d] -> [B, T, d]``.

        x̃ = [p_1 … p_Np] ‖ x                                                     (eq. 29)
        y = M(x̃): the memory layer on x̃                                          (eq. 30; the paper prints M(x))
        o = SW-Attn(y): sliding-window attention over y, the last ``window``
            positions of x̃ (persistent positions included while in the window)   (eq. 31)

    The output projection of the memory layer feeds the attention's projections; no ⊗ gate. Decoding keeps a ring
    buffer of ``min(window, N_p + max_len)`` keys/values, filled at ``init_cache`` with the persistent tokens'
    memory outputs, and the memory layer's state.

    Args: as in ``TitansMAG``.
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int = 64, num_persistent: int = 4,
                 num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 memory_heads: Optional[int] = None, memory_head_dim: Optional[int] = None, chunk_size: int = 1,
                 conv_size: int = 4, memory: Union[str, MemoryConfig] = "titans_linear", max_lr: float = 1.0,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.build_window(d_model, num_heads, window=window, gate=False, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, num_persistent=num_persistent, memory_heads=memory_heads,
                          memory_head_dim=memory_head_dim, chunk_size=chunk_size, conv_size=conv_size, memory=memory,
                          max_lr=max_lr, implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``, causal.

        ``mask``: None or ``masks.Causal()`` (the same, causal, result); other masks raise ``NotImplementedError``.
        """
        check_input("x", x, self.d_model)
        check_causal_mask("TitansMAL", mask)
        y, _ = self.memory.scan(self.prefixed(x), self.memory.initial_cache(x.shape[0]))
        q = self.query(y[:, self.num_persistent:])
        return self.out(attention(q, self.key(y), self.value(y), mask=masks.SlidingWindow(self.window - 1, 0)))

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> TitansWindowCache:
        """The memory layer's cache after the persistent tokens (float32 unless ``dtype``) and a ring buffer of
        ``min(window, N_p + max_len)`` slots (the module's dtype unless ``dtype``) holding the persistent tokens'
        keys/values at slots ``p mod size``."""
        check_positive(batch=batch, max_len=max_len)
        prefix = None if self.persistent is None else self.persistent[...]
        y_p, memory = self.memory.persistent_cache(prefix, batch, dtype)
        size = min(self.window, self.num_persistent + max_len)
        ring = self.ring(batch, size, self.cache_dtype(dtype))
        if y_p is not None:
            kept = min(size, self.num_persistent)
            slots = jnp.arange(self.num_persistent - kept, self.num_persistent) % size
            y_p = y_p[:, self.num_persistent - kept:]
            ring = KVCache(ring.k.at[:, slots].set(self.key(y_p).astype(ring.k.dtype)),
                           ring.v.at[:, slots].set(self.value(y_p).astype(ring.v.dtype)), ring.length)
        return TitansWindowCache(memory, ring)

    def decode(self, x_t: jax.Array, cache: TitansWindowCache) -> tuple[jax.Array, TitansWindowCache]:
        """One step, equal, position by position, to ``self(x)``: the memory layer takes one step, and its output's
        keys/values go to ring slot ``(N_p + length) mod size``; the query attends to the filled slots.

        Args:
          x_t: ``[B, 1, d_model]``, the next token.
          cache: a ``TitansWindowCache`` from ``init_cache`` or the previous ``decode``.
        Returns:
          ``(y_t [B, 1, d_model], cache)``.
        """
        ring = cache.window
        check_step("x_t", x_t, self.d_model, ring.k.shape[0])
        dtype, size = ring.k.dtype, ring.k.shape[1]
        y, memory = self.memory.advance(x_t, cache.memory)
        position = self.num_persistent + ring.length
        start = (0, position % size, 0, 0)
        k_all = jax.lax.dynamic_update_slice(ring.k, self.key(y).astype(dtype), start)
        v_all = jax.lax.dynamic_update_slice(ring.v, self.value(y).astype(dtype), start)
        filled = masks.Explicit((jnp.arange(size) <= position)[None, :])
        o = self.out(attention(self.query(y).astype(dtype), k_all, v_all, mask=filled))
        return o, TitansWindowCache(memory, KVCache(k_all, v_all, ring.length + 1))


_EXAMPLE = dict(d_model=16, num_heads=2, num_persistent=2, chunk_size=2, conv_size=3)
register_module(ModuleSpec(
    "titans_mac", TitansMAC, dict(_EXAMPLE, segment_size=4, num_kv_heads=1), (2, 9, 16), kind="layer",
    paper=PAPER + ", memory as a context (MAC), Sec. 4.1", causal=True, decodes=True))
register_module(ModuleSpec(
    "titans_mag", TitansMAG, dict(_EXAMPLE, window=4), (2, 9, 16), kind="layer",
    paper=PAPER + ", memory as a gate (MAG), Sec. 4.2", causal=True, decodes=True))
register_module(ModuleSpec(
    "titans_mal", TitansMAL, dict(_EXAMPLE, window=4, memory="titans_deep"), (2, 9, 16), kind="layer",
    paper=PAPER + ", memory as a layer (MAL), Sec. 4.3", causal=True, decodes=True))
