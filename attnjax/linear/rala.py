"""RALA, rank-augmented linear attention (non-causal, for vision).

Fan, Huang & He, "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025 (arXiv 2411.07635), sec. 4
("Rank-Augmented Linear Attention"); official code qhfan/RALA, ``classfication/RALA.py``
(``GateLinearAttentionNoSilu``, ``RoPE``, ``theta_shift``), which fixes the details below.

Plain linear attention shares one KV buffer ``Σ_j φ(k_j)ᵀ v_j`` among all queries, so its attention map has
rank at most ``D``. RALA raises the buffer's rank by weighting every token's contribution with a
query-dependent coefficient ``α_j``, computed from the global (mean) query; per head, with ``φ = elu + 1``::

    q̄   = (1/T) Σ_i φ(q_i)
    α_j = softmax_j(σ q̄ · φ(k_j))                                        (σ = 1/√D)
    o_i = Σ_j α_j (R_i φ(q_i))·(R_j φ(k_j)) v_j  /  (Σ_j α_j φ(q_i)·φ(k_j) + ε)

``R_i`` is an optional rotary embedding (RAVLT's 2-D RoPE, ``rala_rotary``), applied in the numerator only,
as the official code does (``z`` is computed from the un-rotated ``q`` and ``k``); ``ε = 1e-6``. The official
code writes the weighting as ``k_j ← N·α_j·φ(k_j)`` and the buffer as ``(k/√N)ᵀ(v/√N)``: the factors ``N``
cancel, which is the form above. The second rank augmentation of the paper, the element-wise modulation of
the output by a projection of the input (``O ⊙ X W_o``), and the LePE depthwise convolution on ``V`` act
outside this op: they are in ``attnjax.nn.vision.rala.RALAttention``.

* ``rala_reference``: quadratic, forms ``[R φ(Q)][R φ(K)]ᵀ diag(α)`` and ``φ(Q)φ(K)ᵀ diag(α)``.
* ``rala``: right product first, O(T + S) in the sequence: the weighted buffer
  ``Σ_j α_j (R_j φ(k_j)) v_jᵀ`` ``[D, Dv]`` and normalizer ``Σ_j α_j φ(k_j)`` ``[D]`` per head, then one
  product per query.
* ``RALA``: the registry entry (``attnjax.attention(q, k, v, mechanism="rala")``): non-causal, no mask, GQA and
  cross attention (``T != S``), no rotary embedding. ``RALA.chunk_attention`` runs ``rala``'s right product on one
  chunk of a sequence split over devices (``attnjax.linear.sequence_state``, ``attnjax.parallel.lasp2_mechanism``):
  ``q̄`` is one all-reduce, then ``α``'s softmax is merged across chunks log-sum-exp style.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.checks import check_positive, check_qkv, check_scalar, describe
from attnjax.dispatch import dispatch
from attnjax.linear.feature_maps import elu_plus_one
from attnjax.linear.linear_attention import NORMALIZER_EPS
from attnjax.linear.sequence_state import WHOLE, StateExchange
from attnjax.meshes import vary_like
from attnjax.tiling import pad_axis

Rotary = tuple[jax.Array, jax.Array]
"""``(sin, cos)``, each ``[N, D]``: the rotary tables of the official ``theta_shift``."""


def rala_rotary(height: int, width: int, head_dim: int) -> Rotary:
    """RAVLT's 2-D rotary tables ``(sin, cos)``, each float32 ``[height·width, head_dim]`` (official ``RoPE``).

    ``θ = 1 / 10000^linspace(0, 1, D/4)``, each repeated twice (one angle per interleaved feature pair); the
    first ``D/2`` features rotate by ``row·θ``, the last ``D/2`` by ``column·θ``; tokens row-major
    (``l = row·width + column``). ``head_dim`` must be a multiple of 4.
    """
    check_positive(height=height, width=width, head_dim=head_dim)
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for RAVLT's 2-D rotary embedding, got {head_dim}")
    theta = np.repeat(1.0 / 10000.0 ** np.linspace(0.0, 1.0, head_dim // 4), 2)          # [D/2]
    rows = np.broadcast_to(np.arange(height)[:, None, None] * theta, (height, width, head_dim // 2))
    cols = np.broadcast_to(np.arange(width)[None, :, None] * theta, (height, width, head_dim // 2))
    angle = np.concatenate([rows, cols], axis=-1).reshape(height * width, head_dim)
    return jnp.asarray(np.sin(angle), jnp.float32), jnp.asarray(np.cos(angle), jnp.float32)


def theta_shift(x: jax.Array, rotary: Rotary) -> jax.Array:
    """``x·cos + rotate_every_two(x)·sin`` (official ``theta_shift``): interleaved pairs ``(x_2i, x_2i+1)``
    rotate to ``(x_2i cos − x_2i+1 sin, x_2i+1 cos + x_2i sin)``. ``x [B, N, H, D]``, tables ``[N, D]``; float32."""
    sin, cos = (t[:, None, :] for t in rotary)
    return _turn(x, sin, cos)


def _turn(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """``theta_shift``'s rotation in float32 with tables already broadcastable to ``x`` (``[..., D]``)."""
    x = x.astype(jnp.float32)
    turned = jnp.stack([-x[..., 1::2], x[..., 0::2]], axis=-1).reshape(x.shape)
    return x * cos + turned * sin


def _check(q: jax.Array, k: jax.Array, v: jax.Array, rotary: Optional[Rotary], scale: Optional[float]) -> float:
    """Validate; returns ``σ``."""
    check_qkv(q, k, v)
    if rotary is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"rotary needs as many queries as keys (one position per token), got T={q.shape[1]}, "
                             f"S={k.shape[1]}")
        expected = (q.shape[1], q.shape[-1])
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2 or any(
                getattr(t, "shape", None) != expected for t in rotary):
            raise ValueError(f"rotary must be (sin, cos), each of shape [N, head_dim] = {list(expected)}, "
                             f"got {describe(rotary)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_scalar("scale", scale)
    return float(scale)


def _features(q: jax.Array, k: jax.Array, v: jax.Array, scale: float):
    """``φ(Q)`` grouped ``[B, T, Hkv, G, D]``, ``φ(K)`` ``[B, S, Hkv, D]``, ``V`` float32, and ``α [B, Hkv, G, S]``."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    fq = elu_plus_one(q).reshape(B, T, Hkv, Hq // Hkv, D)
    fk = elu_plus_one(k)
    q_mean = fq.mean(axis=1)                                                                 # [B, Hkv, G, D]
    alpha = jax.nn.softmax(scale * jnp.einsum("bhgd,bshd->bhgs", q_mean, fk), axis=-1)
    return fq, fk, v.astype(jnp.float32), alpha


def _rotate_grouped(fq: jax.Array, rotary: Optional[Rotary]) -> jax.Array:
    """``R φ(Q)`` for grouped queries ``[B, T, Hkv, G, D]``."""
    if rotary is None:
        return fq
    B, T, Hkv, G, D = fq.shape
    return theta_shift(fq.reshape(B, T, Hkv * G, D), rotary).reshape(fq.shape)


def rala_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, rotary: Optional[Rotary] = None,
                   scale: Optional[float] = None) -> jax.Array:
    """RALA written as its quadratic attention map (Fan et al. 2025, sec. 4; the module docstring's formula).

    ``A = ([R φ(Q)][R φ(K)]ᵀ diag(α)) / ((φ(Q)φ(K)ᵀ diag(α)) 1 + ε)`` row-wise, ``O = A V``, with
    ``α = softmax(σ q̄ φ(K)ᵀ)`` from the mean query ``q̄``. O(T·S) memory per head.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0`` (query head ``h`` reads
        K/V head ``h // (Hq // Hkv)``; its ``α`` comes from its own mean query).
      rotary: ``(sin, cos)`` ``[N, D]`` (``rala_rotary``; needs ``T == S == N``), applied to ``φ(Q)``, ``φ(K)`` in
        the numerator only; None for none.
      scale: ``σ`` of the coefficient logits, default ``1/√D`` (official ``head_dim ** -0.5``).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    scale = _check(q, k, v, rotary, scale)
    fq, fk, vf, alpha = _features(q, k, v, scale)
    rq, rk = _rotate_grouped(fq, rotary), (fk if rotary is None else theta_shift(fk, rotary))
    numerator = jnp.einsum("bthgd,bshd->bhgts", rq, rk) * alpha[..., None, :]
    denominator = jnp.sum(jnp.einsum("bthgd,bshd->bhgts", fq, fk) * alpha[..., None, :], axis=-1) + NORMALIZER_EPS
    out = jnp.einsum("bhgts,bshe->bthge", numerator / denominator[..., None], vf)
    return out.reshape(*q.shape[:3], v.shape[-1]).astype(q.dtype)


def rala(q: jax.Array, k: jax.Array, v: jax.Array, *, rotary: Optional[Rotary] = None, scale: Optional[float] = None,
         implementation: str = "auto") -> jax.Array:
    """RALA, right product first (Fan et al. 2025, sec. 4; official ``GateLinearAttentionNoSilu``).

    ``S_h = Σ_j α_hj (R_j φ(k_j)) v_jᵀ`` ``[D, Dv]`` and ``z_h = Σ_j α_hj φ(k_j)`` ``[D]`` per query head, then
    ``o_i = (R_i φ(q_i)) S_h / (φ(q_i)·z_h + ε)``. Cost O(B·Hq·(T + S)·D·Dv); keys and queries go by blocks of
    ``BLOCK`` tokens (a scan with an online-softmax maximum for ``α``), so temporaries are O(B·Hq·(BLOCK·D + D·Dv))
    beyond the inputs and output (and O(B·Hq·S·D) residuals under ``jax.grad``); never a ``[T, S]`` array.

    Args:
      q, k, v, rotary, scale: as in ``rala_reference``.
      implementation: "reference", "xla" or "auto" (xla).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    scale = _check(q, k, v, rotary, scale)

    def xla():
        return _chunk(q, k, v, rotary, scale, WHOLE)

    paths = {"reference": lambda: rala_reference(q, k, v, rotary=rotary, scale=scale), "xla": xla}
    return dispatch(paths, implementation, what="RALA").astype(q.dtype)


BLOCK = 512
"""Tokens per step of ``_chunk``'s two passes: a step's features, weights and products stay in a core's L2
cache (CPU, B=1, H=4, D=64: the whole-sequence form's fwd slope over T = 1k-16k 1.21-1.37, this one's 1.06-1.10)."""


def _blocks(x: jax.Array, rows: int) -> jax.Array:
    """``x [B, L, ...]`` zero-padded to ``n·rows`` tokens -> ``[n, B, rows, ...]``."""
    x = pad_axis(x, 1, rows)
    return x.reshape(x.shape[0], -1, rows, *x.shape[2:]).swapaxes(0, 1)


def _table_blocks(rotary: Optional[Rotary], length: int, rows: int) -> Optional[tuple[jax.Array, jax.Array]]:
    """The rotary tables ``[L, D]`` as ``[n, rows, D]`` blocks; None without them."""
    return None if rotary is None else tuple(_blocks(t[None], rows)[:, 0] for t in rotary)


def _rotated(x: jax.Array, tables: Optional[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """``R x`` with one block's tables (``_turn``), or ``x`` without them."""
    return x if tables is None else _turn(x, *tables)


def _chunk(q: jax.Array, k: jax.Array, v: jax.Array, rotary: Optional[Rotary], scale: float,
           exchange: StateExchange) -> jax.Array:
    """The right product on chunk ``t`` of ``exchange.world`` (``q``, ``k``, ``v``, ``rotary``: the chunk's rows);
    ``[B, T, Hq, Dv]`` float32. Three collectives, each needing the one before:

    1. ``total`` of ``Σ φ(q_i)`` ``[B, Hq, D]``: the mean query ``q̄`` over all queries;
    2. ``gather`` of each chunk's largest logit ``m_r = max_j σ q̄·φ(k_j)`` ``[B, Hq]``: ``α``'s softmax shift
       ``m = max_r m_r``;
    3. ``total`` of ``Σ_j e_j``, ``S = Σ_j e_j (R_j φ(k_j)) v_jᵀ`` and ``z = Σ_j e_j φ(k_j)`` with
       ``e_j = exp(logit_j − m)`` (``[B, Hq, 1 + D·Dv + D]``); ``α``'s normalizer divides ``S`` and ``z``.

    The keys are summed by a scan over ``BLOCK``-token blocks (a running maximum rescales the sums, as in
    online softmax), and the queries read ``S`` and ``z`` block by block: temporaries O(BLOCK·H·D), each block
    heads-major so every contraction is a plain batched product.
    """
    B, T, Hq, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    q_mean = exchange.total(elu_plus_one(q).reshape(B, T, Hkv, G, D).sum(axis=1)) / (T * exchange.world)
    rows = min(BLOCK, S)

    def key_block(carry, block):
        m, e_sum, state, z = carry
        kb, vb, valid, tables = block
        fk = elu_plus_one(kb).transpose(0, 2, 1, 3)                                      # [B, Hkv, rows, D]
        vh = vb.astype(jnp.float32).transpose(0, 2, 1, 3)                                # [B, Hkv, rows, Dv]
        logits = jnp.where(valid, scale * jnp.einsum("bhgd,bhsd->bhgs", q_mean, fk), -jnp.inf)
        top = jnp.maximum(m, jax.lax.stop_gradient(logits.max(axis=-1)))                 # [B, Hkv, G]
        decay, e = jnp.exp(m - top), jnp.exp(logits - top[..., None])
        weighted = e[..., None] * _rotated(fk, tables)[:, :, None]                        # [B, Hkv, G, rows, D]
        return (top, e_sum * decay + e.sum(axis=-1),
                state * decay[..., None, None] + jnp.einsum("bhgsd,bhse->bhgde", weighted, vh),
                z * decay[..., None] + jnp.einsum("bhgs,bhsd->bhgd", e, fk)), None

    sums = vary_like((jnp.full((B, Hkv, G), -jnp.inf), jnp.zeros((B, Hkv, G)), jnp.zeros((B, Hkv, G, D, Dv)),
                      jnp.zeros((B, Hkv, G, D))), q_mean, k, v)
    valid = _blocks(jnp.ones((1, S), bool), rows)[:, 0]                                     # [n, rows]
    (m, e_sum, state, z), _ = jax.lax.scan(key_block, sums, (_blocks(k, rows), _blocks(v, rows), valid,
                                                             _table_blocks(rotary, S, rows)))
    shift = jnp.max(exchange.gather(m), axis=0)
    rescale = jnp.exp(m - shift)
    e_sum, state, z = exchange.total((e_sum * rescale, state * rescale[..., None, None], z * rescale[..., None]))
    state, z = state / e_sum[..., None, None], z / e_sum[..., None]

    def query_block(block):
        qb, tables = block
        fq = elu_plus_one(qb).reshape(B, -1, Hkv, G, D).transpose(0, 2, 3, 1, 4)        # [B, Hkv, G, rows, D]
        numerator = jnp.einsum("bhgtd,bhgde->bhgte", _rotated(fq, tables), state)
        denominator = jnp.einsum("bhgtd,bhgd->bhgt", fq, z) + NORMALIZER_EPS
        return (numerator / denominator[..., None]).transpose(0, 3, 1, 2, 4)             # [B, rows, Hkv, G, Dv]

    q_rows = min(BLOCK, T)
    out = jax.lax.map(query_block, (_blocks(q, q_rows), _table_blocks(rotary, T, q_rows)))
    return out.swapaxes(0, 1).reshape(B, -1, Hq, Dv)[:, :T]


@registry.register
@dataclasses.dataclass(frozen=True)
class RALA:
    """RALA as a registered mechanism: non-causal (no mask), GQA, cross (``q̄`` over the queries, ``α`` over the
    keys); the rotary embedding is the module's (``attnjax.nn.vision.rala.RALAttention``)."""

    name: ClassVar[str] = "rala"
    family: ClassVar[str] = "linear"
    paper: ClassVar[str] = "Fan et al. 2025, Breaking the Low-Rank Dilemma of Linear Attention"
    supports: ClassVar[frozenset] = frozenset({"gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ("lasp2",)

    def implementations(self):
        return {name: functools.partial(_registered, name) for name in ("reference", "xla")}

    def chunk_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, *, exchange: StateExchange,
                        causal: bool = False, rotary: Optional[Rotary] = None,
                        scale: Optional[float] = None) -> jax.Array:
        """The linear-state interface (``attnjax.linear.sequence_state``): this chunk's rows of ``rala`` over the
        sequence split as ``exchange`` says (``q̄`` over all queries, ``α`` over all keys).

        Args:
          q: chunk ``[B, C, Hq, D]``; k: ``[B, C', Hkv, D]``; v: ``[B, C', Hkv, Dv]``.
          exchange: the ``StateExchange``; causal: must be False (RALA is non-causal: ``q̄`` spans every query).
          rotary: this chunk's rows of the ``(sin, cos)`` tables, each ``[C, D]`` (needs ``C' = C``); scale: ``σ``.
        Returns:
          ``[B, C, Hq, Dv]`` in q's dtype; collectives as in ``_chunk``, none of size ``C``.
        """
        if causal:
            raise NotImplementedError("RALA is non-causal (its key weights come from the mean of every query); "
                                      "pass causal=False")
        scale = _check(q, k, v, rotary, scale)
        return _chunk(q, k, v, rotary, scale, exchange).astype(q.dtype)


def _registered(implementation: str, q: jax.Array, k: jax.Array, v: jax.Array, *, scale=None) -> jax.Array:
    """``attnjax.attention`` signature for ``RALA``."""
    return rala(q, k, v, scale=scale, implementation=implementation)


__all__ = ["Rotary", "rala_rotary", "theta_shift", "rala_reference", "rala", "RALA"]
