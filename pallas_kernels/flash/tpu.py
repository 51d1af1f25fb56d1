"""FlashAttention-2 for TPU: Pallas kernels (Mosaic lowering) with a custom VJP.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023);
the mask handling follows the splash-attention design (jax ``pallas/ops/tpu/splash_attention``):
the mask is preprocessed into a block schedule that the kernels read by scalar prefetch.

Reference: ``attnjax.softmax.softmax_attention_reference`` (same arguments and results; this is
the TPU twin of ``attnjax.softmax.flash_attention_xla``). Tested in ``tests/kernels/test_flash_tpu.py``.
Backend-independent pieces (schedule, weight functions, refusals) come from
``pallas_kernels.flash.common``; the Mosaic plumbing (``pallas_kernels.common.tpu``) and the tile
math (logits, allowed pairs, the backward's ``dlogits``; ``pallas_kernels.common.tpu_flash``) are
shared with the block-sparse kernel.

Forward: grid ``(B, Hq, nq, width)``, the last axis sequential ("arbitrary"). Step ``j`` of query
tile ``i`` visits key tile ``lo[i] + j`` of the schedule; the running max ``m``, normalizer ``l``
and the float32 accumulator live in VMEM scratch, and the last step writes ``out = acc / l`` and
``lse = m + log l``. Steps past ``hi[i]`` and EMPTY tiles are skipped by ``pl.when``, and their
index map is clamped into ``[lo, hi)`` so they fetch no new block. FULL tiles skip the element
mask. The grid width is ``max(hi - lo)`` when the mask is known at trace time (a sliding window
or chunked mask runs a narrow grid; causal skips the upper triangle's work but not its steps),
else the number of key tiles.

Backward (recompute from ``lse``; ``dS = P ⊙ (dP - δ + dlse)`` with ``δ = rowsum(dO ⊙ O)``): a dq
kernel on the forward grid, and a dk/dv kernel on ``(B, gcd(Hk, Hv), nk, Hq / gcd(Hk, Hv), width_t)``
whose last two axes (the consecutive query heads of a head block, then the query tiles of the
transposed schedule) are sequential. A head block holds whole K groups and whole V groups (for GQA,
``Hk = Hv``, it is one group), so dK is summed over its K group and dV over its V group in VMEM
scratch; each output block (K head ``h // (Hq/Hk)``, V head ``h // (Hq/Hv)`` by index map) is visited
on consecutive steps and written on its group's last one. K/V are never repeated in HBM.

Bias (computed in-kernel from the tile's iotas, never a ``[T, S]`` array): ALiBi's slopes, or T5's
relative position bias (``attnjax.positional.T5Bias``, Raffel et al. 2020 §2.1), whose table (one
``[num_buckets]`` row per query head) and query position offset sit in SMEM; each tile computes
the bucket of ``key − query`` by T5's float32 formula itself (``scores.t5_bucket_tile``) and reads
the row by ``num_buckets`` selects. The dq kernel also sums ``dS·[bucket == b]`` over its query
tile and key steps in a ``(8, num_buckets)`` VMEM scratch and writes it as an ``(8, num_buckets)``
block (last two block dims: a multiple of 8 and the whole array dim) of
``[B, Hq, 8·nq, num_buckets]``, summed over batch and query tiles in XLA: O(B·Hq·nq·num_buckets)
memory. ``T5Bias.query_offset`` (a decode step's traced position) is supported. Array biases
raise NotImplementedError.

K and V may have different head counts ``Hk``, ``Hv`` (DiffQKV, Lin et al. 2025, "Sigma", Fig. 3):
query head ``h`` reads K head ``h // (Hq/Hk)`` and V head ``h // (Hq/Hv)`` through the index maps.

TPU constraints: ``block_q`` and ``block_kv`` must be multiples of 8; they are clipped to the
sequence lengths rounded up to 8, and T, S are zero-padded to whole tiles. On a real TPU use
multiples of 128 for ``block_kv`` (the lane axis of the logit tile and of the KV segment-id
block), multiples of 16 for ``block_q`` with bf16 inputs, and of 32 for both with an Explicit
mask (int8 blocks). Row statistics (m, l, lse, δ) are lane-broadcast ``[rows, 128]`` float32
blocks, as in jax's TPU flash attention.
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

from attnjax.masks import FULL, PARTIAL, Mask
from pallas_kernels.common.mask_plans import plan_mask
from pallas_kernels.common.statics import FlashStatic
from pallas_kernels.common.scores import t5_table_grad
from pallas_kernels.common.tpu import (LANES, SUBLANES, call, data_specs, heads_major, mask_layout, row_stat,
                                       stat_column, tiled_spec, tpu_tiles)
from pallas_kernels.common.tpu_flash import allowed, dlogits, logits, split_refs, t5_buckets
from pallas_kernels.flash import common
from pallas_kernels.flash.common import WeightFunction


def flash_attention_tpu(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, block_q: int = 128, block_kv: int = 128, interpret: bool = False,
    weight_fn: WeightFunction = common.SOFTMAX,
):
    """Softmax attention by Pallas TPU FlashAttention-2 kernels, differentiable.

    ``out_i = Σ_j softmax_j(s_ij) v_j`` with ``s_ij = cap·tanh((scale·q_i·k_j + b_ij)/cap)`` over
    the keys the mask allows (Dao 2023); tested against
    ``attnjax.softmax.softmax_attention_reference``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hk, D]``; v: ``[B, S, Hv, Dv]`` with ``Hq % Hk == 0`` and
        ``Hq % Hv == 0`` (query head ``h`` reads K head ``h // (Hq // Hk)`` and V head
        ``h // (Hq // Hv)`` through the index maps).
      mask: ``None`` or ``&``/``|`` combinations of ``Full``, ``Causal``, ``SlidingWindow``,
        ``ChunkedCausal``, ``Segments`` and ``Explicit`` (bottom-right aligned when ``T != S``).
      bias: ``None``, ``attnjax.positional.ALiBi`` or ``attnjax.positional.T5Bias`` (computed in the
        kernel from positions; T5's table gets its gradient, ``query_offset`` is supported).
      scale: logit scale, default ``1/sqrt(D)``. logits_soft_cap: ``cap`` in ``cap·tanh(s/cap)``.
      sinks: ``[Hq]`` per-head sink logits (differentiable).
      dropout_rate, rng: only ``0.0`` is supported.
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]`` (``-inf`` on empty rows);
        it is differentiable.
      block_q, block_kv: tile sizes, multiples of 8 (see the module docstring for real TPUs).
      interpret: run in TPU interpret mode (on CPU, for tests).
      weight_fn: the score-to-weight function (``common.SOFTMAX``; see ``common.WeightFunction``).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype (0 on rows with no allowed key), and ``lse`` if asked.
    Raises:
      NotImplementedError: dropout, an array or other bias, a mask kind the kernel can't evaluate.
    """
    common.validate(q, v, bias=bias, sinks=sinks, dropout_rate=dropout_rate, weight_fn=weight_fn,
                    return_lse=return_lse)
    bias_kind, bias_obj = common.classify_bias(bias)
    if bias_kind == "array":
        raise NotImplementedError("flash_attention_tpu supports bias=None, positional.ALiBi or positional.T5Bias, "
                                  "not an array bias; use implementation='xla'")
    B, T, Hq, D = q.shape
    S, Hkv, Hv, Dv = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    bq, bk, T_pad, S_pad = tpu_tiles(block_q, block_kv, T, S)
    plan, mask_data = plan_mask(mask, T, S, T_pad, S_pad)
    t5, bias_arrays = None, None
    if bias_kind == "t5":
        t5, bias_arrays = common.t5_operands(bias_obj, Hq, T, S)
    elif bias_kind == "alibi":
        bias_arrays = lax.stop_gradient(jnp.asarray(bias_obj.slopes, jnp.float32))
    st = FlashStatic(
        T=T, S=S, T_pad=T_pad, S_pad=S_pad, num_q_heads=Hq, num_kv_heads=Hkv, D=D, Dv=Dv, D_pad=D, Dv_pad=Dv,
        block_q=bq, block_kv=bk, scale=D ** -0.5 if scale is None else float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap), weight_fn=weight_fn,
        mask_plan=plan, bias_kind=bias_kind, t5=t5, has_sinks=sinks is not None, interpret=bool(interpret),
        num_v_heads=Hv)
    sinks = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    schedules, widths = _plans(mask, st)
    out, lse = _flash(q, k, v, sinks, bias_arrays, mask_layout(mask_data, st), schedules, st, widths)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- schedule


def _plans(mask: Optional[Mask], st: FlashStatic):
    """Scalar-prefetch operands and static grid widths of the query-major and key-major passes.

    Returns ``(((codes, lo, hi), (codes_t, q_lo, q_hi)), (width, width_t))``; ``codes`` are
    flattened row-major (``codes_t`` is the transpose). A width is ``max(hi - lo)`` when the
    schedule is known at trace time (structural masks), else the full number of tiles.
    """
    with jax.ensure_compile_time_eval():
        sched = common.schedule(mask, st.T, st.S, st.block_q, st.block_kv)

    def width(lo, hi, full):
        if isinstance(hi, jax.core.Tracer):
            return full
        return max(int(np.max(np.asarray(hi) - np.asarray(lo))), 1)

    by_q = (sched.codes.reshape(-1), sched.lo, sched.hi)
    by_kv = (sched.codes.T.reshape(-1), sched.q_lo, sched.q_hi)
    return (by_q, by_kv), (width(sched.lo, sched.hi, st.num_kv_tiles), width(sched.q_lo, sched.q_hi, st.num_q_tiles))


def _visit(lo, hi, row, step):
    """Tile visited by ``step`` of ``row``: ``lo + step``, clamped into ``[lo, hi)``."""
    return jnp.minimum(lo[row] + step, jnp.maximum(hi[row] - 1, 0))


def _when_tile(codes, lo, hi, row, step, col, num_cols, compute):
    """Run ``compute(masked)`` on a live step: unmasked on FULL tiles, masked on PARTIAL ones."""
    live = lo[row] + step < hi[row]
    code = codes[row * num_cols + col]
    pl.when(live & (code == FULL))(lambda: compute(False))
    pl.when(live & (code == PARTIAL))(lambda: compute(True))


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(codes, lo, hi, q_ref, k_ref, v_ref, *refs, st: FlashStatic, width):
    data_refs, sinks_ref, bias_refs, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = split_refs(refs, st)
    fn = st.weight_fn
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    jk = _visit(lo, hi, i, j)

    @pl.when(j == 0)
    def _init():
        m0 = jnp.full(m_sc.shape, -jnp.inf if fn.running_max else 0.0, jnp.float32)
        l0 = jnp.zeros(l_sc.shape, jnp.float32)
        if sinks_ref is not None:  # a sink is a logit with no value: it joins only the normalizer
            sink = jnp.full(m_sc.shape, sinks_ref[h], jnp.float32)
            m0 = sink if fn.running_max else m0
            l0 = fn.weight(sink, m0)
        m_sc[...], l_sc[...] = m0, l0
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def compute(masked):
        s = logits(q_ref[...], k_ref[...], i, jk, h, bias_refs, st)
        if masked:
            ok = allowed(data_refs, i, jk, st)
            s = jnp.where(ok, s, -jnp.inf)
        u = fn.transform(s)
        m_prev, l_prev = stat_column(m_sc), stat_column(l_sc)
        m_new, m_use, alpha = m_prev, m_prev, 1.0
        if fn.running_max:
            m_new = jnp.maximum(m_prev, u.max(axis=1, keepdims=True))
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen no key yet
            alpha = fn.rescale(m_prev, m_use)
        p = fn.weight(u, m_use)
        if masked:
            p = jnp.where(ok, p, 0.0)
        v = v_ref[...]
        pv = lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_sc.shape)

    _when_tile(codes, lo, hi, i, j, jk, st.num_kv_tiles, compute)

    @pl.when(j == width - 1)
    def _finish():
        acc = acc_sc[...]
        if not fn.normalized:
            o_ref[...] = acc.astype(o_ref.dtype)
            lse_ref[...] = jnp.zeros(lse_ref.shape, jnp.float32)
            return
        m, l = stat_column(m_sc), stat_column(l_sc)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        stat = jnp.log(safe_l) + (m if fn.running_max else 0.0)
        o_ref[...] = jnp.where(seen, acc / safe_l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(jnp.where(seen, stat, -jnp.inf), lse_ref.shape)


def _dq_kernel(codes, lo, hi, q_ref, k_ref, v_ref, do_ref, stat_ref, dterm_ref, *refs, st: FlashStatic, width):
    data_refs, _, bias_refs, rest = split_refs(refs, st, sinks=False)
    table_grad = st.bias_kind == "t5"
    dq_ref, dtable_ref, dq_sc, dtable_sc = rest if table_grad else (rest[0], None, rest[1], None)
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    jk = _visit(lo, hi, i, j)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        if table_grad:
            dtable_sc[...] = jnp.zeros(dtable_sc.shape, jnp.float32)

    def compute(masked):
        k = k_ref[...]
        _, ds = dlogits(q_ref[...], k, v_ref[...], do_ref[...], stat_ref, dterm_ref, i, jk, h, data_refs,
                        bias_refs, st, masked, scaled=False)
        if table_grad:  # ds is 0 on masked pairs and padded rows
            dtable_sc[...] = t5_table_grad(ds, t5_buckets(bias_refs, i, jk, st), dtable_sc[...], st.t5.num_buckets)
        dq_sc[...] += lax.dot((ds * st.scale).astype(k.dtype), k, preferred_element_type=jnp.float32)

    _when_tile(codes, lo, hi, i, j, jk, st.num_kv_tiles, compute)

    @pl.when(j == width - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
        if table_grad:
            dtable_ref[...] = dtable_sc[...]


def _dkdv_kernel(codes, lo, hi, q_ref, k_ref, v_ref, do_ref, stat_ref, dterm_ref, *refs, st: FlashStatic,
                 width):
    data_refs, _, bias_refs, (dk_ref, dv_ref, dk_sc, dv_sc) = split_refs(refs, st, sinks=False)
    c, jk, g, t = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    iq = _visit(lo, hi, jk, t)
    h = c * st.block_heads + g
    G, Gv = st.group, st.v_group
    rk, rv = lax.rem(g, G), lax.rem(g, Gv)  # position in the K and V groups (jnp's % does not lower to Mosaic)

    @pl.when((rk == 0) & (t == 0))  # a K head's sum starts at its group's first query head
    def _init_dk():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)

    @pl.when((rv == 0) & (t == 0))  # and a V head's at its own group's first
    def _init_dv():
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def compute(masked):
        q, do = q_ref[...], do_ref[...]
        p, ds = dlogits(q, k_ref[...], v_ref[...], do, stat_ref, dterm_ref, iq, jk, h, data_refs, bias_refs,
                         st, masked)
        dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _when_tile(codes, lo, hi, jk, t, iq, st.num_q_tiles, compute)

    @pl.when((rk == G - 1) & (t == width - 1))
    def _finish_dk():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)

    @pl.when((rv == Gv - 1) & (t == width - 1))
    def _finish_dv():
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _optional(x) -> list:
    """An optional input's arrays: none for None, a tuple's items (T5's table and query offset), or ``[x]``."""
    return [] if x is None else list(x) if isinstance(x, tuple) else [x]


def _smem(arrays: list) -> list:
    return [pl.BlockSpec(memory_space=pltpu.SMEM) for _ in arrays]


def _by_q(st: FlashStatic):
    """Tile getters ``(b, h, tile)`` of q, k and v on the forward/dq grid ``(B, Hq, nq, width)``.

    Head indices use ``lax.div``: grid ids are non-negative, and ``//`` lowers through ``sign``,
    which Mosaic can't lower here."""
    def q_tile(b, h, i, j, codes, lo, hi):
        return b, h, i

    def k_tile(b, h, i, j, codes, lo, hi):
        return b, lax.div(h, st.group), _visit(lo, hi, i, j)

    def v_tile(b, h, i, j, codes, lo, hi):
        return b, lax.div(h, st.v_group), _visit(lo, hi, i, j)

    return q_tile, k_tile, v_tile


def _by_kv(st: FlashStatic):
    """Tile getters ``(b, h, tile)`` of q, k and v on the dk/dv grid ``(B, head_blocks, nk, block_heads,
    width)``: query head ``h = c·block_heads + g`` reads K head ``h // group`` and V head ``h // v_group``."""
    def q_tile(b, c, jk, g, t, codes, lo, hi):
        return b, c * st.block_heads + g, _visit(lo, hi, jk, t)

    def k_tile(b, c, jk, g, t, codes, lo, hi):
        return b, lax.div(c * st.block_heads + g, st.group), jk

    def v_tile(b, c, jk, g, t, codes, lo, hi):
        return b, lax.div(c * st.block_heads + g, st.v_group), jk

    return q_tile, k_tile, v_tile


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, sinks, bias, mask_data, schedules, st, widths):
    return _forward(q, k, v, sinks, bias, mask_data, schedules, st, widths)


def _forward(q, k, v, sinks, bias, mask_data, schedules, st: FlashStatic, widths):
    B, Hq, bq, bk = q.shape[0], st.num_q_heads, st.block_q, st.block_kv
    schedule, width = schedules[0], widths[0]
    q_tile, k_tile, v_tile = _by_q(st)
    out, lse = call(
        functools.partial(_fwd_kernel, st=st, width=width), (B, Hq, st.num_q_tiles, width),
        in_specs=[tiled_spec(bq, st.D, q_tile), tiled_spec(bk, st.D, k_tile), tiled_spec(bk, st.Dv, v_tile),
                  *data_specs(mask_data, q_tile, k_tile, st), *_smem(_optional(sinks)), *_smem(_optional(bias))],
        out_specs=[tiled_spec(bq, st.Dv, q_tile), tiled_spec(bq, LANES, q_tile)],
        out_shape=[jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, st.T_pad, LANES), jnp.float32)],
        scratch=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                 pltpu.VMEM((bq, st.Dv), jnp.float32)],
        st=st, name="attnjax_flash_tpu_fwd",
    )(*schedule, heads_major(q, st.T_pad), heads_major(k, st.S_pad), heads_major(v, st.S_pad),
      *[x for arrays in mask_data for x in arrays], *_optional(sinks), *_optional(bias))
    return out[:, :, :st.T].transpose(0, 2, 1, 3), lse[:, :, :st.T, 0].transpose(0, 2, 1)


def _flash_fwd(q, k, v, sinks, bias, mask_data, schedules, st, widths):
    out, lse = _forward(q, k, v, sinks, bias, mask_data, schedules, st, widths)
    return (out, lse), (q, k, v, sinks, bias, mask_data, schedules, out, lse)


def _flash_bwd(st: FlashStatic, widths, residuals, cotangents):
    q, k, v, sinks, bias, mask_data, schedules, out, lse = residuals
    d_out, d_lse = cotangents
    fn, B, bq, bk = st.weight_fn, q.shape[0], st.block_q, st.block_kv
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dterm = delta - d_lse.astype(jnp.float32)
    # Padded query rows: dO = 0, and a +inf statistic makes their recomputed weights exactly 0.
    stat = row_stat(common.backward_stat(fn, lse), st, jnp.inf if fn.running_max else 0.0)
    operands = (heads_major(q, st.T_pad), heads_major(k, st.S_pad), heads_major(v, st.S_pad),
                heads_major(d_out.astype(q.dtype), st.T_pad), stat, row_stat(dterm, st, 0.0),
                *[x for arrays in mask_data for x in arrays], *_optional(bias))

    def in_specs(q_tile, k_tile, v_tile):
        return [tiled_spec(bq, st.D, q_tile), tiled_spec(bk, st.D, k_tile), tiled_spec(bk, st.Dv, v_tile),
                tiled_spec(bq, st.Dv, q_tile), tiled_spec(bq, LANES, q_tile), tiled_spec(bq, LANES, q_tile),
                *data_specs(mask_data, q_tile, k_tile, st), *_smem(_optional(bias))]

    (schedule, schedule_t), (width, width_t) = schedules, widths
    q_tile, k_tile, v_tile = _by_q(st)
    out_specs, out_shape = [tiled_spec(bq, st.D, q_tile)], [jax.ShapeDtypeStruct(operands[0].shape, q.dtype)]
    scratch = [pltpu.VMEM((bq, st.D), jnp.float32)]
    if st.bias_kind == "t5":  # per (query tile, head) sums of dS by bucket, on every row of an (8, nb) block
        nb = st.t5.num_buckets
        out_specs.append(tiled_spec(SUBLANES, nb, q_tile))
        out_shape.append(jax.ShapeDtypeStruct((B, st.num_q_heads, st.num_q_tiles * SUBLANES, nb), jnp.float32))
        scratch.append(pltpu.VMEM((SUBLANES, nb), jnp.float32))
    dq, *table_sums = call(
        functools.partial(_dq_kernel, st=st, width=width), (B, st.num_q_heads, st.num_q_tiles, width),
        in_specs(q_tile, k_tile, v_tile), out_specs, out_shape, scratch, st, "attnjax_flash_tpu_dq",
    )(*schedule, *operands)

    q_tile, k_tile, v_tile = _by_kv(st)
    dk, dv = call(
        functools.partial(_dkdv_kernel, st=st, width=width_t),
        (B, st.head_blocks, st.num_kv_tiles, st.block_heads, width_t), in_specs(q_tile, k_tile, v_tile),
        [tiled_spec(bk, st.D, k_tile), tiled_spec(bk, st.Dv, v_tile)],
        [jax.ShapeDtypeStruct(operands[1].shape, k.dtype), jax.ShapeDtypeStruct(operands[2].shape, v.dtype)],
        [pltpu.VMEM((bk, st.D), jnp.float32), pltpu.VMEM((bk, st.Dv), jnp.float32)], st,
        "attnjax_flash_tpu_dkdv",
    )(*schedule_t, *operands)

    d_bias = None
    if st.bias_kind == "t5":  # the table's; the query offset is an int (no cotangent)
        sums = table_sums[0].reshape(B, st.num_q_heads, st.num_q_tiles, SUBLANES, -1)[:, :, :, 0]
        d_bias = (common.t5_table_cotangent(sums, st.t5.num_buckets), None)
    d_sinks = None
    if sinks is not None:  # softmax only (validated): P_sink = exp(sink - lse), dsink = Σ -P_sink·(δ - dlse)
        d_sinks = jnp.sum(-jnp.exp(sinks[None, None, :] - lse) * dterm, axis=(0, 1))
    dq = dq[:, :, :st.T].transpose(0, 2, 1, 3)
    dk = dk[:, :, :st.S].transpose(0, 2, 1, 3)
    dv = dv[:, :, :st.S].transpose(0, 2, 1, 3)
    return dq, dk, dv, d_sinks, d_bias, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

__all__ = ["flash_attention_tpu"]
