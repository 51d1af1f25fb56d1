"""GPU (Triton lowering) paged decode attention.

Grid ``(B, Hk, num_splits)``. A program owns one sequence, one KV head and one split of its pages
(split-K, as Flash-Decoding; Dao et al. 2023): it loads the query rows of that KV head's group
(``Tq·G`` rows, token-major, padded to at least 16 for ``tl.dot``), then walks its pages in blocks of
``pages_per_block`` pages with a ``fori_loop`` whose trip count stops at the sequence's length. Each
step reads the block's page ids from the page table and loads the pages with one gathered load
``k_ref[pages]`` (index loads, as jax's ``pallas/ops/gpu/paged_attention.py`` and vLLM's CUDA
kernel do), so K/V are read in place from the pool and never repeated over the query heads of a
group (GQA). The program writes its unnormalized float32 accumulator and its running max and
normalizer; ``common.merge_partials`` combines the splits in XLA.

On a real GPU every loaded block must have a power-of-two size (Triton): ``page_size``,
``pages_per_block``, ``D`` and ``Dv`` must be powers of two, and ``D``, ``Dv`` and the block of
``pages_per_block · page_size`` tokens at least 16; other requests raise NotImplementedError. Interpret
mode (CPU) takes any sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import gpu
from pallas_kernels.common.calls import pallas_call
from pallas_kernels.common.statics import next_power_of_2
from pallas_kernels.paged_attention import common

BLOCK_TOKENS = 64
"""Default tokens per compute block (``pages_per_block · page_size``)."""
MIN_ROWS = 16
"""``tl.dot`` takes at least 16 rows: the query rows of a group are padded up to this."""
TARGET_PROGRAMS = 128
"""The default split count aims at about this many programs (``B · Hk · num_splits``), enough to
fill a GPU's SMs when the batch is small (FlashDecoding's point)."""


def _kernel(length_ref, table_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, tq, group,
            pages_per_block, blocks_per_split):
    split = pl.program_id(2)
    length = length_ref[0]
    rows = q_ref.shape[0]
    block = pages_per_block * k_ref.shape[1]
    limit = common.row_limits(length, jnp.arange(rows, dtype=jnp.int32), tq, group)[:, None]
    q = q_ref[...]
    first = split * blocks_per_split
    count = jnp.clip(pl.cdiv(length, block) - first, 0, blocks_per_split)

    def body(i, carry):
        pages = table_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block, q.shape[1])
        v = v_ref[pages].reshape(block, acc_ref.shape[-1])
        s = gpu.dot(q, k) * scale
        col = (first + i) * block + jnp.arange(block, dtype=jnp.int32)
        s = jnp.where(col[None, :] < limit, s, -jnp.inf)
        return common.softmax_update(*carry, s, lambda p: gpu.dot(p.astype(v.dtype), v, contract_b=0))

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, acc_ref.shape[-1]), jnp.float32))
    m, l, acc = lax.fori_loop(0, count, body, init)
    acc_ref[...] = acc
    m_ref[...] = m[:, 0]
    l_ref[...] = l[:, 0]


def refuse(dims: common.PagedDims, pages_per_block: int, interpret: bool) -> None:
    """NotImplementedError for what the Triton kernel can't serve (interpret mode takes any sizes)."""
    if dims.Hk != dims.Hv:
        raise NotImplementedError(f"the Pallas paged attention kernel takes one K/V head count, got Hk={dims.Hk}, "
                                  f"Hv={dims.Hv}; use implementation='xla'")
    if interpret:
        return
    sizes = dict(page_size=dims.page_size, pages_per_block=pages_per_block, D=dims.D, Dv=dims.Dv)
    odd = {k: s for k, s in sizes.items() if s & (s - 1)}
    if odd:
        raise NotImplementedError(f"the Triton paged attention kernel needs power-of-two sizes, got {odd}")
    small = {k: s for k, s in (("D", dims.D), ("Dv", dims.Dv), ("block tokens", pages_per_block * dims.page_size))
             if s < 16}
    if small:
        raise NotImplementedError(f"the Triton paged attention kernel needs sizes of at least 16 (tl.dot), got {small}")
    if dims.Tq * dims.Hq // dims.Hk > gpu.MAX_BLOCK:
        raise NotImplementedError(f"the Triton paged attention kernel holds at most {gpu.MAX_BLOCK} query rows per KV "
                                  f"head (Tq·Hq/Hk = {dims.Tq * dims.Hq // dims.Hk}); use implementation='xla'")


def default_pages_per_block(page_size: int, max_pages: int) -> int:
    """Pages per compute block: about ``BLOCK_TOKENS`` tokens, a power of two, at most the table width
    rounded up to a power of two."""
    return min(next_power_of_2(max(1, BLOCK_TOKENS // page_size)), next_power_of_2(max_pages))


def default_num_splits(dims: common.PagedDims, pages_per_block: int) -> int:
    """Splits so that ``B · Hk · num_splits`` reaches about ``TARGET_PROGRAMS``, at most one per block."""
    blocks = -(-dims.M // pages_per_block)
    return max(1, min(blocks, TARGET_PROGRAMS // (dims.B * dims.Hk)))


def paged_attention_gpu(q, k_pages, v_pages, page_table, lengths, dims: common.PagedDims, *, scale: float,
                        pages_per_block: int, num_splits: int, interpret: bool) -> jax.Array:
    """``[B, Tq, Hq, Dv]`` in q's dtype for ``q [B, Tq, Hq, D]`` and the paged layout of ``common``."""
    B, Tq, Hq, D = q.shape
    Hk, Dv, group = dims.Hk, dims.Dv, Hq // dims.Hk
    rows = Tq * group
    rows_pad = max(MIN_ROWS, next_power_of_2(rows))
    blocks = -(-dims.M // pages_per_block)
    blocks_per_split = next_power_of_2(-(-blocks // num_splits))
    pages_per_split = blocks_per_split * pages_per_block
    table = common.padded_page_table(page_table, dims.P, num_splits * pages_per_split)
    qg = q.reshape(B, Tq, Hk, group, D).transpose(0, 2, 1, 3, 4).reshape(B, Hk, rows, D)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
    kernel = functools.partial(_kernel, scale=scale, tq=Tq, group=group, pages_per_block=pages_per_block,
                               blocks_per_split=blocks_per_split)
    width = next_power_of_2(max(D, Dv))
    stat = pl.BlockSpec((None, None, None, rows_pad), lambda b, h, s: (b, h, s, 0))
    acc, m, l = pallas_call(
        kernel,
        grid=(B, Hk, num_splits),
        in_specs=[pl.BlockSpec((1,), lambda b, h, s: (b,)),
                  pl.BlockSpec((None, pages_per_split), lambda b, h, s: (b, s)),
                  pl.BlockSpec((None, None, rows_pad, D), lambda b, h, s: (b, h, 0, 0)),
                  pl.BlockSpec((dims.P, dims.page_size, None, D), lambda b, h, s: (0, 0, h, 0)),
                  pl.BlockSpec((dims.P, dims.page_size, None, Dv), lambda b, h, s: (0, 0, h, 0))],
        out_specs=[pl.BlockSpec((None, None, None, rows_pad, Dv), lambda b, h, s: (b, h, s, 0, 0)), stat, stat],
        out_shape=[jax.ShapeDtypeStruct((B, Hk, num_splits, rows_pad, Dv), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hk, num_splits, rows_pad), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hk, num_splits, rows_pad), jnp.float32)],
        compiler_params=gpu.compiler_params(width, width, rows_pad, pages_per_block * dims.page_size),
        interpret=interpret,
        name="paged_attention",
    )(lengths.astype(jnp.int32), table, qg, k_pages, v_pages)
    out = common.merge_partials(acc, m[..., None], l[..., None], axis=2)[:, :, :rows]
    return out.reshape(B, Hk, Tq, group, Dv).transpose(0, 2, 1, 3, 4).reshape(B, Tq, Hq, Dv).astype(q.dtype)


__all__ = ["BLOCK_TOKENS", "MIN_ROWS", "TARGET_PROGRAMS", "refuse", "default_pages_per_block", "default_num_splits",
           "paged_attention_gpu"]
