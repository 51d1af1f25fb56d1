"""Per-chunk math shared by the GPU (Triton) and TPU (Mosaic) Lightning kernels.

Everything here acts on one chunk of one (batch, head) pair, on values already loaded from refs,
so the same functions run inside both lowerings. Notation (Qin et al. 2024, "Lightning
Attention-2", Alg. 1 and 2): a chunk holds ``C`` rows at local positions ``0..C-1``, of which the
first ``L`` are real tokens (``L < C`` only in a padded last chunk); ``a = log λ``; ``S`` is the
``[Dk, Dv]`` state before the chunk.

Forward::

    O      = ((Q Kᵀ) ⊙ D) V + (Q ⊙ γ) S            D_ij = λ^(i−j) (j ≤ i, else 0),  γ_i = λ^(i+1)
    S_next = λ^L S + (K ⊙ β)ᵀ V                      β_j = λ^(L−1−j) (j < L, else 0)

Backward, with ``dS_next`` the cotangent of ``S_next``::

    dQ = ((dO Vᵀ) ⊙ D) K + γ ⊙ (dO Sᵀ)
    dK = ((dO Vᵀ) ⊙ D)ᵀ Q + β ⊙ (V dS_nextᵀ)
    dV = ((Q Kᵀ) ⊙ D)ᵀ dO + (K ⊙ β) dS_next
    dS = λ^L dS_next + (Q ⊙ γ)ᵀ dO

Decay powers come from ``exp(a · exponent)``, never from repeated products. Matmul operands are
cast to the input dtype (f32 or bf16) and accumulate in f32; states stay f32.
Layout-free: works on ``[C, D]`` values, so both lowerings share it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_NN = ((1,), (0,))  # a @ b
_NT = ((1,), (1,))  # a @ b.T
_TN = ((0,), (0,))  # a.T @ b


def _dot(a, b, dims, dtype):
    """Matmul of operands cast to ``dtype``, accumulated in f32 (full f32 passes for f32 inputs,
    not TF32 / one bf16 MXU pass)."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


class DecayFactors(NamedTuple):
    """Decay factors of one chunk: ``intra`` [C, C] = D, ``q_decay`` [C, 1] = γ,
    ``k_decay`` [C, 1] = β, ``state_decay`` scalar = λ^L."""

    intra: jax.Array
    q_decay: jax.Array
    k_decay: jax.Array
    state_decay: jax.Array


def decay_factors(log_decay, chunk_size: int, length, *, tangent: bool = False) -> DecayFactors:
    """Factors for a chunk of ``chunk_size`` rows whose first ``length`` rows are real tokens.

    ``log_decay`` is the scalar ``a = log λ`` (≤ 0); ``length`` may be a traced int32 scalar.
    With ``tangent=True``, each factor ``exp(a·e)`` is replaced by its derivative ``e·exp(a·e)``
    with respect to ``a`` (for the decay gradient).
    """
    def power(exponent, valid):
        p = jnp.where(valid, jnp.exp(log_decay * exponent), 0.0)
        return exponent * p if tangent else p

    row = lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 0)
    col = lax.broadcasted_iota(jnp.int32, (chunk_size, chunk_size), 1)
    pos = lax.broadcasted_iota(jnp.int32, (chunk_size, 1), 0)
    pos_f, length_f = pos.astype(jnp.float32), jnp.asarray(length, jnp.float32)
    return DecayFactors(
        intra=power(jnp.maximum(row - col, 0).astype(jnp.float32), row >= col),
        q_decay=power(pos_f + 1.0, True),
        k_decay=power(jnp.maximum(length_f - 1.0 - pos_f, 0.0), pos < length),
        state_decay=power(length_f, True),
    )


def chunk_length(chunk_index, chunk_size: int, seq_len: int):
    """Number of real tokens in chunk ``chunk_index`` of a sequence of ``seq_len`` tokens."""
    return jnp.minimum(chunk_size, seq_len - chunk_index * chunk_size)


def update_state(k, v, state, f: DecayFactors):
    """``S_next = λ^L S + (K ⊙ β)ᵀ V`` for k [C, Dk], v [C, Dv], state [Dk, Dv] f32."""
    return f.state_decay * state + _dot(k * f.k_decay, v, _TN, k.dtype)


def chunk_forward(q, k, v, state, f: DecayFactors):
    """Output [C, Dv] (f32) and next state of one chunk; ``q`` is already scaled."""
    scores = _dot(q, k, _NT, q.dtype) * f.intra
    out = _dot(scores, v, _NN, q.dtype) + _dot(q, state, _NN, q.dtype) * f.q_decay
    return out, update_state(k, v, state, f)


def chunk_dq(do, k, v, state, f: DecayFactors):
    """dQ [C, Dk] (f32, w.r.t. the scaled q) of one chunk, given the state before the chunk."""
    dp = _dot(do, v, _NT, do.dtype) * f.intra
    return _dot(dp, k, _NN, do.dtype) + _dot(do, state, _NT, do.dtype) * f.q_decay


def chunk_decay_tangent(q, k, v, do, state, state_tangent, f: DecayFactors, df: DecayFactors):
    """Row terms ``Σ_e dO ⊙ ∂O/∂a`` [C, 1] of the decay gradient, and ``∂S_next/∂a``.

    ``f``/``df``: the chunk's factors and their tangents; ``state_tangent`` = ``∂S/∂a`` before the
    chunk. Forward-mode in ``a = log λ``, so the sum of the row terms plus ``⟨∂S_T/∂a, dS_T⟩`` is
    ``dL/da`` with no cancellation between large terms.
    """
    dt = q.dtype
    scores = _dot(q, k, _NT, dt) * df.intra
    out_tangent = (_dot(scores, v, _NN, dt) + _dot(q, state, _NN, dt) * df.q_decay
                   + _dot(q, state_tangent, _NN, dt) * f.q_decay)
    rows = jnp.sum(do.astype(jnp.float32) * out_tangent, axis=1, keepdims=True)
    next_tangent = (f.state_decay * state_tangent + df.state_decay * state
                    + _dot(k * df.k_decay, v, _TN, dt))
    return rows, next_tangent


def chunk_dkv(q, k, v, do, dstate, f: DecayFactors):
    """dK [C, Dk], dV [C, Dv] and the state cotangent before the chunk, all f32.

    ``q`` is already scaled; ``dstate`` is the cotangent of the state after the chunk.
    """
    dt = q.dtype
    dp = _dot(do, v, _NT, dt) * f.intra
    dk = _dot(dp, q, _TN, dt) + _dot(v, dstate, _NT, dt) * f.k_decay
    scores = _dot(q, k, _NT, dt) * f.intra
    dv = _dot(scores, do, _TN, dt) + _dot(k * f.k_decay, dstate, _NN, dt)
    dstate_prev = f.state_decay * dstate + _dot(q * f.q_decay, do, _TN, dt)
    return dk, dv, dstate_prev
