"""Mosaic (TPU) helpers shared by the TPU kernels (flash, block-sparse, stick-breaking): vreg
sizes, tile sizes, the scalar-prefetch ``pallas_call``, heads-major layouts and block specs,
lane-broadcast row statistics, and the TPU layout and specs of mask data.

Row statistics (m, l, lse, δ) are lane-broadcast ``[rows, 128]`` float32 blocks, as in jax's TPU
flash attention; segment ids are q ``[Bs, T_pad, 128]`` (lane-broadcast) and kv ``[Bs, 8, S_pad]``
(sublane-broadcast) so a tile compares them without a relayout.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attnjax.tiling import num_tiles
from pallas_kernels.common.calls import pallas_call
from pallas_kernels.common.mask_plans import SegmentData
from pallas_kernels.common.statics import KernelStatic

LANES = 128
"""Lane width of a TPU vreg: row statistics are stored broadcast over this many lanes."""
SUBLANES = 8
"""Sublane count of a TPU vreg (the float32 tile is (8, 128))."""


def tpu_tiles(block_q: int, block_kv: int, T: int, S: int) -> tuple[int, int, int, int]:
    """``(bq, bk, T_pad, S_pad)`` for the Mosaic kernels: the blocks (positive multiples of
    ``SUBLANES``, ValueError otherwise) clipped to the lengths rounded up to ``SUBLANES``, and the
    lengths padded to whole tiles."""
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, int) or block <= 0 or block % SUBLANES:
            raise ValueError(f"{name} must be a positive multiple of {SUBLANES}, got {block!r}")
    bq, bk = min(block_q, _round_up(T, SUBLANES)), min(block_kv, _round_up(S, SUBLANES))
    return bq, bk, _round_up(T, bq), _round_up(S, bk)


def _round_up(n: int, multiple: int) -> int:
    return num_tiles(n, multiple) * multiple


def call(kernel, grid, in_specs, out_specs, out_shape, scratch, st: KernelStatic, name, *, parallel: int = 3,
         vmem_limit_bytes: Optional[int] = None):
    """``pallas_call`` with three scalar-prefetch operands (a schedule or block lists); the first
    ``parallel`` grid axes are independent, the rest sequential ("arbitrary")."""
    semantics = ("parallel",) * parallel + ("arbitrary",) * (len(grid) - parallel)
    # The TPU interpreter (jax 0.10) runs the grid in order anyway and does not extend
    # dimension_semantics over vmapped grid axes, so interpret mode leaves them out.
    params = None if st.interpret else pltpu.CompilerParams(dimension_semantics=semantics,
                                                            vmem_limit_bytes=vmem_limit_bytes)
    return pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=params, out_shape=out_shape, name=name,
        interpret=pltpu.InterpretParams() if st.interpret else False,
    )


def tiled_spec(block, depth, tile):
    """BlockSpec of a ``[B, H, L, depth]`` array whose block ``(b, h, tile)`` follows ``tile``."""
    return pl.BlockSpec((None, None, block, depth), lambda *a: (*tile(*a), 0))


def heads_major(x: jax.Array, length: int, value=0.0) -> jax.Array:
    """``[B, L, H, E]`` -> ``[B, H, length, E]`` (padded with ``value``)."""
    x = x.transpose(0, 2, 1, 3)
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)), constant_values=value)


def row_stat(x: jax.Array, st: KernelStatic, value) -> jax.Array:
    """``[B, T, H]`` -> lane-broadcast float32 ``[B, H, T_pad, 128]`` (padded with ``value``)."""
    x = heads_major(x[..., None].astype(jnp.float32), st.T_pad, value)
    return jnp.broadcast_to(x, x.shape[:3] + (LANES,))


def stat_column(ref):
    """A lane-broadcast ``[rows, 128]`` statistic as a ``[rows, 1]`` column."""
    return ref[:, :1]


def mask_layout(mask_data, st: KernelStatic) -> list:
    """Mask data in TPU-shaped blocks: segment ids as q ``[Bs, T_pad, 128]`` (lane-broadcast)
    and kv ``[Bs, 8, S_pad]`` (sublane-broadcast); Explicit masks as int8 ``[Bm, Hm, T_pad, S_pad]``."""
    arrays = []
    for item in mask_data:
        if isinstance(item, SegmentData):
            arrays.append((jnp.broadcast_to(item.q[:, :, None], item.q.shape + (LANES,)),
                           jnp.broadcast_to(item.kv[:, None, :], (item.kv.shape[0], SUBLANES, st.S_pad))))
        else:
            arrays.append((item.mask,))
    return arrays


def data_specs(mask_data, q_tile, kv_tile, st: KernelStatic) -> list:
    """BlockSpecs of the ``mask_layout`` data, tiled like q (rows) and k (columns); a batch or head
    dimension of size 1 broadcasts."""
    def spec(block, batch1, head1, pick):
        def index(*grid_and_prefetch):
            b, h, iq = q_tile(*grid_and_prefetch)
            jk = kv_tile(*grid_and_prefetch)[2]
            return pick(0 if batch1 else b, 0 if head1 else h, iq, jk)
        return pl.BlockSpec(block, index)

    specs = []
    for arrays in mask_data:
        batch1 = arrays[0].shape[0] == 1
        if len(arrays) == 2:  # segment ids (q, kv)
            specs += [spec((None, st.block_q, LANES), batch1, True, lambda b, h, iq, jk: (b, iq, 0)),
                      spec((None, SUBLANES, st.block_kv), batch1, True, lambda b, h, iq, jk: (b, 0, jk))]
        else:  # an Explicit mask
            specs.append(spec((None, None, st.block_q, st.block_kv), batch1, arrays[0].shape[1] == 1,
                              lambda b, h, iq, jk: (b, h, iq, jk)))
    return specs


__all__ = ["LANES", "SUBLANES", "tpu_tiles", "call", "tiled_spec", "heads_major", "row_stat", "stat_column",
           "mask_layout", "data_specs"]
