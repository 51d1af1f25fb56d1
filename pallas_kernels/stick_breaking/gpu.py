"""Stick-breaking attention in Pallas with the GPU (Triton) lowering, forward and backward.

Tan et al., "Scaling Stick-Breaking Attention: An Efficient Implementation and In-depth Study"
(2024). Math, conventions and the derivation of the backward: ``attnjax.softmax.stick_breaking``
(the reference this kernel is tested against, in ``tests/softmax/test_stick_breaking.py``).

Layout: q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, Dv]`` are transposed to
``[B, H, L, D]`` at this module's boundary, T and S padded to whole tiles and the head dims to
powers of two (at least 16). K/V of head ``h // (Hq/Hkv)`` are read through the index maps (GQA
without repeating K/V).

Kernels, grid ``(T/bq, B, Hq)``, one program per query tile, walking its key tiles from the
diagonal back to the first (``[lo, hi)`` of the mask's block schedule, EMPTY tiles skipped, FULL
tiles without the element mask):
  * forward: carries ``c = Σ softplus(z)`` of the keys passed; per tile
    ``A = exp(z − c − revcumsum(softplus(z)))``, ``acc += A V``; writes ``o = acc`` (float32) and
    ``c``. The remainder ``exp(−c)·v_i`` is added in XLA (``with_remainder``).
  * backward: the same walk carrying ``c`` and ``Σ A⊙dA``; ``dZ`` per tile gives ``dQ``
    (registers) and ``dK = scale·dZᵀQ``, ``dV = AᵀdO``, added with atomics into float32 ``[B, Hkv,
    S, D]`` buffers (as the paper's Triton kernel does): a key tile's gradient depends on the
    stick of every key between it and the query, which only a query-major walk has at hand.

The reverse cumsum inside a tile is ``total − cumsum`` (Triton lowers only the forward scan).
Masks: any mask implying causality that ``pallas_kernels.common.plan_mask`` compiles (Causal,
SlidingWindow(left, 0), ChunkedCausal, & Segments / Explicit / other structural masks). No bias.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.tiling import num_tiles
from pallas_kernels.common.calls import pallas_call
from pallas_kernels.common.gpu import MAX_BLOCK, compiler_params, dot, full_spec, switch_on_code
from pallas_kernels.common.mask_plans import SegmentData, plan_mask
from pallas_kernels.common.scores import apply_soft_cap, soft_cap_grad
from pallas_kernels.common.statics import next_power_of_2, pick_block
from pallas_kernels.stick_breaking import common
from pallas_kernels.stick_breaking.common import StickBreakingStatic
from pallas_kernels.stick_breaking.tiles import backward_tile, forward_tile

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_KV = 64


def stick_breaking_core_gpu(q, k, v, mask, *, scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                            block_q: int = DEFAULT_BLOCK_Q, block_kv: int = DEFAULT_BLOCK_KV, interpret: bool = False,
                            num_warps: Optional[int] = None, num_stages: Optional[int] = None):
    """``(o [B, T, Hq, Dv], row_softplus [B, T, Hq])``, both float32, differentiable.

    ``o_i = Σ_{j<i} A_ij v_j`` (no remainder) and ``row_softplus_i = Σ_k softplus(z_ik)``; inputs
    already validated (``common.validate``). ``block_q``/``block_kv``: powers of two, clipped to
    ``pallas_kernels.common.gpu.MAX_BLOCK`` and for short sequences (min 16).
    """
    B, T, Hq, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, int) or block <= 0 or block & (block - 1):
            raise ValueError(f"{name} must be a positive power of two, got {block!r}")
    bq = pick_block(min(block_q, MAX_BLOCK), T)
    bk = pick_block(min(block_kv, MAX_BLOCK), S)
    T_pad, S_pad = num_tiles(T, bq) * bq, num_tiles(S, bk) * bk
    D_pad, Dv_pad = max(16, next_power_of_2(D)), max(16, next_power_of_2(Dv))
    plan, mask_data = plan_mask(mask, T, S, T_pad, S_pad)
    st = StickBreakingStatic(
        T=T, S=S, T_pad=T_pad, S_pad=S_pad, num_q_heads=Hq, num_kv_heads=Hkv, D=D, Dv=Dv, D_pad=D_pad,
        Dv_pad=Dv_pad, block_q=bq, block_kv=bk, scale=D ** -0.5 if scale is None else float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap), mask_plan=plan,
        interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages)
    sched = common.schedule(mask, st)
    qt = jnp.pad(q, ((0, 0), (0, T_pad - T), (0, 0), (0, D_pad - D))).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, ((0, 0), (0, S_pad - S), (0, 0), (0, D_pad - D))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, S_pad - S), (0, 0), (0, Dv_pad - Dv))).transpose(0, 2, 1, 3)
    o, c = _core(qt, kt, vt, mask_data, sched, st)
    return o[:, :, :T, :Dv].transpose(0, 2, 1, 3), c[:, :, :T].transpose(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# Specs, mask data, tile pieces.
# ----------------------------------------------------------------------------------------------


def _mask_specs(mask_data, st: StickBreakingStatic):
    """Arrays and specs of the mask's data leaves for a query-major grid ``(i, b, h)``."""
    arrays, specs = [], []
    for d in mask_data:
        if isinstance(d, SegmentData):
            one = d.q.shape[0] == 1
            specs.append(pl.BlockSpec((None, st.block_q), lambda i, b, h, one=one: (0 if one else b, i)))
            specs.append(pl.BlockSpec((None, st.S_pad), lambda i, b, h, one=one: (0 if one else b, 0)))
            arrays += [d.q, d.kv]
        else:
            b1, h1 = d.mask.shape[0] == 1, d.mask.shape[1] == 1
            specs.append(pl.BlockSpec((None, None, st.block_q, st.S_pad),
                                      lambda i, b, h, b1=b1, h1=h1: (0 if b1 else b, 0 if h1 else h, i, 0)))
            arrays.append(d.mask)
    return arrays, specs


def _mask_loader(st: StickBreakingStatic, refs, j):
    """``eval_mask``'s loader for key tile ``j`` from this program's mask data refs."""
    refs, by_slot = list(refs), {}
    for kind, slot in st.mask_plan.data_kinds():
        by_slot[slot] = (refs.pop(0), refs.pop(0)) if kind == "segments" else refs.pop(0)
    bk = st.block_kv

    def load(kind, slot):
        if kind == "segments":
            q_ref, kv_ref = by_slot[slot]
            return q_ref[...][:, None], kv_ref[pl.ds(j * bk, bk)][None, :]
        return by_slot[slot][:, pl.ds(j * bk, bk)]

    return load


def _num_mask_refs(st: StickBreakingStatic) -> int:
    return sum(2 if kind == "segments" else 1 for kind, _ in st.mask_plan.data_kinds())


def _logits(st: StickBreakingStatic, q, k):
    return apply_soft_cap(dot(q, k) * st.scale, st.logits_soft_cap)


def _walk_left(lo_ref, hi_ref, codes_ref, i, visit, carry):
    """Key tiles ``hi−1, …, lo`` of query tile ``i``; ``visit(j, carry, apply_mask)``."""
    hi = hi_ref[i]

    def body(t, c):
        j = hi - 1 - t
        return switch_on_code(codes_ref[i, j], c, lambda c_: visit(j, c_, True), lambda c_: visit(j, c_, False))

    return lax.fori_loop(0, hi - lo_ref[i], body, carry)


def _params(st: StickBreakingStatic):
    return compiler_params(st.D_pad, st.Dv_pad, st.block_q, st.block_kv, st.num_warps, st.num_stages)


# ----------------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, codes_ref, *rest, st: StickBreakingStatic):
    *mask_refs, o_ref, c_ref = rest
    i, bk = pl.program_id(0), st.block_kv
    q = q_ref[...]

    def visit(j, carry, apply_mask):
        c, acc = carry
        v = v_ref[pl.ds(j * bk, bk), :]
        z = _logits(st, q, k_ref[pl.ds(j * bk, bk), :])
        ok = common.allowed(st, i, j, _mask_loader(st, mask_refs, j)) if apply_mask else None
        a, c = forward_tile(z, c, ok, common.cumsum_reverse_cumsum)
        return c, acc + dot(a.astype(v.dtype), v, contract_a=1, contract_b=0)

    init = (jnp.zeros((st.block_q, 1), jnp.float32), jnp.zeros((st.block_q, st.Dv_pad), jnp.float32))
    c, acc = _walk_left(lo_ref, hi_ref, codes_ref, i, visit, init)
    o_ref[...] = acc
    c_ref[...] = c[:, 0]


def _forward(qt, kt, vt, mask_data, sched, st: StickBreakingStatic):
    B, Hq = qt.shape[:2]
    G, bq = st.group, st.block_q
    codes, lo, hi = sched
    arrays, specs = _mask_specs(mask_data, st)
    in_specs = [
        pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.D_pad), lambda i, b, h: (b, h // G, 0, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.Dv_pad), lambda i, b, h: (b, h // G, 0, 0)),
        full_spec(lo), full_spec(hi), full_spec(codes),
    ] + specs
    return pallas_call(
        functools.partial(_fwd_kernel, st=st), grid=(st.num_q_tiles, B, Hq), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, st.Dv_pad), lambda i, b, h: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.Dv_pad), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hq, st.T_pad), jnp.float32)],
        interpret=st.interpret, name="attnjax_stick_breaking_fwd", compiler_params=_params(st),
    )(qt, kt, vt, lo, hi, codes, *arrays)


# ----------------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------------


def _bwd_kernel(q_ref, do_ref, dterm_ref, k_ref, v_ref, lo_ref, hi_ref, codes_ref, *rest, st: StickBreakingStatic):
    n = _num_mask_refs(st)
    mask_refs, rest = rest[:n], rest[n:]
    _, _, dq_ref, dk_ref, dv_ref = rest  # the two zero inputs are aliased to dk_ref, dv_ref
    i, bk = pl.program_id(0), st.block_kv
    q, do = q_ref[...], do_ref[...]
    dterm = dterm_ref[...][:, None]

    def visit(j, carry, apply_mask):
        c, s, dq = carry
        rows = pl.ds(j * bk, bk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        z = _logits(st, q, k)
        ok = common.allowed(st, i, j, _mask_loader(st, mask_refs, j)) if apply_mask else None
        a, dz, c, s = backward_tile(z, dot(do, v), c, s, dterm, ok, common.cumsum_reverse_cumsum)
        dz = dz * soft_cap_grad(z, st.logits_soft_cap) * st.scale
        plgpu.atomic_add(dk_ref, (rows, slice(None)), dot(dz.astype(q.dtype), q, contract_a=0, contract_b=0))
        plgpu.atomic_add(dv_ref, (rows, slice(None)), dot(a.astype(do.dtype), do, contract_a=0, contract_b=0))
        return c, s, dq + dot(dz.astype(k.dtype), k, contract_a=1, contract_b=0)

    zeros_row = jnp.zeros((st.block_q, 1), jnp.float32)
    init = (zeros_row, zeros_row, jnp.zeros((st.block_q, st.D_pad), jnp.float32))
    _, _, dq = _walk_left(lo_ref, hi_ref, codes_ref, i, visit, init)
    dq_ref[...] = dq


def _backward(st: StickBreakingStatic, residuals, cotangents):
    qt, kt, vt, mask_data, sched, o = residuals
    d_o, d_c = cotangents
    B, Hq = qt.shape[:2]
    Hkv, G, bq = st.num_kv_heads, st.group, st.block_q
    codes, lo, hi = sched
    # dZ = A⊙dA − σ(z)⊙(δ − dc − Σ_{k>j} A⊙dA) with δ = dO·o (attnjax.softmax.stick_breaking).
    dterm = jnp.einsum("bhtd,bhtd->bht", d_o, o) - d_c
    arrays, specs = _mask_specs(mask_data, st)
    kv_block = lambda D: pl.BlockSpec((None, None, st.S_pad, D), lambda i, b, h: (b, h // G, 0, 0))  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, bq, st.Dv_pad), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        kv_block(st.D_pad), kv_block(st.Dv_pad), full_spec(lo), full_spec(hi), full_spec(codes),
    ] + specs + [kv_block(st.D_pad), kv_block(st.Dv_pad)]
    zeros_k = jnp.zeros((B, Hkv, st.S_pad, st.D_pad), jnp.float32)
    zeros_v = jnp.zeros((B, Hkv, st.S_pad, st.Dv_pad), jnp.float32)
    first_zero = len(in_specs) - 2
    dq, dk, dv = pallas_call(
        functools.partial(_bwd_kernel, st=st), grid=(st.num_q_tiles, B, Hq), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
                   kv_block(st.D_pad), kv_block(st.Dv_pad)],
        out_shape=[jax.ShapeDtypeStruct(qt.shape, jnp.float32), jax.ShapeDtypeStruct(zeros_k.shape, jnp.float32),
                   jax.ShapeDtypeStruct(zeros_v.shape, jnp.float32)],
        input_output_aliases={first_zero: 1, first_zero + 1: 2},
        interpret=st.interpret, name="attnjax_stick_breaking_bwd", compiler_params=_params(st),
    )(qt, d_o.astype(qt.dtype), dterm, kt, vt, lo, hi, codes, *arrays, zeros_k, zeros_v)
    return dq.astype(qt.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype), None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(qt, kt, vt, mask_data, sched, st):
    return _forward(qt, kt, vt, mask_data, sched, st)


def _core_fwd(qt, kt, vt, mask_data, sched, st):
    o, c = _forward(qt, kt, vt, mask_data, sched, st)
    return (o, c), (qt, kt, vt, mask_data, sched, o)


_core.defvjp(_core_fwd, _backward)


__all__ = ["stick_breaking_core_gpu", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV"]
