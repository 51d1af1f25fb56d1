"""Neighborhood attention on 1-D, 2-D and 3-D token grids: NA, dilated NA, causal NA and GNA strides.

Each query attends to a window of ``k`` keys per axis around it (Hassani et al., "Neighborhood
Attention Transformer", CVPR 2023; Hassani & Shi, "Dilated Neighborhood Attention Transformer",
2022; Hassani et al., "Faster Neighborhood Attention", NeurIPS 2024; Hassani et al., "Generalized
Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light", 2025). The window
follows NATTEN's definition (SHI-Labs/NATTEN, ``src/natten/backends/flex.py``, ``get_na_flex_mask``).
Per axis of length ``L`` with kernel ``k``, dilation ``d`` and stride ``s`` (``1 ≤ s ≤ k``):

- dilation: coordinate ``i`` is in residue class ``g = i mod d`` at in-class position ``c = i // d``;
  the class has ``L_g = ceil((L - g) / d)`` members, and keys must share the query's class;
- stride (GNA): runs of ``s`` in-class positions share the window of a leader, the run's center
  ``⌊c/s⌋·s + ⌊s/2⌋`` (causal: its last member ``⌊c/s⌋·s + s − 1``), capped at ``L_g − 1``;
  ``s = 1`` is sliding NA, ``s = k`` is blocked attention;
- non-causal: ``k`` consecutive in-class keys starting at ``leader − ⌊k/2⌋``, shifted to lie inside
  the class, so every query sees ``min(k, L_g)`` keys;
- causal: in-class keys with ``c_j ≤ c`` and ``c_j > leader − k`` (never shifted).

A query on a grid sees the product of its per-axis windows. NATTEN rejects ``k·d > L``; here the
window is then the whole residue class.

The fast path lays the tokens out tile-major (``NeighborhoodMask``): one block of
``prod(tile_shape)`` tokens is a spatial tile of one dilation class, static block lists name the key
tiles that each query tile's windows touch, and ``attnjax.sparse.block_sparse_attention`` visits
only those, with ``NeighborhoodMask`` as the fine mask inside them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks, registry
from attnjax.checks import check_qkv
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse.engine import block_sparse_attention
from attnjax.blocked.lists import BlockSparse
from attnjax.tiling import num_tiles

Axes = Union[int, Sequence[int]]
Flags = Union[bool, Sequence[bool]]

DEFAULT_TILE_SHAPES = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}
"""Tile shape per grid rank: 64 tokens per block, as spatial tiles."""


def _per_axis(name: str, value, ndim: int, kind: type) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} needs one value per grid axis ({ndim}), got {value!r}")
    for x in values:
        if kind is bool and not isinstance(x, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        if kind is int and (isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1):
            raise ValueError(f"{name} must be a positive int or a tuple of them, got {value!r}")
    return tuple(kind(x) for x in values)


def _axis_window(xp, i, L: int, k: int, d: int, s: int, causal: bool):
    """Window of query coordinate ``i`` on one axis: ``(g, c, lo, hi)``, in-class bounds inclusive.

    Keys at coordinate ``j`` are neighbours iff ``j % d == g`` and ``lo ≤ j // d ≤ hi``. Integer
    arithmetic only, so it runs on NumPy arrays, traced jax arrays and inside Pallas kernels.
    """
    g, c = i % d, i // d
    class_len = (L - g + d - 1) // d
    run_start = (c // s) * s
    if causal:
        leader = xp.minimum(run_start + s - 1, class_len - 1)
        return g, c, xp.maximum(leader - k + 1, 0), c
    leader = xp.minimum(run_start + s // 2, class_len - 1)
    lo = xp.maximum(xp.minimum(leader - k // 2, class_len - k), 0)
    return g, c, lo, xp.minimum(lo + k - 1, class_len - 1)


@dataclasses.dataclass(frozen=True)
class NeighborhoodMask(masks.Mask):
    """The neighbourhood predicate on the *tiled* token order of a grid (a static, structural mask).

    Tiled order: per axis ``a`` (length ``L``, dilation ``d``, tile ``t``) there are
    ``n = ceil(ceil(L/d) / t)`` tiles per residue class, and ``U = d·n`` axis blocks
    ``u = g·n + tile``. Token ``(u_0.., off_0..)`` sits at grid coordinate
    ``i_a = (tile_a·t_a + off_a)·d_a + g_a`` and at tiled index ``block·prod(t) + off`` with
    ``block`` row-major over ``(u_0, u_1, ..)`` and ``off`` row-major over the tile. Coordinates
    ``i_a ≥ L_a`` are padding (never allowed). ``tile(q_idx, kv_idx, T, S)`` uses only integer
    arithmetic on the index vectors, so a Pallas kernel can evaluate it in-kernel.

    Args:
      grid: the token grid ``(L_0, ..)``, rank 1 to 3.
      kernel_size, dilation, stride: int or one per axis (``stride ≤ kernel_size``).
      causal: bool or one per axis.
      tile_shape: tokens per tile along each axis (default ``DEFAULT_TILE_SHAPES``).
    """

    grid: tuple
    kernel_size: Axes
    dilation: Axes = 1
    stride: Axes = 1
    causal: Flags = False
    tile_shape: Optional[Axes] = None

    def __post_init__(self):
        grid = _per_axis("grid", self.grid, len(self.grid) if isinstance(self.grid, (tuple, list)) else 1, int)
        if not 1 <= len(grid) <= 3:
            raise ValueError(f"grid must have 1 to 3 axes, got {self.grid!r}")
        n = len(grid)
        tile = DEFAULT_TILE_SHAPES[n] if self.tile_shape is None else self.tile_shape
        values = dict(grid=grid, kernel_size=_per_axis("kernel_size", self.kernel_size, n, int),
                      dilation=_per_axis("dilation", self.dilation, n, int),
                      stride=_per_axis("stride", self.stride, n, int),
                      causal=_per_axis("causal", self.causal, n, bool),
                      tile_shape=_per_axis("tile_shape", tile, n, int))
        kernel, stride = values["kernel_size"], values["stride"]
        if any(s > k for s, k in zip(stride, kernel)):
            raise ValueError(f"stride {stride} cannot exceed kernel_size {kernel} on any axis (GNA, NATTEN)")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def tiles_per_class(self) -> tuple:
        return tuple(num_tiles(num_tiles(L, d), t) for L, d, t in zip(self.grid, self.dilation, self.tile_shape))

    @property
    def axis_blocks(self) -> tuple:
        """``U_a = d_a · n_a`` blocks per axis."""
        return tuple(d * n for d, n in zip(self.dilation, self.tiles_per_class))

    @property
    def block_size(self) -> int:
        return math.prod(self.tile_shape)

    @property
    def num_blocks(self) -> int:
        return math.prod(self.axis_blocks)

    @property
    def num_tokens(self) -> int:
        """Length of the tiled sequence, padding included."""
        return self.num_blocks * self.block_size

    def _axis(self, a: int):
        return self.grid[a], self.kernel_size[a], self.dilation[a], self.stride[a], self.causal[a]

    def coordinates(self, idx):
        """Grid coordinates ``(i_0, ..)`` of tiled indices ``idx`` and whether each is a real token."""
        block, off = idx // self.block_size, idx % self.block_size
        valid = (idx >= 0) & (idx < self.num_tokens)
        coords = []
        for a in range(self.ndim):
            after_u = math.prod(self.axis_blocks[a + 1:])
            after_t = math.prod(self.tile_shape[a + 1:])
            u = (block // after_u) % self.axis_blocks[a]
            o = (off // after_t) % self.tile_shape[a]
            n = self.tiles_per_class[a]
            i = ((u % n) * self.tile_shape[a] + o) * self.dilation[a] + u // n
            coords.append(i)
            valid = valid & (i < self.grid[a])
        return tuple(coords), valid

    def grid_index(self, idx):
        """Row-major grid index of tiled indices (meaningless where ``coordinates`` says padding)."""
        coords, _ = self.coordinates(idx)
        flat = coords[0]
        for a in range(1, self.ndim):
            flat = flat * self.grid[a] + coords[a]
        return flat

    def tile(self, q_idx, kv_idx, T, S):
        xp = np if isinstance(q_idx, np.ndarray) and isinstance(kv_idx, np.ndarray) else jnp
        qc, q_valid = self.coordinates(q_idx)
        kc, k_valid = self.coordinates(kv_idx)
        ok = q_valid[:, None] & k_valid[None, :]
        for a in range(self.ndim):
            g, _, lo, hi = _axis_window(xp, qc[a], *self._axis(a))
            d = self.dilation[a]
            kg, kpos = kc[a][None, :] % d, kc[a][None, :] // d
            ok = ok & (g[:, None] == kg) & (lo[:, None] <= kpos) & (kpos <= hi[:, None])
        return ok[None, None]

    def check(self, batch, num_heads, T, S):
        if T != self.num_tokens or S != self.num_tokens:
            raise ValueError(f"NeighborhoodMask covers {self.num_tokens} tiled tokens, got T={T}, S={S}")

    def block_summary(self, T, S, block_q, block_kv):
        if (T, S, block_q, block_kv) == (self.num_tokens, self.num_tokens, self.block_size, self.block_size):
            return _tile_codes(self)[None, None]
        return _reduce_codes(self.tile(np.arange(T), np.arange(S), T, S)[0, 0], block_q, block_kv)[None, None]

    def block_lists(self) -> BlockSparse:
        """Static block lists: for each query tile, the key tiles its windows touch (exact)."""
        return _block_lists(self)

    def grid_dense(self) -> np.ndarray:
        """The ``[N, N]`` neighbour matrix in row-major grid order, ``N = prod(grid)`` (NumPy)."""
        result = np.ones((1, 1), bool)
        for a in range(self.ndim):
            L, d = self.grid[a], self.dilation[a]
            g, _, lo, hi = _axis_window(np, np.arange(L), *self._axis(a))
            j = np.arange(L)[None, :]
            axis = (j % d == g[:, None]) & (lo[:, None] <= j // d) & (j // d <= hi[:, None])
            result = np.kron(result, axis).astype(bool)
        return result

    def to_tiles(self, x: jax.Array) -> jax.Array:
        """``[B, N, ...]`` in row-major grid order -> ``[B, num_tokens, ...]`` tiled, zero padded."""
        B, rest = x.shape[0], x.shape[2:]
        x = x.reshape(B, *self.grid, *rest)
        pads = [(0, U * t - L) for L, U, t in zip(self.grid, self.axis_blocks, self.tile_shape)]
        x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)] * len(rest))
        split = [s for n, t, d in zip(self.tiles_per_class, self.tile_shape, self.dilation) for s in (n, t, d)]
        x = x.reshape(B, *split, *rest)
        return x.transpose(self._tiled_axes(len(rest))).reshape(B, self.num_tokens, *rest)

    def from_tiles(self, x: jax.Array) -> jax.Array:
        """Inverse of ``to_tiles``: ``[B, num_tokens, ...]`` -> ``[B, N, ...]``, padding dropped."""
        B, rest = x.shape[0], x.shape[2:]
        shape = ([s for d, n in zip(self.dilation, self.tiles_per_class) for s in (d, n)]
                 + list(self.tile_shape))
        x = x.reshape(B, *shape, *rest).transpose(np.argsort(self._tiled_axes(len(rest))))
        x = x.reshape(B, *(U * t for U, t in zip(self.axis_blocks, self.tile_shape)), *rest)
        x = x[(slice(None),) + tuple(slice(0, L) for L in self.grid)]
        return x.reshape(B, math.prod(self.grid), *rest)

    def _tiled_axes(self, num_rest: int) -> list:
        """Transpose from ``[B, (n, t, d) per axis, rest]`` to ``[B, (d, n) per axis, t per axis, rest]``."""
        n = self.ndim
        blocks = [ax for a in range(n) for ax in (3 + 3 * a, 1 + 3 * a)]
        offsets = [2 + 3 * a for a in range(n)]
        return [0] + blocks + offsets + list(range(1 + 3 * n, 1 + 3 * n + num_rest))


jax.tree_util.register_dataclass(
    NeighborhoodMask, data_fields=[],
    meta_fields=["grid", "kernel_size", "dilation", "stride", "causal", "tile_shape"])


def _axis_tiles(na: NeighborhoodMask, a: int):
    """Per-axis block relation: key-block interval ``[first, first + count)`` and codes ``[U, U]``.

    A query tile's queries form a run of in-class positions whose window bounds ``lo``/``hi`` are
    non-decreasing and overlapping, so the keys they touch form one interval per axis.
    """
    L, k, d, s, causal = na._axis(a)
    t, n, U = na.tile_shape[a], na.tiles_per_class[a], na.axis_blocks[a]
    u = np.arange(U)
    g, tile = u // n, u % n
    class_len = (L - g + d - 1) // d
    c_first = tile * t
    c_last = np.minimum(c_first + t, class_len) - 1
    has = c_first <= c_last
    _, _, lo_first, hi_first = _axis_window(np, np.where(has, c_first, 0) * d + g, L, k, d, s, causal)
    _, _, lo_last, hi_last = _axis_window(np, np.where(has, c_last, 0) * d + g, L, k, d, s, causal)
    first = g * n + lo_first // t
    count = np.where(has, hi_last // t - lo_first // t + 1, 0)
    v = np.arange(U)[None, :]
    key_tile, key_len = v % n, (L - v // n + d - 1) // d
    nonempty = (first[:, None] <= v) & (v < (first + count)[:, None])
    full = (nonempty & (c_first + t <= class_len)[:, None] & ((key_tile + 1) * t <= key_len)
            & (lo_last[:, None] <= key_tile * t) & (hi_first[:, None] >= key_tile * t + t - 1))
    codes = np.where(nonempty, np.where(full, masks.FULL, masks.PARTIAL), masks.EMPTY).astype(np.int8)
    return first, count, codes


@functools.lru_cache(maxsize=64)
def _tile_codes(na: NeighborhoodMask) -> np.ndarray:
    """Exact ``[num_blocks, num_blocks]`` codes: EMPTY if any axis is, FULL if every axis is."""
    codes = np.full((1, 1), masks.FULL, np.int8)
    for a in range(na.ndim):
        axis = _axis_tiles(na, a)[2]
        codes = np.minimum(codes[:, None, :, None], axis[None, :, None, :]).reshape(len(codes) * len(axis), -1)
    return codes


@functools.lru_cache(maxsize=64)
def _block_lists(na: NeighborhoodMask) -> BlockSparse:
    """Lists as the product of the per-axis key-block intervals (ascending: row-major, sorted axes)."""
    ids = np.zeros((1, 1), np.int64)
    valid = np.ones((1, 1), bool)
    for a in range(na.ndim):
        first, count, _ = _axis_tiles(na, a)
        slot = np.arange(max(1, int(count.max())))
        axis_ids, axis_valid = first[:, None] + slot, slot < count[:, None]
        rows = len(ids) * len(first)
        ids = (ids[:, None, :, None] * na.axis_blocks[a] + axis_ids[None, :, None, :]).reshape(rows, -1)
        valid = (valid[:, None, :, None] & axis_valid[None, :, None, :]).reshape(rows, -1)
    counts = valid.sum(-1)
    order = np.argsort(~valid, axis=-1, kind="stable")[:, :max(1, int(counts.max()))]
    ids = np.take_along_axis(ids, order, axis=-1)
    slot = np.arange(ids.shape[1])
    last = np.where(counts > 0, np.take_along_axis(ids, np.maximum(counts - 1, 0)[:, None], axis=-1)[:, 0], 0)
    ids = np.where(slot < counts[:, None], ids, last[:, None])
    return BlockSparse(ids.astype(np.int32)[None, None], counts.astype(np.int32)[None, None],
                       na.block_size, na.block_size, na.num_blocks)


def _reduce_codes(dense: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
    """Codes of a dense ``[T, S]`` NumPy mask over tiles (only the unpadded part of a tile counts)."""
    T, S = dense.shape
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)

    def tiles(fill):
        padded = np.pad(dense, ((0, nq * block_q - T), (0, nk * block_kv - S)), constant_values=fill)
        return padded.reshape(nq, block_q, nk, block_kv)

    any_ = tiles(False).any(axis=(1, 3))
    all_ = tiles(True).all(axis=(1, 3))
    return np.where(any_, np.where(all_, masks.FULL, masks.PARTIAL), masks.EMPTY).astype(np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class _TiledView(masks.Mask):
    """A user mask on ``(T, S)`` (row-major grid order, queries = last ``T`` positions), read in tiled order."""

    inner: masks.Mask
    layout: NeighborhoodMask
    T: int
    S: int

    def check(self, batch, num_heads, T, S):
        self.inner.check(batch, num_heads, self.T, self.S)

    def tile(self, q_idx, kv_idx, T, S):
        rows = jnp.clip(self.layout.grid_index(q_idx) - (self.S - self.T), 0, self.T - 1)
        cols = jnp.clip(self.layout.grid_index(kv_idx), 0, self.S - 1)
        return self.inner.tile(rows, cols, self.T, self.S)

    def block_summary(self, T, S, block_q, block_kv):
        return np.full((1, 1, num_tiles(T, block_q), num_tiles(S, block_kv)), masks.PARTIAL, np.int8)


jax.tree_util.register_dataclass(_TiledView, data_fields=["inner"], meta_fields=["layout", "T", "S"])


def _tokens(q, k, v, grid):
    """Flatten grid inputs to ``[B, T, H, D]`` tokens; returns ``(q, k, v, grid, unflatten)``."""
    if grid is None:
        spatial = tuple(q.shape[1:-2])
        if not 1 <= len(spatial) <= 3:
            raise ValueError(f"q must be [B, *spatial, H, D] with 1 to 3 spatial axes, got shape {q.shape}")
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape[1:-2]) != spatial:
                raise ValueError(f"{name} must have q's spatial shape {spatial}, got shape {x.shape}")
        flat = [x.reshape(x.shape[0], math.prod(spatial), *x.shape[-2:]) for x in (q, k, v)]
        check_qkv(*flat)
        return (*flat, spatial, lambda y: y.reshape(y.shape[0], *spatial, *y.shape[2:]))
    check_qkv(q, k, v)
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    if math.prod(grid) != k.shape[1]:
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens but k has S={k.shape[1]}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"neighbourhood attention needs T <= S (queries are the last T grid positions), "
                         f"got T={q.shape[1]}, S={k.shape[1]}")
    return q, k, v, grid, lambda y: y


def _finish(result, return_lse: bool, convert):
    if return_lse:
        out, lse = result
        return convert(out), convert(lse)
    return convert(result)


def neighborhood_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kernel_size: Axes, dilation: Axes = 1, stride: Axes = 1,
    causal: Flags = False, grid: Optional[Axes] = None, mask: Optional[masks.Mask] = None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
    tile_shape: Optional[Axes] = None, implementation: str = "auto",
):
    """Neighbourhood attention on the block-sparse engine (NA / DiNA / causal NA / GNA; module docstring).

    ``out_x = Σ_{y ∈ N(x)} softmax_y(scale·q_x·k_y) v_y`` where ``N(x)`` is the product of the
    per-axis NATTEN windows of grid position ``x``.

    Args:
      q: ``[B, *spatial, Hq, D]`` with 1 to 3 spatial axes; k ``[B, *spatial, Hkv, D]``, v
        ``[B, *spatial, Hkv, Dv]`` (``Hq % Hkv == 0``). With ``grid`` given instead: flattened
        tokens q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, ·]``, ``S = prod(grid)``, ``T ≤ S``, the
        queries being the last ``T`` grid positions in row-major order (bottom-right alignment).
      kernel_size, dilation, stride: int or one per axis; causal: bool or one per axis.
      mask: optional extra ``attnjax.masks`` restriction on the row-major flattened tokens.
      scale: default ``1/sqrt(D)``; logits_soft_cap: ``cap·tanh(s/cap)``.
      return_lse: also return the float32 log-sum-exp ``[B, *spatial, Hq]``.
      tile_shape: tokens per tile and axis (block size ``prod(tile_shape)``).
      implementation: engine path, "reference", "xla", "pallas" or "auto".
    Returns:
      ``[B, *spatial, Hq, Dv]`` (``[B, T, Hq, Dv]`` with ``grid``) in q's dtype, or ``(out, lse)``.
    """
    qf, kf, vf, grid, unflatten = _tokens(q, k, v, grid)
    na = NeighborhoodMask(grid, kernel_size, dilation, stride, causal, tile_shape)
    B, T, Hq, _ = qf.shape
    S = kf.shape[1]
    if mask is not None:
        mask.check(B, Hq, T, S)
    qf = jnp.pad(qf, ((0, 0), (S - T, 0), (0, 0), (0, 0)))
    fine = na if mask is None else na & _TiledView(mask, na, T, S)
    tiled = [na.to_tiles(x) for x in (qf, kf, vf)]
    result = block_sparse_attention(*tiled, na.block_lists(), mask=fine, scale=scale,
                                    logits_soft_cap=logits_soft_cap, return_lse=return_lse,
                                    implementation=implementation)
    return _finish(result, return_lse, lambda y: unflatten(na.from_tiles(y)[:, S - T:]))


def neighborhood_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kernel_size: Axes, dilation: Axes = 1, stride: Axes = 1,
    causal: Flags = False, grid: Optional[Axes] = None, mask: Optional[masks.Mask] = None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
):
    """Direct reference: dense softmax attention under the ``[N, N]`` neighbour matrix (O(N²) memory).

    Same arguments and result as ``neighborhood_attention`` (no tiles, no engine).
    """
    qf, kf, vf, grid, unflatten = _tokens(q, k, v, grid)
    T, S = qf.shape[1], kf.shape[1]
    allowed = NeighborhoodMask(grid, kernel_size, dilation, stride, causal).grid_dense()[S - T:]
    full = masks.Explicit(jnp.asarray(allowed))
    full = full if mask is None else full & mask
    result = softmax_attention_reference(qf, kf, vf, mask=full, scale=scale, logits_soft_cap=logits_soft_cap,
                                         return_lse=return_lse)
    return _finish(result, return_lse, unflatten)


@registry.register
@dataclasses.dataclass(frozen=True)
class Neighborhood:
    """Neighbourhood attention as a registered mechanism on ``[B, T, H, D]`` tokens.

    The ``S`` keys form ``grid`` (row-major; default the 1-D sequence ``(S,)``) and the queries are
    the last ``T`` of those positions. ``kernel_size``/``dilation``/``stride``/``causal`` are per
    axis (module docstring); ``tile_shape`` sets the engine's tiles. A ``mask`` further restricts
    the pairs; "reference" is the direct dense path, "xla"/"pallas" run the block-sparse engine.
    """

    kernel_size: Axes = 7
    dilation: Axes = 1
    stride: Axes = 1
    causal: Flags = False
    grid: Optional[tuple] = None
    tile_shape: Optional[tuple] = None

    name: ClassVar[str] = "neighborhood"
    family: ClassVar[str] = "local"
    paper: ClassVar[str] = ("Hassani et al. 2023 (NAT); Faster Neighborhood Attention (Hassani et al. 2024); "
                            "Generalized Neighborhood Attention (Hassani et al. 2025)")
    supports: ClassVar[frozenset] = frozenset({"mask", "logits_soft_cap", "return_lse", "gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def implementations(self):
        return {name: functools.partial(_registered, self, name) for name in ("reference", "xla", "pallas")}


def _registered(config: Neighborhood, implementation: str, q, k, v, *, mask=None, scale=None,
                logits_soft_cap=None, return_lse=False, **unused):
    """``attnjax.attention`` signature for ``Neighborhood``."""
    for option in ("bias", "sinks", "rng"):
        if unused.get(option) is not None:
            raise NotImplementedError(f"neighborhood attention does not support {option}")
    if unused.get("dropout_rate", 0.0):
        raise NotImplementedError("neighborhood attention does not support dropout")
    kwargs = dict(kernel_size=config.kernel_size, dilation=config.dilation, stride=config.stride,
                  causal=config.causal, grid=config.grid or (k.shape[1],), mask=mask, scale=scale,
                  logits_soft_cap=logits_soft_cap, return_lse=return_lse)
    if implementation == "reference":
        return neighborhood_attention_reference(q, k, v, **kwargs)
    return neighborhood_attention(q, k, v, tile_shape=config.tile_shape, implementation=implementation,
                                  **kwargs)


__all__ = ["DEFAULT_TILE_SHAPES", "NeighborhoodMask", "Neighborhood", "neighborhood_attention",
           "neighborhood_attention_reference"]
