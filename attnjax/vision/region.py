"""Region (partition) attention: every token attends only to the tokens of its own region.

A map of integer region ids partitions the tokens of a grid; attention runs within each region, of any shape
and size. Two papers of the project's seed list (``/work/shared/seeds/003_*.txt``) attend this way:

* R-MSA, region-based multi-head self-attention (Yang et al., "Region Attention Transformer for Medical Image
  Restoration", 2024): SAM segments the image into non-overlapping semantic regions and "performs
  self-attention within these regions" (abstract). The official code (Yaziwel/Region-Attention-Transformer-
  for-Medical-Image-Restoration, ``Model_RAT.py``, ``RegionAttention`` and ``correlation_mask_batch``) adds
  −1000 to the logits of pairs in different regions, which this module's exact mask equals up to
  ``e^{−1000}``; it scales the logits by ``heads^{−1/2}`` (pass ``scale=heads ** -0.5`` to follow it).
* PAAB, the pose-aware attention block (Reilly & Das, "Seeing the Pose in the Pixels: Learning Pose-Aware
  Representations in Vision Transformers", 2023), "performs localized attention on pose regions" (abstract):
  in the official code (dominickrei/PoseAwareVT, ``timesformer/models/vit_poseblock.py``) the mask is the
  outer product of the per-frame keypoint-patch mask, i.e. ``regions = where(pose_patch, 0, −1)`` here; the
  block then keeps the input at the background patches (and its CLS token, which sees every patch, is not a
  grid token: it stays outside this op).

DSVT's dynamic sets (``attnjax.vision.dsvt``) are regions too.

* ``region_attention``: the fast path. The tokens are stably sorted by region id, so that every region is a
  contiguous run; ``attnjax.attention`` with ``masks.Segments`` on the sorted ids then attends within runs,
  and the mask's block summary (per-tile min/max of sorted ids) lets the blocked path and the kernels skip the
  tiles that pair two different regions; the outputs are put back in grid order.
* ``region_attention_reference``: one dense masked softmax over all tokens.

A negative id means "in no region": such a token is no key for anyone, and as a query it sees no key and
outputs zeros (the library's rule for a fully masked row).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import describe
from attnjax.softmax.softmax import softmax_attention_reference


def check_region_inputs(q: jax.Array, k: jax.Array, v: jax.Array, regions: jax.Array) -> None:
    """``ValueError``/``TypeError`` naming the argument unless q, k ``[B, *grid, heads, D]``, v
    ``[B, *grid, heads, Dv]`` and integer ``regions [B, *grid]`` agree (``grid`` of rank 1 or more)."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", 0) < 4:
            raise ValueError(f"{name} must have shape [batch, *grid, heads, head_dim] (rank 4 or more), "
                             f"got {describe(a)}")
    if q.shape[:-1] != k.shape[:-1] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v must share [batch, *grid, heads] (and q, k head_dim): q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    if getattr(regions, "shape", None) != q.shape[:-2]:
        raise ValueError(f"regions must have shape [batch, *grid] = {list(q.shape[:-2])}, got {describe(regions)}")
    if not jnp.issubdtype(regions.dtype, jnp.integer):
        raise TypeError(f"regions must hold integer region ids, got {describe(regions)}")


def region_attention(q: jax.Array, k: jax.Array, v: jax.Array, regions: jax.Array, *, scale: Optional[float] = None,
                     implementation: str = "auto") -> jax.Array:
    """Multi-head softmax attention within the regions of a token grid (R-MSA, PAAB).

    ``out[b, i] = Σ_{j : r[b, j] = r[b, i]} softmax_j(scale·q[b, i]·k[b, j]) v[b, j]`` per head, for
    ``r[b, i] ≥ 0``; ``out[b, i] = 0`` where ``r[b, i] < 0``.

    Fast path: a stable argsort of the ids makes each region a contiguous run, then ``attnjax.attention`` with
    ``masks.Segments`` on the sorted ids (negative ids become a query id and a key id that match nothing), and
    the inverse permutation. Memory: the sorted copies of q, k, v and the output, O(B·T·heads·(D + Dv)) for
    ``T = prod(grid)``, plus the blocked engine's O(T·tile); never a ``[T, T]`` array. Work: the tile pairs
    that hold a common region, about ``Σ_regions (|region| + tile)² `` logits per head instead of ``T²``.

    Args:
      q, k: ``[B, *grid, heads, D]`` (``[B, H, W, heads, D]`` for an image, any grid rank ≥ 1);
        v: ``[B, *grid, heads, Dv]``.
      regions: int ``[B, *grid]``, the region id of each token (any integers; negative: in no region).
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention`` ("auto", "xla", "pallas", "reference").

    Returns:
      ``[B, *grid, heads, Dv]`` in q's dtype.
    """
    check_region_inputs(q, k, v, regions)
    B, grid, heads, Dv = q.shape[0], q.shape[1:-2], q.shape[-2], v.shape[-1]
    T = math.prod(grid)
    ids = regions.reshape(B, T)
    order = jnp.argsort(ids, axis=1, stable=True)
    sorted_ids = jnp.take_along_axis(ids, order, axis=1)

    def gather(a: jax.Array) -> jax.Array:
        return jnp.take_along_axis(a.reshape(B, T, heads, a.shape[-1]), order[:, :, None, None], axis=1)

    mask = masks.Segments(jnp.where(sorted_ids < 0, -1, sorted_ids), jnp.where(sorted_ids < 0, -2, sorted_ids))
    out = attention(gather(q), gather(k), gather(v), mask=mask, scale=scale, implementation=implementation)
    inverse = jnp.argsort(order, axis=1)
    out = jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)
    return out.reshape(B, *grid, heads, Dv)


def region_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, regions: jax.Array, *,
                               scale: Optional[float] = None) -> jax.Array:
    """``region_attention`` as one dense masked softmax over all ``T = prod(grid)`` tokens (O(T²) memory).

    The mask ``M[b, i, j] = (r[b, i] = r[b, j]) ∧ r[b, i] ≥ 0 ∧ r[b, j] ≥ 0`` goes to
    ``attnjax.softmax.softmax_attention_reference`` as an explicit ``[B, 1, T, T]`` array.
    """
    check_region_inputs(q, k, v, regions)
    B, grid, (heads, D), Dv = q.shape[0], q.shape[1:-2], q.shape[-2:], v.shape[-1]
    T = math.prod(grid)
    ids = regions.reshape(B, T)
    allowed = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0) & (ids[:, None, :] >= 0)
    out = softmax_attention_reference(q.reshape(B, T, heads, D), k.reshape(B, T, heads, D),
                                      v.reshape(B, T, heads, Dv), mask=masks.Explicit(allowed[:, None]), scale=scale)
    return out.reshape(B, *grid, heads, Dv)


__all__ = ["check_region_inputs", "region_attention", "region_attention_reference"]
