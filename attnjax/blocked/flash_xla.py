"""Blocked softmax-family attention in XLA: FlashAttention-2's algorithm with a custom VJP.

Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).

The score-to-weight step is a ``attnjax.blocked.weights.WeightFunction`` (the same extension
point as the Pallas kernels): softmax by default, sigmoid attention (no running max, no
normalizer) and softplus attention (a running max in the log domain) from the same code.

Forward: for each query tile, an online pass over key tiles keeps a running max ``m`` of the
transformed logits ``u`` (when the weight function has one), normalizer ``l`` and accumulator in
float32, and saves the row statistic (softmax: ``lse = m + log l``). Backward: for each query
tile, the weights are recomputed tile by tile from that statistic; with ``δ_i = dO_i·O_i``,
``dS = dP/ds ⊙ (dO Vᵀ - δ + dlse)`` (unnormalized: ``dP/ds ⊙ dO Vᵀ``) gives ``dQ``, ``dK``,
``dV`` (and a learnable bias's gradient), accumulated in float32. Memory is O(T·tile), never O(T·S).

The mask's block summary decides the work: each query tile loops only over the span of key
tiles that are not empty, skips empty tiles inside that span, and leaves out the element mask
on full tiles. Causal attention therefore does about half the tile products.

K and V may have different head counts (``Hk``, ``Hv``; DiffQKV, Lin et al. 2025, "Sigma", Fig. 3):
a query tile is grouped by K head for the logits and ``tiles.regroup``-ed (a reshape of the tile's
query heads) to V's heads for ``P·V``, ``dO·Vᵀ`` and ``dV = Σ_{h in V group} Pᵀ·dO``; K and V are
read once per tile, never repeated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.bias import ArrayBias, Bias, as_bias
from attnjax.dropout import dropout_seed
from attnjax.masks import Mask, block_schedule
from attnjax.blocked.scores import ScoreSpec, allowed, dropout_multiplier, raw_logits, score_spec, soft_cap
from attnjax.blocked.tiles import (add_bias_grad, add_slice, bias_grad_init, finish_grads, kv_tiles,
                                   logits_with_bias_pullback, q_tiles, regroup, row_tiles, switch_key_tile,
                                   untile)
from attnjax.blocked.weights import SOFTMAX, WeightFunction, backward_offsets, backward_stat
from attnjax.meshes import vary_like
from attnjax.tiling import num_tiles


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: ScoreSpec
    block_q: int
    block_kv: int
    weight_fn: WeightFunction = SOFTMAX


def flash_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
    sinks: Optional[jax.Array] = None, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
    return_lse: bool = False, block_q: int = 512, block_kv: int = 512, weight_fn: WeightFunction = SOFTMAX,
):
    """Memory-efficient softmax-family attention (same arguments and results as the reference).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hk, D]``; v: ``[B, S, Hv, Dv]`` with ``Hq % Hk == 0`` and
        ``Hq % Hv == 0`` (query head ``h`` reads K head ``h // (Hq // Hk)``, V head ``h // (Hq // Hv)``).
      mask, bias, scale, logits_soft_cap, sinks, dropout_rate, rng, return_lse: as in
        ``attnjax.softmax.softmax_attention_reference``.
      block_q, block_kv: tile sizes (clipped to T and S); T and S need not be multiples.
      weight_fn: the score-to-weight function (``weights.SOFTMAX``; ``weights.SigmoidWeight``,
        ``weights.SoftplusWeight``). Sinks need one that supports them; ``return_lse`` needs a
        normalized one (it returns the row statistic, see ``weights.WeightFunction``).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, and ``lse [B, T, Hq]`` (float32) if asked.
    Gradients flow to q, k, v, sinks and a learnable bias (an array, or a rule's table such as
    ``T5Bias``; ALiBi slopes are constants). A rule is ``Bias.prepare``-d once per call for the padded
    extents of the tiles, before the tile loop.
    """
    if sinks is not None and not weight_fn.supports_sinks:
        raise NotImplementedError(f"weight function {weight_fn.name!r} does not support sinks")
    if return_lse and not weight_fn.normalized:
        raise NotImplementedError(f"weight function {weight_fn.name!r} has no row normalizer to return")
    B, T, Hq, D = q.shape
    S = k.shape[1]
    spec = score_spec(q, k, scale, logits_soft_cap, dropout_rate)
    static = _Static(spec, block_q=min(block_q, T), block_kv=min(block_kv, S), weight_fn=weight_fn)
    seed = dropout_seed(rng) if dropout_rate > 0 else None
    sinks = None if sinks is None else jnp.asarray(sinks, jnp.float32)
    bias = as_bias(bias)
    if bias is not None:  # a rule's per-call table, built once outside the custom VJP (autodiff reaches its leaves)
        bq, bk = static.block_q, static.block_kv
        bias = bias.prepare(T, S, num_tiles(T, bq) * bq, num_tiles(S, bk) * bk)
    out, lse = _flash(q, k, v, bias, sinks, mask, seed, static)
    return (out, lse) if return_lse else out


def flash_attention_xla_backward(
    q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array, d_out: jax.Array,
    d_lse: Optional[jax.Array] = None, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, block_q: int = 512, block_kv: int = 512,
):
    """The blocked softmax backward for given forward statistics: ``(dq, dk, dv)`` in the dtypes of q, k, v.

    ``out [B, T, Hq, Dv]`` and ``lse [B, T, Hq]`` may come from a larger computation than these keys
    (ring attention passes the global ones while ``k``, ``v`` are one rank's block); then
    ``P = exp(s − lse)`` is this block's share and ``dS = P ⊙ (dO·Vᵀ − δ + dlse)`` with
    ``δ_i = dO_i·out_i`` (FlashAttention-2, Dao 2023). ``d_lse`` defaults to zeros.
    """
    spec = score_spec(q, k, scale, logits_soft_cap)
    st = _Static(spec, block_q=min(block_q, q.shape[1]), block_kv=min(block_kv, k.shape[1]))
    d_lse = jnp.zeros(lse.shape, jnp.float32) if d_lse is None else d_lse
    dq, dk, dv, *_ = _flash_bwd(st, (q, k, v, None, None, mask, None, out, lse), (d_out, d_lse))
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, bias, sinks, mask, seed, st):
    return _forward(q, k, v, bias, sinks, mask, seed, st)


def _forward(q, k, v, bias: Optional[Bias], sinks, mask, seed, st: _Static):
    B, T, Hq, _ = q.shape
    Hkv, G = st.spec.num_kv_heads, Hq // st.spec.num_kv_heads
    bq, bk, fn = st.block_q, st.block_kv, st.weight_fn
    codes, lo, hi = block_schedule(mask, st.spec.T, st.spec.S, bq, bk)
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)
    Hv, Dv = v.shape[2], v.shape[-1]

    def q_tile(args):
        i, qi = args
        q_idx = i * bq + jnp.arange(bq)
        if sinks is None:
            m0 = jnp.full((B, Hkv, G, bq), -jnp.inf if fn.running_max else 0.0, jnp.float32)
            l0 = jnp.zeros((B, Hkv, G, bq), jnp.float32)
        else:  # softmax only (checked): the sink is a logit with no value
            m0 = jnp.broadcast_to(sinks.reshape(1, Hkv, G, 1), (B, Hkv, G, bq))
            l0 = jnp.ones((B, Hkv, G, bq), jnp.float32)
        acc0 = jnp.zeros((B, Hkv, G, bq, Dv), jnp.float32)
        m0, l0, acc0 = vary_like((m0, l0, acc0), q, k, v, bias, sinks, mask, seed)

        def visit(j, carry, apply_mask):
            m, l, acc = carry
            kv_idx = j * bk + jnp.arange(bk)
            kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            s = soft_cap(raw_logits(qi, kj, q_idx, kv_idx, bias, st.spec), st.spec.logits_soft_cap)
            if apply_mask:
                s = jnp.where(allowed(mask, q_idx, kv_idx, st.spec), s, -jnp.inf)
            u = fn.transform(s)
            if fn.running_max:
                m_new = jnp.maximum(m, u.max(-1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                p = fn.weight(u, m_safe[..., None])
                alpha = fn.rescale(m, m_safe)
                l = alpha * l + p.sum(-1)
            else:
                m_new, alpha = m, None
                p = fn.weight(u, 0.0)
                if fn.normalized:
                    l = l + p.sum(-1)
            if seed is not None:
                p = p * dropout_multiplier(seed, B, Hq, q_idx, kv_idx, st.spec)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", regroup(p.astype(v.dtype), Hv), vj,
                            preferred_element_type=jnp.float32)
            pv = regroup(pv, Hkv)
            return m_new, l, (acc + pv if alpha is None else alpha[..., None] * acc + pv)

        def body(j, carry):
            branches = [lambda c: c, lambda c: visit(j, c, True), lambda c: visit(j, c, False)]
            return lax.switch(codes[i, j], branches, carry)

        m, l, acc = lax.fori_loop(lo[i], hi[i], body, (m0, l0, acc0))
        if not fn.normalized:
            return acc.astype(q.dtype), jnp.zeros(l.shape, jnp.float32)
        safe_l = jnp.where(l > 0, l, 1.0)
        out = jnp.where(l[..., None] > 0, acc / safe_l[..., None], 0.0)
        log_l = jnp.log(safe_l)
        lse = jnp.where(l > 0, m + log_l if fn.running_max else log_l, -jnp.inf)
        return out.astype(q.dtype), lse

    nq = num_tiles(T, bq)
    out, lse = lax.map(q_tile, (jnp.arange(nq), q_tiles(q, bq, Hkv)))
    return untile(out, T), untile(lse, T)


def _flash_fwd(q, k, v, bias, sinks, mask, seed, st):
    out, lse = _forward(q, k, v, bias, sinks, mask, seed, st)
    return (out, lse), (q, k, v, bias, sinks, mask, seed, out, lse)


def _flash_bwd(st: _Static, residuals, cotangents):
    q, k, v, bias, sinks, mask, seed, out, lse = residuals
    d_out, d_lse = cotangents
    B, T, Hq, D = q.shape
    Hkv, Hv = st.spec.num_kv_heads, v.shape[2]
    bq, bk, fn = st.block_q, st.block_kv, st.weight_fn
    codes, lo, hi = block_schedule(mask, st.spec.T, st.spec.S, bq, bk)
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)
    if fn.normalized:
        delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    else:  # no normalizer: dS = dP/ds ⊙ dO·Vᵀ, without the row term
        delta = jnp.zeros(lse.shape, jnp.float32)
    d_lse = d_lse.astype(jnp.float32)
    stat = backward_stat(fn, lse)
    dbias0 = bias_grad_init(bias, T, bq, st.spec.S, bk)
    array_bias = isinstance(bias, ArrayBias)
    rule_grads = dbias0 is not None and not array_bias  # a rule whose float leaves get gradients
    Dv = v.shape[-1]

    def q_tile(carry, xs):
        dk, dv, dbias = carry
        i, qi, doi, stat_i, delta_i, dlse_i = xs
        q_idx = i * bq + jnp.arange(bq)
        m_b, n_b = backward_offsets(fn, stat_i)
        norm_only = fn.normalized and not fn.running_max
        inv_norm = jnp.exp(-n_b)[..., None] if norm_only else None
        doi_v = regroup(doi, Hv)  # grouped by V head for dO·Vᵀ and dV

        def visit(j, dqi, apply_mask):
            kv_idx = j * bk + jnp.arange(bk)
            kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            local = None if bias is None else bias.for_tile(q_idx, kv_idx, st.spec.T, st.spec.S)
            local_dbias = bias_grad_init(local, T, bq, st.spec.S, bk) if rule_grads else None
            raw, pullback = logits_with_bias_pullback(qi, kj, q_idx, kv_idx, local, st.spec, local_dbias)
            s = soft_cap(raw, st.spec.logits_soft_cap)
            p = fn.weight(fn.transform(s), m_b[..., None])
            if apply_mask:
                p = jnp.where(allowed(mask, q_idx, kv_idx, st.spec), p, 0.0)
            dpds = fn.dweight(s, p)
            if norm_only:
                p, dpds = p * inv_norm, dpds * inv_norm
            dp = regroup(jnp.einsum("bhgqd,bhkd->bhgqk", doi_v, vj, preferred_element_type=jnp.float32), Hkv)
            p_drop = p
            if seed is not None:
                keep = dropout_multiplier(seed, B, Hq, q_idx, kv_idx, st.spec)
                p_drop, dp = p * keep, dp * keep
            dvj = jnp.einsum("bhgqk,bhgqd->bhkd", regroup(p_drop.astype(doi.dtype), Hv), doi_v,
                             preferred_element_type=jnp.float32)
            ds = dpds * (dp - delta_i[..., None] + dlse_i[..., None]) if fn.normalized else dpds * dp
            if st.spec.logits_soft_cap is not None:
                ds = ds * (1.0 - jnp.square(s / st.spec.logits_soft_cap))
            if array_bias:  # the tile's logit gradient, or the gradient of the rule's tile restriction
                ds_bias, dq_bias = ds, 0.0
            else:
                ds_bias, dq_bias = add_bias_grad(local_dbias, ds, local, pullback, q_idx, kv_idx)
            ds = (ds * st.spec.scale).astype(qi.dtype)
            dqi = dqi + dq_bias + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kj, preferred_element_type=jnp.float32)
            dkj = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            return dqi, (dkj, dvj, ds_bias)

        if array_bias:
            bias_zeros = jnp.zeros((B, Hkv, Hq // Hkv, bq, bk), jnp.float32)
        else:
            bias_zeros = bias_grad_init(bias.for_tile(q_idx, jnp.arange(bk), st.spec.T, st.spec.S), T, bq,
                                        st.spec.S, bk) if rule_grads else None
        tile_zeros = vary_like((jnp.zeros((B, Hkv, bk, D), jnp.float32), jnp.zeros((B, Hv, bk, Dv), jnp.float32),
                                bias_zeros), residuals, cotangents)

        def body(j, inner):
            dqi, dk, dv, dbias = inner
            dqi, (dkj, dvj, ds_bias) = switch_key_tile(
                codes[i, j], lambda c, apply_mask: visit(j, c, apply_mask), dqi, tile_zeros)
            dk, dv = add_slice(dk, dkj, j * bk), add_slice(dv, dvj, j * bk)
            if array_bias:
                dbias, _ = add_bias_grad(dbias, ds_bias, bias, None, q_idx, j * bk + jnp.arange(bk))
            elif rule_grads:
                dbias = _add_rule_grad(dbias, ds_bias, bias, q_idx, j * bk + jnp.arange(bk), st.spec)
            return dqi, dk, dv, dbias

        dq0 = vary_like(jnp.zeros(qi.shape, jnp.float32), residuals, cotangents)
        dqi, dk, dv, dbias = lax.fori_loop(lo[i], hi[i], body, (dq0, dk, dv, dbias))
        return (dk, dv, dbias), dqi

    nq = num_tiles(T, bq)
    xs = (jnp.arange(nq), q_tiles(q, bq, Hkv), q_tiles(d_out, bq, Hkv), row_tiles(stat, bq, Hkv),
          row_tiles(delta, bq, Hkv), row_tiles(d_lse, bq, Hkv))
    carry0 = vary_like((jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32), dbias0),
                       residuals, cotangents)
    (dk, dv, dbias), dq = lax.scan(q_tile, carry0, xs)
    dq, dk, dv, d_bias = finish_grads(dq, dk, dv, dbias, q, k, v, bias)
    d_sinks = None
    if sinks is not None:
        p_sink = jnp.exp(sinks[None, None, :] - lse)  # [B, T, Hq]; lse is finite with sinks
        d_sinks = jnp.sum(p_sink * (d_lse - delta), axis=(0, 1))
    return dq, dk, dv, d_bias, d_sinks, None, None


def _add_rule_grad(dbias: list, d_local: list, bias: Bias, q_idx: jax.Array, kv_idx: jax.Array,
                   spec: ScoreSpec) -> list:
    """Add the gradient ``d_local`` of a tile's restriction ``bias.for_tile(q_idx, kv_idx)`` (its float leaves,
    float32) into ``dbias`` (the rule's float leaves, float32) by the restriction's transpose: the identity for
    most rules, an in-place add into the tile's slice of a prepared table (outside the key tile's conditional,
    like dK and dV)."""
    leaves, treedef = jax.tree_util.tree_flatten(bias)
    floating = [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves]

    def restrict(params):
        it = iter(params)
        full = treedef.unflatten([next(it) if f else x for x, f in zip(leaves, floating)])
        local = full.for_tile(q_idx, kv_idx, spec.T, spec.S)
        return [x for x in jax.tree_util.tree_leaves(local) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]

    _, pull = jax.vjp(restrict, [jnp.asarray(x, jnp.float32) for x, f in zip(leaves, floating) if f])
    (grads,) = pull(d_local)
    return [acc + g for acc, g in zip(dbias, grads)]


_flash.defvjp(_flash_fwd, _flash_bwd)
