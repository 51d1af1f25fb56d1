"""Block-sparse softmax attention for TPU: Pallas kernels (Mosaic lowering) with a custom VJP.

Reference: ``attnjax.sparse.block_sparse_attention_reference``; tested in TPU interpret mode in
``tests/kernels/test_block_sparse.py``. The tile math (logits, soft cap, mask plans, the FA-2
backward recomputation ``dlogits``; ``pallas_kernels.common.tpu_flash``) and the call plumbing
(``pallas_kernels.common.tpu``) are the flash TPU kernel's; only the schedule differs: block lists
instead of spans.

Math (FlashAttention-2, Dao 2023, restricted to listed tiles): ``s = cap·tanh(scale·q·kᵀ/cap)``
on tile ``(i, j)`` for ``j`` in the list of query block ``i``, masked by the fine mask and
"key < S"; ``out_i = Σ_j exp(s_ij − m_i) v_j / l_i`` (online ``m``, ``l``, float32 VMEM
scratch), ``lse_i = m_i + log l_i`` (``-inf`` and ``out = 0`` on rows that see nothing).

Forward: ``PrefetchScalarGridSpec`` with the flattened lists (indices, counts) and the fine
mask's per-tile codes as scalar prefetch; grid ``(B, Hq, nq, K)`` with the slot axis sequential.
The K/V index map of step ``t`` reads ``indices[b, h, i, t]`` (KV head ``h // (Hq/Hkv)``). Slots
``t ≥ count`` skip compute, and since padded slots repeat the last valid id their block index
does not change, so they fetch nothing new. Listed tiles the fine mask leaves EMPTY are skipped;
FULL ones skip the element mask.

Backward (``dS = P ⊙ (dP − δ + dlse)``, ``P`` recomputed from lse): a dQ kernel on the forward
grid and lists, and a dK/dV kernel on ``(B, Hkv, nk, G, K')`` walking the transposed (key-major)
lists of ``attnjax.sparse.transpose``; its last two axes (the ``G`` query heads of a KV head,
each with its own list, then the list slots) are sequential, so GQA gradients are summed in VMEM.

TPU constraints: block sizes multiples of 8 (else NotImplementedError); on a real TPU prefer
``block_kv`` a multiple of 128 (the lane axis) and ``block_q`` a multiple of 16 for bf16. Every
list slot is a grid step (a skipped one costs ~0.35 µs), so dynamic lists with a large ``K``
pay per padded slot, and the flattened lists must fit SMEM (``Bl·Hl·nq·K`` int32: share lists
across heads or keep ``K`` small at long T). A structural fine mask other than flash's kinds is
evaluated on 1-D iotas: that runs in interpret mode and passes Mosaic's lowering from a CPU host,
but is unverified on TPU hardware.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.masks import FULL, PARTIAL
from attnjax.blocked.lists import BlockSparse
from attnjax.blocked.weights import backward_stat
from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import SparseStatic
from pallas_kernels.common.tpu import (LANES, SUBLANES, call, data_specs, heads_major, mask_layout, row_stat,
                                       stat_column, tiled_spec)
from pallas_kernels.common.tpu_flash import allowed, dlogits, logits, split_refs


def block_sparse_attention_tpu(
    q: jax.Array, k: jax.Array, v: jax.Array, blocks: BlockSparse, *, mask=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, return_lse: bool = False, interpret: bool = False,
):
    """Block-sparse softmax attention by Pallas TPU kernels, differentiable in q, k, v (and lse).

    Args: as ``pallas_kernels.block_sparse.gpu.block_sparse_attention_gpu``; ``interpret`` runs
    the TPU interpreter (on CPU, for tests).
    Returns: ``out [B, T, Hq, Dv]`` in q's dtype, or ``(out, lse [B, T, Hq] float32)``.
    """
    common.validate(q, k, v, blocks)
    bq, bk = blocks.block_q, blocks.block_kv
    if bq % SUBLANES or bk % SUBLANES:
        raise NotImplementedError(f"the TPU block-sparse kernel needs block sizes that are multiples of {SUBLANES}, "
                                  f"got block_q={bq}, block_kv={bk}; use implementation='xla'")
    T, S, D, Dv = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
    st, mask_data = common.static_config(q, k, v, blocks, mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                         D_pad=D, Dv_pad=Dv, interpret=interpret)
    codes = jnp.asarray(common.tile_codes(mask, T, S, bq, bk)).reshape(-1)
    lists = common.device_lists(blocks)
    lists_t = common.transposed_lists(*lists, st) if blocks.is_static else None
    out, lse = _attention(q, k, v, lists, lists_t, mask_layout(mask_data, st), codes, st)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- list access


def _row(shape, b, h, r):
    """Flat row of ``(b, h, r)`` in lists of shape ``[Bl, Hl, R, K]`` (``Bl``, ``Hl`` ∈ {1, full})."""
    bl, hl, rows, _ = shape
    return ((0 if bl == 1 else b) * hl + (0 if hl == 1 else h)) * rows + r


def _by_q(group, shape):
    """Tile getters ``(b, h, tile)`` of q and k on the forward/dQ grid ``(B, Hq, nq, K)``."""
    def q_tile(b, h, i, t, idx, cnt, codes):
        return b, h, i

    def kv_tile(b, h, i, t, idx, cnt, codes):
        # lax.div, not //: the grid ids are non-negative, and floor division lowers through sign().
        return b, lax.div(h, group), idx[_row(shape, b, h, i) * shape[3] + t]

    return q_tile, kv_tile


def _by_kv(group, shape_t):
    """Tile getters ``(b, h, tile)`` of q and k on the dK/dV grid ``(B, Hkv, nk, G, K')``."""
    def q_tile(b, hk, jk, g, t, idx, cnt, codes):
        h = hk * group + g
        return b, h, idx[_row(shape_t, b, h, jk) * shape_t[3] + t]

    def kv_tile(b, hk, jk, g, t, idx, cnt, codes):
        return b, hk, jk

    return q_tile, kv_tile


def _when_listed(count, t, code, compute):
    """Run ``compute(masked)`` on a live slot: unmasked on FULL tiles, masked on PARTIAL ones."""
    live = t < count
    pl.when(live & (code == FULL))(lambda: compute(False))
    pl.when(live & (code == PARTIAL))(lambda: compute(True))


def _tile_allowed(data_refs, iq, jk, st: SparseStatic):
    """Flash's mask plan and "key < S" on tile ``(iq, jk)``, AND the structural fine mask."""
    ok = allowed(data_refs, iq, jk, st)
    extra = common.structural_tile(st, iq, jk)
    return ok if extra is None else ok & extra


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(idx, cnt, codes, q_ref, k_ref, v_ref, *refs, st: SparseStatic, shape):
    data_refs, _, _, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = split_refs(refs, st, sinks=False)
    b, h, i, t = (pl.program_id(a) for a in range(4))
    row = _row(shape, b, h, i)
    jk = idx[row * shape[3] + t]

    @pl.when(t == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def compute(masked):
        s = logits(q_ref[...], k_ref[...], i, jk, h, None, st)
        if masked:
            s = jnp.where(_tile_allowed(data_refs, i, jk, st), s, -jnp.inf)
        m_prev, l_prev = stat_column(m_sc), stat_column(l_sc)
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen no key yet
        alpha = jnp.exp(m_prev - m_use)
        p = jnp.exp(s - m_use)  # exactly 0 where masked
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=1, keepdims=True), l_sc.shape)

    _when_listed(cnt[row], t, codes[i * st.num_kv_tiles + jk], compute)

    @pl.when(t == shape[3] - 1)
    def _finish():
        m, l = stat_column(m_sc), stat_column(l_sc)
        seen = l > 0
        safe_l = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen, acc_sc[...] / safe_l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(jnp.where(seen, m + jnp.log(safe_l), -jnp.inf), lse_ref.shape)


def _tile_grads(st: SparseStatic, q, k, v, do, stat_ref, dterm_ref, iq, jk, h, data_refs, masked):
    """``P`` and ``scale·dS`` of tile ``(iq, jk)`` (``dlogits``, which applies the mask plan on
    PARTIAL tiles), zeroed where the structural fine mask forbids."""
    p, ds = dlogits(q, k, v, do, stat_ref, dterm_ref, iq, jk, h, data_refs, None, st, masked)
    extra = common.structural_tile(st, iq, jk) if masked else None
    if extra is not None:
        p, ds = jnp.where(extra, p, 0.0), jnp.where(extra, ds, 0.0)
    return p, ds


def _dq_kernel(idx, cnt, codes, q_ref, k_ref, v_ref, do_ref, stat_ref, dterm_ref, *refs, st: SparseStatic, shape):
    data_refs, _, _, (dq_ref, dq_sc) = split_refs(refs, st, sinks=False)
    b, h, i, t = (pl.program_id(a) for a in range(4))
    row = _row(shape, b, h, i)
    jk = idx[row * shape[3] + t]

    @pl.when(t == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def compute(masked):
        k = k_ref[...]
        _, ds = _tile_grads(st, q_ref[...], k, v_ref[...], do_ref[...], stat_ref, dterm_ref, i, jk, h, data_refs,
                            masked)
        dq_sc[...] += lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    _when_listed(cnt[row], t, codes[i * st.num_kv_tiles + jk], compute)

    @pl.when(t == shape[3] - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkdv_kernel(idx, cnt, codes, q_ref, k_ref, v_ref, do_ref, stat_ref, dterm_ref, *refs, st: SparseStatic,
                 shape):
    data_refs, _, _, (dk_ref, dv_ref, dk_sc, dv_sc) = split_refs(refs, st, sinks=False)
    b, hk, jk, g, t = (pl.program_id(a) for a in range(5))
    h = hk * st.group + g
    row = _row(shape, b, h, jk)
    iq = idx[row * shape[3] + t]

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def compute(masked):
        q, do = q_ref[...], do_ref[...]
        p, ds = _tile_grads(st, q, k_ref[...], v_ref[...], do, stat_ref, dterm_ref, iq, jk, h, data_refs, masked)
        dv_sc[...] += lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk_sc[...] += lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    _when_listed(cnt[row], t, codes[iq * st.num_kv_tiles + jk], compute)

    @pl.when((g == st.group - 1) & (t == shape[3] - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas calls


def _flat(lists):
    """Scalar-prefetch form of ``(indices, counts)``: flat 1-D int32 arrays (like flash's codes)."""
    return tuple(jnp.asarray(x).reshape(-1) for x in lists)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, lists, lists_t, mask_data, codes, st):
    return _forward(q, k, v, lists, mask_data, codes, st)


def _forward(q, k, v, lists, mask_data, codes, st: SparseStatic):
    B, bq, bk = q.shape[0], st.block_q, st.block_kv
    shape = tuple(lists[0].shape)
    q_tile, kv_tile = _by_q(st.group, shape)
    out, lse = call(
        functools.partial(_fwd_kernel, st=st, shape=shape), (B, st.num_q_heads, st.num_q_tiles, shape[3]),
        in_specs=[tiled_spec(bq, st.D, q_tile), tiled_spec(bk, st.D, kv_tile), tiled_spec(bk, st.Dv, kv_tile),
                  *data_specs(mask_data, q_tile, kv_tile, st)],
        out_specs=[tiled_spec(bq, st.Dv, q_tile), tiled_spec(bq, LANES, q_tile)],
        out_shape=[jax.ShapeDtypeStruct((B, st.num_q_heads, st.T_pad, st.Dv), q.dtype),
                   jax.ShapeDtypeStruct((B, st.num_q_heads, st.T_pad, LANES), jnp.float32)],
        scratch=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                 pltpu.VMEM((bq, st.Dv), jnp.float32)],
        st=st, name="attnjax_block_sparse_tpu_fwd",
    )(*_flat(lists), codes, heads_major(q, st.T_pad), heads_major(k, st.S_pad), heads_major(v, st.S_pad),
      *[x for arrays in mask_data for x in arrays])
    return out[:, :, :st.T].transpose(0, 2, 1, 3), lse[:, :, :st.T, 0].transpose(0, 2, 1)


def _attention_fwd(q, k, v, lists, lists_t, mask_data, codes, st):
    out, lse = _forward(q, k, v, lists, mask_data, codes, st)
    return (out, lse), (q, k, v, lists, lists_t, mask_data, codes, out, lse)


def _attention_bwd(st: SparseStatic, residuals, cotangents):
    q, k, v, lists, lists_t, mask_data, codes, out, lse = residuals
    d_out, d_lse = cotangents
    B, bq, bk = q.shape[0], st.block_q, st.block_kv
    if lists_t is None:
        lists_t = common.transposed_lists(*lists, st)
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dterm = delta - d_lse.astype(jnp.float32)
    # Padded query rows and empty rows: a +inf statistic makes their recomputed weights exactly 0.
    stat = row_stat(backward_stat(st.weight_fn, lse), st, jnp.inf)
    operands = (heads_major(q, st.T_pad), heads_major(k, st.S_pad), heads_major(v, st.S_pad),
                heads_major(d_out.astype(q.dtype), st.T_pad), stat, row_stat(dterm, st, 0.0),
                *[x for arrays in mask_data for x in arrays])

    def in_specs(q_tile, kv_tile):
        return [tiled_spec(bq, st.D, q_tile), tiled_spec(bk, st.D, kv_tile), tiled_spec(bk, st.Dv, kv_tile),
                tiled_spec(bq, st.Dv, q_tile), tiled_spec(bq, LANES, q_tile), tiled_spec(bq, LANES, q_tile),
                *data_specs(mask_data, q_tile, kv_tile, st)]

    shape = tuple(lists[0].shape)
    q_tile, kv_tile = _by_q(st.group, shape)
    dq = call(
        functools.partial(_dq_kernel, st=st, shape=shape), (B, st.num_q_heads, st.num_q_tiles, shape[3]),
        in_specs(q_tile, kv_tile), tiled_spec(bq, st.D, q_tile), jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
        [pltpu.VMEM((bq, st.D), jnp.float32)], st, "attnjax_block_sparse_tpu_dq",
    )(*_flat(lists), codes, *operands)

    shape_t = tuple(lists_t[0].shape)
    q_tile, kv_tile = _by_kv(st.group, shape_t)
    dk, dv = call(
        functools.partial(_dkdv_kernel, st=st, shape=shape_t),
        (B, st.num_kv_heads, st.num_kv_tiles, st.group, shape_t[3]), in_specs(q_tile, kv_tile),
        [tiled_spec(bk, st.D, kv_tile), tiled_spec(bk, st.Dv, kv_tile)],
        [jax.ShapeDtypeStruct(operands[1].shape, k.dtype), jax.ShapeDtypeStruct(operands[2].shape, v.dtype)],
        [pltpu.VMEM((bk, st.D), jnp.float32), pltpu.VMEM((bk, st.Dv), jnp.float32)], st,
        "attnjax_block_sparse_tpu_dkdv",
    )(*_flat(lists_t), codes, *operands)

    dq = dq[:, :, :st.T].transpose(0, 2, 1, 3)
    dk = dk[:, :, :st.S].transpose(0, 2, 1, 3)
    dv = dv[:, :, :st.S].transpose(0, 2, 1, 3)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)

__all__ = ["block_sparse_attention_tpu"]
