"""Backend-independent pieces of the Pallas flash-attention kernels (GPU Triton and TPU Mosaic).

Shared by ``pallas_kernels.flash.gpu`` and ``pallas_kernels.flash.tpu``; nothing here calls
``pallas_call``. Four parts:

1. ``WeightFunction``: the score-to-weight extension point, defined in
   ``attnjax.blocked.weights`` and re-exported here so that the kernels and the blocked XLA path
   share one definition. The kernel skeleton (tiles, masks, online accumulation, FA2 backward)
   is written once against it: softmax is ``SOFTMAX``; sigmoid attention (``SigmoidWeight``)
   and softplus attention (``SoftplusWeight``) are further instances.
2. ``MaskPlan``: an ``attnjax.masks`` value compiled into a static tree that a kernel evaluates
   on a 2-D tile from iotas (Causal, SlidingWindow, ChunkedCausal, Full) or from data tiles it
   loads (Segments ids, Explicit bool blocks). Combinations with ``&``/``|`` nest.
3. ``Schedule``: ``attnjax.masks.block_schedule`` for the query-major passes, plus the
   transposed span for key-major passes (dK/dV): empty tiles are skipped, full tiles skip the
   element mask.
4. ``FlashStatic``/``validate``/``pick_blocks``: static per-call description and input checks.

Math (FlashAttention-2, Dao 2023): logits ``s = cap·tanh((scale·q·kᵀ + b)/cap)`` (cap optional),
weights ``w = weight(transform(s), m)`` per ``WeightFunction``, ``out = Σ_j w_ij v_j / l_i`` with ``l_i = Σ_j w_ij``
(when normalized). Tested against ``attnjax.softmax.softmax_attention_reference``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from attnjax import masks as _masks
from attnjax.bias import ArrayBias, Bias, as_bias
from attnjax.positional import ALiBi
from attnjax.blocked.weights import (
    SOFTMAX, SigmoidWeight, SoftmaxWeight, SoftplusWeight, WeightFunction, backward_offsets, backward_stat,
)

# ----------------------------------------------------------------------------------------------
# 2. Masks compiled for in-kernel evaluation on 2-D tiles.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """A static mask tree. ``kind`` in full/causal/window/chunked/segments/explicit/and/or.

    ``params`` holds static numbers (window bounds, chunk); ``slot`` indexes the data arrays
    returned by ``plan_mask`` (segments: one slot = q ids and kv ids; explicit: the bool block).
    """

    kind: str
    params: tuple = ()
    slot: int = -1
    children: tuple = ()

    def data_kinds(self) -> tuple:
        """``(kind, slot)`` of every data leaf, in slot order."""
        if self.kind in ("and", "or"):
            return tuple(sorted(sum((c.data_kinds() for c in self.children), ()), key=lambda x: x[1]))
        if self.kind in ("segments", "explicit"):
            return ((self.kind, self.slot),)
        return ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentData:
    """Segment ids padded to the tiled lengths: ``q [Bs, T_pad]``, ``kv [Bs, S_pad]`` int32.

    Padded query rows get id ``-1`` and padded key columns ``-2`` so they never match.
    """

    q: jax.Array
    kv: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExplicitData:
    """An Explicit mask as int8 ``[Bm, Hm, T_pad, S_pad]`` (``Bm ∈ {1,B}``, ``Hm ∈ {1,Hq}``).

    The query and key axes are broadcast to full length (so a tile is always a plain block);
    padding is 0 (not allowed).
    """

    mask: jax.Array


def plan_mask(mask: Optional[_masks.Mask], T: int, S: int, T_pad: int, S_pad: int):
    """Compile ``mask`` into ``(MaskPlan or None, [SegmentData | ExplicitData, ...])``.

    Raises NotImplementedError for mask kinds the kernels can't evaluate in-kernel (anything
    other than Full, Causal, SlidingWindow, ChunkedCausal, Segments, Explicit and their
    ``&``/``|`` combinations, e.g. a future BlockSparse or Neighborhood).
    """
    if mask is None:
        return None, []
    data: list = []

    def build(m) -> MaskPlan:
        if isinstance(m, _masks.Full):
            return MaskPlan("full")
        if isinstance(m, _masks.Causal):
            return MaskPlan("causal")
        if isinstance(m, _masks.SlidingWindow):
            return MaskPlan("window", (m.left, m.right))
        if isinstance(m, _masks.ChunkedCausal):
            return MaskPlan("chunked", (m.chunk,))
        if isinstance(m, _masks.Segments):
            qs = jnp.asarray(m.q_segment_ids, jnp.int32)
            ks = jnp.asarray(m._kv(), jnp.int32)
            bs = max(qs.shape[0], ks.shape[0])
            qs = jnp.broadcast_to(qs, (bs, T))
            ks = jnp.broadcast_to(ks, (bs, S))
            qs = jnp.pad(qs, ((0, 0), (0, T_pad - T)), constant_values=-1)
            ks = jnp.pad(ks, ((0, 0), (0, S_pad - S)), constant_values=-2)
            data.append(SegmentData(qs, ks))
            return MaskPlan("segments", slot=len(data) - 1)
        if isinstance(m, _masks.Explicit):
            arr = jnp.asarray(m.mask)
            arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
            arr = jnp.broadcast_to(arr, arr.shape[:2] + (T, S)).astype(jnp.int8)
            arr = jnp.pad(arr, ((0, 0), (0, 0), (0, T_pad - T), (0, S_pad - S)))
            data.append(ExplicitData(arr))
            return MaskPlan("explicit", slot=len(data) - 1)
        if isinstance(m, _masks.And):
            return MaskPlan("and", children=(build(m.a), build(m.b)))
        if isinstance(m, _masks.Or):
            return MaskPlan("or", children=(build(m.a), build(m.b)))
        raise NotImplementedError(
            f"the Pallas flash kernel can't evaluate mask {type(m).__name__} in-kernel; supported: Full, Causal, "
            "SlidingWindow, ChunkedCausal, Segments, Explicit and &/| combinations (use implementation='xla')")

    return build(mask), data


def eval_mask(plan: MaskPlan, q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int,
              load: Callable[[str, int], object]) -> jax.Array:
    """Evaluate ``plan`` on one tile: bool ``[bq, bk]``.

    Args:
      q_idx: int32 ``[bq, bk]`` query row index of each element (from a 2-D iota).
      kv_idx: int32 ``[bq, bk]`` key column index of each element.
      T, S: true (unpadded) lengths, for bottom-right alignment (query position = i + S − T).
      load: ``load("segments", slot) -> (q_ids [bq, 1], kv_ids [1, bk])`` and
        ``load("explicit", slot) -> bool/int [bq, bk]``; the backend loads the tile's data.
    The result does NOT include the "key column < S" padding test (``in_range`` below).
    """
    qp = q_idx + (S - T)
    kind = plan.kind
    if kind == "full":
        return kv_idx >= 0
    if kind == "causal":
        return kv_idx <= qp
    if kind == "window":
        left, right = plan.params
        ok = kv_idx >= 0
        if left is not None:
            ok = ok & (kv_idx >= qp - left)
        if right is not None:
            ok = ok & (kv_idx <= qp + right)
        return ok
    if kind == "chunked":
        (c,) = plan.params
        # Floor division of non-negative ints; a padded/negative query position gives a
        # negative chunk id that matches no key (kv_idx >= 0).
        return (kv_idx <= qp) & (_floordiv(kv_idx, c) == _floordiv(qp, c))
    if kind == "segments":
        qs, ks = load("segments", plan.slot)
        return qs == ks
    if kind == "explicit":
        return load("explicit", plan.slot) != 0
    if kind == "and":
        a, b = plan.children
        return eval_mask(a, q_idx, kv_idx, T, S, load) & eval_mask(b, q_idx, kv_idx, T, S, load)
    if kind == "or":
        a, b = plan.children
        return eval_mask(a, q_idx, kv_idx, T, S, load) | eval_mask(b, q_idx, kv_idx, T, S, load)
    raise ValueError(f"unknown mask plan kind {kind!r}")


def _floordiv(x: jax.Array, c: int) -> jax.Array:
    """Floor division by a positive constant that is exact for negative ``x`` too."""
    q = jax.lax.div(x, jnp.int32(c))  # truncates toward zero
    return jnp.where((x < 0) & (q * c != x), q - 1, q)


def tile_iotas(i, j, block_q: int, block_kv: int):
    """Row and column indices ``[bq, bk]`` int32 of tile ``(i, j)`` from 2-D iotas."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0) + i * block_q
    cols = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1) + j * block_kv
    return rows, cols


# ----------------------------------------------------------------------------------------------
# 3. Block schedule (empty tiles skipped, full tiles skip the element mask).
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


def schedule(mask: Optional[_masks.Mask], T: int, S: int, block_q: int, block_kv: int) -> Schedule:
    """``attnjax.masks.block_schedule`` plus the transposed (key-major) spans."""
    codes, lo, hi = _masks.block_schedule(mask, T, S, block_q, block_kv)
    nonempty = codes.T != _masks.EMPTY  # [nk, nq]
    nq = codes.shape[0]
    q_lo = jnp.argmax(nonempty, axis=1).astype(jnp.int32)
    q_hi = (nq - jnp.argmax(nonempty[:, ::-1], axis=1)).astype(jnp.int32)
    q_hi = jnp.where(nonempty.any(axis=1), q_hi, q_lo)
    return Schedule(codes.astype(jnp.int32), lo, hi, q_lo, q_hi)


# ----------------------------------------------------------------------------------------------
# 4. Static description, block sizes and validation.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelStatic:
    """The static sizes every attention kernel call shares, and the tile counts derived from them.

    ``T, S``: true lengths; ``T_pad, S_pad``: padded to whole tiles; ``D_pad, Dv_pad``: padded head
    dims (GPU: powers of two).
    """

    T: int
    S: int
    T_pad: int
    S_pad: int
    num_q_heads: int
    num_kv_heads: int
    D: int
    Dv: int
    D_pad: int
    Dv_pad: int
    block_q: int
    block_kv: int
    scale: float
    logits_soft_cap: Optional[float]

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def num_q_tiles(self) -> int:
        return self.T_pad // self.block_q

    @property
    def num_kv_tiles(self) -> int:
        return self.S_pad // self.block_kv


@dataclasses.dataclass(frozen=True)
class FlashStatic(KernelStatic):
    """Everything static about one flash kernel call (hashable: a custom_vjp nondiff argument):
    the shared sizes plus the weight function, the mask plan and ``bias_kind`` in
    None/"alibi"/"array"."""

    weight_fn: WeightFunction
    mask_plan: Optional[MaskPlan]
    bias_kind: Optional[str]
    bias_bcast: tuple = (False, False)
    has_sinks: bool = False
    interpret: bool = False
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pick_block(block: int, length: int, minimum: int = 16, power_of_two: bool = True) -> int:
    """A tile size for a sequence of ``length``: ``block`` clipped so a short sequence isn't
    padded far past its length, never below ``minimum`` (Triton's ``tl.dot`` needs 16).
    With ``power_of_two`` (GPU), ``block`` must be one and the result is one."""
    if block <= 0:
        raise ValueError(f"block size must be positive, got {block}")
    if power_of_two:
        if block & (block - 1):
            raise ValueError(f"block size must be a power of two for this backend, got {block}")
        return max(minimum, min(block, next_power_of_2(length)))
    return max(minimum, min(block, length))


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


def validate(q, k, v, *, mask, bias, scale, logits_soft_cap, sinks, dropout_rate, rng,
             weight_fn: WeightFunction, return_lse: bool) -> None:
    """Shape/option checks shared by the backends: ValueError/TypeError for bad input,
    NotImplementedError for requests the kernels don't serve (dropout, head dim > 256, …)."""
    from attnjax.checks import check_options, check_qkv
    check_qkv(q, k, v)
    check_options(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
                  dropout_rate=dropout_rate, rng=rng)
    if dropout_rate > 0:
        raise NotImplementedError("the Pallas flash kernel has no in-kernel dropout; use implementation='xla'")
    D, Dv = q.shape[-1], v.shape[-1]
    if max(D, Dv) > 256:
        raise NotImplementedError(f"the Pallas flash kernel supports head dims up to 256, got D={D}, Dv={Dv}")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise NotImplementedError(f"the Pallas flash kernel supports float32/bfloat16/float16, got {q.dtype}")
    if sinks is not None and not weight_fn.supports_sinks:
        raise NotImplementedError(f"weight function {weight_fn.name!r} does not support sinks")
    if return_lse and not weight_fn.normalized:
        raise NotImplementedError(f"weight function {weight_fn.name!r} has no row normalizer to return")
    classify_bias(bias)


__all__ = [
    "WeightFunction", "SoftmaxWeight", "SigmoidWeight", "SoftplusWeight", "SOFTMAX", "backward_offsets",
    "backward_stat",
    "MaskPlan", "SegmentData", "ExplicitData", "plan_mask", "eval_mask", "tile_iotas",
    "Schedule", "schedule", "FlashStatic", "next_power_of_2", "pick_block", "classify_bias", "validate",
    "SUPPORTED_HEAD_DIMS",
]


# ----------------------------------------------------------------------------------------------
# 5. In-kernel score helpers on 2-D tiles (float32).
# ----------------------------------------------------------------------------------------------


def alibi_tile(slope, rows: jax.Array, cols: jax.Array, T: int, S: int) -> jax.Array:
    """ALiBi ``−m_h·|pos_q − pos_k|`` on a tile from its row/column iotas (bottom-right aligned)."""
    distance = jnp.abs(rows + (S - T) - cols).astype(jnp.float32)
    return -slope * distance


def apply_soft_cap(s: jax.Array, cap: Optional[float]) -> jax.Array:
    """``cap·tanh(s/cap)`` (identity when ``cap`` is None)."""
    return s if cap is None else cap * jnp.tanh(s / cap)


def soft_cap_grad(capped: jax.Array, cap: Optional[float]) -> jax.Array:
    """``d capped / d raw = 1 − (capped/cap)²`` (1 when ``cap`` is None)."""
    return 1.0 if cap is None else 1.0 - jnp.square(capped / cap)


__all__ += ["alibi_tile", "apply_soft_cap", "soft_cap_grad"]
