"""FlashAttention-2 for TPU: Pallas kernels (Mosaic lowering) with a custom VJP.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023);
the mask handling follows the splash-attention design (jax ``pallas/ops/tpu/splash_attention``):
the mask is preprocessed into a block schedule that the kernels read by scalar prefetch.

Reference: ``attnjax.softmax.softmax_attention_reference`` (same arguments and results; this is
the TPU twin of ``attnjax.softmax.flash_attention_xla``). Tested in ``tests/kernels/test_flash_tpu.py``.
Backend-independent pieces (mask plans, schedule, weight functions, checks) come from
``pallas_kernels.flash.common``.

Forward: grid ``(B, Hq, nq, width)``, the last axis sequential ("arbitrary"). Step ``j`` of query
tile ``i`` visits key tile ``lo[i] + j`` of the schedule; the running max ``m``, normalizer ``l``
and the float32 accumulator live in VMEM scratch, and the last step writes ``out = acc / l`` and
``lse = m + log l``. Steps past ``hi[i]`` and EMPTY tiles are skipped by ``pl.when``, and their
index map is clamped into ``[lo, hi)`` so they fetch no new block. FULL tiles skip the element
mask. The grid width is ``max(hi - lo)`` when the mask is known at trace time (a sliding window
or chunked mask runs a narrow grid; causal skips the upper triangle's work but not its steps),
else the number of key tiles.

Backward (recompute from ``lse``; ``dS = P ⊙ (dP - δ + dlse)`` with ``δ = rowsum(dO ⊙ O)``): a dq
kernel on the forward grid, and a dk/dv kernel on ``(B, Hkv, nk, G, width_t)`` whose last two
axes (the ``G`` query heads sharing a KV head, then the query tiles of the transposed schedule)
are sequential, so GQA gradients are summed in VMEM and K/V are never repeated in HBM.

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
from attnjax.tiling import num_tiles
from pallas_kernels.flash import common
from pallas_kernels.flash.common import FlashStatic, SegmentData, WeightFunction

LANES = 128
"""Lane width of a TPU vreg: row statistics are stored broadcast over this many lanes."""
SUBLANES = 8
"""Sublane count of a TPU vreg (the float32 tile is (8, 128))."""

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


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
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``
        (query head ``h`` reads KV head ``h // (Hq // Hkv)`` through the index map).
      mask: ``None`` or ``&``/``|`` combinations of ``Full``, ``Causal``, ``SlidingWindow``,
        ``ChunkedCausal``, ``Segments`` and ``Explicit`` (bottom-right aligned when ``T != S``).
      bias: ``None`` or ``attnjax.positional.ALiBi`` (computed in the kernel from positions).
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
      NotImplementedError: dropout, an array bias, a mask kind the kernel can't evaluate.
    """
    common.validate(q, k, v, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                    dropout_rate=dropout_rate, rng=rng, weight_fn=weight_fn, return_lse=return_lse)
    bias_kind, bias_obj = common.classify_bias(bias)
    if bias_kind == "array":
        raise NotImplementedError("flash_attention_tpu supports bias=None or positional.ALiBi, not an array "
                                  "bias; use implementation='xla'")
    B, T, Hq, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    bq, bk, T_pad, S_pad = tpu_tiles(block_q, block_kv, T, S)
    plan, mask_data = common.plan_mask(mask, T, S, T_pad, S_pad)
    st = FlashStatic(
        T=T, S=S, T_pad=T_pad, S_pad=S_pad, num_q_heads=Hq, num_kv_heads=Hkv, D=D, Dv=Dv, D_pad=D, Dv_pad=Dv,
        block_q=bq, block_kv=bk, scale=D ** -0.5 if scale is None else float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap), weight_fn=weight_fn,
        mask_plan=plan, bias_kind=bias_kind, has_sinks=sinks is not None, interpret=bool(interpret))
    sinks = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    slopes = None if bias_obj is None else lax.stop_gradient(jnp.asarray(bias_obj.slopes, jnp.float32))
    schedules, widths = _plans(mask, st)
    out, lse = _flash(q, k, v, sinks, slopes, _tpu_layout(mask_data, st), schedules, st, widths)
    return (out, lse) if return_lse else out


def tpu_tiles(block_q: int, block_kv: int, T: int, S: int) -> tuple[int, int, int, int]:
    """``(bq, bk, T_pad, S_pad)`` for the Mosaic kernels: the blocks (positive multiples of
    ``SUBLANES``, ValueError otherwise) clipped to the lengths rounded up to ``SUBLANES``, and the
    lengths padded to whole tiles."""
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, int) or block <= 0 or block % SUBLANES:
            raise ValueError(f"{name} must be a positive multiple of {SUBLANES}, got {block!r}")
    bq, bk = min(block_q, _round_up(T, SUBLANES)), min(block_kv, _round_up(S, SUBLANES))
    return bq, bk, _round_up(T, bq), _round_up(S, bk)


def _round_up(n: int, multiple: int) -> int:
    return num_tiles(n, multiple) * multiple


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


# ----------------------------------------------------------------------------- tile math


def _logits(q, k, iq, jk, h, slopes_ref, st: FlashStatic):
    """``cap·tanh((scale·q·kᵀ + alibi)/cap)`` of tile ``(iq, jk)``, float32 ``[bq, bk]``."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale
    if slopes_ref is not None:
        rows, cols = common.tile_iotas(iq, jk, st.block_q, st.block_kv)
        s = s + common.alibi_tile(slopes_ref[h], rows, cols, st.T, st.S)
    return common.apply_soft_cap(s, st.logits_soft_cap)


def _allowed(data_refs, iq, jk, st: FlashStatic):
    """Boolean ``[bq, bk]``: the mask on tile ``(iq, jk)`` and "the key is not padding"."""
    rows, cols = common.tile_iotas(iq, jk, st.block_q, st.block_kv)
    in_range = cols < st.S
    if st.mask_plan is None:
        return in_range

    def load(kind, slot):
        if kind == "segments":  # lane-broadcast q ids, sublane-broadcast kv ids
            q_ids, kv_ids = data_refs[slot]
            return q_ids[:, :1], kv_ids[:1, :]
        return data_refs[slot][0][...]

    return common.eval_mask(st.mask_plan, rows, cols, st.T, st.S, load) & in_range


def _rows(ref):
    """A lane-broadcast ``[rows, 128]`` statistic as a ``[rows, 1]`` column."""
    return ref[:, :1]


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(codes, lo, hi, q_ref, k_ref, v_ref, *refs, st: FlashStatic, width):
    data_refs, sinks_ref, slopes_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(refs, st)
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
        s = _logits(q_ref[...], k_ref[...], i, jk, h, slopes_ref, st)
        if masked:
            ok = _allowed(data_refs, i, jk, st)
            s = jnp.where(ok, s, -jnp.inf)
        u = fn.transform(s)
        m_prev, l_prev = _rows(m_sc), _rows(l_sc)
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
        m, l = _rows(m_sc), _rows(l_sc)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        stat = jnp.log(safe_l) + (m if fn.running_max else 0.0)
        o_ref[...] = jnp.where(seen, acc / safe_l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(jnp.where(seen, stat, -jnp.inf), lse_ref.shape)


def _dlogits(q, k, v, do, stat_ref, dterm_ref, iq, jk, h, data_refs, slopes_ref, st: FlashStatic, masked):
    """Recompute the weights ``P`` of tile ``(iq, jk)`` and ``dS``, the gradient w.r.t. ``q·kᵀ``.

    ``stat_ref`` holds the backward-safe row statistic (``common.backward_stat``) and
    ``dterm_ref`` holds ``δ - dlse``; see ``common.WeightFunction`` for the general formulas.
    """
    fn = st.weight_fn
    s = _logits(q, k, iq, jk, h, slopes_ref, st)
    m_b, n_b = common.backward_offsets(fn, _rows(stat_ref))
    w = fn.weight(fn.transform(s), m_b)
    p, dpds = w, fn.dweight(s, w)
    if fn.normalized and not fn.running_max:  # weights normalized by exp(n_b), not by a max
        inv_norm = jnp.exp(-n_b)
        p, dpds = p * inv_norm, dpds * inv_norm
    if masked:
        ok = _allowed(data_refs, iq, jk, st)
        p, dpds = jnp.where(ok, p, 0.0), jnp.where(ok, dpds, 0.0)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    if fn.normalized:
        dp = dp - _rows(dterm_ref)
    ds = dpds * dp * common.soft_cap_grad(s, st.logits_soft_cap)
    return p, ds * st.scale


def _dq_kernel(codes, lo, hi, q_ref, k_ref, v_ref, do_ref, stat_ref, dterm_ref, *refs, st: FlashStatic, width):
    data_refs, _, slopes_ref, (dq_ref, dq_sc) = _split_refs(refs, st, sinks=False)
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    jk = _visit(lo, hi, i, j)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def compute(masked):
        k = k_ref[...]
        _, ds = _dlogits(q_ref[...], k, v_ref[...], do_ref[...], stat_ref, dterm_ref, i, jk, h, data_refs,
                         slopes_ref, st, masked)
        dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _when_tile(codes, lo, hi, i, j, jk, st.num_kv_tiles, compute)

    @pl.when(j == width - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkdv_kernel(codes, lo, hi, q_ref, k_ref, v_ref, do_ref, stat_ref, dterm_ref, *refs, st: FlashStatic,
                 width):
    data_refs, _, slopes_ref, (dk_ref, dv_ref, dk_sc, dv_sc) = _split_refs(refs, st, sinks=False)
    hk, jk, g, t = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    iq = _visit(lo, hi, jk, t)
    h = hk * st.group + g

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def compute(masked):
        q, do = q_ref[...], do_ref[...]
        p, ds = _dlogits(q, k_ref[...], v_ref[...], do, stat_ref, dterm_ref, iq, jk, h, data_refs, slopes_ref,
                         st, masked)
        dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _when_tile(codes, lo, hi, jk, t, iq, st.num_q_tiles, compute)

    @pl.when((g == st.group - 1) & (t == width - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _split_refs(refs, st: FlashStatic, sinks: bool = True):
    """``(mask data refs per slot, sinks ref, slopes ref, rest)`` from the refs after the fixed
    operands; absent optional inputs give ``None``."""
    refs = list(refs)
    data_refs = []
    for kind, _ in () if st.mask_plan is None else st.mask_plan.data_kinds():
        n = 2 if kind == "segments" else 1
        data_refs.append(refs[:n])
        del refs[:n]
    sinks_ref = refs.pop(0) if sinks and st.has_sinks else None
    slopes_ref = refs.pop(0) if st.bias_kind == "alibi" else None
    return data_refs, sinks_ref, slopes_ref, refs


# ----------------------------------------------------------------------------- pallas calls


def _tpu_layout(mask_data, st: FlashStatic) -> list:
    """Mask data in TPU-shaped blocks: segment ids as q ``[Bs, T_pad, 128]`` (lane-broadcast)
    and kv ``[Bs, 8, S_pad]`` (sublane-broadcast); Explicit masks as int8 ``[Bm, Hm, T_pad, S_pad]``."""
    arrays = []
    for item in mask_data:
        if isinstance(item, SegmentData):
            arrays.append((jnp.broadcast_to(item.q[:, :, None], item.q.shape + (LANES,)),
                           jnp.broadcast_to(item.kv[:, None, :], (item.kv.shape[0], SUBLANES, st.S_pad))))
        else:
            arrays.append((item.mask,))
    return arrays


def _data_specs(mask_data, q_tile, kv_tile, st: FlashStatic) -> list:
    """BlockSpecs of the mask data, tiled like q (rows) and k (columns); a batch or head
    dimension of size 1 broadcasts."""
    def spec(block, batch1, head1, pick):
        def index(*grid_and_prefetch):
            b, h, iq = q_tile(*grid_and_prefetch)
            jk = kv_tile(*grid_and_prefetch)[2]
            return pick(0 if batch1 else b, 0 if head1 else h, iq, jk)
        return pl.BlockSpec(block, index)

    specs = []
    for arrays in mask_data:
        batch1 = arrays[0].shape[0] == 1
        if len(arrays) == 2:  # segment ids (q, kv)
            specs += [spec((None, st.block_q, LANES), batch1, True, lambda b, h, iq, jk: (b, iq, 0)),
                      spec((None, SUBLANES, st.block_kv), batch1, True, lambda b, h, iq, jk: (b, 0, jk))]
        else:  # an Explicit mask
            specs.append(spec((None, None, st.block_q, st.block_kv), batch1, arrays[0].shape[1] == 1,
                              lambda b, h, iq, jk: (b, h, iq, jk)))
    return specs


def _tiled(block, depth, tile):
    """BlockSpec of a ``[B, H, L, depth]`` array whose block ``(b, h, tile)`` follows ``tile``."""
    return pl.BlockSpec((None, None, block, depth), lambda *a: (*tile(*a), 0))


def _smem(x):
    return [] if x is None else [pl.BlockSpec(memory_space=pltpu.SMEM)]


def _by_q(group):
    """Tile getters ``(b, h, tile)`` of q and k on the forward/dq grid ``(B, Hq, nq, width)``."""
    def q_tile(b, h, i, j, codes, lo, hi):
        return b, h, i

    def kv_tile(b, h, i, j, codes, lo, hi):
        return b, h // group, _visit(lo, hi, i, j)

    return q_tile, kv_tile


def _by_kv(group):
    """Tile getters ``(b, h, tile)`` of q and k on the dk/dv grid ``(B, Hkv, nk, G, width)``."""
    def q_tile(b, hk, jk, g, t, codes, lo, hi):
        return b, hk * group + g, _visit(lo, hi, jk, t)

    def kv_tile(b, hk, jk, g, t, codes, lo, hi):
        return b, hk, jk

    return q_tile, kv_tile


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, st: FlashStatic, name):
    semantics = ("parallel",) * 3 + ("arbitrary",) * (len(grid) - 3)
    # The TPU interpreter (jax 0.10) runs the grid in order anyway and does not extend
    # dimension_semantics over vmapped grid axes, so interpret mode leaves them out.
    params = None if st.interpret else pltpu.CompilerParams(dimension_semantics=semantics)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=params, out_shape=out_shape, name=name,
        interpret=pltpu.InterpretParams() if st.interpret else False,
    )


def _heads_major(x: jax.Array, length: int, value=0.0) -> jax.Array:
    """``[B, L, H, E]`` -> ``[B, H, length, E]`` (padded with ``value``)."""
    x = x.transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)), constant_values=value)


def _row_stat(x: jax.Array, st: FlashStatic, value) -> jax.Array:
    """``[B, T, H]`` -> lane-broadcast float32 ``[B, H, T_pad, 128]`` (padded with ``value``)."""
    x = _heads_major(x[..., None].astype(jnp.float32), st.T_pad, value)
    return jnp.broadcast_to(x, x.shape[:3] + (LANES,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, sinks, slopes, mask_data, schedules, st, widths):
    return _forward(q, k, v, sinks, slopes, mask_data, schedules, st, widths)


def _forward(q, k, v, sinks, slopes, mask_data, schedules, st: FlashStatic, widths):
    B, Hq, bq, bk = q.shape[0], st.num_q_heads, st.block_q, st.block_kv
    schedule, width = schedules[0], widths[0]
    q_tile, kv_tile = _by_q(st.group)
    out, lse = _call(
        functools.partial(_fwd_kernel, st=st, width=width), (B, Hq, st.num_q_tiles, width),
        in_specs=[_tiled(bq, st.D, q_tile), _tiled(bk, st.D, kv_tile), _tiled(bk, st.Dv, kv_tile),
                  *_data_specs(mask_data, q_tile, kv_tile, st), *_smem(sinks), *_smem(slopes)],
        out_specs=[_tiled(bq, st.Dv, q_tile), _tiled(bq, LANES, q_tile)],
        out_shape=[jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, st.T_pad, LANES), jnp.float32)],
        scratch=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                 pltpu.VMEM((bq, st.Dv), jnp.float32)],
        st=st, name="attnjax_flash_tpu_fwd",
    )(*schedule, _heads_major(q, st.T_pad), _heads_major(k, st.S_pad), _heads_major(v, st.S_pad),
      *[x for arrays in mask_data for x in arrays], *[x for x in (sinks, slopes) if x is not None])
    return out[:, :, :st.T].transpose(0, 2, 1, 3), lse[:, :, :st.T, 0].transpose(0, 2, 1)


def _flash_fwd(q, k, v, sinks, slopes, mask_data, schedules, st, widths):
    out, lse = _forward(q, k, v, sinks, slopes, mask_data, schedules, st, widths)
    return (out, lse), (q, k, v, sinks, slopes, mask_data, schedules, out, lse)


def _flash_bwd(st: FlashStatic, widths, residuals, cotangents):
    q, k, v, sinks, slopes, mask_data, schedules, out, lse = residuals
    d_out, d_lse = cotangents
    fn, B, bq, bk = st.weight_fn, q.shape[0], st.block_q, st.block_kv
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dterm = delta - d_lse.astype(jnp.float32)
    # Padded query rows: dO = 0, and a +inf statistic makes their recomputed weights exactly 0.
    stat = _row_stat(common.backward_stat(fn, lse), st, jnp.inf if fn.running_max else 0.0)
    operands = (_heads_major(q, st.T_pad), _heads_major(k, st.S_pad), _heads_major(v, st.S_pad),
                _heads_major(d_out.astype(q.dtype), st.T_pad), stat, _row_stat(dterm, st, 0.0),
                *[x for arrays in mask_data for x in arrays], *([] if slopes is None else [slopes]))

    def in_specs(q_tile, kv_tile):
        return [_tiled(bq, st.D, q_tile), _tiled(bk, st.D, kv_tile), _tiled(bk, st.Dv, kv_tile),
                _tiled(bq, st.Dv, q_tile), _tiled(bq, LANES, q_tile), _tiled(bq, LANES, q_tile),
                *_data_specs(mask_data, q_tile, kv_tile, st), *_smem(slopes)]

    (schedule, schedule_t), (width, width_t) = schedules, widths
    q_tile, kv_tile = _by_q(st.group)
    dq = _call(
        functools.partial(_dq_kernel, st=st, width=width), (B, st.num_q_heads, st.num_q_tiles, width),
        in_specs(q_tile, kv_tile), _tiled(bq, st.D, q_tile), jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
        [pltpu.VMEM((bq, st.D), jnp.float32)], st, "attnjax_flash_tpu_dq",
    )(*schedule, *operands)

    q_tile, kv_tile = _by_kv(st.group)
    dk, dv = _call(
        functools.partial(_dkdv_kernel, st=st, width=width_t),
        (B, st.num_kv_heads, st.num_kv_tiles, st.group, width_t), in_specs(q_tile, kv_tile),
        [_tiled(bk, st.D, kv_tile), _tiled(bk, st.Dv, kv_tile)],
        [jax.ShapeDtypeStruct(operands[1].shape, k.dtype), jax.ShapeDtypeStruct(operands[2].shape, v.dtype)],
        [pltpu.VMEM((bk, st.D), jnp.float32), pltpu.VMEM((bk, st.Dv), jnp.float32)], st,
        "attnjax_flash_tpu_dkdv",
    )(*schedule_t, *operands)

    d_sinks = None
    if sinks is not None:  # softmax only (validated): P_sink = exp(sink - lse), dsink = Σ -P_sink·(δ - dlse)
        d_sinks = jnp.sum(-jnp.exp(sinks[None, None, :] - lse) * dterm, axis=(0, 1))
    dq = dq[:, :, :st.T].transpose(0, 2, 1, 3)
    dk = dk[:, :, :st.S].transpose(0, 2, 1, 3)
    dv = dv[:, :, :st.S].transpose(0, 2, 1, 3)
    return dq, dk, dv, d_sinks, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)

__all__ = ["flash_attention_tpu", "tpu_tiles", "LANES", "SUBLANES"]
