"""RAT: a gated linear recurrence within chunks, softmax attention across chunks.

Wei, Yadav, Pascanu & Gulcehre, "RAT: Bridging RNN Efficiency and Attention Accuracy via Chunk-based
Sequence Modeling" (arXiv:2507.04416, NeurIPS 2025). Token ``t`` is re-indexed ``(c, l)``: chunk ``c = t // L``,
position ``l = t mod L``. The paper's four RAT equations, as the authors print them in their post
``docs/_posts/2025-06-30-RAT.md`` of github.com/CLAIRE-Labo/RAT (equation numbers are not cited here: the PDF's
numbering could not be checked; the equations are unnumbered in the post):

- intra-chunk RNN: ``ṽ_{c,l} = g_{c,l} ⊙ ṽ_{c,l−1} + (1 − g_{c,l}) ⊙ v_{c,l}`` and the same for ``k̃`` with the
  same forget gate ``g``, from a zero state at the start of every chunk;
- inter-chunk attention: ``y_{c,l} = f([q_{c,l} K̃_{:,−1}ᵀ ; q_{c,l} k̃_{c,l}ᵀ]) [Ṽ_{:,−1} ; ṽ_{c,l}]``, where
  ``K̃_{:,−1}``, ``Ṽ_{:,−1}`` are the last states of the chunks and ``f`` is the causal mask (chunks ``< c`` only)
  followed by softmax; the query thus sees the end states of every earlier chunk plus its own running state;
- the output gate ``y_{c,l} ← z_{c,l} ⊙ y_{c,l}`` is the layer's (``attnjax.nn.memory.RAT``).

``L = 1`` is softmax attention over the per-token states ``((1 − g_t) k_t, (1 − g_t) v_t)``; ``L ≥ T`` is the
gated RNN ``y_t = ṽ_t`` (a single key per query). What follows the official code rather than the paper text:
logits scaled by ``1/√D``; an optional RoPE whose position is the *chunk index* (official ``InterRoPE``:
``q_{c,l}`` and ``k̃_{c,l}`` rotate by ``c``, so ``K̃_{c',−1}`` sits at ``c'`` and the own-state logit is
rotation-free); the chunk states enter the attention in the inputs' dtype (official: bf16), while the
recurrence runs in float32. A last partial chunk (``T`` not a multiple of ``L``) is allowed here; the official
layer asserts ``T % L == 0``.

Layout ``[B, T, H, D]``; GQA: query head ``h`` reads the states of kv head ``h // (Hq // Hkv)`` (each kv head runs
its own recurrence with its own gate).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive, check_qkv, check_scalar
from attnjax.positional import RoPE
from attnjax.softmax import Softmax


def check_rat(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, chunk_size: int,
              scale: Optional[float], rope: Optional[RoPE]) -> None:
    """``ValueError``/``TypeError`` naming the argument unless the inputs fit ``rat``/``rat_reference``.

    q ``[B, T, Hq, D]``, k ``[B, T, Hkv, D]``, v ``[B, T, Hkv, Dv]`` (one float dtype, ``Hq % Hkv == 0``),
    gate ``[B, T, Hkv, D]`` (per channel; then ``Dv == D``) or ``[B, T, Hkv, 1]`` (per head), floating;
    ``chunk_size`` a positive int; ``scale`` a positive number or None; ``rope`` a ``RoPE`` or None.
    """
    check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"RAT is causal self-attention: k must have the same length as q, got q {q.shape}, "
                         f"k {k.shape}")
    check_gate(gate, k, v)
    check_positive(chunk_size=chunk_size)
    if scale is not None:
        check_scalar("scale", scale)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
    if rope is not None:
        if not isinstance(rope, RoPE):
            raise TypeError(f"rope must be an attnjax.positional.RoPE or None, got {type(rope).__name__}")
        rope.frequencies(q.shape[-1])


def check_gate(gate: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """``ValueError``/``TypeError`` unless ``gate`` is a floating ``[B, T, Hkv, D]`` (with ``Dv == D``) or
    ``[B, T, Hkv, 1]`` array for k ``[B, T, Hkv, D]`` and v ``[B, T, Hkv, Dv]``."""
    if not hasattr(gate, "ndim") or not hasattr(gate, "dtype"):
        raise TypeError(f"gate must be an array, got {type(gate).__name__}")
    if not jnp.issubdtype(gate.dtype, jnp.floating):
        raise TypeError(f"gate must be a floating-point array, got dtype {gate.dtype}")
    B, T, H, D = k.shape
    Dv = v.shape[-1]
    widths = (1, D) if D == Dv else (1,)
    if gate.ndim != 4 or tuple(gate.shape[:3]) != (B, T, H) or gate.shape[3] not in widths:
        expected = " or ".join(f"[{B}, {T}, {H}, {w}]" for w in widths)
        why = "" if D == Dv else f" (a per-channel gate needs Dv == D; here D={D}, Dv={Dv})"
        raise ValueError(f"gate must have shape [B, T, Hkv, D] or [B, T, Hkv, 1] = {expected}{why}, got "
                         f"{tuple(getattr(gate, 'shape', ()))}; k {k.shape}, v {v.shape}")


def _gated_combine(left, right):
    """The associative combine of ``h_t = a_t ⊙ h_{t−1} + b_t`` for a pair of leaves sharing ``a``."""
    a1, bk1, bv1 = left
    a2, bk2, bv2 = right
    return a1 * a2, a2 * bk1 + bk2, a2 * bv1 + bv2


def rat_recurrence(k: jax.Array, v: jax.Array, gate: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Every position's intra-chunk states ``(k̃, ṽ)`` by a parallel scan within each chunk (float32).

    ``x̃_{c,l} = g_{c,l} ⊙ x̃_{c,l−1} + (1 − g_{c,l}) ⊙ x_{c,l}``, ``x̃_{c,−1} = 0`` (the paper's intra-chunk RNN),
    for ``x = k`` and ``x = v`` with one gate. ``jax.lax.associative_scan`` over the ``L`` positions of each
    chunk: depth ``log2 L``, ``O(B·T·H·(D + Dv))`` work.

    Args:
      k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; gate: ``[B, T, H, D or 1]`` forget gate in ``[0, 1]``.
      chunk_size: ``L``; the last chunk may be partial.
    Returns:
      ``(k̃ [B, T, H, D], ṽ [B, T, H, Dv])`` in float32.
    """
    B, T = k.shape[:2]
    L = chunk_size
    C = -(-T // L)
    g = gate.astype(jnp.float32)
    bk = (1.0 - g) * k.astype(jnp.float32)
    bv = (1.0 - g) * v.astype(jnp.float32)

    def chunks(x):
        x = jnp.pad(x, ((0, 0), (0, C * L - T), (0, 0), (0, 0)))
        return x.reshape((B, C, L) + x.shape[2:])

    _, ks, vs = jax.lax.associative_scan(_gated_combine, (chunks(g), chunks(bk), chunks(bv)), axis=2)

    def tokens(x):
        return x.reshape((B, C * L) + x.shape[3:])[:, :T]

    return tokens(ks), tokens(vs)


def _default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def rat_reference(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, *, chunk_size: int,
                  scale: Optional[float] = None, rope: Optional[RoPE] = None) -> jax.Array:
    """RAT token by token, as the paper writes it: a per-token recurrence, then a masked ``[T, T]`` softmax.

    The states come from the intra-chunk RNN run one token at a time (``lax.scan``), reset to zero at every
    chunk start: ``k̃_t = [t mod L ≠ 0]·g_t ⊙ k̃_{t−1} + (1 − g_t) ⊙ k_t`` (and ``ṽ`` alike). Query ``t`` in chunk
    ``c = t // L`` then takes the softmax of ``scale · q_t·k̃_j`` over the keys ``j`` that are the last token of
    a chunk before ``c`` (``(j + 1) mod L = 0`` and ``j < c·L``), plus ``j = t`` itself, and averages those
    ``ṽ_j`` (Wei et al. 2025, inter-chunk attention with its causal mask ``f``). With ``rope``, q and
    every ``k̃_j`` rotate by their chunk index (official ``InterRoPE``). O(T²) time and memory: for tests.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``; ``Hq % Hkv == 0``.
      gate: forget gate ``g`` in ``[0, 1]``, ``[B, T, Hkv, D]`` (per channel, ``Dv == D``) or ``[B, T, Hkv, 1]``.
      chunk_size: ``L``, a positive int; ``T`` need not be a multiple of it.
      scale: logit scale, default ``1/√D``.
      rope: an ``attnjax.positional.RoPE`` applied at chunk positions, or None (NoPE).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    check_rat(q, k, v, gate, chunk_size, scale, rope)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    L = chunk_size
    g = gate.astype(jnp.float32)

    def step(carry, xs):
        k_prev, v_prev = carry
        t, g_t, k_t, v_t = xs
        keep = (t % L != 0).astype(jnp.float32)
        k_new = keep * g_t * k_prev + (1.0 - g_t) * k_t
        v_new = keep * g_t * v_prev + (1.0 - g_t) * v_t
        return (k_new, v_new), (k_new, v_new)

    init = (jnp.zeros((B, Hkv, D), jnp.float32), jnp.zeros((B, Hkv, v.shape[-1]), jnp.float32))
    xs = (jnp.arange(T), g.swapaxes(0, 1), k.astype(jnp.float32).swapaxes(0, 1), v.astype(jnp.float32).swapaxes(0, 1))
    _, (ks, vs) = jax.lax.scan(step, init, xs)
    ks, vs = ks.swapaxes(0, 1), vs.swapaxes(0, 1)  # [B, T, Hkv, D], [B, T, Hkv, Dv]

    qf = q.astype(jnp.float32)
    chunk = jnp.arange(T) // L
    if rope is not None:
        qf, ks = rope(qf, chunk), rope(ks, chunk)
    G = Hq // Hkv
    ks, vs = jnp.repeat(ks, G, axis=2), jnp.repeat(vs, G, axis=2)
    logits = _default_scale(scale, D) * jnp.einsum("bthd,bjhd->bhtj", qf, ks)
    j = jnp.arange(T)
    allowed = (j[None, :] == j[:, None]) | (((j[None, :] + 1) % L == 0) & (j[None, :] < chunk[:, None] * L))
    weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhtj,bjhd->bthd", weights, vs).astype(q.dtype)


def rat(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, *, chunk_size: int,
        scale: Optional[float] = None, rope: Optional[RoPE] = None) -> jax.Array:
    """RAT, chunked: a scan within chunks, blocked attention over the chunk states, no ``[T, T]`` map.

    Same result as ``rat_reference`` (Wei et al. 2025). Three parts:

    1. ``rat_recurrence``: every position's ``(k̃, ṽ)`` by an associative scan within each chunk, float32;
       the chunk ends ``K̃_{:,−1}``, ``Ṽ_{:,−1}`` are every ``L``-th state.
    2. Inter-chunk attention through ``attnjax.attention`` (blocked online softmax, ``return_lse``): the
       ``L`` queries of chunk ``c`` become ``L`` extra query heads of one "chunk query" row ``c``, which
       attends causally over the chunk ends ``0..c−1`` (queries of chunks ``1..C−1`` against ends
       ``0..C−2`` under ``masks.Causal()``). GQA keeps the states at ``Hkv`` heads. The blocked path's query
       tiles hold ``max(8, 512 // (G·L))`` chunk rows (about 512 folded rows, ``G = Hq/Hkv``) and its key
       tiles 256 chunk ends: the default 512 × 512 tiles, each row carrying ``G·L`` query heads, were 6-8x
       slower at T = 16k on CPU.
    3. The own-state term ``scale·q_t·k̃_t`` (one logit per query) is merged into that softmax through the
       log-sum-exp: weight ``σ(own − lse)`` on ``ṽ_t`` (the official ``merge_last_token``); chunk 0 has only its
       own state.

    Cost, with ``C = ⌈T/L⌉``: time ``O(B·T·C·Hq·(D + Dv))`` for the attention (``L×`` less than softmax
    attention) plus ``O(B·T·Hkv·(D + Dv))`` for the scan; memory ``O(B·T·(Hq·Dv + Hkv·(D + Dv)))``
    (the states, and the blocked attention's ``O(T)`` working set). Differentiable in q, k, v and gate.
    Measured at L = 16, B = 1, H = 2, D = 64 (forward + backward, a shared 2-core CPU): 3.7x faster than causal
    softmax at T = 4k and 12x at 16k (``experiments/results/bench_memory_cpu.md``).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``; ``Hq % Hkv == 0``.
      gate: forget gate ``g`` in ``[0, 1]``, ``[B, T, Hkv, D]`` (per channel, ``Dv == D``) or ``[B, T, Hkv, 1]``.
      chunk_size: ``L``, a positive int; ``T`` need not be a multiple of it.
      scale: logit scale, default ``1/√D``.
      rope: an ``attnjax.positional.RoPE`` applied at chunk positions, or None (NoPE).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    check_rat(q, k, v, gate, chunk_size, scale, rope)
    B, T, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G, L = Hq // Hkv, chunk_size
    C = -(-T // L)
    scale = _default_scale(scale, D)
    ks, vs = rat_recurrence(k, v, gate, L)
    pad = ((0, 0), (0, C * L - T), (0, 0), (0, 0))
    ks, vs, qp = jnp.pad(ks, pad), jnp.pad(vs, pad), jnp.pad(q, pad)
    qg = qp.reshape(B, C, L, Hkv, G, D)
    vs_own = vs.reshape(B, C, L, Hkv, 1, Dv)
    if C == 1:
        return jnp.broadcast_to(vs_own, (B, 1, L, Hkv, G, Dv)).reshape(B, L, Hq, Dv)[:, :T].astype(q.dtype)
    k_end = ks[:, L - 1::L]  # [B, C, Hkv, D]
    v_end = vs[:, L - 1::L].astype(q.dtype)
    if rope is not None:
        qp = rope(qp, jnp.arange(C * L) // L)
        k_end = rope(k_end, jnp.arange(C))
    rows = qp.reshape(B, C, L, Hkv, G, D)[:, 1:].transpose(0, 1, 3, 4, 2, 5).reshape(B, C - 1, Hkv * G * L, D)
    tiles = Softmax(block_q=max(8, 512 // (G * L)), block_kv=256)  # query tiles of about 512 folded rows
    inter, lse = attention(rows, k_end[:, :-1].astype(q.dtype), v_end[:, :-1], mechanism=tiles, mask=masks.Causal(),
                           scale=scale, return_lse=True)
    inter = inter.reshape(B, C - 1, Hkv, G, L, Dv).transpose(0, 1, 4, 2, 3, 5).astype(jnp.float32)
    lse = lse.reshape(B, C - 1, Hkv, G, L).transpose(0, 1, 4, 2, 3)
    own = scale * jnp.sum(qg[:, 1:].astype(jnp.float32) * ks.reshape(B, C, L, Hkv, 1, D)[:, 1:], axis=-1)
    own_share = jax.nn.sigmoid(own - lse)[..., None]  # the own state's softmax weight, e^own / (e^own + e^lse)
    later = inter + own_share * (vs_own[:, 1:] - inter)
    first = jnp.broadcast_to(vs_own[:, :1], (B, 1, L, Hkv, G, Dv))  # chunk 0 sees its own state only
    out = jnp.concatenate([first, later], axis=1)
    return out.reshape(B, C * L, Hq, Dv)[:, :T].astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RATCache:
    """The decoding state of RAT: one state pair per chunk, ``O(T/L)`` memory.

    Attributes:
      k: ``[B, ⌈max_len/L⌉, Hkv, D]`` chunk keys (RoPE at the chunk index already applied): slot ``c < length // L``
        holds chunk ``c``'s end state ``K̃_{c,−1}``, slot ``length // L`` the current chunk's running state.
      v: ``[B, ⌈max_len/L⌉, Hkv, Dv]`` chunk values, alike.
      k_run: ``[B, Hkv, D]`` running key state ``k̃`` of the current chunk (before RoPE); each step updates it
        in float32 and stores it in the cache's dtype.
      v_run: ``[B, Hkv, Dv]`` running value state ``ṽ``, alike.
      length: int32 scalar, the tokens decoded so far (the position of the next one).
    """

    k: jax.Array
    v: jax.Array
    k_run: jax.Array
    v_run: jax.Array
    length: jax.Array


def rat_init_cache(batch: int, max_len: int, *, chunk_size: int, num_kv_heads: int, head_dim: int,
                   v_head_dim: Optional[int] = None, dtype=jnp.float32) -> RATCache:
    """An empty ``RATCache`` for up to ``max_len`` tokens: ``⌈max_len/L⌉`` chunk slots and the running states,
    zeros in ``dtype`` (float32 keeps the recurrence exact; ``rat_step`` keeps the dtype), length 0."""
    check_positive(batch=batch, max_len=max_len, chunk_size=chunk_size, num_kv_heads=num_kv_heads,
                   head_dim=head_dim)
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    check_positive(v_head_dim=v_head_dim)
    slots = -(-max_len // chunk_size)
    return RATCache(jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype),
                    jnp.zeros((batch, slots, num_kv_heads, v_head_dim), dtype),
                    jnp.zeros((batch, num_kv_heads, head_dim), dtype),
                    jnp.zeros((batch, num_kv_heads, v_head_dim), dtype), jnp.zeros((), jnp.int32))


def rat_step(q_t: jax.Array, k_t: jax.Array, v_t: jax.Array, gate_t: jax.Array, cache: RATCache, *,
             chunk_size: int, scale: Optional[float] = None,
             rope: Optional[RoPE] = None) -> tuple[jax.Array, RATCache]:
    """One decoding step of RAT: update the current chunk's state, attend over the chunk slots.

    At position ``p = cache.length`` (chunk ``c = p // L``): ``k̃ = [p mod L ≠ 0]·g ⊙ k̃ + (1 − g) ⊙ k_t`` (and
    ``ṽ``), written to slot ``c`` (the official ``RAT.step`` keeps its slot cache the same way); the query then
    takes the softmax over slots ``0..c``: the end states of earlier chunks and its own running state. Equal,
    position by position, to ``rat(q, k, v, gate)``. ``O(⌈max_len/L⌉·Hq·(D + Dv))`` per step.

    Args:
      q_t: ``[B, 1, Hq, D]``; k_t: ``[B, 1, Hkv, D]``; v_t: ``[B, 1, Hkv, Dv]``; gate_t: ``[B, 1, Hkv, D or 1]``.
      cache: a ``RATCache`` from ``rat_init_cache`` or the previous step; decoding past its ``max_len`` is
        undefined (the slot write clamps to the last slot).
      chunk_size, scale, rope: as for ``rat`` (the same values at every step).
    Returns:
      ``(out [B, 1, Hq, Dv] in q_t's dtype, cache)``.
    """
    check_rat(q_t, k_t, v_t, gate_t, chunk_size, scale, rope)
    if q_t.shape[1] != 1:
        raise ValueError(f"rat_step takes one token: q_t must be [B, 1, Hq, D], got {q_t.shape}")
    expected = cache.k.shape[:1] + cache.k.shape[2:]
    if (k_t.shape[0],) + k_t.shape[2:] != expected or v_t.shape[-1] != cache.v.shape[-1]:
        raise ValueError(f"k_t {k_t.shape} and v_t {v_t.shape} do not fit the cache: k [B, slots, Hkv, D] = "
                         f"{cache.k.shape}, v {cache.v.shape}")
    L = chunk_size
    position = cache.length
    chunk = position // L
    keep = (position % L != 0).astype(jnp.float32)
    g = gate_t[:, 0].astype(jnp.float32)
    k_run = keep * g * cache.k_run.astype(jnp.float32) + (1.0 - g) * k_t[:, 0].astype(jnp.float32)
    v_run = keep * g * cache.v_run.astype(jnp.float32) + (1.0 - g) * v_t[:, 0].astype(jnp.float32)
    k_slot = k_run[:, None]
    if rope is not None:
        q_t, k_slot = rope(q_t, chunk[None]), rope(k_slot, chunk[None])
    start = (0, chunk, 0, 0)
    k_all = jax.lax.dynamic_update_slice(cache.k, k_slot.astype(cache.k.dtype), start)
    v_all = jax.lax.dynamic_update_slice(cache.v, v_run[:, None].astype(cache.v.dtype), start)
    filled = masks.Explicit((jnp.arange(k_all.shape[1]) <= chunk)[None, None, None, :])
    out = attention(q_t.astype(k_all.dtype), k_all, v_all, mask=filled, scale=_default_scale(scale, q_t.shape[-1]))
    return out.astype(q_t.dtype), RATCache(k_all, v_all, k_run.astype(cache.k_run.dtype),
                                           v_run.astype(cache.v_run.dtype), position + 1)


__all__ = ["RATCache", "check_gate", "check_rat", "rat", "rat_init_cache", "rat_recurrence", "rat_reference",
           "rat_step"]
