"""ConViT's positional attention scores ``v_pos^hᵀ r_ij`` on a 2-D patch grid, as a bias rule evaluated per tile.

d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (ICML 2021),
sec. 2 (positional self-attention, eq. 3: ``A_ij^h = softmax(Q_i^h K_j^hᵀ + v_pos^hᵀ r_ij)``) and sec. 3 (GPSA,
whose positional half is ``softmax_j(v_pos^hᵀ r_ij)``). Token ``n`` of a row-major ``height × width`` grid sits at
``(y, x) = divmod(n, width)``; the offset from query ``i`` to key ``j`` is ``δ = (x_j − x_i, y_j − y_i)`` and
``r_ij = (δx, δy, δx² + δy²)``, in the column order of the official code's ``rel_indices`` (facebookresearch/convit,
``GPSA.get_rel_indices``: index 0 the within-row offset, 1 the row offset, 2 the squared distance).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnjax.bias import Bias


def grid_deltas(q_idx: jax.Array, kv_idx: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """``(δx, δy)``, float32 ``[tq, tk]`` each: ``position(kv_idx[j]) − position(q_idx[i])`` on a row-major grid
    ``width`` wide, ``position(n) = (n mod width, n // width)``."""
    qy, qx = jnp.divmod(jnp.asarray(q_idx, jnp.int32), width)
    ky, kx = jnp.divmod(jnp.asarray(kv_idx, jnp.int32), width)
    return (kx[None, :] - qx[:, None]).astype(jnp.float32), (ky[None, :] - qy[:, None]).astype(jnp.float32)


def grid_offsets(q_idx: jax.Array, kv_idx: jax.Array, width: int) -> jax.Array:
    """``r_ij = (δx, δy, δx² + δy²)`` (float32 ``[tq, tk, 3]``) for token indices of a row-major grid ``width`` wide.

    ``δ`` as ``grid_deltas`` (ConViT, sec. 2, ``r_δ``; the official ``rel_indices`` column order).
    """
    dx, dy = grid_deltas(q_idx, kv_idx, width)
    return jnp.stack([dx, dy, dx * dx + dy * dy], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class GPSAPositionBias(Bias):
    """ConViT's positional logits ``b[h, i, j] = v_pos^hᵀ r_ij`` on a row-major grid, computed per tile.

    ``attention(q, k, v, bias=GPSAPositionBias(v_pos, width=W))`` over the ``T = H·W`` tokens of an ``H × W``
    grid is ConViT's positional self-attention (eq. 3); with zero content logits it is GPSA's positional
    attention ``softmax_j(v_pos^hᵀ r_ij)`` (``attnjax.relative.gpsa``). Every blocked path that returns bias
    gradients returns one for ``v_pos``; no path forms ``[T, T]`` beyond its tiles.

    Args:
      v_pos: ``[H, 3]`` float, per head the weights of ``(δx, δy, δx² + δy²)`` (the official ``pos_proj.weight``;
        its bias is a constant per query row, which the softmax cancels).
      width: the grid's width ``W`` (tokens per row). Self-attention only: ``T == S``, a multiple of ``W``.

    A tile is a 4-wide matmul per head (``v·r_ij`` expanded into query terms, key terms and ``x_i·x_j + y_i·y_j``),
    O(H·(tq + tk)) work plus the matmul; float32 rounding of the expansion is about ``1e-7·|v2|·((W/2)² + Δy²)``
    in absolute terms, where ``Δy`` spans the tile's rows (so it stays small where the bias is small).
    """

    v_pos: jax.Array
    width: int = dataclasses.field(metadata=dict(static=True))
    differentiable = True

    def check(self, batch, num_heads, T, S):
        shape = jnp.shape(self.v_pos)
        if len(shape) != 2 or shape != (num_heads, 3):
            raise ValueError(f"GPSAPositionBias v_pos has shape {shape}, expected (num_heads, 3) = ({num_heads}, 3)")
        if not jnp.issubdtype(jnp.asarray(self.v_pos).dtype, jnp.floating):
            raise TypeError(f"GPSAPositionBias v_pos must be a float array, got {jnp.asarray(self.v_pos).dtype}")
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"GPSAPositionBias width must be a positive int, got {self.width!r}")
        if T != S or T % self.width:
            raise ValueError(f"GPSAPositionBias needs self-attention over whole grid rows: T == S, a multiple of "
                             f"width={self.width}; got T={T}, S={S}")

    def tile(self, q_idx, kv_idx, T, S):
        # v·r_ij = row_i + col_j − 2·v2·(x_i·x_j + y_i·y_j): a 4-wide matmul per head (as elementwise passes over
        # the tile this costs as much as the tile's q·kᵀ on CPU). Coordinates are taken from the tile's first query
        # row and the grid's middle column, so the expansion loses no precision where the bias is small.
        origin_y, origin_x = jnp.asarray(q_idx[0], jnp.int32) // self.width, self.width // 2
        qy, qx = _coordinates(q_idx, self.width, origin_y, origin_x)
        ky, kx = _coordinates(kv_idx, self.width, origin_y, origin_x)
        v = jnp.asarray(self.v_pos, jnp.float32)
        v0, v1, v2 = (v[:, c][:, None] for c in range(3))  # [H, 1]
        row = -v0 * qx - v1 * qy + v2 * (qx * qx + qy * qy)  # [H, tq]
        col = v0 * kx + v1 * ky + v2 * (kx * kx + ky * ky)  # [H, tk]
        lhs = jnp.stack([row, jnp.ones_like(row), *jnp.broadcast_arrays(qx, qy, row)[:2]], axis=-1)
        rhs = jnp.stack([jnp.ones_like(col), col, -2.0 * v2 * kx, -2.0 * v2 * ky], axis=-1)
        return jnp.einsum("hik,hjk->hij", lhs, rhs, precision=jax.lax.Precision.HIGHEST)[None]


def _coordinates(idx: jax.Array, width: int, origin_y: jax.Array, origin_x: int) -> tuple[jax.Array, jax.Array]:
    y, x = jnp.divmod(jnp.asarray(idx, jnp.int32), width)
    return (y - origin_y).astype(jnp.float32), (x - origin_x).astype(jnp.float32)

__all__ = ["grid_deltas", "grid_offsets", "GPSAPositionBias"]
