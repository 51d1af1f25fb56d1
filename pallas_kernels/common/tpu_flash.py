"""The flash-family tile on Mosaic (TPU), shared by the flash and block-sparse TPU kernels: the
split of a ``FlashStatic`` call's optional refs, the capped logits of a tile, the allowed pairs,
and FA-2's recomputation of ``P`` and ``dS`` from the saved row statistic.

Mask data refs come in ``pallas_kernels.common.tpu.mask_layout``'s layout; row statistics are
lane-broadcast ``[rows, 128]`` blocks (``stat_column`` reads them as columns).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnjax.blocked.weights import backward_offsets
from pallas_kernels.common.mask_plans import eval_mask, tile_iotas
from pallas_kernels.common.scores import alibi_tile, apply_soft_cap, soft_cap_grad, t5_bucket_tile, t5_tile
from pallas_kernels.common.statics import FlashStatic
from pallas_kernels.common.tpu import stat_column

_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def split_refs(refs, st: FlashStatic, sinks: bool = True):
    """``(mask data refs per slot, sinks ref, bias refs, rest)`` from the refs after the fixed
    operands; absent optional inputs give ``None``. The bias refs are ALiBi's slopes ref, or T5's
    ``(table ref, offset ref)`` (``pallas_kernels.flash.common.t5_operands``), all in SMEM."""
    refs = list(refs)
    data_refs = []
    for kind, _ in () if st.mask_plan is None else st.mask_plan.data_kinds():
        n = 2 if kind == "segments" else 1
        data_refs.append(refs[:n])
        del refs[:n]
    sinks_ref = refs.pop(0) if sinks and st.has_sinks else None
    bias_refs = None
    if st.bias_kind == "alibi":
        bias_refs = refs.pop(0)
    elif st.bias_kind == "t5":
        bias_refs = (refs.pop(0), refs.pop(0))
    return data_refs, sinks_ref, bias_refs, refs


def t5_buckets(bias_refs, iq, jk, st: FlashStatic):
    """T5's bucket ``[bq, bk]`` of each (query, key) pair of tile ``(iq, jk)`` (``scores.t5_bucket_tile``)."""
    rows, cols = tile_iotas(iq, jk, st.block_q, st.block_kv)
    return t5_bucket_tile(rows, cols, bias_refs[1][0], st.t5)


def logits(q, k, iq, jk, h, bias_refs, st: FlashStatic):
    """``cap·tanh((scale·q·kᵀ + b)/cap)`` of tile ``(iq, jk)``, float32 ``[bq, bk]``; ``b`` is ALiBi
    or T5 (``split_refs``' bias refs) computed from the tile's iotas, or 0 when ``bias_refs`` is None."""
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * st.scale
    if bias_refs is not None and st.bias_kind == "t5":
        nb = st.t5.num_buckets
        s = s + t5_tile([bias_refs[0][h * nb + b] for b in range(nb)], t5_buckets(bias_refs, iq, jk, st))
    elif bias_refs is not None:
        rows, cols = tile_iotas(iq, jk, st.block_q, st.block_kv)
        s = s + alibi_tile(bias_refs[h], rows, cols, st.T, st.S)
    return apply_soft_cap(s, st.logits_soft_cap)


def allowed(data_refs, iq, jk, st: FlashStatic):
    """Boolean ``[bq, bk]``: the mask on tile ``(iq, jk)`` and "the key is not padding"."""
    rows, cols = tile_iotas(iq, jk, st.block_q, st.block_kv)
    in_range = cols < st.S
    if st.mask_plan is None:
        return in_range

    def load(kind, slot):
        if kind == "segments":  # lane-broadcast q ids, sublane-broadcast kv ids
            q_ids, kv_ids = data_refs[slot]
            return q_ids[:, :1], kv_ids[:1, :]
        return data_refs[slot][0][...]

    return eval_mask(st.mask_plan, rows, cols, st.T, st.S, load) & in_range


def dlogits(q, k, v, do, stat_ref, dterm_ref, iq, jk, h, data_refs, bias_refs, st: FlashStatic, masked,
            scaled: bool = True):
    """Recompute the weights ``P`` of tile ``(iq, jk)`` and ``dS``: the gradient w.r.t. ``q·kᵀ``, or
    with ``scaled=False`` w.r.t. the logits ``scale·q·kᵀ + b`` (what an additive bias receives).

    ``stat_ref`` holds the backward-safe row statistic (``attnjax.blocked.weights.backward_stat``)
    and ``dterm_ref`` holds ``δ - dlse``; see ``attnjax.blocked.weights.WeightFunction`` for the
    general formulas.
    """
    fn = st.weight_fn
    s = logits(q, k, iq, jk, h, bias_refs, st)
    m_b, n_b = backward_offsets(fn, stat_column(stat_ref))
    w = fn.weight(fn.transform(s), m_b)
    p, dpds = w, fn.dweight(s, w)
    if fn.normalized and not fn.running_max:  # weights normalized by exp(n_b), not by a max
        inv_norm = jnp.exp(-n_b)
        p, dpds = p * inv_norm, dpds * inv_norm
    if masked:
        ok = allowed(data_refs, iq, jk, st)
        p, dpds = jnp.where(ok, p, 0.0), jnp.where(ok, dpds, 0.0)
    dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
    if fn.normalized:
        dp = dp - stat_column(dterm_ref)
    ds = dpds * dp * soft_cap_grad(s, st.logits_soft_cap)
    return p, ds * st.scale if scaled else ds


__all__ = ["split_refs", "t5_buckets", "logits", "allowed", "dlogits"]
