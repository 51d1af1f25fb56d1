"""Backend-independent pieces of the Pallas flash-attention kernels (GPU Triton and TPU Mosaic).

Shared by ``pallas_kernels.flash.gpu`` and ``pallas_kernels.flash.tpu``; nothing here calls
``pallas_call``. Scaffolding that other kernels share too (static description, mask plans, score
helpers, the flash-family tile math) lives in ``pallas_kernels.common``. Three parts:

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
from attnjax.positional import ALiBi
from attnjax.blocked.weights import (
    SOFTMAX, SigmoidWeight, SoftmaxWeight, SoftplusWeight, WeightFunction, backward_offsets, backward_stat,
)
from pallas_kernels.common.refusals import refuse_unserved

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
    """``(kind, Bias or None)`` with kind None / "alibi" / "array"; NotImplementedError otherwise."""
    bias = as_bias(bias)
    if bias is None:
        return None, None
    if isinstance(bias, ALiBi):
        return "alibi", bias
    if isinstance(bias, ArrayBias):
        return "array", bias
    if isinstance(bias, Bias):
        raise NotImplementedError(
            f"the Pallas flash kernel supports ALiBi and array biases, not {type(bias).__name__}")
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


__all__ = [
    "WeightFunction", "SoftmaxWeight", "SigmoidWeight", "SoftplusWeight", "SOFTMAX", "backward_offsets",
    "backward_stat", "Schedule", "schedule", "classify_bias", "validate", "SUPPORTED_HEAD_DIMS",
]
