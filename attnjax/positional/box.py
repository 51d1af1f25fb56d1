"""Plain DETR's box-to-pixel relative position bias (BoxRPB), decomposed along x and y, as a per-tile bias rule.

Lin et al., "DETR Doesn't Need Multi-Scale or Locality Design", ICCV 2023, sec. 3 ("Box-to-pixel relative
position bias", Fig. 2); official code: impiga/Plain-DETR, ``models/global_rpe_decomp_decoder.py``
(``GlobalCrossAttention``). In the decoder's cross-attention ``softmax(QKᵀ/√d + B)·V`` from ``Nq`` object queries
to the ``Hh·W`` pixels of one feature map, each query ``i`` carries a box with corners ``(x1, y1)``, ``(x2, y2)``
and the bias of pixel ``(x, y)`` is::

    B(i, (x, y)) = B_x(i, x) + B_y(i, y)
    B_x(i, x) = MLP_1(x1_i − x, x2_i − x),   B_y(i, y) = MLP_2(y1_i − y, y2_i − y)

per head (each MLP maps 2 offsets to one value per head). The MLPs run over ``Nq·(W + Hh)`` offsets only; the
rule ``BoxRelativeBias`` holds ``B_x [B, heads, Nq, W]`` and ``B_y [B, heads, Nq, Hh]`` and adds the two per tile,
so no path forms the ``[B, heads, Nq, Hh·W]`` bias beyond its tiles. ``box_relative_bias_reference`` evaluates
the MLPs at every (query, pixel) pair, the dense definition.

Coordinates follow the official code: boxes are ``(cx, cy, w, h)`` normalized to ``[0, 1]`` of the feature map's
extent, corners are scaled to input-image pixels (``× W·stride``, ``× Hh·stride``), and pixel ``(x, y)`` of the
feature map sits at ``((x + ½)·stride, (y + ½)·stride)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from attnjax.bias import Bias

OFFSET_TRANSFORMS = ("linear", "log8")
"""How a box-to-pixel offset ``δ`` enters the MLP, as the official ``rpe_type``: ``"linear"`` (``δ`` itself, the
default of the released configs) or ``"log8"`` (``sign(δ)·log₂(|δ| + 1)/log₂ 8``, the official "abs_log8")."""

FEATURE_STRIDE = 16
"""The feature map's stride in input pixels (the official ``proposal_in_stride`` of every released config)."""

MLP = Callable[[jax.Array], jax.Array]
"""``[..., 2] -> [..., heads]``: one of BoxRPB's MLPs on a pair of offsets."""


def check_boxes(boxes: jax.Array) -> None:
    """``ValueError`` naming ``boxes`` unless it is a float ``[B, Nq, 4]`` array of ``(cx, cy, w, h)``."""
    if getattr(boxes, "ndim", None) != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [batch, queries, 4] (cx, cy, w, h), got "
                         f"{list(getattr(boxes, 'shape', ())) or type(boxes).__name__}")
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        raise TypeError(f"boxes must be a float array, got {boxes.dtype}")


def transform_offsets(delta: jax.Array, transform: str) -> jax.Array:
    """``delta`` as the MLP sees it: itself (``"linear"``) or ``sign(δ)·log₂(|δ| + 1)/3`` (``"log8"``)."""
    if transform == "linear":
        return delta
    if transform == "log8":
        return jnp.sign(delta) * jnp.log2(jnp.abs(delta) + 1.0) / math.log2(8.0)
    raise ValueError(f"transform must be one of {OFFSET_TRANSFORMS}, got {transform!r}")


def box_corners(boxes: jax.Array, height: int, width: int, *, stride: float = FEATURE_STRIDE) -> jax.Array:
    """``(x1, y1, x2, y2)`` in input-image pixels of normalized ``(cx, cy, w, h)`` boxes ``[..., 4]``.

    ``x1 = (cx − w/2)·W·stride``, ``x2 = (cx + w/2)·W·stride``, and the same with ``cy, h, Hh`` for ``y``.
    """
    scale = jnp.asarray([width, height, width, height], jnp.float32) * stride
    centre, size = boxes[..., :2].astype(jnp.float32), boxes[..., 2:].astype(jnp.float32)
    return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1) * scale


def box_pixel_offsets(boxes: jax.Array, height: int, width: int, *, stride: float = FEATURE_STRIDE,
                      transform: str = "linear") -> tuple[jax.Array, jax.Array]:
    """BoxRPB's decomposed inputs: ``(F_x [B, Nq, W, 2], F_y [B, Nq, Hh, 2])``, float32.

    ``F_x[b, i, x] = t(x1_i − p_x, x2_i − p_x)`` with ``p_x = (x + ½)·stride`` and ``F_y`` alike along ``y``
    (``box_corners``; ``t`` is the offset transform). Memory ``O(B·Nq·(Hh + W))``.
    """
    check_boxes(boxes)
    corners = box_corners(boxes, height, width, stride=stride)
    px = (jnp.arange(width, dtype=jnp.float32) + 0.5) * stride
    py = (jnp.arange(height, dtype=jnp.float32) + 0.5) * stride
    fx = corners[:, :, None, 0::2] - px[None, None, :, None]
    fy = corners[:, :, None, 1::2] - py[None, None, :, None]
    return transform_offsets(fx, transform), transform_offsets(fy, transform)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class BoxRelativeBias(Bias):
    """BoxRPB as a bias rule: ``b[b, h, i, p] = bias_x[b, h, i, p mod W] + bias_y[b, h, i, p div W]``, per tile.

    For cross-attention from ``T = Nq`` queries to the ``S = Hh·W`` row-major pixels of a feature map (Lin et al.
    2023, sec. 3, the decomposed BoxRPB). A tile gathers ``[B, heads, tq, tk]`` from the two tables; the blocked
    paths pull gradients back to ``bias_x`` and ``bias_y`` (and through them to the MLPs that made them). Memory
    ``O(B·heads·Nq·(Hh + W))`` against ``O(B·heads·Nq·Hh·W)`` for the dense bias.

    Args:
      bias_x: ``[B or 1, heads or 1, Nq, W]`` float, ``B_x`` (``MLP_1`` on ``box_pixel_offsets``' ``F_x``).
      bias_y: ``[B or 1, heads or 1, Nq, Hh]`` float, ``B_y`` (``MLP_2`` on ``F_y``); the two broadcast apart.
    """

    bias_x: jax.Array
    bias_y: jax.Array
    differentiable = True

    @property
    def width(self) -> int:
        """``W``, the feature map's width in pixels."""
        return jnp.shape(self.bias_x)[-1]

    @property
    def height(self) -> int:
        """``Hh``, the feature map's height in pixels."""
        return jnp.shape(self.bias_y)[-1]

    def check(self, batch, num_heads, T, S):
        bx, by = jnp.shape(self.bias_x), jnp.shape(self.bias_y)
        if len(bx) != 4 or len(by) != 4 or bx[2] != by[2]:
            raise ValueError(f"BoxRelativeBias needs bias_x [B, heads, Nq, W] and bias_y [B, heads, Nq, Hh] with the "
                             f"same Nq, got bias_x {bx}, bias_y {by}")
        fits = all(shape[0] in (1, batch) and shape[1] in (1, num_heads) for shape in (bx, by))
        if not fits or bx[2] != T or self.height * self.width != S:
            raise ValueError(f"BoxRelativeBias with bias_x {bx}, bias_y {by} covers [B, heads, Nq, Hh·W] = "
                             f"[{max(bx[0], by[0])}, {max(bx[1], by[1])}, {bx[2]}, {self.height * self.width}], "
                             f"which does not fit [B, H, T, S] = [{batch}, {num_heads}, {T}, {S}]")
        for name, a in (("bias_x", self.bias_x), ("bias_y", self.bias_y)):
            if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
                raise TypeError(f"BoxRelativeBias {name} must be a float array, got {jnp.asarray(a).dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        y, x = jnp.divmod(jnp.clip(kv_idx, 0, self.height * self.width - 1), self.width)

        def gather(table: jax.Array, columns: jax.Array) -> jax.Array:
            rows = jnp.take(jnp.asarray(table, jnp.float32), q_idx, axis=2, mode="clip")
            return jnp.take(rows, columns, axis=3, mode="clip")

        return gather(self.bias_x, x) + gather(self.bias_y, y)


def box_relative_bias(boxes: jax.Array, mlp_x: MLP, mlp_y: MLP, height: int, width: int, *,
                      stride: float = FEATURE_STRIDE, transform: str = "linear") -> BoxRelativeBias:
    """BoxRPB for ``Nq`` boxes over an ``Hh × W`` map, the fast way: the MLPs on ``Nq·(W + Hh)`` offsets.

    ``B_x = MLP_1(F_x)``, ``B_y = MLP_2(F_y)`` (``box_pixel_offsets``), moved to ``[B, heads, Nq, ·]``; the rule adds
    them per tile. Cost ``O(B·Nq·(Hh + W))`` MLP evaluations.

    Args:
      boxes: ``[B, Nq, 4]`` normalized ``(cx, cy, w, h)``.
      mlp_x, mlp_y: ``[..., 2] -> [..., heads]``, BoxRPB's two MLPs.
      height, width: ``Hh``, ``W`` of the feature map; stride: its stride in input pixels.
      transform: one of ``OFFSET_TRANSFORMS``.
    """
    fx, fy = box_pixel_offsets(boxes, height, width, stride=stride, transform=transform)
    return BoxRelativeBias(jnp.moveaxis(mlp_x(fx), -1, 1), jnp.moveaxis(mlp_y(fy), -1, 1))


def box_relative_bias_reference(boxes: jax.Array, mlp_x: MLP, mlp_y: MLP, height: int, width: int, *,
                                stride: float = FEATURE_STRIDE, transform: str = "linear") -> jax.Array:
    """BoxRPB's dense definition: ``[B, heads, Nq, Hh·W]``, the MLPs evaluated at every (query, pixel) pair.

    ``B[b, h, i, p] = MLP_1(t(x1_i − p_x, x2_i − p_x))[h] + MLP_2(t(y1_i − p_y, y2_i − p_y))[h]`` for the pixel
    ``p = y·W + x`` at ``(p_x, p_y) = ((x + ½)·stride, (y + ½)·stride)``. ``O(B·Nq·Hh·W)`` memory and MLP
    evaluations (for tests). Arguments as ``box_relative_bias``.
    """
    check_boxes(boxes)
    corners = box_corners(boxes, height, width, stride=stride)
    y, x = jnp.divmod(jnp.arange(height * width), width)
    px, py = (x.astype(jnp.float32) + 0.5) * stride, (y.astype(jnp.float32) + 0.5) * stride
    fx = transform_offsets(corners[:, :, None, 0::2] - px[None, None, :, None], transform)  # [B, Nq, Hh·W, 2]
    fy = transform_offsets(corners[:, :, None, 1::2] - py[None, None, :, None], transform)
    return jnp.moveaxis(mlp_x(fx) + mlp_y(fy), -1, 1).astype(jnp.float32)


__all__ = ["OFFSET_TRANSFORMS", "FEATURE_STRIDE", "check_boxes", "transform_offsets", "box_corners",
           "box_pixel_offsets", "BoxRelativeBias", "box_relative_bias", "box_relative_bias_reference"]
