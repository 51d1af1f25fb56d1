"""Stick-breaking attention in Pallas for TPU (Mosaic lowering), forward and backward.

Tan et al., "Scaling Stick-Breaking Attention: An Efficient Implementation and In-depth Study"
(2024). Math, conventions and the backward's derivation: ``attnjax.softmax.stick_breaking`` (the
reference; tested in ``tests/softmax/test_stick_breaking.py`` in TPU interpret mode).

Forward: grid ``(B, Hq, nq, width)``, the last axis sequential. Step ``t`` of query tile ``i``
visits key tile ``hi[i] − 1 − t`` of the schedule (from the diagonal back to the first, by scalar
prefetch, as in ``pallas_kernels.flash.tpu``), carrying ``c = Σ softplus(z)`` and the float32
accumulator in VMEM scratch. Steps past ``lo[i]`` keep the last block index (no new fetch) and do
nothing; EMPTY tiles are skipped, FULL tiles skip the element mask.

Backward: grid ``(B, Hkv, G, nq, width)``, all but the first two axes sequential. Each step walks
like the forward (carrying ``c`` and ``Σ A⊙dA``), accumulates ``dQ`` in scratch, and adds the key
tile's ``dK = scale·dZᵀQ`` and ``dV = AᵀdO`` into float32 ``[S, D]`` output blocks that stay in
VMEM for the whole ``(b, kv head)``: a key tile's gradient needs the stick of every key between it
and the query, which only this query-major walk has, and TPU programs of one core run in order,
so no atomics are needed. VMEM holds ``S·(D + Dv)`` float32 of gradient per kv head, double
buffered (16 MiB at S = 8192, D = Dv = 128; the kernel raises its scoped VMEM limit to fit), which
bounds the sequence length by the chip's VMEM.

The reverse cumsum inside a tile is a matmul with an upper-triangular ones matrix (MXU, HIGHEST).
Masks: Causal, SlidingWindow(left, 0), ChunkedCausal and ``&``/``|`` combinations of structural
masks; Segments/Explicit and a bias raise NotImplementedError (use implementation="xla"). Blocks
are multiples of 8 (on hardware, ``block_kv`` a multiple of 128); row statistics are
lane-broadcast ``[rows, 128]`` float32 blocks.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.masks import FULL, PARTIAL
from pallas_kernels.common.mask_plans import plan_mask
from pallas_kernels.common.scores import apply_soft_cap, soft_cap_grad
from pallas_kernels.common.tpu import LANES, call, heads_major, stat_column, tpu_tiles
from pallas_kernels.stick_breaking import common
from pallas_kernels.stick_breaking.common import StickBreakingStatic
from pallas_kernels.stick_breaking.tiles import backward_tile, forward_tile

DEFAULT_BLOCK = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def stick_breaking_core_tpu(q, k, v, mask, *, scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                            block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK, interpret: bool = False):
    """``(o [B, T, Hq, Dv], row_softplus [B, T, Hq])``, both float32, differentiable (as
    ``gpu.stick_breaking_core_gpu``); inputs already validated. Blocks: multiples of 8."""
    B, T, Hq, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    bq, bk, T_pad, S_pad = tpu_tiles(block_q, block_kv, T, S)
    plan, mask_data = plan_mask(mask, T, S, T_pad, S_pad)
    if mask_data:
        raise NotImplementedError("the TPU stick-breaking kernel evaluates structural masks only (Causal, "
                                  "SlidingWindow, ChunkedCausal); use implementation='xla' for Segments/Explicit")
    st = StickBreakingStatic(
        T=T, S=S, T_pad=T_pad, S_pad=S_pad, num_q_heads=Hq, num_kv_heads=Hkv, D=D, Dv=Dv, D_pad=D, Dv_pad=Dv,
        block_q=bq, block_kv=bk, scale=D ** -0.5 if scale is None else float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap), mask_plan=plan,
        interpret=bool(interpret))
    with jax.ensure_compile_time_eval():
        codes, lo, hi = common.schedule(mask, st)
        width = max(int(np.max(np.asarray(hi) - np.asarray(lo))), 1)
    qt = heads_major(q, T_pad)
    kt, vt = heads_major(k, S_pad), heads_major(v, S_pad)
    o, c = _core(qt, kt, vt, (codes.reshape(-1), lo, hi), st, width)
    return o[:, :, :T].transpose(0, 2, 1, 3), c[:, :, :T, 0].transpose(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# Shared kernel pieces.
# ----------------------------------------------------------------------------------------------


def _key_tile(lo, hi, i, t):
    """Key tile of step ``t`` of query tile ``i``: ``hi − 1 − t``, kept at ``lo`` past the span."""
    return jnp.maximum(hi[i] - 1 - t, lo[i])


def _when_tile(codes, lo, hi, i, t, j, st: StickBreakingStatic, compute):
    """Run ``compute(masked)`` on a live step: unmasked on FULL tiles, masked on PARTIAL ones."""
    live = hi[i] - 1 - t >= lo[i]
    code = codes[i * st.num_kv_tiles + j]
    pl.when(live & (code == FULL))(lambda: compute(False))
    pl.when(live & (code == PARTIAL))(lambda: compute(True))


def _logits(st: StickBreakingStatic, q, k):
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale
    return apply_soft_cap(s, st.logits_soft_cap)


def _no_data(kind, slot):
    raise AssertionError("structural masks only (checked in stick_breaking_core_tpu)")


def _store_rows(ref, x):
    ref[...] = jnp.broadcast_to(x, ref.shape)


# ----------------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(codes, lo, hi, q_ref, k_ref, v_ref, o_ref, c_ref, c_sc, acc_sc, *, st: StickBreakingStatic, width):
    i, t = pl.program_id(2), pl.program_id(3)
    j = _key_tile(lo, hi, i, t)

    @pl.when(t == 0)
    def _init():
        c_sc[...] = jnp.zeros(c_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def compute(masked):
        z = _logits(st, q_ref[...], k_ref[...])
        ok = common.allowed(st, i, j, _no_data) if masked else None
        a, c = forward_tile(z, stat_column(c_sc), ok, common.matmul_reverse_cumsum)
        v = v_ref[...]
        acc_sc[...] += lax.dot(a.astype(v.dtype), v, preferred_element_type=jnp.float32)
        _store_rows(c_sc, c)

    _when_tile(codes, lo, hi, i, t, j, st, compute)

    @pl.when(t == width - 1)
    def _finish():
        o_ref[...] = acc_sc[...]
        c_ref[...] = c_sc[...]


def _forward(qt, kt, vt, sched, st: StickBreakingStatic, width):
    B, Hq = qt.shape[:2]
    G, bq, bk = st.group, st.block_q, st.block_kv

    def q_block(b, h, i, t, codes, lo, hi):
        return b, h, i, 0

    def kv_block(b, h, i, t, codes, lo, hi):
        return b, lax.div(h, G), _key_tile(lo, hi, i, t), 0  # lax.div: no sign op in the index map

    return call(
        functools.partial(_fwd_kernel, st=st, width=width), (B, Hq, st.num_q_tiles, width),
        in_specs=[pl.BlockSpec((None, None, bq, st.D), q_block), pl.BlockSpec((None, None, bk, st.D), kv_block),
                  pl.BlockSpec((None, None, bk, st.Dv), kv_block)],
        out_specs=[pl.BlockSpec((None, None, bq, st.Dv), q_block), pl.BlockSpec((None, None, bq, LANES), q_block)],
        out_shape=[jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hq, st.T_pad, LANES), jnp.float32)],
        scratch=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, st.Dv), jnp.float32)],
        st=st, name="attnjax_stick_breaking_fwd_tpu", parallel=3,
    )(*sched, qt, kt, vt)


# ----------------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------------


def _bwd_kernel(codes, lo, hi, q_ref, do_ref, dterm_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, c_sc, s_sc, dq_sc,
                *, st: StickBreakingStatic, width):
    g, i, t = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    j = _key_tile(lo, hi, i, t)

    @pl.when((g == 0) & (i == 0) & (t == 0))
    def _init_kv():
        dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
        dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)

    @pl.when(t == 0)
    def _init_q():
        c_sc[...] = jnp.zeros(c_sc.shape, jnp.float32)
        s_sc[...] = jnp.zeros(s_sc.shape, jnp.float32)
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def compute(masked):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        z = _logits(st, q, k)
        ok = common.allowed(st, i, j, _no_data) if masked else None
        da = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        a, dz, c, s = backward_tile(z, da, stat_column(c_sc), stat_column(s_sc), stat_column(dterm_ref), ok,
                                    common.matmul_reverse_cumsum)
        dz = dz * soft_cap_grad(z, st.logits_soft_cap) * st.scale
        dq_sc[...] += lax.dot(dz.astype(k.dtype), k, preferred_element_type=jnp.float32)
        rows = pl.ds(pl.multiple_of(j * st.block_kv, st.block_kv), st.block_kv)
        dk_ref[rows, :] += lax.dot(dz.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        dv_ref[rows, :] += lax.dot(a.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        _store_rows(c_sc, c)
        _store_rows(s_sc, s)

    _when_tile(codes, lo, hi, i, t, j, st, compute)

    @pl.when(t == width - 1)
    def _finish():
        dq_ref[...] = dq_sc[...]


def _backward(st: StickBreakingStatic, width, residuals, cotangents):
    qt, kt, vt, sched, o = residuals
    d_o, d_c = cotangents
    B, Hq = qt.shape[:2]
    Hkv, G, bq, bk = st.num_kv_heads, st.group, st.block_q, st.block_kv
    # dZ = A⊙dA − σ(z)⊙(δ − dc − Σ_{k>j} A⊙dA) with δ = dO·o (attnjax.softmax.stick_breaking).
    dterm = jnp.einsum("bhtd,bhtd->bht", d_o, o) - d_c[..., 0]
    dterm = jnp.broadcast_to(dterm[..., None], dterm.shape + (LANES,))

    def q_block(b, hk, g, i, t, codes, lo, hi):
        return b, hk * G + g, i, 0

    def kv_block(b, hk, g, i, t, codes, lo, hi):
        return b, hk, _key_tile(lo, hi, i, t), 0

    def kv_whole(b, hk, g, i, t, codes, lo, hi):
        return b, hk, 0, 0

    dq, dk, dv = call(
        functools.partial(_bwd_kernel, st=st, width=width), (B, Hkv, G, st.num_q_tiles, width),
        in_specs=[pl.BlockSpec((None, None, bq, st.D), q_block), pl.BlockSpec((None, None, bq, st.Dv), q_block),
                  pl.BlockSpec((None, None, bq, LANES), q_block), pl.BlockSpec((None, None, bk, st.D), kv_block),
                  pl.BlockSpec((None, None, bk, st.Dv), kv_block)],
        out_specs=[pl.BlockSpec((None, None, bq, st.D), q_block),
                   pl.BlockSpec((None, None, st.S_pad, st.D), kv_whole),
                   pl.BlockSpec((None, None, st.S_pad, st.Dv), kv_whole)],
        out_shape=[jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, st.S_pad, st.D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, st.S_pad, st.Dv), jnp.float32)],
        scratch=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                 pltpu.VMEM((bq, st.D), jnp.float32)],
        st=st, name="attnjax_stick_breaking_bwd_tpu", parallel=2, vmem_limit_bytes=_bwd_vmem_bytes(st),
    )(*sched, qt, d_o.astype(qt.dtype), dterm, kt, vt)
    return dq.astype(qt.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), None


def _bwd_vmem_bytes(st: StickBreakingStatic) -> int:
    """The backward's VMEM: the resident float32 dK/dV blocks (double-buffered), the pipelined
    tiles and scratch, plus 8 MiB of headroom; at least the 32 MiB default scoped limit."""
    resident = 2 * st.S_pad * (st.D + st.Dv) * 4
    tiles = 2 * 4 * (st.block_q * (2 * st.D + st.Dv + 3 * LANES) + st.block_kv * (st.D + st.Dv))
    return max(resident + tiles + (8 << 20), 32 << 20)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _core(qt, kt, vt, sched, st, width):
    return _forward(qt, kt, vt, sched, st, width)


def _core_fwd(qt, kt, vt, sched, st, width):
    o, c = _forward(qt, kt, vt, sched, st, width)
    return (o, c), (qt, kt, vt, sched, o)


_core.defvjp(_core_fwd, _backward)


__all__ = ["stick_breaking_core_tpu", "DEFAULT_BLOCK"]
