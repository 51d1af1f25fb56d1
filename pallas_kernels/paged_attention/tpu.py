"""TPU (Mosaic lowering) paged decode attention.

Grid ``(B, Hk, num_blocks)``, the last axis sequential ("arbitrary"). The lengths and the page
table are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``), as in jax's
``pallas/ops/tpu/paged_attention``; here the index maps read them, so the Pallas pipeline itself
DMAs (and double-buffers) the pages: K and V enter as ``pages_per_block`` operands each, operand
``j`` of step ``i`` being page ``page_table[b, i·pages_per_block + j]`` (a ``(page_size, D)`` block of
the pool viewed as ``[P, page_size, Hk·D]``, lane block ``h``). Steps past a sequence's last block
clamp their index to that block, so they fetch nothing new, and ``pl.when`` skips their compute.
The running max, normalizer and float32 accumulator live in VMEM scratch (max and normalizer
lane-broadcast ``[rows, 128]``, as in jax's TPU flash attention); the last step writes
``acc / l``. One program reads each K/V page once for all ``Tq·G`` query rows of its group (GQA:
no repeated K/V).

TPU constraints (compiled; interpret mode takes any sizes): ``page_size`` a multiple of 8 (16 for
16-bit dtypes); ``D`` and ``Dv`` multiples of 128 unless there is a single KV head (the lane block
of one head); one K/V head count; at most ``MAX_ROWS`` query rows. Other requests raise
NotImplementedError. The whole page table sits in SMEM (as in jax's kernel), which bounds
``B · max_pages_per_seq``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.calls import pallas_call
from pallas_kernels.common.tpu import LANES, SUBLANES, stat_column
from pallas_kernels.paged_attention import common

BLOCK_TOKENS = 128
"""Default tokens per compute step (``pages_per_block · page_size``): one lane-width of logits."""
MAX_ROWS = 512
"""The most query rows (``Tq · Hq/Hk``) one program holds in VMEM; longer requests (a long prompt) go to the
xla path."""


def _sublanes(dtype) -> int:
    """Rows of a native tile: 8 for 32-bit, 16 for 16-bit dtypes."""
    return SUBLANES * (4 // jnp.dtype(dtype).itemsize)


def _kernel(lengths_ref, table_ref, q_ref, *refs, scale, tq, group, pages_per_block):
    k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
    o_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_block:]
    b, i = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]
    block = pages_per_block * k_refs[0].shape[0]

    @pl.when(i == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(i * block < length)
    def _compute():
        k = jnp.concatenate([r[...] for r in k_refs], axis=0)
        v = jnp.concatenate([r[...] for r in v_refs], axis=0)
        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        rows = lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = i * block + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(cols < common.row_limits(length, rows, tq, group), s, -jnp.inf)
        m, l, acc = common.softmax_update(
            stat_column(m_sc), stat_column(l_sc), acc_sc[...], s,
            lambda p: lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32))
        m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l, l_sc.shape)
        acc_sc[...] = acc

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = common.normalize(acc_sc[...], stat_column(l_sc)).astype(o_ref.dtype)


def refuse(dims: common.PagedDims, dtype, interpret: bool) -> None:
    """NotImplementedError for what the Mosaic kernel can't serve (interpret mode takes any sizes)."""
    if dims.Hk != dims.Hv:
        raise NotImplementedError(f"the Pallas paged attention kernel takes one K/V head count, got Hk={dims.Hk}, "
                                  f"Hv={dims.Hv}; use implementation='xla'")
    if interpret:
        return
    rows = _sublanes(dtype)
    if dims.page_size % rows:
        raise NotImplementedError(f"the Mosaic paged attention kernel needs page_size to be a multiple of {rows} for "
                                  f"{jnp.dtype(dtype).name}, got {dims.page_size}")
    if dims.Tq * dims.Hq // dims.Hk > MAX_ROWS:
        raise NotImplementedError(f"the Mosaic paged attention kernel holds at most {MAX_ROWS} query rows per KV head "
                                  f"(Tq·Hq/Hk = {dims.Tq * dims.Hq // dims.Hk}); use implementation='xla'")
    if dims.Hk > 1 and (dims.D % LANES or dims.Dv % LANES):
        raise NotImplementedError(f"the Mosaic paged attention kernel reads one KV head as a lane block: D and Dv "
                                  f"must be multiples of {LANES} with {dims.Hk} KV heads, got D={dims.D}, Dv={dims.Dv}")


def default_pages_per_block(page_size: int, max_pages: int) -> int:
    """Pages per step: about ``BLOCK_TOKENS`` tokens, at most the page-table width."""
    return max(1, min(BLOCK_TOKENS // page_size, max_pages))


def paged_attention_tpu(q, k_pages, v_pages, page_table, lengths, dims: common.PagedDims, *, scale: float,
                        pages_per_block: int, interpret: bool) -> jax.Array:
    """``[B, Tq, Hq, Dv]`` in q's dtype for ``q [B, Tq, Hq, D]`` and the paged layout of ``common``."""
    B, Tq, Hq, D = q.shape
    Hk, Dv, page_size, group = dims.Hk, dims.Dv, dims.page_size, Hq // dims.Hk
    rows = Tq * group
    tile = _sublanes(q.dtype)
    rows_pad = -(-rows // tile) * tile
    num_blocks = -(-dims.M // pages_per_block)
    width = num_blocks * pages_per_block
    block = pages_per_block * page_size
    table = common.padded_page_table(page_table, dims.P, width).reshape(-1)
    lengths = lengths.astype(jnp.int32)
    qg = q.reshape(B, Tq, Hk, group, D).transpose(0, 2, 1, 3, 4).reshape(B, Hk, rows, D)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))

    def page_spec(j, depth):
        def index(b, h, i, lengths_ref, table_ref):
            last = jnp.maximum(pl.cdiv(lengths_ref[b], block) - 1, 0)
            return table_ref[b * width + jnp.minimum(i, last) * pages_per_block + j], 0, h
        return pl.BlockSpec((None, page_size, depth), index)

    rows_spec = functools.partial(pl.BlockSpec, index_map=lambda b, h, i, *_: (b, h, 0, 0))
    kernel = functools.partial(_kernel, scale=scale, tq=Tq, group=group, pages_per_block=pages_per_block)
    params = None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    out = pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, Hk, num_blocks),
            in_specs=[rows_spec((None, None, rows_pad, D)),
                      *(page_spec(j, D) for j in range(pages_per_block)),
                      *(page_spec(j, Dv) for j in range(pages_per_block))],
            out_specs=rows_spec((None, None, rows_pad, Dv)),
            scratch_shapes=[pltpu.VMEM((rows_pad, LANES), jnp.float32), pltpu.VMEM((rows_pad, LANES), jnp.float32),
                            pltpu.VMEM((rows_pad, Dv), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((B, Hk, rows_pad, Dv), q.dtype),
        compiler_params=params,
        interpret=pltpu.InterpretParams() if interpret else False,
        name="paged_attention_tpu",
    )(lengths, table, qg, *([k_pages.reshape(dims.P, page_size, Hk * D)] * pages_per_block),
      *([v_pages.reshape(dims.P, page_size, Hk * Dv)] * pages_per_block))
    out = out[:, :, :rows]
    return out.reshape(B, Hk, Tq, group, Dv).transpose(0, 2, 1, 3, 4).reshape(B, Tq, Hq, Dv)


__all__ = ["BLOCK_TOKENS", "MAX_ROWS", "refuse", "default_pages_per_block", "paged_attention_tpu"]
