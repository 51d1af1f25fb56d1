"""Backend-independent pieces of the Pallas stick-breaking kernels (GPU Triton, TPU Mosaic).

The tile math (``forward_tile``/``backward_tile``, the request checks and the remainder) lives in
``pallas_kernels.stick_breaking.tiles`` and is shared with the blocked XLA path; masks are compiled
by ``pallas_kernels.common.plan_mask`` and evaluated by its ``eval_mask``. This module adds the
static call description, the refusals, the schedule (the flash schedule with diagonal tiles made
PARTIAL: stick-breaking excludes key position == query position) and the per-backend reverse
cumulative sum ``Σ_{k≥j}`` along a tile row.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from pallas_kernels.common.mask_plans import MaskPlan, eval_mask, tile_iotas
from pallas_kernels.common.refusals import refuse_unserved
from pallas_kernels.common.statics import KernelStatic
from pallas_kernels.stick_breaking.tiles import check_request, strict_codes


@dataclasses.dataclass(frozen=True)
class StickBreakingStatic(KernelStatic):
    """Everything static about one stick-breaking kernel call (hashable: a custom_vjp nondiff
    argument): the shared sizes (head dims padded on GPU to powers of two, at least 16) plus the
    mask plan."""

    mask_plan: Optional[MaskPlan]
    interpret: bool = False
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None


def validate(q, k, v, *, mask, bias, sinks, dropout_rate, return_lse) -> None:
    """Refusals shared by the backends: NotImplementedError for what stick-breaking does not define
    (non-causal masks, sinks, dropout, lse; ValueError for T > S) and for what the kernels don't
    serve (a bias, head dims > 256, dtypes other than f32/bf16/f16). Shapes and options are
    checked by ``attnjax.attention`` before the kernel is called."""
    check_request(q, k, mask=mask, sinks=sinks, dropout_rate=dropout_rate, return_lse=return_lse)
    if bias is not None:
        raise NotImplementedError("the Pallas stick-breaking kernel takes no bias; use implementation='xla'")
    refuse_unserved("stick-breaking", q, v)


def schedule(mask: masks.Mask, st: StickBreakingStatic):
    """``(codes [nq, nk], lo [nq], hi [nq])`` int32: the key tiles ``[lo, hi)`` each query tile walks
    (right to left), EMPTY tiles skipped, FULL tiles (no diagonal pair, no padding) unmasked."""
    codes, lo, hi = masks.block_schedule(mask, st.T, st.S, st.block_q, st.block_kv)
    return strict_codes(codes, st.T, st.S, st.block_q, st.block_kv).astype(jnp.int32), lo, hi


def allowed(st: StickBreakingStatic, i, j, load) -> jax.Array:
    """Bool ``[bq, bk]`` on tile ``(i, j)``: the mask, key position < query position, key < S.

    ``load`` is ``eval_mask``'s loader of the tile's Segments/Explicit data.
    """
    rows, cols = tile_iotas(i, j, st.block_q, st.block_kv)
    ok = (cols < st.S) & (cols < rows + (st.S - st.T))
    return ok & eval_mask(st.mask_plan, rows, cols, st.T, st.S, load)


def cumsum_reverse_cumsum(x: jax.Array) -> jax.Array:
    """``Σ_{k≥j} x_k`` along the last axis as ``total − cumsum + x`` (Triton lowers only the forward
    cumsum). Error ~ eps·Σ|x_row|, which matters only where the weight is already tiny."""
    return jnp.sum(x, axis=-1, keepdims=True) - jnp.cumsum(x, axis=-1) + x


def matmul_reverse_cumsum(x: jax.Array) -> jax.Array:
    """``Σ_{k≥j} x_k`` along the last axis of a 2-D tile as ``x @ U`` with ``U_kj = [k ≥ j]`` (MXU;
    float32 at HIGHEST precision)."""
    n = x.shape[-1]
    upper = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
             >= jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)).astype(jnp.float32)
    return jax.lax.dot(x, upper, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


__all__ = ["StickBreakingStatic", "validate", "schedule", "allowed", "cumsum_reverse_cumsum",
           "matmul_reverse_cumsum"]
