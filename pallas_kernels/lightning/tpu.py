"""TPU (Mosaic) lowering of the Lightning Attention-2 kernels.

Grid ``(B, H, num_chunks)``: batch and head are "parallel", the chunk axis is the sequential
"arbitrary" axis. Each step gets one ``(C, D)`` chunk in VMEM through its BlockSpec, and the
``[Dk, Dv]`` state (or its cotangent) lives in a VMEM scratch across the chunk steps, as in
Lightning Attention-2 (Qin et al. 2024). The backward dK/dV kernel walks the chunks in reverse
through its index maps. ``log λ`` per head is read from SMEM. GQA: q head ``h`` reads kv head
``h // (H // Hkv)`` through the index map.

Arrays are transposed to ``[B, H, T, D]`` at this module's boundary so that blocks are
``(C, D)`` tiles (C a multiple of 8, 16 for bf16, on hardware). Inputs are already padded to a multiple of
``chunk_size``; ``seq_len`` is the real length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.calls import pallas_call
from pallas_kernels.lightning import common


def _fwd_kernel(log_decay_ref, q_ref, k_ref, v_ref, s0_ref, o_ref, st_ref, state_ref, *,
                scale, chunk, seq_len):
    h, n = pl.program_id(1), pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]

    f = common.decay_factors(log_decay_ref[h], chunk, common.chunk_length(n, chunk, seq_len))
    q = (q_ref[...] * scale).astype(q_ref.dtype)
    out, state = common.chunk_forward(q, k_ref[...], v_ref[...], state_ref[...], f)
    o_ref[...] = out.astype(o_ref.dtype)
    state_ref[...] = state

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        st_ref[...] = state


def _dq_kernel(log_decay_ref, q_ref, k_ref, v_ref, do_ref, s0_ref, dq_ref, decay_rows_ref, st_tangent_ref,
               state_ref, state_tangent_ref, *, scale, chunk, seq_len):
    """dQ, and the forward-mode decay tangent (row terms and ∂S_T/∂log λ) in the same sweep."""
    h, n = pl.program_id(1), pl.program_id(2)

    @pl.when(n == 0)
    def _():
        state_ref[...] = s0_ref[...]
        state_tangent_ref[...] = jnp.zeros(state_tangent_ref.shape, jnp.float32)

    length = common.chunk_length(n, chunk, seq_len)
    f = common.decay_factors(log_decay_ref[h], chunk, length)
    df = common.decay_factors(log_decay_ref[h], chunk, length, tangent=True)
    q = (q_ref[...] * scale).astype(q_ref.dtype)
    k, v, do, state = k_ref[...], v_ref[...], do_ref[...], state_ref[...]
    dq_ref[...] = scale * common.chunk_dq(do, k, v, state, f)
    decay_rows_ref[...], state_tangent = common.chunk_decay_tangent(q, k, v, do, state, state_tangent_ref[...], f, df)
    state_ref[...] = common.update_state(k, v, state, f)
    state_tangent_ref[...] = state_tangent

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        st_tangent_ref[...] = state_tangent


def _dkv_kernel(log_decay_ref, q_ref, k_ref, v_ref, do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, dstate_ref, *,
                scale, chunk, seq_len):
    h, i = pl.program_id(1), pl.program_id(2)
    n = pl.num_programs(2) - 1 - i

    @pl.when(i == 0)
    def _():
        dstate_ref[...] = dst_ref[...]

    f = common.decay_factors(log_decay_ref[h], chunk, common.chunk_length(n, chunk, seq_len))
    q = (q_ref[...] * scale).astype(q_ref.dtype)
    dk, dv, dstate = common.chunk_dkv(q, k_ref[...], v_ref[...], do_ref[...], dstate_ref[...], f)
    dk_ref[...] = dk
    dv_ref[...] = dv
    dstate_ref[...] = dstate

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = dstate


def _chunk_spec(chunk, D, head_map=lambda h: h, reverse_of=None):
    """One ``(chunk, D)`` tile of a ``[B, H, T, D]`` array: chunk ``n`` at grid step ``n``, or
    chunk ``reverse_of - 1 - n`` when walking ``reverse_of`` chunks backwards."""
    def index(b, h, n):
        return b, head_map(h), n if reverse_of is None else reverse_of - 1 - n, 0
    return pl.BlockSpec((None, None, chunk, D), index)


def _state_spec(Dk, Dv):
    return pl.BlockSpec((None, None, Dk, Dv), lambda b, h, n: (b, h, 0, 0))


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch, name, interpret):
    """``pallas_call`` with ``log λ`` [H] in SMEM first and ``[Dk, Dv]`` f32 VMEM scratch states."""
    return pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=grid,
            in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), *in_specs],
            out_specs=out_specs, scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for shape in scratch]),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )


def _heads_first(x):
    return jnp.swapaxes(x, 1, 2)


def forward(q, k, v, log_decay, s0, *, scale, chunk, seq_len, interpret):
    """Output ``[B, T, H, Dv]`` (q's dtype) and final state ``[B, H, Dk, Dv]`` f32."""
    B, T, H, Dk = q.shape
    Dv, group = v.shape[-1], H // k.shape[2]

    def kv(h):
        return h // group

    out, st = _call(
        functools.partial(_fwd_kernel, scale=scale, chunk=chunk, seq_len=seq_len),
        grid=(B, H, T // chunk),
        in_specs=[_chunk_spec(chunk, Dk), _chunk_spec(chunk, Dk, kv), _chunk_spec(chunk, Dv, kv),
                  _state_spec(Dk, Dv)],
        out_specs=[_chunk_spec(chunk, Dv), _state_spec(Dk, Dv)],
        out_shape=[jax.ShapeDtypeStruct((B, H, T, Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        scratch=[(Dk, Dv)], name="lightning_fwd", interpret=interpret,
    )(log_decay, _heads_first(q), _heads_first(k), _heads_first(v), s0)
    return _heads_first(out), st


def backward(q, k, v, log_decay, s0, do, dst, *, scale, chunk, seq_len, interpret):
    """Cotangents, all f32: dq ``[B, T, H, Dk]``; per-q-head dk ``[B, T, H, Dk]`` and dv
    ``[B, T, H, Dv]`` (GQA groups are summed by the caller); d initial_state ``[B, H, Dk, Dv]``;
    and for the decay gradient, ``Σ_t dO_t · ∂O_t/∂log λ`` ``[B, H]`` and ``∂S_T/∂log λ``
    ``[B, H, Dk, Dv]``."""
    B, T, H, Dk = q.shape
    Dv, group = v.shape[-1], H // k.shape[2]

    def kv(h):
        return h // group

    q, k, v, do = map(_heads_first, (q, k, v, do))
    static = dict(scale=scale, chunk=chunk, seq_len=seq_len)
    dq, decay_rows, st_tangent = _call(
        functools.partial(_dq_kernel, **static),
        grid=(B, H, T // chunk),
        in_specs=[_chunk_spec(chunk, Dk), _chunk_spec(chunk, Dk, kv), _chunk_spec(chunk, Dv, kv),
                  _chunk_spec(chunk, Dv), _state_spec(Dk, Dv)],
        out_specs=[_chunk_spec(chunk, Dk), _chunk_spec(chunk, 1), _state_spec(Dk, Dv)],
        out_shape=[jax.ShapeDtypeStruct((B, H, T, Dk), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, T, 1), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        scratch=[(Dk, Dv), (Dk, Dv)], name="lightning_bwd_dq", interpret=interpret,
    )(log_decay, q, k, v, do, s0)

    def rev(D, head_map=lambda h: h):
        return _chunk_spec(chunk, D, head_map, reverse_of=T // chunk)

    dk, dv, ds0 = _call(
        functools.partial(_dkv_kernel, **static),
        grid=(B, H, T // chunk),
        in_specs=[rev(Dk), rev(Dk, kv), rev(Dv, kv), rev(Dv), _state_spec(Dk, Dv)],
        out_specs=[rev(Dk), rev(Dv), _state_spec(Dk, Dv)],
        out_shape=[jax.ShapeDtypeStruct((B, H, T, Dk), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, T, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, Dk, Dv), jnp.float32)],
        scratch=[(Dk, Dv)], name="lightning_bwd_dkv", interpret=interpret,
    )(log_decay, q, k, v, do, dst)
    return _heads_first(dq), _heads_first(dk), _heads_first(dv), ds0, jnp.sum(decay_rows, axis=(2, 3)), st_tangent
