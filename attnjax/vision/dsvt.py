"""DSVT's dynamic sparse window attention: rotated sets of sparse voxels, attention within each set.

Wang et al., "DSVT: Dynamic Sparse Voxel Transformer with Rotated Sets", CVPR 2023, sec. 3 (dynamic sparse
window attention, rotated set partition); official code: Haiyang-W/DSVT,
``pcdet/models/backbones_3d/dsvt_input_layer.py`` (``window_partition``, ``get_set_single_shift``, whose comment
calls the slot rule below the paper's eq. 3), ``pcdet/models/model_utils/dsvt_utils.py`` (``get_window_coors``)
and ``pcdet/models/backbones_3d/dsvt.py`` (``DSVTBlock``, ``SetAttention``).

A voxel at integer coordinates ``c = (x, y[, z])`` lies, after a shift ``s``, in window ``⌊(c + s)/w⌋`` at
in-window position ``(c + s) mod w`` (``get_window_coors``; ``s = 0``, or ``⌊w/2⌋`` for the shifted
configuration). The ``N_w`` voxels of a window are sorted by their in-window position, x-major
(``(x, y, z)``, the official code's "x-axis" partition, whose sets run along y) or y-major (``(y, x, z)``, its
"y-axis" partition), and cut into ``n = ⌈N_w/S⌉`` sets of ``S`` slots each: slot ``i`` of set ``j`` holds the
voxel of sorted rank ``⌊(j·S + i)·N_w/(n·S)⌋``. Since ``N_w ≤ n·S``, consecutive slots advance by 0 or 1 rank:
a set holds the ranks ``⌊j·N_w/n⌋ … ⌊(j+1)·N_w/n⌋ − 1`` (each once, the repeats being masked keys in the
official code's ``set_voxel_mask``), and every voxel lies in exactly one set. Attention then runs within each
set, with the sets of all windows processed in parallel.

Rotation (``DSVTBlock``): each block has two set-attention layers, the first on the y-axis partition, the
second on the x-axis partition; blocks alternate between the unshifted and the shifted window configuration
(``dsvt_layer_partition``). The paper's Figure 3 names the X-axis layer first; the order follows the code.

* ``dsvt_set_ids``: the set of every voxel, as region ids (``attnjax.vision.region``).
* ``dsvt_set_attention``: ``region_attention`` on those ids (sort by id + ``masks.Segments``: the blocked path
  and the kernels skip tile pairs of different sets).
* ``dsvt_set_attention_reference``: a dense masked softmax over all voxels with the same ids.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.checks import check_positive, describe
from attnjax.vision.region import region_attention, region_attention_reference

AXES = ("x", "y")
"""The two partition configurations: sort a window's voxels x-major or y-major (sec. 3, rotated sets)."""

Shift = Union[bool, Sequence[int]]
"""A window shift: False (none), True (``⌊w/2⌋`` per axis, DSVT's shifted configuration) or one int per axis."""


def window_sizes(window_shape: Union[int, Sequence[int]], ndim: int) -> tuple:
    """One positive window size per coordinate axis (an int is used for every axis)."""
    sizes = (window_shape,) * ndim if isinstance(window_shape, (int, np.integer)) else tuple(window_shape)
    if len(sizes) != ndim or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0
                                     for w in sizes):
        raise ValueError(f"window_shape must be a positive int or {ndim} positive ints (one per coordinate), "
                         f"got {describe(window_shape)}")
    return tuple(int(w) for w in sizes)


def shift_sizes(shift: Shift, window: tuple) -> tuple:
    """The shift per axis: zeros for False, ``⌊w/2⌋`` for True (``get_window_coors``), or the given ints."""
    if isinstance(shift, (bool, np.bool_)):
        return tuple(w // 2 for w in window) if shift else (0,) * len(window)
    values = tuple(shift)
    if len(values) != len(window) or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                             for s in values):
        raise ValueError(f"shift must be a bool or {len(window)} ints, got {describe(shift)}")
    return tuple(int(s) for s in values)


def check_voxels(coords: jax.Array, valid: Optional[jax.Array]) -> None:
    """``ValueError``/``TypeError`` naming the argument unless ``coords`` is int ``[B, N, 2 or 3]`` and
    ``valid`` is None or bool ``[B, N]``."""
    if getattr(coords, "ndim", None) != 3 or coords.shape[-1] not in (2, 3):
        raise ValueError(f"coords must have shape [batch, voxels, 2 or 3] (x, y[, z]), got {describe(coords)}")
    if not jnp.issubdtype(coords.dtype, jnp.integer):
        raise TypeError(f"coords must hold integer voxel coordinates, got {describe(coords)}")
    if valid is not None and (getattr(valid, "shape", None) != coords.shape[:2] or valid.dtype != jnp.bool_):
        raise ValueError(f"valid must be a bool array of shape [batch, voxels] = {list(coords.shape[:2])}, "
                         f"got {describe(valid)}")


def dsvt_set_ids(coords: jax.Array, valid: Optional[jax.Array], window_shape: Union[int, Sequence[int]],
                 set_size: int = 36, *, axis: str = "x", shift: Shift = False) -> jax.Array:
    """DSVT's dynamic set partition (sec. 3, eq. 3) as region ids: voxels share an id iff they share a set.

    Args:
      coords: int ``[B, N, 2 or 3]``, voxel coordinates ``(x, y[, z])``; distinct among a row's valid voxels
        (ties in the sort are broken by voxel index).
      valid: bool ``[B, N]`` (False: padding, in no set), or None (all valid).
      window_shape: ``w`` or one size per coordinate: ``(12, 12, 1)`` for DSVT's pillars, ``(12, 12, 32)`` for its
        first 3-D stage; the official shifted configuration also enlarges the window (``hybrid_factor``
        ``(2, 2, 1)``: ``(24, 24, 1)`` with shifts ``(6, 6, 0)``), which here is just another window_shape.
      set_size: ``S``, the voxels per set (the official pillar configuration's 36; its 3-D one uses 48).
      axis: "x" (sort a window's voxels by ``(x, y, z)`` in the window) or "y" (by ``(y, x, z)``).
      shift: False, True (``⌊w/2⌋``) or explicit shifts per axis (for windows spanning the whole z range pass
        ``(sx, sy, 0)``, as the official code does there).

    Returns:
      int32 ``[B, N]``: for a valid voxel, the sorted position of its window's first voxel plus its set's
      index in the window (unique per set within a row); −1 for padding.

    Integer arithmetic: the set of rank ``r`` among ``N_w`` voxels is ``⌊((r + 1)·n − 1)/N_w⌋``, exact while
    ``N_w² < 2³¹`` (every window of under 46 340 voxels).
    """
    check_voxels(coords, valid)
    check_positive(set_size=set_size)
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {describe(axis)}")
    B, N, ndim = coords.shape
    window = window_sizes(window_shape, ndim)
    shifted = coords.astype(jnp.int32) + jnp.asarray(shift_sizes(shift, window), jnp.int32)
    sizes = jnp.asarray(window, jnp.int32)
    win, inner = shifted // sizes, shifted % sizes
    valid = jnp.ones((B, N), bool) if valid is None else valid
    inner_keys = [inner[..., a] for a in ((0, 1, 2) if axis == "x" else (1, 0, 2))[:ndim]]
    # jnp.lexsort sorts by the last key first: padding last, then window, then the in-window order.
    keys = inner_keys[::-1] + [win[..., a] for a in range(ndim)][::-1] + [~valid]
    order = jnp.lexsort(keys, axis=1)
    win_s = jnp.take_along_axis(win, order[..., None], axis=1)
    valid_s = jnp.take_along_axis(valid, order, axis=1)
    position = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
    same_as_previous = jnp.concatenate(
        [jnp.zeros((B, 1), bool), jnp.all(win_s[:, 1:] == win_s[:, :-1], axis=-1) & valid_s[:, 1:]], axis=1)
    start = lax.cummax(jnp.where(same_as_previous, 0, position), axis=1)
    last = ~jnp.concatenate([same_as_previous[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
    end = lax.cummin(jnp.where(last, position, N), axis=1, reverse=True)
    count, rank = end - start + 1, position - start
    sets = ((rank + 1) * ((count + set_size - 1) // set_size) - 1) // count
    ids_sorted = jnp.where(valid_s, start + sets, -1)
    return jnp.take_along_axis(ids_sorted, jnp.argsort(order, axis=1), axis=1)


def dsvt_layer_partition(layer: int) -> tuple[str, bool]:
    """``(axis, shifted)`` of set-attention layer ``layer`` (0-based over the whole stage) in DSVT's schedule.

    Block ``b = layer // 2`` holds layers ``2b`` (y-axis sets) and ``2b + 1`` (x-axis sets); odd blocks use
    the shifted window configuration (official ``DSVTBlock``: ``set_id = i``, ``shift_id = block_id % 2``).
    """
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer must be a non-negative int, got {describe(layer)}")
    return ("y" if layer % 2 == 0 else "x"), bool((layer // 2) % 2)


def dsvt_set_attention(q: jax.Array, k: jax.Array, v: jax.Array, coords: jax.Array, valid: Optional[jax.Array],
                       window_shape: Union[int, Sequence[int]], set_size: int = 36, *, axis: str = "x",
                       shift: Shift = False, scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Dynamic sparse window attention (DSVT sec. 3): each voxel attends to the voxels of its set.

    ``out[b, i] = Σ_{j ∈ set(i)} softmax_j(scale·q[b, i]·k[b, j]) v[b, j]`` per head, sets from
    ``dsvt_set_ids``; padding voxels output zeros. The official ``SetAttention`` adds the position embedding
    to the features before its q/k projections: pass the projected q, k, v here.

    Fast path: ``region_attention`` on the set ids: a sort of the ids and ``attnjax.attention`` with
    ``masks.Segments``, so the blocked path and the kernels visit only the tile pairs that share a set.
    Memory O(B·N·heads·(D + Dv)) plus the blocked engine's O(N·tile); never an ``[N, N]`` array. Work: about
    ``N·(S + tile)`` logits per head.

    Args:
      q, k: ``[B, N, heads, D]``; v: ``[B, N, heads, Dv]``.
      coords, valid, window_shape, set_size, axis, shift: as ``dsvt_set_ids``.
      scale: logit scale, default ``1/√D`` (PyTorch's ``nn.MultiheadAttention``, which the official code uses).
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, N, heads, Dv]`` in q's dtype.
    """
    ids = dsvt_set_ids(coords, valid, window_shape, set_size, axis=axis, shift=shift)
    return region_attention(q, k, v, ids, scale=scale, implementation=implementation)


def dsvt_set_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, coords: jax.Array,
                                 valid: Optional[jax.Array], window_shape: Union[int, Sequence[int]],
                                 set_size: int = 36, *, axis: str = "x", shift: Shift = False,
                                 scale: Optional[float] = None) -> jax.Array:
    """``dsvt_set_attention`` as one dense masked softmax over all ``N`` voxels (O(N²) memory)."""
    ids = dsvt_set_ids(coords, valid, window_shape, set_size, axis=axis, shift=shift)
    return region_attention_reference(q, k, v, ids, scale=scale)


__all__ = ["AXES", "Shift", "window_sizes", "shift_sizes", "check_voxels", "dsvt_set_ids", "dsvt_layer_partition",
           "dsvt_set_attention", "dsvt_set_attention_reference"]
