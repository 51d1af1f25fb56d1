"""FlashAttention-2 in Pallas with the GPU (Triton) lowering, forward and backward (custom_vjp).

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).

Shapes: q ``[B, T, Hq, D]``, k ``[B, S, Hk, D]``, v ``[B, S, Hv, Dv]`` -> out ``[B, T, Hq, Dv]``
(q's dtype) and optionally lse ``[B, T, Hq]`` (float32, ``-inf`` on empty rows). At its boundary
the kernel transposes to ``[B, H, L, D]``, pads T and S to multiples of the blocks and the head
dims to powers of two (Triton needs power-of-two tiles; D=192 runs padded to 256).

Math: ``s = cap·tanh((scale·q·kᵀ + b)/cap)`` with ``b`` an array bias, or ALiBi or T5's relative
position bias computed in-kernel from positions, masked where the mask forbids;
``out_i = Σ_j w_ij v_j / l_i`` with the weights of a ``common.WeightFunction`` (softmax:
``w = exp(s − m)`` with an online running max ``m`` and ``l`` including the per-head sink
``exp(sink − m)``).

Kernels (grid = independent programs, one per tile of work):
  * forward: grid ``(T/bq, B, Hq)``; one program owns a query tile and loops over key tiles
    ``[lo, hi)`` of ``masks.block_schedule`` (empty tiles skipped, full tiles skip the element
    mask); K of head ``h // (Hq/Hk)`` and V of head ``h // (Hq/Hv)`` are read by the index maps
    (GQA, and DiffQKV's separate K and V head counts, without repeating K/V). It writes ``out``
    and the row statistic ``lse = m + log l``.
  * backward, two kernels as in FA2 §3.2 (no atomics): ``dK/dV`` with grid ``(S/bk, B, gcd(Hk, Hv))``
    loops over the consecutive query heads of its head block (a GQA group, or whole K groups and
    whole V groups when ``Hk != Hv``) and the query tiles that see its key tile (the transposed
    schedule), so dK is summed over its K group and dV over its V group in registers and each is
    stored after the group's last query head; ``dQ`` (and the array-bias gradient or T5's table
    sums) with grid ``(T/bq, B, Hq)`` loops over key tiles. Both recompute ``P`` from the saved
    lse; ``δ_i = dO_i·O_i`` is a cheap XLA reduction. ``dS = P ⊙ (dO·Vᵀ − δ + dlse)``
    (times the soft-cap derivative); dsinks ``= Σ_rows −exp(sink − lse)·(δ − dlse)`` in XLA.

Masks evaluated in-kernel: Full, Causal, SlidingWindow, ChunkedCausal (from iotas), Segments
(segment-id blocks are kernel inputs), Explicit (int8 mask blocks are kernel inputs) and their
``&``/``|`` combinations; anything else raises NotImplementedError. Dropout raises
NotImplementedError. An array bias gets its gradient (the dQ kernel writes a float32
``[B, Hq, T, S]`` logit gradient, reduced over broadcast axes in XLA; O(T·S) memory, like the
bias itself). ALiBi slopes are constants (no gradient, as in the xla path).

T5 (``attnjax.positional.T5Bias``, Raffel et al. 2020 §2.1): the table (one ``[num_buckets]`` row
per query head) and the position of query row 0 are small whole-array inputs; each tile computes the
bucket of ``key − query`` from its iotas (``scores.t5_bucket_tile``: T5's float32 formula itself)
and reads the head's row by ``num_buckets`` selects, never a ``[T, S]`` array. The dQ kernel also
sums ``dS·[bucket == b]`` over its query tile and key tiles, one lane per bucket, into
``[B, Hq, T/bq, next_pow2(num_buckets)]`` float32 (summed over batch and query tiles in XLA):
O(B·Hq·T/bq·num_buckets) memory. ``T5Bias.query_offset`` (a decode step's traced position) is
supported.

The tile pieces (optional inputs and their loader, logits, allowed pairs, the backward's
recomputation) are ``pallas_kernels.common.gpu_flash``, shared with the block-sparse kernel.

Tested (CPU, interpret mode) against ``attnjax.softmax.softmax_attention_reference`` in
``tests/kernels/test_flash_gpu.py``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.tiling import num_tiles
from pallas_kernels.common.calls import pallas_call
from pallas_kernels.common.gpu import MAX_BLOCK, compiler_params, dot, full_spec, switch_on_code
from pallas_kernels.common.gpu_flash import Loader, allowed, extras, recompute, scores
from pallas_kernels.common.mask_plans import plan_mask
from pallas_kernels.common.scores import t5_table_grad
from pallas_kernels.common.statics import FlashStatic, next_power_of_2, pick_block
from pallas_kernels.flash import common
from pallas_kernels.flash.common import WeightFunction

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 64


def _pow2_floor(block: int, name: str) -> int:
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"{name} must be a positive int, got {block!r}")
    return 1 << (block.bit_length() - 1)


# ----------------------------------------------------------------------------------------------
# Public entry.
# ----------------------------------------------------------------------------------------------


def flash_attention_gpu(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0,
    rng: Optional[jax.Array] = None, return_lse: bool = False, block_q: int = DEFAULT_BLOCK_Q,
    block_kv: int = DEFAULT_BLOCK_KV, interpret: bool = False, weight_fn: WeightFunction = common.SOFTMAX,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None,
):
    """Flash attention with the Pallas Triton lowering (``interpret=True`` runs it on CPU).

    Args: as ``attnjax.softmax.softmax_attention_reference``; ``block_q``/``block_kv`` are powers
    of two (others are rounded down to one), clipped to ``pallas_kernels.common.gpu.MAX_BLOCK`` and
    for short sequences (min 16); ``weight_fn`` is the score-to-weight function
    (``common.SOFTMAX`` by default; ``common.SigmoidWeight`` gives sigmoid attention and
    ``common.SoftplusWeight`` softplus attention).
    Returns ``out`` or ``(out, lse)``.
    ``bias``: an array, ``attnjax.positional.ALiBi`` or ``attnjax.positional.T5Bias`` (gradients to
    the array and to T5's table; T5's ``query_offset`` is supported).
    Raises NotImplementedError for dropout, unsupported mask kinds or bias types, head dims > 256.
    """
    common.validate(q, v, bias=bias, sinks=sinks, dropout_rate=dropout_rate, weight_fn=weight_fn,
                    return_lse=return_lse)
    B, T, Hq, D = q.shape
    S, Hkv, Hv, Dv = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    bq = pick_block(_pow2_floor(min(block_q, MAX_BLOCK), "block_q"), T)
    bk = pick_block(_pow2_floor(min(block_kv, MAX_BLOCK), "block_kv"), S)
    T_pad, S_pad = num_tiles(T, bq) * bq, num_tiles(S, bk) * bk
    D_pad, Dv_pad = max(16, next_power_of_2(D)), max(16, next_power_of_2(Dv))
    plan, mask_data = plan_mask(mask, T, S, T_pad, S_pad)
    bias_kind, bias_obj = common.classify_bias(bias)
    bias_arr, t5 = None, None
    if bias_kind == "t5":
        t5, bias_arr = common.t5_operands(bias_obj, Hq, T, S)
    elif bias_kind == "alibi":
        bias_arr = jnp.asarray(lax.stop_gradient(bias_obj.slopes), jnp.float32)
    elif bias_kind == "array":
        a = jnp.asarray(bias_obj.array)
        a = a.reshape((1,) * (4 - a.ndim) + a.shape).astype(jnp.float32)
        a = jnp.broadcast_to(a, a.shape[:2] + (T, S))
        bias_arr = jnp.pad(a, ((0, 0), (0, 0), (0, T_pad - T), (0, S_pad - S)))
    st = FlashStatic(
        T=T, S=S, T_pad=T_pad, S_pad=S_pad, num_q_heads=Hq, num_kv_heads=Hkv, D=D, Dv=Dv, D_pad=D_pad,
        Dv_pad=Dv_pad, block_q=bq, block_kv=bk, scale=D ** -0.5 if scale is None else float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap), weight_fn=weight_fn,
        mask_plan=plan, bias_kind=bias_kind, t5=t5,
        bias_bcast=() if bias_kind != "array" else (bias_arr.shape[0] == 1, bias_arr.shape[1] == 1),
        has_sinks=sinks is not None, interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages,
        num_v_heads=Hv)
    sched = common.schedule(mask, T, S, bq, bk)
    qt = jnp.pad(q, ((0, 0), (0, T_pad - T), (0, 0), (0, D_pad - D))).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, ((0, 0), (0, S_pad - S), (0, 0), (0, D_pad - D))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, S_pad - S), (0, 0), (0, Dv_pad - Dv))).transpose(0, 2, 1, 3)
    sinks_arr = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    out, lse = _flash(qt, kt, vt, sinks_arr, bias_arr, mask_data, sched, st)
    out = out[:, :, :T, :Dv].transpose(0, 2, 1, 3)
    if return_lse:
        return out, lse[:, :, :T].transpose(0, 2, 1)
    return out


# ----------------------------------------------------------------------------------------------
# Forward kernel.
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, codes_ref, *rest, st: FlashStatic):
    *extra_refs, o_ref, lse_ref = rest
    fn = st.weight_fn
    i, h = pl.program_id(0), pl.program_id(2)
    loader = Loader(st, extra_refs, "q")
    bq, bk = st.block_q, st.block_kv
    q = q_ref[...]
    if st.has_sinks:
        sink = loader.sinks[h]
        m0 = jnp.full((bq,), sink, jnp.float32) if fn.running_max else jnp.zeros((bq,), jnp.float32)
        l0 = fn.weight(m0, m0 if fn.running_max else jnp.zeros_like(m0))
    else:
        m0 = jnp.full((bq,), -jnp.inf if fn.running_max else 0.0, jnp.float32)
        l0 = jnp.zeros((bq,), jnp.float32)
    acc0 = jnp.zeros((bq, st.Dv_pad), jnp.float32)

    def visit(j, carry, apply_mask):
        m, l, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s, rows, cols = scores(st, q, k, loader, h, i, j, None)
        if apply_mask:
            ok = allowed(st, loader, i, j, None, rows, cols)
            s = jnp.where(ok, s, -jnp.inf)
        u = fn.transform(s)
        if fn.running_max:
            m_new = jnp.maximum(m, jnp.max(u, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = fn.rescale(m, m_safe)
            w = fn.weight(u, m_safe[:, None])
        else:
            m_new, alpha = m, None
            w = fn.weight(u, jnp.zeros((bq, 1), jnp.float32))
        if apply_mask:
            w = jnp.where(ok, w, 0.0)
        pv = dot(w.astype(v.dtype), v, contract_a=1, contract_b=0)
        if alpha is None:
            return m_new, l + jnp.sum(w, axis=1), acc + pv
        return m_new, alpha * l + jnp.sum(w, axis=1), alpha[:, None] * acc + pv

    def body(j, carry):
        return switch_on_code(codes_ref[i, j], carry, lambda c: visit(j, c, True), lambda c: visit(j, c, False))

    m, l, acc = lax.fori_loop(lo_ref[i], hi_ref[i], body, (m0, l0, acc0))
    if fn.normalized:
        nonempty = l > 0
        safe_l = jnp.where(nonempty, l, 1.0)
        out = jnp.where(nonempty[:, None], acc / safe_l[:, None], 0.0)
        log_l = jnp.log(safe_l)
        lse = jnp.where(nonempty, m + log_l if fn.running_max else log_l, -jnp.inf)
    else:
        out, lse = acc, jnp.zeros((bq,), jnp.float32)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _forward(qt, kt, vt, sinks, bias, mask_data, sched, st: FlashStatic):
    B, Hq = qt.shape[0], qt.shape[1]
    G, Gv, bq = st.group, st.v_group, st.block_q
    ex = extras(st, sinks, bias, mask_data, "q")
    in_specs = [
        pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.D_pad), lambda i, b, h: (b, h // G, 0, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.Dv_pad), lambda i, b, h: (b, h // Gv, 0, 0)),
        full_spec(sched.lo), full_spec(sched.hi), full_spec(sched.codes),
    ] + ex.specs
    out_shape = [jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.Dv_pad), qt.dtype),
                 jax.ShapeDtypeStruct((B, Hq, st.T_pad), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, bq, st.Dv_pad), lambda i, b, h: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
    return pallas_call(
        functools.partial(_fwd_kernel, st=st), grid=(st.num_q_tiles, B, Hq), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=st.interpret, name="attnjax_flash_fwd",
        compiler_params=compiler_params(st.D_pad, st.Dv_pad, bq, st.block_kv, st.num_warps, st.num_stages),
    )(qt, kt, vt, sched.lo, sched.hi, sched.codes, *ex.arrays)


# ----------------------------------------------------------------------------------------------
# Backward kernels.
# ----------------------------------------------------------------------------------------------


def _dkdv_kernel(q_ref, do_ref, mb_ref, nb_ref, dterm_ref, k_ref, v_ref, qlo_ref, qhi_ref, codes_ref, *rest,
                 st: FlashStatic):
    *extra_refs, dk_ref, dv_ref = rest
    j, c = pl.program_id(0), pl.program_id(2)
    G, Gv, bq = st.group, st.v_group, st.block_q
    loader = Loader(st, extra_refs, "kv")

    def visit(g, k, v, i, carry, apply_mask):
        dk, dv = carry
        rows_ = pl.ds(i * bq, bq)
        q, do = q_ref[g, rows_, :], do_ref[g, rows_, :]
        s, rows, cols = scores(st, q, k, loader, c * st.block_heads + g, i, j, g)
        ok = allowed(st, loader, i, j, g, rows, cols) if apply_mask else None
        dp = dot(do, v)
        p, ds = recompute(st, s, mb_ref[g, rows_], nb_ref[g, rows_], dterm_ref[g, rows_], dp, ok)
        dv = dv + dot(p.astype(do.dtype), do, contract_a=0, contract_b=0)
        dk = dk + dot((ds * st.scale).astype(q.dtype), q, contract_a=0, contract_b=0)
        return dk, dv

    def head(g, carry):  # query head g of the block reads K head g // G and V head g // Gv of the block
        rk, rv = lax.div(g, G), lax.div(g, Gv)  # lax.div/rem: jnp's floor // and % do not lower to Triton
        dk = jnp.where(lax.rem(g, G) == 0, 0.0, carry[0])  # a K (V) head's sum starts at its group's first
        dv = jnp.where(lax.rem(g, Gv) == 0, 0.0, carry[1])  # query head
        k, v = k_ref[rk], v_ref[rv]

        def body(i, c_):
            return switch_on_code(codes_ref[i, j], c_, lambda a: visit(g, k, v, i, a, True),
                                  lambda a: visit(g, k, v, i, a, False))
        dk, dv = lax.fori_loop(qlo_ref[j], qhi_ref[j], body, (dk, dv))

        @pl.when(lax.rem(g, G) == G - 1)
        def _store_dk():
            dk_ref[rk] = dk.astype(dk_ref.dtype)

        @pl.when(lax.rem(g, Gv) == Gv - 1)
        def _store_dv():
            dv_ref[rv] = dv.astype(dv_ref.dtype)

        return dk, dv

    init = (jnp.zeros((st.block_kv, st.D_pad), jnp.float32), jnp.zeros((st.block_kv, st.Dv_pad), jnp.float32))
    lax.fori_loop(0, st.block_heads, head, init)


def _dq_kernel(q_ref, do_ref, mb_ref, nb_ref, dterm_ref, k_ref, v_ref, lo_ref, hi_ref, codes_ref, *rest,
               st: FlashStatic):
    bias_grad, table_grad = st.bias_kind == "array", st.bias_kind == "t5"
    if bias_grad or table_grad:
        *extra_refs, dq_ref, dbias_ref = rest
    else:
        *extra_refs, dq_ref = rest
    i, h = pl.program_id(0), pl.program_id(2)
    bk = st.block_kv
    loader = Loader(st, extra_refs, "q")
    q, do = q_ref[...], do_ref[...]
    mb, nb, dterm = mb_ref[...], nb_ref[...], dterm_ref[...]

    if bias_grad:  # tiles the loop doesn't visit have zero logit gradient
        def zero(j, c):
            dbias_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((st.block_q, bk), jnp.float32)
            return c
        lax.fori_loop(0, st.num_kv_tiles, zero, 0)

    def visit(j, carry, apply_mask):
        dq, dtable = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s, rows, cols = scores(st, q, k, loader, h, i, j, None)
        ok = allowed(st, loader, i, j, None, rows, cols) if apply_mask else None
        dp = dot(do, v)
        _, ds = recompute(st, s, mb, nb, dterm, dp, ok)
        if bias_grad:
            dbias_ref[:, pl.ds(j * bk, bk)] = ds
        if table_grad:  # ds is 0 on masked pairs and padded rows
            dtable = t5_table_grad(ds, loader.t5_buckets(rows, cols), dtable, st.t5.num_buckets)
        return dq + dot((ds * st.scale).astype(k.dtype), k, contract_a=1, contract_b=0), dtable

    def body(j, carry):
        return switch_on_code(codes_ref[i, j], carry, lambda c: visit(j, c, True), lambda c: visit(j, c, False))

    init = (jnp.zeros((st.block_q, st.D_pad), jnp.float32),
            jnp.zeros((_t5_width(st),), jnp.float32) if table_grad else None)
    dq, dtable = lax.fori_loop(lo_ref[i], hi_ref[i], body, init)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if table_grad:
        dbias_ref[...] = dtable


def _t5_width(st: FlashStatic) -> int:
    """Lanes of the dQ kernel's per-tile T5 table sums (Triton tensors have power-of-two sizes)."""
    return next_power_of_2(st.t5.num_buckets)


def _backward(st: FlashStatic, residuals, cotangents):
    qt, kt, vt, sinks, bias, mask_data, sched, out, lse = residuals
    d_out, d_lse = cotangents
    fn = st.weight_fn
    B, Hq = qt.shape[:2]
    G, Gv, bq, bk = st.group, st.v_group, st.block_q, st.block_kv
    nh, nk, nv = st.block_heads, st.num_kv_heads // st.head_blocks, st.v_heads // st.head_blocks
    d_out = d_out.astype(qt.dtype)
    if fn.normalized:
        delta = jnp.einsum("bhtd,bhtd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
        dterm = delta - d_lse.astype(jnp.float32)
    else:
        dterm = jnp.zeros(lse.shape, jnp.float32)
    # Padded query rows: their dO is 0; a +inf offset also makes their recomputed P exactly 0.
    row_valid = jnp.arange(st.T_pad) < st.T
    stat = common.backward_stat(fn, lse)
    mb, nb = common.backward_offsets(fn, stat)
    if fn.running_max:
        mb = jnp.where(row_valid, mb, jnp.inf)
    cparams = compiler_params(st.D_pad, st.Dv_pad, bq, bk, st.num_warps, st.num_stages)

    # dK, dV: grid over key tiles and head blocks; a block's nh query heads (whole K groups and whole
    # V groups: nk K heads, nv V heads) come as one block.
    ex = extras(st, sinks, bias, mask_data, "kv")
    row_spec = pl.BlockSpec((None, nh, st.T_pad), lambda j, b, c: (b, c, 0))
    k_spec = pl.BlockSpec((None, nk, bk, st.D_pad), lambda j, b, c: (b, c, j, 0))
    v_spec = pl.BlockSpec((None, nv, bk, st.Dv_pad), lambda j, b, c: (b, c, j, 0))
    in_specs = [
        pl.BlockSpec((None, nh, st.T_pad, st.D_pad), lambda j, b, c: (b, c, 0, 0)),
        pl.BlockSpec((None, nh, st.T_pad, st.Dv_pad), lambda j, b, c: (b, c, 0, 0)),
        row_spec, row_spec, row_spec, k_spec, v_spec,
        full_spec(sched.q_lo), full_spec(sched.q_hi), full_spec(sched.codes),
    ] + ex.specs
    dk, dv = pallas_call(
        functools.partial(_dkdv_kernel, st=st), grid=(st.num_kv_tiles, B, st.head_blocks), in_specs=in_specs,
        out_specs=[k_spec, v_spec],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        interpret=st.interpret, name="attnjax_flash_dkdv", compiler_params=cparams,
    )(qt, d_out, mb, nb, dterm, kt, vt, sched.q_lo, sched.q_hi, sched.codes, *ex.arrays)

    # dQ (and the array bias's logit gradient or T5's table sums): grid over query tiles and query heads.
    ex = extras(st, sinks, bias, mask_data, "q")
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [
        pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, bq, st.Dv_pad), lambda i, b, h: (b, h, i, 0)),
        row_spec, row_spec, row_spec,
        pl.BlockSpec((None, None, st.S_pad, st.D_pad), lambda i, b, h: (b, h // G, 0, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.Dv_pad), lambda i, b, h: (b, h // Gv, 0, 0)),
        full_spec(sched.lo), full_spec(sched.hi), full_spec(sched.codes),
    ] + ex.specs
    out_specs = [pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(qt.shape, qt.dtype)]
    if st.bias_kind == "array":
        out_specs.append(pl.BlockSpec((None, None, bq, st.S_pad), lambda i, b, h: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.S_pad), jnp.float32))
    elif st.bias_kind == "t5":  # per (query tile, head) sums of dS by bucket
        out_specs.append(pl.BlockSpec((None, None, None, _t5_width(st)), lambda i, b, h: (b, h, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, Hq, st.num_q_tiles, _t5_width(st)), jnp.float32))
    res = pallas_call(
        functools.partial(_dq_kernel, st=st), grid=(st.num_q_tiles, B, Hq), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=st.interpret, name="attnjax_flash_dq",
        compiler_params=cparams,
    )(qt, d_out, mb, nb, dterm, kt, vt, sched.lo, sched.hi, sched.codes, *ex.arrays)
    dq = res[0]

    d_bias = None
    if st.bias_kind == "array":
        b1, h1 = st.bias_bcast
        d_bias = res[1].sum(axis=tuple(a for a, one in ((0, b1), (1, h1)) if one), keepdims=True)
    elif st.bias_kind == "t5":  # the table's; the query offset is an int (no cotangent)
        d_bias = (common.t5_table_cotangent(res[1], st.t5.num_buckets), None)
    d_sinks = None
    if st.has_sinks:  # softmax only (validated): P_sink = exp(sink − lse), dsink = Σ −P_sink·(δ − dlse)
        p_sink = jnp.exp(sinks[None, :, None] - jnp.where(jnp.isfinite(lse), lse, jnp.inf))
        d_sinks = jnp.sum(-p_sink * jnp.where(row_valid, dterm, 0.0), axis=(0, 2))
    return dq, dk, dv, d_sinks, d_bias, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(qt, kt, vt, sinks, bias, mask_data, sched, st):
    return _forward(qt, kt, vt, sinks, bias, mask_data, sched, st)


def _flash_fwd(qt, kt, vt, sinks, bias, mask_data, sched, st):
    out, lse = _forward(qt, kt, vt, sinks, bias, mask_data, sched, st)
    return (out, lse), (qt, kt, vt, sinks, bias, mask_data, sched, out, lse)


_flash.defvjp(_flash_fwd, _backward)


__all__ = ["flash_attention_gpu", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV"]
