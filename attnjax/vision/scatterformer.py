"""ScatterFormer's scattered linear attention over voxel windows and its cross-window interaction.

He, Li, Zhang & Zhang, "ScatterFormer: Efficient Voxel Transformer with Scattered Linear Attention", ECCV 2024
(arXiv 2401.00912), sec. 3.2 (SLA, eq. 2-3) and sec. 3.3 (CWI, eq. 4-7); official code skyhehe123/ScatterFormer,
``pcdet/models/backbones_3d/scatterformer.py`` (``ScatterFormerLayer3x``, ``SLALayer``, ``CWI_FFN_Layer``) and
``pcdet/models/model_utils/scatterformer_utils.py`` (the Triton kernels ``scatter_matmul_kv``/``_qc``).

Voxels are batch-first, as in ``attnjax.vision.dsvt``: integer coordinates ``coords [B, N, 2 or 3]`` = ``(x, y[, z])``
and a ``valid [B, N]`` mask (False: padding, in no window). A voxel at ``c`` lies, after a shift ``s``, in window
``⌊(c + s)/w⌋``. ScatterFormer's windows are BEV columns: ``w = (S_w, S_h, depth)`` with ``depth`` at least the
grid's z extent (the official code windows ``(y, x)`` only).

SLA (eq. 2-3): the voxels of the scene are sorted by window, so that each window is a contiguous run of one
packed sequence, and linear attention runs within each run::

    SLA(Q, K, V) = Concat[LA(Q_j, K_j, V_j)]_{j=1..M}                                      (eq. 2)
    LA: o_i = φ(q_i) Σ_{t∈j} φ(k_t)ᵀ v_t / (φ(q_i) Σ_{t∈j} φ(k_t)ᵀ + ε)                    (eq. 3)

with ``φ = ReLU`` and ``ε = 1e-6`` (the official ``SLALayer``: ``y / (z + 1e-6)``; the paper cites the map of
Katharopoulos et al., pass ``feature_map="elu+1"`` for it). ``attnjax.linear.linear_attention`` already computes
this on a packed sequence (``causal=False, normalize=True, scale=1, segment_ids=``, its ``NORMALIZER_EPS`` is the
same 1e-6); nothing is missing, so ``scattered_linear_attention`` is that call. The official Triton kernel
accumulates each window's ``Σ φ(k)ᵀv`` in SRAM chunk by chunk; the XLA path here is the library's non-causal
segmented scan (a forward and a backward chunked pass minus the diagonal), also O(N·D²) work and never a
``[N, N]`` array.

CWI (sec. 3.3): the channels are split in four groups of ``g = C/4``: a 3×3×3 depthwise convolution, a depthwise
convolution of ``S_w + 1`` taps along x, one of ``S_h + 1`` taps along y, and the identity on the rest
(eq. 4-7; the channel order is the official ``CWI_FFN_Layer``'s: 3×3×3, x, y, identity). The official code uses
submanifold sparse depthwise convolutions (``SparseDwConv``, outputs at the active voxels only, inputs from active
voxels only, no bias). ``sparse_depthwise_conv`` computes exactly that with a dense scatter onto the
``grid_shape`` grid (zeros at empty sites), one dense depthwise convolution, and a gather at the voxels: memory
O(B·X·Y·Z·C) for the grid.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.checks import check_positive, check_qkv, concrete_values, describe
from attnjax.linear.feature_maps import FeatureMap, get_feature_map
from attnjax.linear.linear_attention import NORMALIZER_EPS, linear_attention
from attnjax.vision.dsvt import Shift, check_voxels, shift_sizes, window_sizes


class VoxelWindows(NamedTuple):
    """The window partition of a voxel batch (``voxel_windows``)."""

    order: jax.Array         # int32 [B, N]: voxel index at each packed position (windows contiguous, padding last)
    segment_ids: jax.Array   # int32 [B, N]: window id at each packed position (−1 for padding)
    window_ids: jax.Array    # int32 [B, N]: window id of each voxel in input order (−1 for padding)


def voxel_windows(coords: jax.Array, valid: Optional[jax.Array], window_shape: Union[int, Sequence[int]],
                  shift: Shift = False) -> VoxelWindows:
    """ScatterFormer's window partition (sec. 3.2, Fig. 3a): sort the voxels by window into one packed sequence.

    Window ids are dense ranks per row: the windows holding a valid voxel, in lexicographic order of their window
    coordinates ``⌊(c + s)/w⌋`` (x, then y, then z), get ``0, 1, …, M − 1`` (the official ``torch.unique`` on the
    window coordinates, per batch row). The packed order lists the windows by id, each window's voxels by voxel
    index, then the padding voxels.

    Args:
      coords: int ``[B, N, 2 or 3]``, voxel coordinates ``(x, y[, z])``.
      valid: bool ``[B, N]`` (False: padding), or None (all valid).
      window_shape: ``w`` or one size per coordinate (``(12, 12, depth)`` for the paper's Waymo BEV windows).
      shift: False, True (``⌊w/2⌋`` per axis, Swin's shifted windows) or one int per axis. ScatterFormer itself
        does not shift (its CWI replaces the shift).

    Returns:
      ``VoxelWindows(order, segment_ids, window_ids)``: ``features[b, order[b]]`` is the packed sequence, with
      ``segment_ids`` for ``linear_attention``; ``window_ids[b, order[b]] == segment_ids[b]``.
    """
    check_voxels(coords, valid)
    B, N, ndim = coords.shape
    window = window_sizes(window_shape, ndim)
    shifted = coords.astype(jnp.int32) + jnp.asarray(shift_sizes(shift, window), jnp.int32)
    win = shifted // jnp.asarray(window, jnp.int32)
    valid = jnp.ones((B, N), bool) if valid is None else valid
    index = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N))
    # jnp.lexsort sorts by the last key first: padding last, then x, y, z window coordinates, then voxel index.
    order = jnp.lexsort([index] + [win[..., a] for a in range(ndim)][::-1] + [~valid], axis=1).astype(jnp.int32)
    win_s = jnp.take_along_axis(win, order[..., None], axis=1)
    valid_s = jnp.take_along_axis(valid, order, axis=1)
    opens = jnp.concatenate([jnp.ones((B, 1), bool), jnp.any(win_s[:, 1:] != win_s[:, :-1], axis=-1)], axis=1)
    segment_ids = jnp.where(valid_s, jnp.cumsum(opens, axis=1, dtype=jnp.int32) - 1, -1)
    window_ids = jnp.take_along_axis(segment_ids, jnp.argsort(order, axis=1), axis=1)
    return VoxelWindows(order, segment_ids, window_ids)


def scattered_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                               feature_map: Union[str, FeatureMap] = "relu", implementation: str = "auto") -> jax.Array:
    """SLA on a packed sequence (eq. 2-3): normalized linear attention within each run of equal ``segment_ids``.

    ``o_i = φ(q_i)·Σ_{j∈run(i)} φ(k_j)ᵀ v_j / (φ(q_i)·Σ_{j∈run(i)} φ(k_j) + 1e-6)``: exactly
    ``linear_attention(..., causal=False, normalize=True, scale=1, segment_ids=segment_ids)``.

    Args:
      q, k: ``[B, N, Hq, D]`` / ``[B, N, Hkv, D]``; v: ``[B, N, Hkv, Dv]``, packed (``voxel_windows(...).order``).
      segment_ids: int ``[B, N]``; each window a contiguous run (``voxel_windows(...).segment_ids``).
      feature_map: ``φ``, "relu" (official code) or any plain map of ``attnjax.linear.feature_maps``.
      implementation: as ``linear_attention`` ("reference": one masked ``[N, N]`` product; "xla": the segmented
        scan, O(N·D·(C + D)) work for chunk ``C``, O(N·D) memory beyond the inputs).
    Returns:
      ``[B, N, Hq, Dv]`` in q's dtype.
    """
    return linear_attention(q, k, v, feature_map=feature_map, causal=False, normalize=True, scale=1.0,
                            segment_ids=segment_ids, implementation=implementation)


def scatterformer_attention(q: jax.Array, k: jax.Array, v: jax.Array, coords: jax.Array, valid: Optional[jax.Array],
                            window_shape: Union[int, Sequence[int]], *, shift: Shift = False,
                            feature_map: Union[str, FeatureMap] = "relu", implementation: str = "auto") -> jax.Array:
    """Scattered linear attention on voxels in any order: sort by window (``voxel_windows``), SLA, unsort.

    Each valid voxel attends, by normalized linear attention (eq. 3), to the valid voxels of its window; padding
    voxels output zeros.

    Args:
      q, k: ``[B, N, Hq, D]`` / ``[B, N, Hkv, D]``; v: ``[B, N, Hkv, Dv]``, one row per voxel.
      coords, valid, window_shape, shift: as ``voxel_windows``.
      feature_map, implementation: as ``scattered_linear_attention``.
    Returns:
      ``[B, N, Hq, Dv]`` in q's dtype.
    """
    check_qkv(q, k, v)
    _check_rows(q, coords)
    windows = voxel_windows(coords, valid, window_shape, shift)
    packed = [jnp.take_along_axis(t, windows.order[:, :, None, None], axis=1) for t in (q, k, v)]
    out = scattered_linear_attention(*packed, windows.segment_ids, feature_map=feature_map,
                                     implementation=implementation)
    out = jnp.take_along_axis(out, jnp.argsort(windows.order, axis=1)[:, :, None, None], axis=1)
    return jnp.where((windows.window_ids >= 0)[:, :, None, None], out, 0).astype(q.dtype)


def scatterformer_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, coords: jax.Array,
                                      valid: Optional[jax.Array], window_shape: Union[int, Sequence[int]], *,
                                      shift: Shift = False, feature_map: Union[str, FeatureMap] = "relu") -> jax.Array:
    """``scatterformer_attention`` as one dense masked product over all voxels (eq. 2-3; O(N²) memory).

    ``M_ij = [valid_i ∧ valid_j ∧ ⌊(c_i + s)/w⌋ = ⌊(c_j + s)/w⌋]``,
    ``o_i = Σ_j M_ij (φ(q_i)·φ(k_j)) v_j / (Σ_j M_ij φ(q_i)·φ(k_j) + 1e-6)``; padding rows are zero.

    Args:
      q, k, v, coords, valid, window_shape, shift, feature_map: as ``scatterformer_attention``.
    Returns:
      ``[B, N, Hq, Dv]`` in q's dtype.
    """
    check_qkv(q, k, v)
    _check_rows(q, coords)
    check_voxels(coords, valid)
    B, N, ndim = coords.shape
    window = window_sizes(window_shape, ndim)
    win = (coords.astype(jnp.int32) + jnp.asarray(shift_sizes(shift, window), jnp.int32)) // jnp.asarray(window)
    valid = jnp.ones((B, N), bool) if valid is None else valid
    same = jnp.all(win[:, :, None] == win[:, None, :], axis=-1) & valid[:, :, None] & valid[:, None, :]
    phi = get_feature_map(feature_map)
    Hq, Hkv = q.shape[2], k.shape[2]
    fq = phi(q).reshape(B, N, Hkv, Hq // Hkv, -1)
    scores = jnp.einsum("bihgf,bjhf->bhgij", fq, phi(k)) * same[:, None, None]
    out = jnp.einsum("bhgij,bjhe->bihge", scores, v.astype(jnp.float32))
    out = out / (jnp.sum(scores, axis=-1).transpose(0, 3, 1, 2)[..., None] + NORMALIZER_EPS)
    return out.reshape(B, N, Hq, v.shape[-1]).astype(q.dtype)


def _check_rows(q: jax.Array, coords: jax.Array) -> None:
    if getattr(coords, "shape", (None, None))[:2] != q.shape[:2]:
        raise ValueError(f"coords must have shape [batch, voxels, 2 or 3] with [batch, voxels] = {list(q.shape[:2])} "
                         f"(one row per voxel of q, k, v), got {describe(coords)}")


def check_grid(coords: jax.Array, valid: Optional[jax.Array], grid_shape: Sequence[int]) -> tuple:
    """``grid_shape`` as a tuple of positive ints, one per coordinate; ``ValueError`` if it is not, or if the
    coordinates are known (not traced) and some valid voxel lies outside ``[0, grid_shape)``."""
    grid = tuple(grid_shape) if isinstance(grid_shape, (tuple, list)) else ()
    if len(grid) != coords.shape[-1]:
        raise ValueError(f"grid_shape must hold {coords.shape[-1]} positive ints (one per coordinate), "
                         f"got {describe(grid_shape)}")
    check_positive(**{f"grid_shape[{a}]": n for a, n in enumerate(grid)})
    values, mask = concrete_values(coords), (None if valid is None else concrete_values(valid))
    if values is not None and mask is not None:
        values = values[mask]
    if values is not None and values.size:
        values = values.reshape(-1, len(grid))
        if values.min() < 0 or np.any(values.max(0) >= grid):
            raise ValueError(f"coords of valid voxels must lie in [0, grid_shape) = [0, {grid}), got values from "
                             f"{values.min()} to {values.max(0).tolist()} (per axis)")
    return grid


def sparse_depthwise_conv(x: jax.Array, coords: jax.Array, valid: Optional[jax.Array], kernel: jax.Array,
                          grid_shape: Sequence[int]) -> jax.Array:
    """A submanifold sparse depthwise convolution on voxels (official ``SparseDwConv``, ``subm=True``, no bias).

    ``y_i = Σ_δ kernel[δ + ⌊K/2⌋] ⊙ x_j`` over the offsets ``δ`` of the (odd-sized, centred) kernel, where ``j`` is
    the valid voxel at ``c_i + δ`` (absent voxels contribute 0); padding voxels output 0. Computed by a dense
    scatter onto the ``grid_shape`` grid, one ``lax.conv_general_dilated`` with one group per channel, and a
    gather: memory O(B·prod(grid_shape)·C). Valid voxels must have distinct coordinates.

    Args:
      x: ``[B, N, C]`` voxel features.
      coords, valid: as ``voxel_windows`` (2 or 3 coordinates).
      kernel: ``[K_0, …, K_{n−1}, C]`` (one size per coordinate, each odd).
      grid_shape: the grid's extent per coordinate; coordinates lie in ``[0, grid_shape)``.
    Returns:
      ``[B, N, C]`` in x's dtype.
    """
    check_voxels(coords, valid)
    if getattr(x, "ndim", None) != 3 or x.shape[:2] != coords.shape[:2]:
        raise ValueError(f"x must have shape [batch, voxels, channels] with [batch, voxels] = "
                         f"{list(coords.shape[:2])}, got {describe(x)}")
    B, N, ndim = coords.shape
    C = x.shape[-1]
    if getattr(kernel, "ndim", None) != ndim + 1 or kernel.shape[-1] != C or not all(s % 2 for s in kernel.shape[:-1]):
        raise ValueError(f"kernel must have shape [K_0, ..., K_{ndim - 1}, {C}] with odd sizes (centred), "
                         f"got {describe(kernel)}")
    grid = check_grid(coords, valid, grid_shape)
    valid = jnp.ones((B, N), bool) if valid is None else valid
    at = (jnp.arange(B)[:, None], *(coords[..., a] for a in range(ndim)))
    dense = jnp.zeros((B, *grid, C), x.dtype).at[at].add(jnp.where(valid[..., None], x, 0), mode="drop")
    spatial = "DHW"[3 - ndim:]
    out = jax.lax.conv_general_dilated(
        dense, kernel[..., None, :].astype(x.dtype), window_strides=(1,) * ndim, padding="SAME",
        feature_group_count=C, dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    return jnp.where(valid[..., None], out.at[at].get(mode="fill", fill_value=0), 0)


def cross_window_interaction(x: jax.Array, coords: jax.Array, valid: Optional[jax.Array], grid_shape: Sequence[int],
                             local_kernel: jax.Array, x_kernel: jax.Array, y_kernel: jax.Array) -> jax.Array:
    """CWI (sec. 3.3, eq. 4-7): ``[DWConv₃ₓ₃ₓ₃(X₀), DWConv_x(X₁), DWConv_y(X₂), X₃]`` on 3-D voxels.

    ``X₀, X₁, X₂`` are the first three groups of ``g = C // 4`` channels, ``X₃`` the remaining ``C − 3g``; the
    convolutions are ``sparse_depthwise_conv`` (submanifold) with ``local_kernel [3, 3, 3, g]``, ``x_kernel [K_x, g]``
    along x (``K_x = S_w + 1`` in the paper) and ``y_kernel [K_y, g]`` along y (``S_h + 1``). The official block adds
    this to its input (``CWI_FFN_Layer``); that residual is the caller's.

    Args:
      x: ``[B, N, C]``, ``C >= 4``; coords: int ``[B, N, 3]`` = ``(x, y, z)``; valid: bool ``[B, N]`` or None.
      grid_shape: ``(X, Y, Z)``. local_kernel, x_kernel, y_kernel: as above (odd sizes).
    Returns:
      ``[B, N, C]`` in x's dtype; padding voxels output 0.
    """
    if getattr(coords, "ndim", None) != 3 or coords.shape[-1] != 3:
        raise ValueError(f"coords must have shape [batch, voxels, 3] (x, y, z) for CWI, got {describe(coords)}")
    C = x.shape[-1]
    g = C // 4
    if g < 1:
        raise ValueError(f"x must have at least 4 channels (four groups), got {describe(x)}")
    for name, kernel, shape in (("local_kernel", local_kernel, (3, 3, 3, g)), ("x_kernel", x_kernel, (None, g)),
                                ("y_kernel", y_kernel, (None, g))):
        if getattr(kernel, "ndim", None) != len(shape) or any(s is not None and s != t
                                                              for s, t in zip(shape, kernel.shape)):
            raise ValueError(f"{name} must have shape {[s if s is not None else 'K' for s in shape]} "
                             f"(g = C // 4 = {g}), got {describe(kernel)}")
    branches = (local_kernel, x_kernel[:, None, None, :], y_kernel[None, :, None, :])
    convolved = [sparse_depthwise_conv(x[..., i * g:(i + 1) * g], coords, valid, kernel, grid_shape)
                 for i, kernel in enumerate(branches)]
    out = jnp.concatenate(convolved + [x[..., 3 * g:]], axis=-1)
    return out if valid is None else jnp.where(valid[..., None], out, 0)


__all__ = ["VoxelWindows", "voxel_windows", "scattered_linear_attention", "scatterformer_attention",
           "scatterformer_attention_reference", "check_grid", "sparse_depthwise_conv", "cross_window_interaction"]
