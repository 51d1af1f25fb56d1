"""GPU (Triton) lowering of the Lightning Attention-2 kernels.

Layout ``[B, T, H, D]`` as given (no transposes): each program owns one (batch, head) pair, and
the forward also one block of ``Dv``. It walks the chunks of its sequence in a ``fori_loop``,
carrying the ``[Dk, Dv]`` state in registers, as in Lightning Attention-2 (Qin et al. 2024).
GQA: q head ``h`` reads kv head ``h // (H // Hkv)`` through the index map.

Inputs here are already padded to a multiple of ``chunk_size``; ``seq_len`` is the real length.
On a real GPU, ``chunk_size``, ``Dk`` and ``Dv`` must be powers of two (Triton block shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common.calls import pallas_call
from pallas_kernels.lightning import common

_BLOCK_DV = 64


def _fwd_kernel(log_decay_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, *, scale, chunk, seq_len):
    log_decay = log_decay_ref[0]

    def body(n, state):
        span = pl.ds(n * chunk, chunk)
        f = common.decay_factors(log_decay, chunk, common.chunk_length(n, chunk, seq_len))
        q = (q_ref[span, :] * scale).astype(q_ref.dtype)
        out, state = common.chunk_forward(q, k_ref[span, :], v_ref[span, :], state, f)
        o_ref[span, :] = out.astype(o_ref.dtype)
        return state

    st_ref[...] = lax.fori_loop(0, q_ref.shape[0] // chunk, body, s0_ref[...])


def _dq_kernel(log_decay_ref, q_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, decay_rows_ref, st_tangent_ref, *,
               scale, chunk, seq_len):
    """dQ, and the forward-mode decay tangent (row terms and ∂S_T/∂log λ) in the same sweep."""
    log_decay = log_decay_ref[0]

    def body(n, carry):
        state, state_tangent = carry
        span = pl.ds(n * chunk, chunk)
        length = common.chunk_length(n, chunk, seq_len)
        f = common.decay_factors(log_decay, chunk, length)
        df = common.decay_factors(log_decay, chunk, length, tangent=True)
        q = (q_ref[span, :] * scale).astype(q_ref.dtype)
        k, v, do = k_ref[span, :], v_ref[span, :], do_ref[span, :]
        dq_ref[span, :] = scale * common.chunk_dq(do, k, v, state, f)
        decay_rows_ref[span, :], state_tangent = common.chunk_decay_tangent(q, k, v, do, state, state_tangent, f, df)
        return common.update_state(k, v, state, f), state_tangent

    s0 = s0_ref[...]
    _, st_tangent_ref[...] = lax.fori_loop(0, k_ref.shape[0] // chunk, body, (s0, jnp.zeros_like(s0)))


def _dkv_kernel(log_decay_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, *,
                scale, chunk, seq_len):
    log_decay = log_decay_ref[0]
    num_chunks = q_ref.shape[0] // chunk

    def body(i, dstate):
        n = num_chunks - 1 - i
        span = pl.ds(n * chunk, chunk)
        f = common.decay_factors(log_decay, chunk, common.chunk_length(n, chunk, seq_len))
        q = (q_ref[span, :] * scale).astype(q_ref.dtype)
        dk, dv, dstate = common.chunk_dkv(q, k_ref[span, :], v_ref[span, :], do_ref[span, :], dstate, f)
        dk_ref[span, :] = dk
        dv_ref[span, :] = dv
        return dstate

    ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dst_ref[...])


def _seq_spec(T, D, head_map, block_d=None):
    """Whole sequence of one head: block ``(T, D)`` of a ``[B, T, H, D]`` array, or ``(T, block_d)``
    at the ``Dv`` block given by the third grid index."""
    if block_d is None:
        return pl.BlockSpec((None, T, None, D), lambda b, h, *_: (b, 0, head_map(h), 0))
    return pl.BlockSpec((None, T, None, block_d), lambda b, h, j: (b, 0, head_map(h), j))


def _state_spec(Dk, Dv, block_dv=None):
    if block_dv is None:
        return pl.BlockSpec((None, None, Dk, Dv), lambda b, h, *_: (b, h, 0, 0))
    return pl.BlockSpec((None, None, Dk, block_dv), lambda b, h, j: (b, h, 0, j))


def _decay_spec():
    return pl.BlockSpec((1,), lambda b, h, *_: (h,))


def _params(interpret):
    return dict(interpret=interpret, compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))


def forward(q, k, v, log_decay, s0, *, scale, chunk, seq_len, interpret):
    """Output ``[B, T, H, Dv]`` (q's dtype) and final state ``[B, H, Dk, Dv]`` f32."""
    B, T, H, Dk = q.shape
    Dv, group = v.shape[-1], H // k.shape[2]
    block_dv = _BLOCK_DV if Dv % _BLOCK_DV == 0 else Dv
    same, kv = (lambda h: h), (lambda h: h // group)
    kernel = functools.partial(_fwd_kernel, scale=scale, chunk=chunk, seq_len=seq_len)
    return pallas_call(
        kernel,
        grid=(B, H, Dv // block_dv),
        in_specs=[_decay_spec(), _seq_spec(T, Dk, same), _seq_spec(T, Dk, kv),
                  _seq_spec(T, Dv, kv, block_dv), _state_spec(Dk, Dv, block_dv)],
        out_specs=[_seq_spec(T, Dv, same, block_dv), _state_spec(Dk, Dv, block_dv)],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        name="lightning_fwd",
        **_params(interpret),
    )(log_decay, q, k, v, s0)


def backward(q, k, v, log_decay, s0, do, dst, *, scale, chunk, seq_len, interpret):
    """Cotangents, all f32: dq ``[B, T, H, Dk]``; per-q-head dk ``[B, T, H, Dk]`` and dv
    ``[B, T, H, Dv]`` (GQA groups are summed by the caller); d initial_state ``[B, H, Dk, Dv]``;
    and for the decay gradient, ``Σ_t dO_t · ∂O_t/∂log λ`` ``[B, H]`` and ``∂S_T/∂log λ``
    ``[B, H, Dk, Dv]``."""
    B, T, H, Dk = q.shape
    Dv, group = v.shape[-1], H // k.shape[2]
    same, kv = (lambda h: h), (lambda h: h // group)
    static = dict(scale=scale, chunk=chunk, seq_len=seq_len)
    dq, decay_rows, st_tangent = pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(B, H),
        in_specs=[_decay_spec(), _seq_spec(T, Dk, same), _seq_spec(T, Dk, kv), _seq_spec(T, Dv, kv),
                  _seq_spec(T, Dv, same), _state_spec(Dk, Dv)],
        out_specs=[_seq_spec(T, Dk, same), _seq_spec(T, 1, same), _state_spec(Dk, Dv)],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, Dk), jnp.float32),
                   jax.ShapeDtypeStruct((B, T, H, 1), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        name="lightning_bwd_dq",
        **_params(interpret),
    )(log_decay, q, k, v, do, s0)
    dk, dv, ds0 = pallas_call(
        functools.partial(_dkv_kernel, **static),
        grid=(B, H),
        in_specs=[_decay_spec(), _seq_spec(T, Dk, same), _seq_spec(T, Dk, kv), _seq_spec(T, Dv, kv),
                  _seq_spec(T, Dv, same), _state_spec(Dk, Dv)],
        out_specs=[_seq_spec(T, Dk, same), _seq_spec(T, Dv, same), _state_spec(Dk, Dv)],
        out_shape=[jax.ShapeDtypeStruct((B, T, H, Dk), jnp.float32),
                   jax.ShapeDtypeStruct((B, T, H, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        name="lightning_bwd_dkv",
        **_params(interpret),
    )(log_decay, q, k, v, do, dst)
    return dq, dk, dv, ds0, jnp.sum(decay_rows, axis=(1, 3)), st_tangent
