"""Backend-independent pieces of the Pallas flash-attention kernels (GPU Triton and TPU Mosaic).

Shared by ``pallas_kernels.flash.gpu`` and ``pallas_kernels.flash.tpu``; nothing here calls
``pallas_call``. Scaffolding that other kernels share too (static description, mask plans, score
helpers, the flash-family tile math) lives in ``pallas_kernels.common``. Four parts:

1. ``WeightFunction``: the score-to-weight extension point, defined in
   ``attnjax.blocked.weights`` and re-exported here so that the kernels and the blocked XLA path
   share one definition. The kernel skeleton (tiles, masks, online accumulation, FA2 backward)
   is written once against it: softmax is ``SOFTMAX``; sigmoid attention (``SigmoidWeight``)
   and softplus attention (``SoftplusWeight``) are further instances.
2. ``Schedule``: ``attnjax.masks.block_schedule`` for the query-major passes, plus the
   transposed span for key-major passes (dK/dV): empty tiles are skipped, full tiles skip the
   element mask.
3. ``classify_bias``/``validate``: the requests the kernels refuse (NotImplementedError). Input
   validity is checked once, by ``attnjax.attention``, before a kernel is called.
4. ``t5_operands``/``t5_table_cotangent``: a ``T5Bias`` as kernel inputs (the table, one row per
   query head, and the query position offset) and its table gradient from the dQ pass's per-tile sums.

Math (FlashAttention-2, Dao 2023): logits ``s = cap·tanh((scale·q·kᵀ + b)/cap)`` (cap optional),
weights ``w = weight(transform(s), m)`` per ``WeightFunction``, ``out = Σ_j w_ij v_j / l_i`` with ``l_i = Σ_j w_ij``
(when normalized). Tested against ``attnjax.softmax.softmax_attention_reference``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.bias import ArrayBias, Bias, as_bias
from attnjax.positional import ALiBi, T5Bias
from attnjax.blocked.weights import (
    SOFTMAX, SigmoidWeight, SoftmaxWeight, SoftplusWeight, WeightFunction, backward_offsets, backward_stat,
)
from pallas_kernels.common.refusals import refuse_unserved
from pallas_kernels.common.scores import T5Buckets

# ----------------------------------------------------------------------------------------------
# 2. Block schedule (empty tiles skipped, full tiles skip the element mask).
# ----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Tile work plan. ``codes [nq, nk]`` EMPTY/PARTIAL/FULL (int32). Query-major: query tile
    ``i`` visits key tiles ``[lo[i], hi[i])``. Key-major (dK/dV): key tile ``j`` visits query
    tiles ``[q_lo[j], q_hi[j])``. EMPTY tiles inside a span are skipped; FULL tiles skip the
    element mask. Padded query rows are never marked: their dO is 0, so they add nothing."""

    codes: jax.Array
    lo: jax.Array
    hi: jax.Array
    q_lo: jax.Array
    q_hi: jax.Array


def schedule(mask: Optional[masks.Mask], T: int, S: int, block_q: int, block_kv: int) -> Schedule:
    """``attnjax.masks.block_schedule`` plus the transposed (key-major) spans."""
    codes, lo, hi = masks.block_schedule(mask, T, S, block_q, block_kv)
    nonempty = codes.T != masks.EMPTY  # [nk, nq]
    nq = codes.shape[0]
    q_lo = jnp.argmax(nonempty, axis=1).astype(jnp.int32)
    q_hi = (nq - jnp.argmax(nonempty[:, ::-1], axis=1)).astype(jnp.int32)
    q_hi = jnp.where(nonempty.any(axis=1), q_hi, q_lo)
    return Schedule(codes.astype(jnp.int32), lo, hi, q_lo, q_hi)


# ----------------------------------------------------------------------------------------------
# 3. Refusals.
# ----------------------------------------------------------------------------------------------


def classify_bias(bias) -> tuple:
    """``(kind, Bias or None)`` with kind None, "alibi" (``positional.ALiBi``), "t5"
    (``positional.T5Bias``) or "array" (``bias.ArrayBias``; the TPU kernel refuses it);
    NotImplementedError for any other ``Bias`` (so ``implementation="auto"`` falls back), TypeError
    for a value that is not a bias."""
    bias = as_bias(bias)
    if bias is None:
        return None, None
    if isinstance(bias, ALiBi):
        return "alibi", bias
    if isinstance(bias, T5Bias):
        return "t5", bias
    if isinstance(bias, ArrayBias):
        return "array", bias
    if isinstance(bias, Bias):
        raise NotImplementedError(
            f"the Pallas flash kernel supports ALiBi, T5Bias and array biases, not {type(bias).__name__}")
    raise TypeError(f"bias must be an array or an attnjax Bias, got {type(bias).__name__}")


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 192, 256)
"""Head dims the kernels are meant for (others up to 256 work too: padded to a power of two)."""


def validate(q, v, *, bias, sinks, dropout_rate, weight_fn: WeightFunction, return_lse: bool) -> None:
    """NotImplementedError for requests the kernels don't serve (dropout, head dim > 256, dtypes
    other than float32/bfloat16/float16, sinks or lse the weight function lacks, bias kinds).
    Shapes and options are checked by ``attnjax.attention`` before the kernel is called."""
    if dropout_rate > 0:
        raise NotImplementedError("the Pallas flash kernel has no in-kernel dropout; use implementation='xla'")
    refuse_unserved("flash", q, v)
    if sinks is not None and not weight_fn.supports_sinks:
        raise NotImplementedError(f"weight function {weight_fn.name!r} does not support sinks")
    if return_lse and not weight_fn.normalized:
        raise NotImplementedError(f"weight function {weight_fn.name!r} has no row normalizer to return")
    classify_bias(bias)


# ----------------------------------------------------------------------------------------------
# 4. T5 relative position bias as kernel inputs.
# ----------------------------------------------------------------------------------------------


def t5_operands(bias: T5Bias, num_q_heads: int, T: int, S: int) -> tuple:
    """``(T5Buckets, (table, offset))`` for the kernels: ``table`` float32 ``[Hq·num_buckets]``
    (query head ``h``'s column at ``h·num_buckets + b``; a 1-column table is broadcast, so its
    gradient sums over heads by autodiff) and ``offset`` int32 ``[1]``, the position of query row 0
    (``S − T`` bottom-right, or ``bias.query_offset``, a traced scalar, as a decode step passes)."""
    bias.check(1, num_q_heads, T, S)
    table = jnp.asarray(bias.table, jnp.float32)
    num_buckets = table.shape[0]
    rows = jnp.broadcast_to(table, (num_buckets, num_q_heads)).T.reshape(-1)
    if bias.query_offset is None:
        offset = jnp.full((1,), S - T, jnp.int32)
    elif jnp.ndim(bias.query_offset) != 0 or not jnp.issubdtype(jnp.asarray(bias.query_offset).dtype, jnp.integer):
        raise ValueError(f"T5Bias.query_offset must be an int scalar, got shape {jnp.shape(bias.query_offset)} "
                         f"and dtype {jnp.asarray(bias.query_offset).dtype}")
    else:
        offset = jnp.asarray(bias.query_offset, jnp.int32).reshape(1)
    spec = T5Buckets(num_buckets=num_buckets, bidirectional=bool(bias.bidirectional),
                     max_distance=int(bias.max_distance))
    return spec, (rows, offset)


def t5_table_cotangent(partial: jax.Array, num_buckets: int) -> jax.Array:
    """The gradient of ``t5_operands``' flat table from the dQ pass's sums ``[B, Hq, nq, width]``
    (``Σ ds·[bucket == b]`` of one query tile and head at index ``b``): summed over batch and query
    tiles, ``[Hq·num_buckets]``. O(B·Hq·nq·width) memory."""
    return partial[..., :num_buckets].sum(axis=(0, 2)).reshape(-1)


__all__ = [
    "WeightFunction", "SoftmaxWeight", "SigmoidWeight", "SoftplusWeight", "SOFTMAX", "backward_offsets",
    "backward_stat", "Schedule", "schedule", "classify_bias", "validate", "SUPPORTED_HEAD_DIMS", "t5_operands",
    "t5_table_cotangent",
]
