"""Block-sparse softmax attention in Pallas with the GPU (Triton) lowering, forward and backward.

Reference: ``attnjax.sparse.block_sparse_attention_reference`` (dense softmax under the mask
``blocks & mask``); tested in interpret mode in ``tests/kernels/test_block_sparse.py``.

Math (FlashAttention-2, Dao 2023, restricted to the listed tiles): for query block ``i`` of
(batch ``b``, query head ``h``) with list ``J = indices[b, h, i, :counts[b, h, i]]``,
``s = cap·tanh(scale·q·kᵀ/cap)`` on the tiles ``(i, j ∈ J)``, masked by the fine mask and by
"key < S"; ``out_i = Σ_j exp(s_ij − m_i) v_j / l_i`` with an online running max ``m`` and
normalizer ``l`` in float32; ``lse_i = m_i + log l_i`` (``-inf`` and ``out = 0`` on rows that
see nothing).

Kernels (the flash-family tile helpers of ``pallas_kernels.common.gpu_flash`` on list-driven loops):
  * forward: grid ``(nq, B, Hq)``. The lists are index-array inputs read as scalars; the count
    bounds a ``fori_loop`` whose step ``t`` loads key/value tile ``indices[b, h, i, t]`` of KV
    head ``h // (Hq/Hkv)`` with a dynamic slice. Listed tiles that the fine mask leaves EMPTY are
    skipped and FULL ones skip the element mask (codes of ``attnjax.masks.block_schedule``).
  * dQ: the same grid and lists; ``P = exp(s − lse)`` recomputed, ``dS = P ⊙ (dO·Vᵀ − δ + dlse)``.
  * dK/dV: grid ``(nk, B, Hkv)``, walking the transposed (key-major) lists of
    ``attnjax.sparse.transpose`` over query blocks, so each program owns its key tile and no
    atomics are needed. GQA: the program loops over the ``Hq/Hkv`` query heads of its KV head
    (each with its own transposed list) and sums their contributions in registers.
Static (NumPy) lists are transposed with NumPy at trace time; dynamic lists inside the backward
pass (``K' = nq``).

Triton needs power-of-two tiles: on a real GPU ``block_q``/``block_kv`` must be powers of two in
[16, 128] (else NotImplementedError); head dims are zero-padded to powers of two (≥ 16).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from attnjax.blocked.lists import BlockSparse
from attnjax.blocked.weights import backward_offsets, backward_stat
from pallas_kernels.block_sparse import common
from pallas_kernels.block_sparse.common import SparseStatic
from pallas_kernels.common.calls import pallas_call
from pallas_kernels.common.gpu import MAX_BLOCK, compiler_params, dot, full_spec, switch_on_code
from pallas_kernels.common.gpu_flash import Loader, allowed, extras, recompute, scores
from pallas_kernels.common.statics import next_power_of_2


def block_sparse_attention_gpu(
    q: jax.Array, k: jax.Array, v: jax.Array, blocks: BlockSparse, *, mask=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, return_lse: bool = False, interpret: bool = False,
    num_warps: Optional[int] = None, num_stages: Optional[int] = None,
):
    """Block-sparse softmax attention with the Pallas Triton lowering (``interpret=True`` on CPU).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``Hq % Hkv == 0``).
      blocks: ``attnjax.sparse.BlockSparse`` lists (static NumPy or dynamic jax); the kernel tiles
        are the lists' ``block_q × block_kv``.
      mask: optional fine mask inside the listed tiles (see ``common.split_fine_mask``).
      scale, logits_soft_cap, return_lse: as ``attnjax.sparse.block_sparse_attention_reference``.
      num_warps, num_stages: Triton overrides (default: ``pallas_kernels.common.gpu.compiler_params``).
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, or ``(out, lse [B, T, Hq] float32)``; differentiable in
      q, k, v (and through lse).
    """
    common.validate(q, k, v, blocks)
    bq, bk = blocks.block_q, blocks.block_kv
    if not interpret and any(b & (b - 1) or not 16 <= b <= MAX_BLOCK for b in (bq, bk)):
        raise NotImplementedError(f"the Triton block-sparse kernel needs block sizes that are powers of two in "
                                  f"[16, {MAX_BLOCK}], got block_q={bq}, block_kv={bk}; use implementation='xla'")
    B, T, Hq, D = q.shape
    S, Dv = k.shape[1], v.shape[3]
    D_pad, Dv_pad = (max(16, next_power_of_2(d)) for d in (D, Dv))
    st, mask_data = common.static_config(q, k, v, blocks, mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                         D_pad=D_pad, Dv_pad=Dv_pad, interpret=interpret, num_warps=num_warps,
                                         num_stages=num_stages)
    codes = jnp.asarray(common.tile_codes(mask, T, S, bq, bk))
    lists = common.device_lists(blocks)
    lists_t = common.transposed_lists(*lists, st) if blocks.is_static else None
    qt = jnp.pad(q, ((0, 0), (0, st.T_pad - T), (0, 0), (0, D_pad - D))).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, ((0, 0), (0, st.S_pad - S), (0, 0), (0, D_pad - D))).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, ((0, 0), (0, st.S_pad - S), (0, 0), (0, Dv_pad - Dv))).transpose(0, 2, 1, 3)
    out, lse = _attention(qt, kt, vt, lists, lists_t, mask_data, codes, st)
    out = out[:, :, :T, :Dv].transpose(0, 2, 1, 3)
    return (out, lse[:, :, :T].transpose(0, 2, 1)) if return_lse else out


# ----------------------------------------------------------------------------------------------
# In-kernel helpers.
# ----------------------------------------------------------------------------------------------


def _owner(list_ref, b, h):
    """Batch and head indices into ``[Bl, Hl, ...]`` lists (``Bl``, ``Hl`` ∈ {1, full})."""
    return (0 if list_ref.shape[0] == 1 else b), (0 if list_ref.shape[1] == 1 else h)


def _tile_allowed(st: SparseStatic, loader, i, j, g, rows, cols):
    """Flash's mask plan and "key < S", AND the structural fine mask."""
    ok = allowed(st, loader, i, j, g, rows, cols)
    extra = common.structural_tile(st, i, j)
    return ok if extra is None else ok & extra


def _walk(count, index_of, code_of, visit, carry):
    """``carry`` through the listed tiles: EMPTY codes skipped, FULL ones without the element mask."""
    def body(t, c):
        n = index_of(t)
        return switch_on_code(code_of(n), c, lambda c_: visit(n, c_, True), lambda c_: visit(n, c_, False))
    return lax.fori_loop(0, count, body, carry)


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------


def _fwd_kernel(idx_ref, cnt_ref, codes_ref, q_ref, k_ref, v_ref, *rest, st: SparseStatic):
    *extra_refs, o_ref, lse_ref = rest
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lb, lh = _owner(idx_ref, b, h)
    loader = Loader(st, extra_refs, "q")
    bq, bk = st.block_q, st.block_kv
    q = q_ref[...]

    def visit(j, carry, apply_mask):
        m, l, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s, rows, cols = scores(st, q, k, loader, h, i, j, None)
        if apply_mask:
            s = jnp.where(_tile_allowed(st, loader, i, j, None, rows, cols), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen no key yet
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])  # exactly 0 where masked
        pv = dot(p.astype(v.dtype), v, contract_a=1, contract_b=0)
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, st.Dv_pad), jnp.float32))
    m, l, acc = _walk(cnt_ref[lb, lh, i], lambda t: idx_ref[lb, lh, i, t], lambda j: codes_ref[i, j], visit, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def _dq_kernel(idx_ref, cnt_ref, codes_ref, q_ref, do_ref, mb_ref, nb_ref, dterm_ref, k_ref, v_ref, *rest,
               st: SparseStatic):
    *extra_refs, dq_ref = rest
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lb, lh = _owner(idx_ref, b, h)
    loader = Loader(st, extra_refs, "q")
    bk = st.block_kv
    q, do = q_ref[...], do_ref[...]
    mb, nb, dterm = mb_ref[...], nb_ref[...], dterm_ref[...]

    def visit(j, dq, apply_mask):
        k = k_ref[pl.ds(j * bk, bk), :]
        v = v_ref[pl.ds(j * bk, bk), :]
        s, rows, cols = scores(st, q, k, loader, h, i, j, None)
        ok = _tile_allowed(st, loader, i, j, None, rows, cols) if apply_mask else None
        _, ds = recompute(st, s, mb, nb, dterm, dot(do, v), ok)
        return dq + dot((ds * st.scale).astype(k.dtype), k, contract_a=1, contract_b=0)

    dq = _walk(cnt_ref[lb, lh, i], lambda t: idx_ref[lb, lh, i, t], lambda j: codes_ref[i, j], visit,
               jnp.zeros((st.block_q, st.D_pad), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkdv_kernel(idx_ref, cnt_ref, codes_ref, q_ref, do_ref, mb_ref, nb_ref, dterm_ref, k_ref, v_ref, *rest,
                 st: SparseStatic):
    *extra_refs, dk_ref, dv_ref = rest
    j, b, hk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    G, bq = st.group, st.block_q
    loader = Loader(st, extra_refs, "kv")
    k, v = k_ref[...], v_ref[...]

    def head(g, carry):
        h = hk * G + g
        lb, lh = _owner(idx_ref, b, h)

        def visit(i, c, apply_mask):
            dk, dv = c
            rows_ = pl.ds(i * bq, bq)
            q, do = q_ref[g, rows_, :], do_ref[g, rows_, :]
            s, rows, cols = scores(st, q, k, loader, h, i, j, g)
            ok = _tile_allowed(st, loader, i, j, g, rows, cols) if apply_mask else None
            p, ds = recompute(st, s, mb_ref[g, rows_], nb_ref[g, rows_], dterm_ref[g, rows_], dot(do, v), ok)
            dv = dv + dot(p.astype(do.dtype), do, contract_a=0, contract_b=0)
            dk = dk + dot((ds * st.scale).astype(q.dtype), q, contract_a=0, contract_b=0)
            return dk, dv

        return _walk(cnt_ref[lb, lh, j], lambda t: idx_ref[lb, lh, j, t], lambda i: codes_ref[i, j], visit, carry)

    init = (jnp.zeros((st.block_kv, st.D_pad), jnp.float32), jnp.zeros((st.block_kv, st.Dv_pad), jnp.float32))
    dk, dv = lax.fori_loop(0, G, head, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP.
# ----------------------------------------------------------------------------------------------


def _cparams(st: SparseStatic):
    return compiler_params(st.D_pad, st.Dv_pad, st.block_q, st.block_kv, st.num_warps, st.num_stages)


def _forward(qt, kt, vt, lists, mask_data, codes, st: SparseStatic):
    B, Hq = qt.shape[:2]
    G, bq = st.group, st.block_q
    idx, cnt = lists
    ex = extras(st, None, None, mask_data, "q")
    in_specs = [
        full_spec(idx), full_spec(cnt), full_spec(codes),
        pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.D_pad), lambda i, b, h: (b, h // G, 0, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.Dv_pad), lambda i, b, h: (b, h // G, 0, 0)),
    ] + ex.specs
    return pallas_call(
        functools.partial(_fwd_kernel, st=st), grid=(st.num_q_tiles, B, Hq), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, st.Dv_pad), lambda i, b, h: (b, h, i, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((B, Hq, st.T_pad, st.Dv_pad), qt.dtype),
                   jax.ShapeDtypeStruct((B, Hq, st.T_pad), jnp.float32)],
        interpret=st.interpret, name="attnjax_block_sparse_fwd", compiler_params=_cparams(st),
    )(idx, cnt, codes, qt, kt, vt, *ex.arrays)


def _backward(st: SparseStatic, residuals, cotangents):
    qt, kt, vt, lists, lists_t, mask_data, codes, out, lse = residuals
    d_out, d_lse = cotangents
    B, Hq = qt.shape[:2]
    G, bq, bk = st.group, st.block_q, st.block_kv
    d_out = d_out.astype(qt.dtype)
    delta = jnp.einsum("bhtd,bhtd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    dterm = delta - d_lse.astype(jnp.float32)
    # Empty rows and padded query rows: a +inf offset makes their recomputed P exactly 0.
    mb, nb = backward_offsets(st.weight_fn, backward_stat(st.weight_fn, lse))
    mb = jnp.where(jnp.arange(st.T_pad) < st.T, mb, jnp.inf)
    if lists_t is None:
        lists_t = common.transposed_lists(*lists, st)

    # dK, dV: grid over key tiles and KV heads; the group's query heads come as one block.
    ex = extras(st, None, None, mask_data, "kv")
    row_spec = pl.BlockSpec((None, G, st.T_pad), lambda j, b, hk: (b, hk, 0))
    in_specs = [
        full_spec(lists_t[0]), full_spec(lists_t[1]), full_spec(codes),
        pl.BlockSpec((None, G, st.T_pad, st.D_pad), lambda j, b, hk: (b, hk, 0, 0)),
        pl.BlockSpec((None, G, st.T_pad, st.Dv_pad), lambda j, b, hk: (b, hk, 0, 0)),
        row_spec, row_spec, row_spec,
        pl.BlockSpec((None, None, bk, st.D_pad), lambda j, b, hk: (b, hk, j, 0)),
        pl.BlockSpec((None, None, bk, st.Dv_pad), lambda j, b, hk: (b, hk, j, 0)),
    ] + ex.specs
    dk, dv = pallas_call(
        functools.partial(_dkdv_kernel, st=st), grid=(st.num_kv_tiles, B, st.num_kv_heads), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bk, st.D_pad), lambda j, b, hk: (b, hk, j, 0)),
                   pl.BlockSpec((None, None, bk, st.Dv_pad), lambda j, b, hk: (b, hk, j, 0))],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype)],
        interpret=st.interpret, name="attnjax_block_sparse_dkdv", compiler_params=_cparams(st),
    )(*lists_t, codes, qt, d_out, mb, nb, dterm, kt, vt, *ex.arrays)

    # dQ: the forward's grid and lists.
    ex = extras(st, None, None, mask_data, "q")
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    in_specs = [
        full_spec(lists[0]), full_spec(lists[1]), full_spec(codes),
        pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
        pl.BlockSpec((None, None, bq, st.Dv_pad), lambda i, b, h: (b, h, i, 0)),
        row_spec, row_spec, row_spec,
        pl.BlockSpec((None, None, st.S_pad, st.D_pad), lambda i, b, h: (b, h // G, 0, 0)),
        pl.BlockSpec((None, None, st.S_pad, st.Dv_pad), lambda i, b, h: (b, h // G, 0, 0)),
    ] + ex.specs
    dq = pallas_call(
        functools.partial(_dq_kernel, st=st), grid=(st.num_q_tiles, B, Hq), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, st.D_pad), lambda i, b, h: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
        interpret=st.interpret, name="attnjax_block_sparse_dq", compiler_params=_cparams(st),
    )(*lists, codes, qt, d_out, mb, nb, dterm, kt, vt, *ex.arrays)
    return dq, dk, dv, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(qt, kt, vt, lists, lists_t, mask_data, codes, st):
    return _forward(qt, kt, vt, lists, mask_data, codes, st)


def _attention_fwd(qt, kt, vt, lists, lists_t, mask_data, codes, st):
    out, lse = _forward(qt, kt, vt, lists, mask_data, codes, st)
    return (out, lse), (qt, kt, vt, lists, lists_t, mask_data, codes, out, lse)


_attention.defvjp(_attention_fwd, _backward)

__all__ = ["block_sparse_attention_gpu"]
