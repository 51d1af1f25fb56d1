"""Backend-independent pieces of the Pallas block-sparse kernels (GPU Triton and TPU Mosaic).

The kernels are the flash kernels' tile math (``pallas_kernels.common``: logits, soft cap, mask
plans, FA-2 backward recomputation) driven by ``attnjax.sparse.BlockSparse`` lists instead of a
dense block schedule. This module adds what is specific to block lists:

- ``SparseStatic``: ``FlashStatic`` (softmax weights, no bias, no sinks) plus the *structural*
  part of the fine mask: a mask with no array leaves (Causal, SlidingWindow, ChunkedCausal,
  Full, or any mask whose ``tile`` is integer arithmetic on the index vectors, e.g. a
  neighborhood mask) that the kernels evaluate by calling ``mask.tile`` on position iotas.
- ``split_fine_mask``: the fine mask as a ``MaskPlan`` (the kinds ``plan_mask`` knows, with their
  data: Segments ids, Explicit blocks) AND a structural mask (everything else without data).
- ``validate``/``static_config``: refusals, list checks and the static description of one call.
- ``device_lists``/``transposed_lists``/``tile_codes``: the list arrays, the key-major lists of
  the dK/dV pass (``attnjax.sparse.transpose``) and the per-tile EMPTY/PARTIAL/FULL codes of the
  fine mask (FULL tiles skip the element mask, EMPTY listed tiles are skipped).

Math (FlashAttention-2, Dao 2023, restricted to listed tiles): ``s = cap·tanh(scale·q·kᵀ/cap)``,
``out_i = Σ_{j ∈ listed(i), mask(i,j)} exp(s_ij − lse_i) v_j`` with ``lse_i`` the log-sum-exp
over the same keys. Reference: ``attnjax.sparse.block_sparse_attention_reference``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import masks
from attnjax.blocked.lists import BlockSparse, transpose
from attnjax.blocked.weights import SOFTMAX
from attnjax.tiling import num_tiles
from pallas_kernels.common.mask_plans import plan_mask
from pallas_kernels.common.refusals import refuse_unserved
from pallas_kernels.common.statics import FlashStatic


@dataclasses.dataclass(frozen=True)
class SparseStatic(FlashStatic):
    """``FlashStatic`` plus ``structural``: the data-free part of the fine mask (or None).

    ``block_q``/``block_kv`` are the lists' block sizes (one kernel tile per listed block).
    """

    structural: Optional[masks.Mask] = None


def is_structural(mask: masks.Mask) -> bool:
    """True for a registered mask pytree without array leaves (its ``tile`` is pure index math)."""
    leaves = jax.tree_util.tree_leaves(mask)
    return not leaves


def _conjuncts(mask: masks.Mask) -> list:
    if isinstance(mask, masks.And):
        return _conjuncts(mask.a) + _conjuncts(mask.b)
    return [mask]


def split_fine_mask(mask: Optional[masks.Mask], T: int, S: int, T_pad: int, S_pad: int):
    """``(plan, plan_data, structural)`` with ``mask == planned & structural``.

    Each ``&``-conjunct goes to ``pallas_kernels.common.plan_mask`` (Full, Causal, SlidingWindow,
    ChunkedCausal, Segments, Explicit and ``&``/``|`` of them) when it can, else to the structural part when it
    has no array leaves. Raises NotImplementedError for anything else (e.g. a ``BlockSparse`` or a
    data mask of an unknown kind), so the dispatcher falls back to the xla path.
    """
    if mask is None:
        return None, [], None
    planned, structural = [], []
    for part in _conjuncts(mask):
        try:
            plan_mask(part, T, S, T_pad, S_pad)
            planned.append(part)
        except NotImplementedError:
            if not is_structural(part):
                raise NotImplementedError(
                    f"the Pallas block-sparse kernel can't evaluate fine mask {type(part).__name__} in-kernel: "
                    "it is neither a kind flash's MaskPlan knows nor a structural mask (a registered pytree "
                    "without array leaves); use implementation='xla'") from None
            structural.append(part)
    plan, data = None, []
    if planned:
        plan, data = plan_mask(_join(planned), T, S, T_pad, S_pad)
    return plan, data, _join(structural) if structural else None


def _join(parts: list) -> masks.Mask:
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def check_structural(mask: masks.Mask, block_q: int, block_kv: int, T: int, S: int) -> None:
    """NotImplementedError unless ``mask.tile`` gives one bool ``[1, 1, bq, bk]`` tile for all heads."""
    shape = jax.eval_shape(lambda: mask.tile(jnp.arange(block_q), jnp.arange(block_kv), T, S))
    if shape.shape != (1, 1, block_q, block_kv) or shape.dtype != jnp.bool_:
        raise NotImplementedError(
            f"structural fine mask {type(mask).__name__}.tile gives {shape.dtype}{list(shape.shape)}; the kernel "
            f"needs bool[1, 1, bq, bk] (the same for every batch and head)")


def structural_tile(st: SparseStatic, i, j) -> Optional[jax.Array]:
    """Bool ``[bq, bk]``: ``st.structural`` on tile ``(i, j)`` from 1-D position iotas (None if unset)."""
    if st.structural is None:
        return None
    q_idx = lax.broadcasted_iota(jnp.int32, (st.block_q,), 0) + i * st.block_q
    kv_idx = lax.broadcasted_iota(jnp.int32, (st.block_kv,), 0) + j * st.block_kv
    return st.structural.tile(q_idx, kv_idx, st.T, st.S).reshape(st.block_q, st.block_kv)


def validate(q, k, v, blocks: BlockSparse) -> None:
    """NotImplementedError for head dims > 256 or dtypes the kernels don't compute in; TypeError or
    ValueError for lists that don't fit q and k (shapes and options are checked by the entry point,
    ``attnjax.sparse.block_sparse_attention``)."""
    refuse_unserved("block-sparse", q, v)
    if not isinstance(blocks, BlockSparse):
        raise TypeError(f"blocks must be an attnjax.sparse.BlockSparse, got {type(blocks).__name__}")
    B, T, Hq, _ = q.shape
    blocks.check(B, Hq, T, k.shape[1])


def static_config(q, k, v, blocks: BlockSparse, mask, *, scale, logits_soft_cap, D_pad: int, Dv_pad: int,
                  interpret: bool, **compiler):
    """``(SparseStatic, plan_data)`` for one call; T and S are padded to whole list blocks."""
    _, T, Hq, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    bq, bk = blocks.block_q, blocks.block_kv
    T_pad, S_pad = num_tiles(T, bq) * bq, num_tiles(S, bk) * bk
    plan, data, structural = split_fine_mask(mask, T, S, T_pad, S_pad)
    if structural is not None:
        check_structural(structural, bq, bk, T, S)
    st = SparseStatic(
        T=T, S=S, T_pad=T_pad, S_pad=S_pad, num_q_heads=Hq, num_kv_heads=Hkv, D=D, Dv=Dv, D_pad=D_pad,
        Dv_pad=Dv_pad, block_q=bq, block_kv=bk, scale=D ** -0.5 if scale is None else float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        weight_fn=SOFTMAX, mask_plan=plan, bias_kind=None, interpret=bool(interpret),
        structural=structural, **compiler)
    return st, data


def device_lists(blocks: BlockSparse):
    """``(indices, counts)`` as int32 arrays (NumPy stays NumPy: a constant under jit)."""
    xp = np if blocks.is_static else jnp
    return xp.asarray(blocks.indices).astype(xp.int32), xp.asarray(blocks.counts).astype(xp.int32)


def transposed_lists(indices, counts, st: FlashStatic):
    """Key-major lists ``(indices_t [Bl, Hl, nk, K'], counts_t [Bl, Hl, nk])`` of ``(indices, counts)``
    (``attnjax.sparse.transpose``): for each key block, the query blocks that list it, ascending.

    NumPy lists give exact NumPy lists (``K'`` = the largest count); jax lists give ``K' = nq``.
    """
    t = transpose(BlockSparse(indices, counts, st.block_q, st.block_kv, st.num_kv_tiles))
    xp = np if t.is_static else jnp
    return xp.asarray(t.indices).astype(xp.int32), xp.asarray(t.counts).astype(xp.int32)


def tile_codes(mask: Optional[masks.Mask], T: int, S: int, block_q: int, block_kv: int) -> jax.Array:
    """int32 ``[nq, nk]``: EMPTY/PARTIAL/FULL of the fine mask per tile (reduced over batch and
    heads; a ragged last key tile is at most PARTIAL), from ``attnjax.masks.block_schedule``."""
    with jax.ensure_compile_time_eval():
        codes, _, _ = masks.block_schedule(mask, T, S, block_q, block_kv)
    return codes


__all__ = ["SparseStatic", "is_structural", "split_fine_mask", "check_structural", "structural_tile", "validate",
           "static_config", "device_lists", "transposed_lists", "tile_codes"]
