"""A relative position bias over the tokens of a 2-D grid, gathered per tile from a table of (Δy, Δx) offsets.

Swin's learned relative position bias (Liu et al., "Swin Transformer", ICCV 2021, sec. 3.2, eq. 4) and
CrossFormer's dynamic position bias (Wang et al., "CrossFormer: A Versatile Vision Transformer Hinging on
Cross-scale Attention", ICLR 2022, sec. 3.3) both give one scalar per head and per offset between two pixels,
stored as a ``[(2·gh − 1)·(2·gw − 1), heads]`` table in Swin's row order. ``RelativeGridBias`` applies such a
table to attention over all ``gh·gw`` pixels of a map (global attention, not only inside windows): every tile
computes its offsets from the token indices and gathers, so no path forms ``[N, N]`` beyond its tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.bias import Bias


def check_grid(grid) -> tuple[int, int]:
    """``(gh, gw)`` from a pair of positive ints; ``ValueError`` naming ``grid`` otherwise."""
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair (height, width) of positive ints, got {grid!r}")
    return int(grid[0]), int(grid[1])


def relative_grid_index(q_idx: jax.Array, kv_idx: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Swin's ``relative_position_index`` between row-major grid tokens: int32 ``[tq, tk]``.

    Token ``n`` sits at ``(y, x) = divmod(n, gw)``; the pair (query ``i``, key ``j``) gets
    ``(y_i − y_j + gh − 1)·(2·gw − 1) + (x_i − x_j + gw − 1)``, the same index as
    ``attnjax.vision.window.relative_position_index`` inside a ``gh × gw`` window. Indices past the grid (padding
    rows and columns of a blocked path) are clipped to the last token.

    Args:
      q_idx: int ``[tq]``, query token indices; kv_idx: int ``[tk]``, key token indices.
      grid: ``(gh, gw)``.
    """
    gh, gw = check_grid(grid)
    last = gh * gw - 1
    yq, xq = jnp.divmod(jnp.clip(q_idx, 0, last), gw)
    yk, xk = jnp.divmod(jnp.clip(kv_idx, 0, last), gw)
    return (yq[:, None] - yk[None, :] + gh - 1) * (2 * gw - 1) + xq[:, None] - xk[None, :] + gw - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RelativeGridBias(Bias):
    """A per-head bias for every pair of pixels of a ``gh × gw`` grid, from a table of offsets, per tile.

    ``b[h, i, j] = table[(y_i − y_j + gh − 1)·(2·gw − 1) + x_i − x_j + gw − 1, h]`` for the row-major tokens
    ``i = y_i·gw + x_i`` (queries) and ``j`` (keys) of self-attention over all ``N = gh·gw`` pixels: Swin's
    relative position bias (sec. 3.2, eq. 4) beyond a window, or CrossFormer's dynamic position bias (sec. 3.3)
    over a whole image of any size, where the table is the DPB MLP's output on ``(Δy, Δx) = (y_i − y_j, x_i − x_j)``
    (``attnjax.nn.vision.crossformer.DynamicPositionBias.grid_bias``).

    Pass as ``attention(q, k, v, bias=RelativeGridBias(table, grid=(gh, gw)))`` with ``T = S = gh·gw``. For one query
    and one grid row of keys the bias is a contiguous run of the table's ``Δy`` row (reversed), so a tile whose keys
    are whole grid rows (the blocked paths' tiles when ``gw`` divides the key tile) is gathered as ``tq·tk/gw`` runs
    of ``gw`` values straight into the ``[H, tq, tk]`` layout; any other tile by one gather of ``[tq, tk, H]``.
    Memory ``O((2gh − 1)(2gw − 1)·H)`` besides the tile; the blocked paths pull the gradient back to ``table`` through
    ``tile`` (a scatter-add per tile), so ``jax.grad`` reaches whatever produced the table.

    Args:
      table: ``[(2·gh − 1)·(2·gw − 1), H]`` float, one column per query head (``H = 1`` shares it), rows in
        Swin's order (row ``(Δy + gh − 1)·(2·gw − 1) + Δx + gw − 1`` for the offset ``(Δy, Δx)``).
      grid: ``(gh, gw)``, the map's height and width in tokens.
    """

    table: jax.Array
    grid: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    differentiable = True

    def __post_init__(self):
        object.__setattr__(self, "grid", check_grid(self.grid))

    @property
    def num_offsets(self) -> int:
        """``(2·gh − 1)·(2·gw − 1)``, the rows the table must have."""
        gh, gw = self.grid
        return (2 * gh - 1) * (2 * gw - 1)

    def check(self, batch, num_heads, T, S):
        gh, gw = self.grid
        shape = jnp.shape(self.table)
        if len(shape) != 2 or shape[0] != self.num_offsets or shape[1] not in (1, num_heads):
            raise ValueError(f"RelativeGridBias table has shape {shape}, expected ((2·gh − 1)·(2·gw − 1), heads) = "
                             f"({self.num_offsets}, {num_heads}) or ({self.num_offsets}, 1) for grid {self.grid}")
        if not jnp.issubdtype(jnp.asarray(self.table).dtype, jnp.floating):
            raise TypeError(f"RelativeGridBias table must be a float array, got {jnp.asarray(self.table).dtype}")
        if T != gh * gw or S != gh * gw:
            raise ValueError(f"RelativeGridBias over grid {self.grid} needs T = S = {gh * gw} tokens, got T={T}, S={S}")

    def tile(self, q_idx, kv_idx, T, S):
        table = jnp.asarray(self.table, jnp.float32)
        gw = self.grid[1]
        if kv_idx.shape[0] % gw:
            return _pair_gather(table, q_idx, kv_idx, self.grid)
        return jax.lax.cond(kv_idx[0] % gw == 0, functools.partial(_row_runs, grid=self.grid),
                            functools.partial(_pair_gather, grid=self.grid), table, q_idx, kv_idx)


def _pair_gather(table: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """``RelativeGridBias.tile`` by one gather per pair: ``[1, H, tq, tk]``."""
    index = relative_grid_index(q_idx, kv_idx, grid)
    return jnp.moveaxis(jnp.take(table, index, axis=0, mode="clip"), -1, 0)[None]


def _row_runs(table: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """``RelativeGridBias.tile`` for keys that are whole grid rows: per query and key row, one contiguous run.

    With Swin's table per head as ``[Δy + gh − 1, gw − 1 − Δx]`` (columns reversed), the keys ``x' = 0 … gw − 1``
    of grid row ``y'`` seen from query ``(y, x)`` are the run ``gw − 1 − x … 2·gw − 2 − x`` of row ``y − y' + gh − 1``:
    ``tq·tk/gw`` slices of ``gw`` values, gathered straight into the ``[H, tq, tk]`` layout. Indices past the grid
    are clipped to its last token (queries) or last row (keys).
    """
    gh, gw = grid
    tq, tk = q_idx.shape[0], kv_idx.shape[0]
    H = table.shape[1]
    yq, xq = jnp.divmod(jnp.clip(q_idx, 0, gh * gw - 1), gw)
    yk = jnp.minimum(kv_idx[0] // gw + jnp.arange(tk // gw), gh - 1)
    flipped = table.T.reshape(H, 2 * gh - 1, 2 * gw - 1)[..., ::-1]
    dy = yq[:, None] - yk[None, :] + gh - 1                                   # [tq, tk / gw]
    dx = jnp.broadcast_to((gw - 1 - xq)[:, None], dy.shape)

    def key_row(head, r, c):  # the gw keys of one grid row for one query
        return jax.lax.dynamic_slice(head, (r, c), (1, gw))[0]

    runs = jax.vmap(jax.vmap(jax.vmap(key_row, (None, 0, 0)), (None, 0, 0)), (0, None, None))(flipped, dy, dx)
    return runs.reshape(1, H, tq, tk)


__all__ = ["check_grid", "relative_grid_index", "RelativeGridBias"]
