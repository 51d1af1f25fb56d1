"""Paged decode attention: exact softmax attention over a KV cache stored in fixed-size pages.

PagedAttention (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving
with PagedAttention", §4.1): a sequence's keys and values live in pages of ``page_size`` tokens
scattered over one shared pool, found through a per-sequence page table (a block table, §4.2),
so that a cache grows a page at a time and freed pages serve other sequences. The math is
unchanged: query ``t`` of the last ``Tq`` tokens of sequence ``b`` (``Tq = 1`` for decode) computes

    out[b, t, h] = Σ_{j < L_b − Tq + 1 + t} softmax_j(scale · q[b, t, h] · k_{b, j}) v_{b, j}

(Vaswani et al. 2017, eq. 1, with the causal mask of the last ``Tq`` rows), where ``k_{b, j}`` is
slot ``j % page_size`` of page ``page_table[b, j // page_size]`` and ``L_b = lengths[b]``. Layout
and the checks: ``pallas_kernels.paged_attention.common``. GQA: query head ``h`` reads K head
``h // (Hq/Hk)`` and V head ``h // (Hq/Hv)`` (``Hk != Hv`` is DiffQKV's layout, xla and reference
paths only).

Paths:

- ``paged_attention_reference``: gathers every sequence's pages into a contiguous
  ``[B, M·page_size]`` cache and runs the dense masked softmax reference. O(B·M·page_size) memory.
- ``paged_attention_xla``: a ``lax.scan`` over blocks of pages with an online softmax
  (FlashAttention-2, Dao 2023, Alg. 1), gathering one block of pages per step; blocks past the
  longest sequence are skipped (``lax.cond``), K/V are never repeated for GQA. O(B·block) extra memory.
- ``paged_attention_pallas``: the Pallas kernels of ``pallas_kernels.paged_attention`` (GPU split-K with
  index loads, TPU with the page table scalar-prefetched); their gradient is the xla path's.

Decode needs no custom backward: the reference and xla paths are differentiable by autodiff, and the
"pallas" path differentiates through the xla path (a ``jax.custom_vjp`` whose backward is the xla
path's VJP).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import masks
from attnjax.dispatch import dispatch
from attnjax.softmax.softmax import softmax_attention_reference
from pallas_kernels.paged_attention import common
from pallas_kernels.paged_attention import paged_attention_pallas as paged_attention_kernel

XLA_BLOCK_TOKENS = 512
"""Default tokens per step of the xla path (``pages_per_block · page_size``), as ``Softmax.block_kv``."""


def _gather(pages: jax.Array, table: jax.Array) -> jax.Array:
    """``pages [P, page_size, H, E]`` at ``table [B, n]`` -> ``[B, n·page_size, H, E]``."""
    x = pages[table]
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _limits(lengths: jax.Array, tq: int) -> jax.Array:
    """``[B, Tq]`` exclusive key bound of each query (``common.key_limit``)."""
    return common.key_limit(lengths.astype(jnp.int32)[:, None], jnp.arange(tq, dtype=jnp.int32), tq)


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                              lengths: jax.Array, *, scale: Optional[float] = None) -> jax.Array:
    """Paged attention, obviously correct: gather the pages into a contiguous cache, then dense softmax.

    ``k[b, j] = k_pages[page_table[b, j // page_size], j % page_size]`` for ``j < M·page_size`` (PagedAttention,
    Kwon et al. 2023, §4.1), then ``attnjax.softmax.softmax_attention_reference`` (Vaswani et al. 2017,
    eq. 1) with the mask ``j < lengths[b] − Tq + 1 + t``.

    Args:
      q: ``[B, Hq, D]`` (one decode token per sequence) or ``[B, Tq, Hq, D]`` (its last ``Tq`` tokens).
      k_pages: ``[P, page_size, Hk, D]``; v_pages: ``[P, page_size, Hv, Dv]``.
      page_table: int ``[B, M]``; lengths: int ``[B]``, tokens per sequence (``<= M·page_size``).
      scale: logit scale, default ``1/sqrt(D)``.
    Returns:
      ``[B, Hq, Dv]`` or ``[B, Tq, Hq, Dv]`` (as q) in q's dtype; a query that sees no key gives 0.
    """
    dims = common.check_paged(q, k_pages, v_pages, page_table, lengths)
    table = common.padded_page_table(page_table, dims.P, dims.M)
    q4 = common.as_tokens(q)
    allowed = jnp.arange(dims.capacity)[None, None, :] < _limits(lengths, dims.Tq)[:, :, None]
    out = softmax_attention_reference(q4, _gather(k_pages, table), _gather(v_pages, table),
                                      mask=masks.Explicit(allowed[:, None]), scale=scale)
    return out[:, 0] if q.ndim == 3 else out


def paged_attention_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                        lengths: jax.Array, *, scale: Optional[float] = None,
                        pages_per_block: Optional[int] = None) -> jax.Array:
    """Paged attention as an online softmax over blocks of pages, gathered one block at a time.

    Same arguments and result as ``paged_attention_reference``. A ``lax.scan`` over
    ``ceil(M / pages_per_block)`` blocks gathers ``pages_per_block`` pages of every sequence per step
    and folds their logits into a running max, normalizer and float32 accumulator (FlashAttention-2,
    Dao 2023, Alg. 1; ``pallas_kernels.paged_attention.common.softmax_update``). Queries are grouped
    by KV head, so GQA reads each K/V page once. Blocks past the longest sequence are skipped by a
    ``lax.cond``, so a step costs O(B·Tq·Hq·max(lengths)·(D + Dv)) flops and O(B·block·(Hk·D + Hv·Dv))
    extra memory, whatever the pool size.

    Args:
      pages_per_block: pages gathered per step (default: about ``XLA_BLOCK_TOKENS`` tokens).
    """
    dims = common.check_paged(q, k_pages, v_pages, page_table, lengths)
    if pages_per_block is not None and (not isinstance(pages_per_block, int) or pages_per_block <= 0):
        raise ValueError(f"pages_per_block must be a positive int, got {pages_per_block!r}")
    ppb = min(dims.M, pages_per_block or max(1, XLA_BLOCK_TOKENS // dims.page_size))
    num_blocks = -(-dims.M // ppb)
    block = ppb * dims.page_size
    table = common.padded_page_table(page_table, dims.P, num_blocks * ppb)
    q4 = common.as_tokens(q)
    B, Tq, Hq, D = q4.shape
    Hk, Hv, Dv = dims.Hk, dims.Hv, dims.Dv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qg = q4.reshape(B, Tq, Hk, Hq // Hk, D)
    limits = _limits(lengths, Tq)[:, :, None, None]
    longest = jnp.max(lengths).astype(jnp.int32)

    def visit(carry, i):
        pages = lax.dynamic_slice_in_dim(table, i * ppb, ppb, axis=1)
        k, v = _gather(k_pages, pages), _gather(v_pages, pages)
        s = jnp.einsum("btkgd,bskd->btkgs", qg, k, preferred_element_type=jnp.float32).reshape(B, Tq, Hq, block)
        s = jnp.where(i * block + jnp.arange(block) < limits, s * scale, -jnp.inf)

        def weighted_values(p):
            p = p.reshape(B, Tq, Hv, Hq // Hv, block).astype(v.dtype)
            return jnp.einsum("btvgs,bsve->btvge", p, v, preferred_element_type=jnp.float32).reshape(B, Tq, Hq, Dv)

        return common.softmax_update(*carry, s, weighted_values)

    def step(carry, i):
        return lax.cond(i * block < longest, visit, lambda c, _: c, carry, i), None

    init = (jnp.full((B, Tq, Hq, 1), -jnp.inf, jnp.float32), jnp.zeros((B, Tq, Hq, 1), jnp.float32),
            jnp.zeros((B, Tq, Hq, Dv), jnp.float32))
    (_, l, acc), _ = lax.scan(step, init, jnp.arange(num_blocks))
    out = common.normalize(acc, l).astype(q.dtype)
    return out[:, 0] if q.ndim == 3 else out


def paged_attention_pallas(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           lengths: jax.Array, *, scale: Optional[float] = None, **kernel_options) -> jax.Array:
    """Paged attention by the Pallas kernels (``pallas_kernels.paged_attention.paged_attention_pallas``).

    Same arguments and result as ``paged_attention_reference``; ``kernel_options`` (``pages_per_block``,
    ``num_splits``, ``backend``, ``interpret``) go to the kernel. Forward only in the kernel: the
    gradient (``jax.custom_vjp``) is the VJP of ``paged_attention_xla``, which recomputes the forward.

    Raises:
      NotImplementedError for requests the kernels don't serve (see the kernel), so "auto" falls back.
    """
    common.check_paged(q, k_pages, v_pages, page_table, lengths)
    return _kernel_with_xla_grad(q, k_pages, v_pages, page_table, lengths, scale, tuple(sorted(kernel_options.items())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kernel_with_xla_grad(q, k_pages, v_pages, page_table, lengths, scale, options):
    return paged_attention_kernel(q, k_pages, v_pages, page_table, lengths, scale=scale, **dict(options))


def _kernel_fwd(q, k_pages, v_pages, page_table, lengths, scale, options):
    out = _kernel_with_xla_grad(q, k_pages, v_pages, page_table, lengths, scale, options)
    return out, (q, k_pages, v_pages, page_table, lengths)


def _kernel_bwd(scale, options, residuals, d_out):
    q, k_pages, v_pages, page_table, lengths = residuals
    _, pullback = jax.vjp(lambda q, k, v: paged_attention_xla(q, k, v, page_table, lengths, scale=scale),
                          q, k_pages, v_pages)
    return (*pullback(d_out), None, None)


_kernel_with_xla_grad.defvjp(_kernel_fwd, _kernel_bwd)

PATHS = {"reference": paged_attention_reference, "xla": paged_attention_xla, "pallas": paged_attention_pallas}
"""Implementation name -> path, for ``paged_attention``'s ``implementation=``."""


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                    lengths: jax.Array, *, scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Softmax attention of each sequence's last token(s) over its paged KV cache (PagedAttention, Kwon et al. 2023).

    Args:
      q: ``[B, Hq, D]`` (one decode token per sequence) or ``[B, Tq, Hq, D]`` (its last ``Tq`` tokens,
        bottom-right causal: query ``t`` sees keys ``j < lengths[b] − Tq + 1 + t``).
      k_pages: ``[P, page_size, Hk, D]``; v_pages: ``[P, page_size, Hv, Dv]``, the shared page pool.
      page_table: int ``[B, M]``, the pages of each sequence in order; columns past a sequence's last
        page are ignored (e.g. -1).
      lengths: int ``[B]``, tokens per sequence (ragged), at most ``M·page_size``.
      scale: logit scale, default ``1/sqrt(D)``.
      implementation: "reference", "xla", "pallas" or "auto" (pallas, then xla, on GPU/TPU; xla on
        CPU, where "pallas" runs the GPU kernel in interpret mode).
    Returns:
      ``[B, Hq, Dv]`` or ``[B, Tq, Hq, Dv]`` (as q) in q's dtype; a query that sees no key gives 0.
    Raises:
      ValueError/TypeError naming the argument and the shapes for inputs that break the layout, and for
      lengths or page-table entries that don't fit (checked when their values are known, i.e. outside jit);
      NotImplementedError when the named path can't serve the request.
    """
    return dispatch(PATHS, implementation, q, k_pages, v_pages, page_table, lengths, scale=scale,
                    what="paged attention")


__all__ = ["paged_attention", "paged_attention_reference", "paged_attention_xla", "paged_attention_pallas",
           "XLA_BLOCK_TOKENS", "PATHS"]
