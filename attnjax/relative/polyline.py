"""Polyline path masked attention (PPMA): Mamba2-style decay masks along 2-D L-shaped paths in softmax attention.

Zhao et al., "Polyline Path Masked Attention for Vision Transformer", NeurIPS 2025 (arXiv 2506.15940): a
token of an ``Hg × Wg`` feature map attends to every other token, and the attention to key ``(r', c')`` from
query ``(r, c)`` is damped by the product of per-token decays along an L-shaped (polyline) path between them,
the 2-D counterpart of Mamba2's 1-semiseparable mask ``L_ij = a_(j+1)·…·a_i``. The stored copies of the paper
reachable while writing this end at its abstract, so the equations here follow the authors' code,
``zhongchenzhao/PPMA``, ``classification/models/PPMA.py`` (``PathEmbeding2D.generate_structed_mask_1d`` and
``forward``: the mask; ``MambaAttentionAllDouble.forward``: the attention), which is what the published
models ran:

- 1-D mask along a line with per-token log decays ``x``: ``log L_ij = Σ_{min(i,j) < k ≤ max(i,j)} x_k``, the
  same for ``i < j`` and ``i > j`` (symmetric): every unit step between neighbours ``k − 1`` and ``k`` costs
  the decay of token ``k``, the step's right (or lower) end.
- Polyline mask ``"v2h"`` (the code's ``structed_mask``): from key ``(r', c')`` down/up its column ``c'`` to
  row ``r`` with the vertical decays ``β``, then along row ``r`` to column ``c`` with the horizontal decays
  ``α``: ``log M[(r,c),(r',c')] = log Lᵅ_row r(c, c') + log Lᵝ_col c'(r, r')``. ``"h2v"`` is its transpose
  (along the key's row first, then the query's column).
- Attention (``MambaAttentionAllDouble``): ``O = ½·softmax(S + log M_v2h)·V + ½·softmax(S + log M_h2v)·V``
  with ``S = scale·QKᵀ``. The mask enters the logits, so each row is renormalized:
  ``softmax(S + log M) = (exp(S) ⊙ M) / rowsum(exp(S) ⊙ M)``. ``M`` is per batch element and head, input
  dependent (the module ``attnjax.nn.vision.polyline`` projects the decays from the tokens).

Because ``log M`` is a sum of differences of per-row and per-column cumulative log decays, it is an additive
logit rule (``PolylineBias``) whose tiles are gathered from ``[B, H, Hg, Wg]`` tables: the fast path is the
blocked flash path (``attnjax.blocked.flash_attention_xla``) once per polyline direction, O(N·tile) memory,
with the tables' gradients pulled back tile by tile. Left out: the criss-cross ("chunk") variant of the
official code's early stages, which factorizes the attention into row and column attentions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax.bias import Bias
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.checks import check_positive, check_qkv, check_scalar, describe
from attnjax.dispatch import dispatch

PATHS = ("v2h", "h2v")
"""The polyline directions, from the key: ``"v2h"`` vertical along the key's column then horizontal along the
query's row; ``"h2v"`` horizontal along the key's row then vertical along the query's column."""


def _check_grid(grid) -> tuple[int, int]:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2):
        raise ValueError(f"grid must be a pair (height, width), got {describe(grid)}")
    check_positive(grid_height=grid[0], grid_width=grid[1])
    return int(grid[0]), int(grid[1])


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def _check_decays(log_alpha: jax.Array, log_beta: jax.Array, grid, batch: Optional[int] = None,
                  heads: Optional[int] = None) -> tuple[int, int]:
    """The grid as ints; ``log_alpha``/``log_beta`` must be float ``[B, Hg·Wg, H]`` (and match q's B, Hq)."""
    Hg, Wg = _check_grid(grid)
    for name, x in (("log_alpha", log_alpha), ("log_beta", log_beta)):
        shape = tuple(getattr(x, "shape", ()))
        expected = [batch if batch is not None else "B", Hg * Wg, heads if heads is not None else "H"]
        if (len(shape) != 3 or shape[1] != Hg * Wg or (batch is not None and shape[0] != batch)
                or (heads is not None and shape[2] != heads)):
            raise ValueError(f"{name} must have shape [B, grid_height·grid_width, heads] = {expected} for grid "
                             f"{(Hg, Wg)}, got {list(shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array of log decays, got dtype {x.dtype}")
    if log_alpha.shape != log_beta.shape:
        raise ValueError(f"log_alpha and log_beta must have one shape, got {list(log_alpha.shape)} and "
                         f"{list(log_beta.shape)}")
    return Hg, Wg


def _check_paths(paths: Sequence[str]) -> tuple[str, ...]:
    paths = tuple(paths)
    if not paths:
        raise ValueError(f"paths must name at least one of {PATHS}, got {paths!r}")
    for path in paths:
        _check_path(path)
    return paths


def _check_attention(q, k, v, log_alpha, log_beta, grid, scale, paths) -> tuple[str, ...]:
    check_qkv(q, k, v)
    Hg, Wg = _check_grid(grid)
    if q.shape[1] != Hg * Wg or k.shape[1] != Hg * Wg:
        raise ValueError(f"polyline attention is self-attention on the grid: q and k need Hg·Wg = {Hg * Wg} tokens "
                         f"for grid {(Hg, Wg)}, got q {list(q.shape)}, k {list(k.shape)}")
    _check_decays(log_alpha, log_beta, grid, q.shape[0], q.shape[2])
    if scale is not None:
        check_scalar("scale", scale)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
    return _check_paths(paths)


def _sign(d: jax.Array) -> jax.Array:
    """``sgn(d)`` with ``sgn(0) = 1`` (a zero-length segment's difference is 0 either way)."""
    return jnp.where(d >= 0, 1.0, -1.0)


def polyline_mask_reference(log_alpha: jax.Array, log_beta: jax.Array, *, grid: tuple[int, int], path: str = "v2h",
                            log: bool = False) -> jax.Array:
    """The dense polyline path mask ``M [B, H, N, N]`` (``N = Hg·Wg``, row-major tokens), from its definition.

    ``log M[(r,c),(r',c')] = Σ_k log α[r,k]·[min(c,c') < k ≤ max(c,c')]
    + Σ_k log β[k,c']·[min(r,r') < k ≤ max(r,r')]`` for ``path="v2h"`` (the path's horizontal part runs along
    the query's row ``r``, its vertical part down the key's column ``c'``), and ``M_h2v = M_v2hᵀ``: the
    membership of each token in the path, summed, without cumulative sums (module docstring; official code
    ``PathEmbeding2D``). O(B·H·N²·(Hg + Wg)) work.

    Args:
      log_alpha: ``[B, N, H]`` horizontal log decays ``log α ≤ 0`` (``α = exp(Δ·A)`` in Mamba2's terms).
      log_beta: ``[B, N, H]`` vertical log decays.
      grid: ``(Hg, Wg)``.
      path: ``"v2h"`` or ``"h2v"``.
      log: return ``log M`` instead of ``M``.
    Returns:
      float32 ``[B, H, N, N]``, query tokens on axis 2, key tokens on axis 3; the diagonal is 1 (``log`` 0).
    """
    Hg, Wg = _check_decays(log_alpha, log_beta, grid)
    _check_path(path)
    B, N, H = log_alpha.shape
    a = log_alpha.astype(jnp.float32).reshape(B, Hg, Wg, H)
    b = log_beta.astype(jnp.float32).reshape(B, Hg, Wg, H)

    def between(n):  # [n, n, n]: token k lies on the segment from i to j, lower end excluded
        i, j, k = jnp.arange(n)[:, None, None], jnp.arange(n)[None, :, None], jnp.arange(n)[None, None, :]
        return ((jnp.minimum(i, j) < k) & (k <= jnp.maximum(i, j))).astype(jnp.float32)

    along_row = jnp.einsum("brkh,cek->bhrce", a, between(Wg))    # [B, H, r, c, c']: row r from column c to c'
    along_col = jnp.einsum("bkch,rsk->bhrsc", b, between(Hg))    # [B, H, r, r', c']: column c' from row r to r'
    log_mask = along_row[:, :, :, :, None, :] + along_col[:, :, :, None, :, :]   # [B, H, r, c, r', c']
    log_mask = log_mask.reshape(B, H, N, N)
    if path == "h2v":
        log_mask = jnp.swapaxes(log_mask, -1, -2)
    return log_mask if log else jnp.exp(log_mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PolylineBias(Bias):
    """``log M`` of one polyline direction as an additive logit rule, one ``[B, H, tq, tk]`` tile at a time.

    With per-row cumulative horizontal log decays ``Cα[r, c] = Σ_{k ≤ c} log α[r, k]`` and per-column vertical
    ones ``Cβ[r, c] = Σ_{k ≤ r} log β[k, c]``, a 1-D segment is a signed difference,
    ``Σ_{min < k ≤ max} x_k = sgn(i − j)·(C_i − C_j)``, so for ``"v2h"``::

        log M[(r,c),(r',c')] = sgn(c − c')·(Cα[r, c] − Cα[r, c']) + sgn(r − r')·(Cβ[r, c'] − Cβ[r', c'])

    (``"h2v"``: the same with query and key swapped). A tile reads each query's and key's own entries and,
    per pair, ``Cα``/``Cβ`` at the corner ``(r, c')`` (``"h2v"``: ``(r', c)``): gathers from the ``[B, H, N]``
    tables, never a ``[N, N]`` array. The blocked ``xla`` path returns gradients for both tables; a tile's gradient
    is not the transpose of those gathers (a scatter-add of every pair) but of the same tile written with the runs'
    structure: for runs of whole grid rows (the blocked path's tiles when ``Wg`` divides the tile sizes) two small
    arrays ``[rows, Wg, Wg]`` and ``[rows, rows', Wg]`` broadcast-added, whose transpose is sums over the broadcast
    axes; otherwise the key run's columns repeat with period ``Wg``, whose transpose folds the repeats. Pass as
    ``attnjax.attention(q, k, v, bias=PolylineBias.from_log_decays(...))`` for one direction;
    ``polyline_attention`` averages both, as PPMA does.

    Args:
      cum_alpha: ``[B, H, Hg, Wg]`` float32, cumulative horizontal log decays along each row.
      cum_beta: ``[B, H, Hg, Wg]`` float32, cumulative vertical log decays down each column.
      path: ``"v2h"`` or ``"h2v"`` (``PATHS``).
    """

    cum_alpha: jax.Array
    cum_beta: jax.Array
    path: str = dataclasses.field(default="v2h", metadata=dict(static=True))
    differentiable = True

    @classmethod
    def from_log_decays(cls, log_alpha: jax.Array, log_beta: jax.Array, *, grid: tuple[int, int],
                        path: str = "v2h") -> "PolylineBias":
        """The rule for log decays ``[B, N, H]`` on a grid ``(Hg, Wg)`` (cumulative sums in float32, O(B·H·N))."""
        Hg, Wg = _check_decays(log_alpha, log_beta, grid)
        _check_path(path)
        B, _, H = log_alpha.shape
        a = jnp.cumsum(log_alpha.astype(jnp.float32).reshape(B, Hg, Wg, H), axis=2)
        b = jnp.cumsum(log_beta.astype(jnp.float32).reshape(B, Hg, Wg, H), axis=1)
        return cls(jnp.moveaxis(a, -1, 1), jnp.moveaxis(b, -1, 1), path)

    def check(self, batch, num_heads, T, S):
        _check_path(self.path)
        shape = tuple(jnp.shape(self.cum_alpha))
        if len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, num_heads):
            raise ValueError(f"PolylineBias tables must have shape [B, H, Hg, Wg] with B in (1, {batch}) and H in "
                             f"(1, {num_heads}), got {list(shape)}")
        if tuple(jnp.shape(self.cum_beta)) != shape:
            raise ValueError(f"PolylineBias cum_alpha {list(shape)} and cum_beta {list(jnp.shape(self.cum_beta))} "
                             "must have one shape")
        for name, x in (("cum_alpha", self.cum_alpha), ("cum_beta", self.cum_beta)):
            if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
                raise TypeError(f"PolylineBias {name} must be a float array, got {jnp.result_type(x)}")
        N = shape[2] * shape[3]
        if T != N or S != N:
            raise ValueError(f"PolylineBias on a {shape[2]}x{shape[3]} grid is self-attention over N = {N} tokens, "
                             f"got T = {T}, S = {S}")

    def tile(self, q_idx, kv_idx, T, S):
        return _tile(jnp.asarray(self.cum_alpha, jnp.float32), jnp.asarray(self.cum_beta, jnp.float32), q_idx,
                     kv_idx, self.path)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tile(ca: jax.Array, cb: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, path: str) -> jax.Array:
    """``PolylineBias.tile``: the forward gathers (``_gathered_tile``); the gradient to the tables is the transpose of
    the same tile written without per-pair gathers (``_structured_tile``), so the blocked backward pays sums over
    broadcast axes rather than a scatter-add of every pair into the tables."""
    return _gathered_tile(ca, cb, q_idx, kv_idx, path)


def _tile_fwd(ca, cb, q_idx, kv_idx, path):
    return _gathered_tile(ca, cb, q_idx, kv_idx, path), (ca, cb, q_idx, kv_idx)


def _tile_bwd(path, residuals, cotangent):
    ca, cb, q_idx, kv_idx = residuals
    _, pullback = jax.vjp(lambda a, b: _structured_tile(a, b, q_idx, kv_idx, path), ca, cb)
    return (*pullback(cotangent), None, None)


_tile.defvjp(_tile_fwd, _tile_bwd)


def _gathered_tile(ca: jax.Array, cb: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, path: str) -> jax.Array:
    """The tile ``[Bb, H, tq, tk]`` for any runs, by gathers: each token's own entries from the flat ``[B, H, N]``
    tables, and per pair the corner ``Cα``/``Cβ[r, c']`` (``"h2v"``: ``[r', c]``) by a row gather then a column
    gather. Indices past the grid (padding) are clipped to ``N − 1``."""
    Bb, Hb, Hg, Wg = ca.shape
    N = Hg * Wg
    qi, kj = jnp.minimum(q_idx, N - 1), jnp.minimum(kv_idx, N - 1)  # padding rows/columns: any valid entry
    if path == "h2v":  # M_h2v[i, j] = M_v2h[j, i]: swap the roles of query and key
        qi, kj = kj, qi
    r, c = jnp.divmod(qi, Wg)                               # the target ends (rows r, columns c)
    r2, c2 = jnp.divmod(kj, Wg)                             # the source ends (rows r', columns c')

    def corner(table):  # table[r, c'] for every pair: a row gather, then a column gather (no per-pair index)
        return jnp.take(jnp.take(table, r, axis=2), c2, axis=3)

    def own(table, rows, cols):
        return table.reshape(Bb, Hb, N)[..., rows * Wg + cols]

    along_row = _sign(c[:, None] - c2[None, :]) * (own(ca, r, c)[..., :, None] - corner(ca))
    along_col = _sign(r[:, None] - r2[None, :]) * (corner(cb) - own(cb, r2, c2)[..., None, :])
    out = along_row + along_col
    return jnp.swapaxes(out, -1, -2) if path == "h2v" else out


def _structured_tile(ca: jax.Array, cb: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, path: str) -> jax.Array:
    """``_gathered_tile`` (the same values on every real pair) with the structure of contiguous runs: by
    broadcasts when both runs are whole grid rows (``_aligned_tile``), else with the source columns as a
    repeated rotation (``_unaligned_tile``). Written for its transpose (``_tile``'s backward)."""
    Wg = ca.shape[-1]
    if q_idx.shape[0] % Wg or kv_idx.shape[0] % Wg:
        return _unaligned_tile(ca, cb, q_idx, kv_idx, path)
    aligned = (q_idx[0] % Wg == 0) & (kv_idx[0] % Wg == 0)
    return jax.lax.cond(aligned, functools.partial(_aligned_tile, path=path),
                        functools.partial(_unaligned_tile, path=path), ca, cb, q_idx, kv_idx)


def _grid_rows(table: jax.Array, start: jax.Array, n: int) -> jax.Array:
    """Rows ``start … start + n − 1`` of ``table [Bb, H, Hg, Wg]`` (rows past the grid repeat the last one):
    ``[Bb, H, n, Wg]``, a dynamic slice."""
    padded = jnp.pad(table, ((0, 0), (0, 0), (0, n), (0, 0)), mode="edge")
    return jax.lax.dynamic_slice_in_dim(padded, start, n, axis=2)


def _aligned_tile(ca: jax.Array, cb: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, path: str) -> jax.Array:
    """The tile for runs of whole grid rows (starts and lengths multiples of ``Wg``), by broadcasts.

    The target rows ``y`` (the query's for ``"v2h"``), columns ``x``, and source rows ``y'``, columns ``x'``
    index ``log M = R[y, x, x'] + C[y, y', x']`` with ``R = sgn(x − x')·(Cα[y, x] − Cα[y, x'])`` ``[ny, Wg, Wg]``
    and ``C = sgn(y − y')·(Cβ[y, x'] − Cβ[y', x'])`` ``[ny, ny', Wg]``: two small arrays broadcast-added into the
    tile (``[ny, Wg, ny', Wg]`` is the tile's ``[tq, tk]`` up to a reshape), O(tq·tk) vectorized adds, no gather.
    Their gradients are sums over the broadcast axes, then a dynamic-slice transpose into the tables.
    """
    Bb, Hb, _, Wg = ca.shape
    (t_idx, s_idx) = (kv_idx, q_idx) if path == "h2v" else (q_idx, kv_idx)
    nt, ns = t_idx.shape[0] // Wg, s_idx.shape[0] // Wg
    yt, ys = t_idx[0] // Wg, s_idx[0] // Wg
    x = jnp.arange(Wg)
    alpha = _grid_rows(ca, yt, nt)                                                   # Cα[y, ·]
    along_row = _sign(x[:, None] - x[None, :]) * (alpha[..., :, None] - alpha[..., None, :])   # R [.., y, x, x']
    beta_t, beta_s = _grid_rows(cb, yt, nt), _grid_rows(cb, ys, ns)               # Cβ[y, ·], Cβ[y', ·]
    sy = _sign(jnp.arange(nt)[:, None] + yt - jnp.arange(ns)[None, :] - ys)        # [y, y']
    along_col = sy[:, :, None] * (beta_t[..., :, None, :] - beta_s[..., None, :, :])  # C [.., y, y', x']
    if path == "h2v":  # the query is the source: the tile's [(y', x'), (y, x)]
        out = (jnp.moveaxis(along_row, -1, -3)[..., None, :, :, :]                   # R as [.., x', y, x]
               + jnp.moveaxis(along_col, -3, -1)[..., :, :, :, None])              # C as [.., y', x', y]
        return out.reshape(Bb, Hb, ns * Wg, nt * Wg)
    out = along_row[..., :, :, None, :] + along_col[..., :, None, :, :]              # [.., y, x, y', x']
    return out.reshape(Bb, Hb, nt * Wg, ns * Wg)


def _periodic_columns(x: jax.Array, start: jax.Array, length: int, axis: int) -> jax.Array:
    """``x[(start + n) mod w]`` for ``n < length`` along ``axis`` (size ``w``): a rotation (a dynamic slice of
    two copies) repeated and cut, so that its transpose is a sum over the repeats, not a scatter."""
    w = x.shape[axis]
    rotated = jax.lax.dynamic_slice_in_dim(jnp.concatenate([x, x], axis), start % w, w, axis)
    reps = [1] * x.ndim
    reps[axis] = -(-length // w)
    return jax.lax.slice_in_dim(jnp.tile(rotated, reps), 0, length, axis=axis)


def _unaligned_tile(ca: jax.Array, cb: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, path: str) -> jax.Array:
    """The tile for any runs: per pair, the corner ``Cα``/``Cβ[r, c']`` (``"h2v"``: ``[r', c]``) is
    a row gather of the target rows, then the source run's columns, which repeat with period ``Wg``
    (``_periodic_columns``); each token's own entries are gathered from the flat ``[B, H, N]`` tables. The
    source columns of padding indices (past ``N``) continue the period; every other index is clipped to ``N − 1``."""
    Bb, Hb, Hg, Wg = ca.shape
    N = Hg * Wg
    qi, kj = jnp.minimum(q_idx, N - 1), jnp.minimum(kv_idx, N - 1)  # padding rows/columns: any valid entry
    h2v = path == "h2v"
    if h2v:  # M_h2v[i, j] = M_v2h[j, i]: the key is the target, the query the source
        qi, kj = kj, qi
    r, c = jnp.divmod(qi, Wg)                               # the target ends (rows r, columns c)
    r2, c2 = jnp.divmod(kj, Wg)                             # the source ends (rows r', columns c')
    start = (q_idx if h2v else kv_idx)[0]

    def corner(table):  # table[r, c'] in the tile's [query, key] layout
        rows = jnp.take(table, r, axis=2)                   # [Bb, Hb, targets, Wg]
        if h2v:
            return _periodic_columns(jnp.swapaxes(rows, -1, -2), start, kj.shape[0], axis=2)
        return _periodic_columns(rows, start, kj.shape[0], axis=3)

    def own(table, rows, cols):
        return table.reshape(Bb, Hb, N)[..., rows * Wg + cols]

    if h2v:  # target (key) on the last axis
        along_row = _sign(c[None, :] - c2[:, None]) * (own(ca, r, c)[..., None, :] - corner(ca))
        along_col = _sign(r[None, :] - r2[:, None]) * (corner(cb) - own(cb, r2, c2)[..., :, None])
    else:
        along_row = _sign(c[:, None] - c2[None, :]) * (own(ca, r, c)[..., :, None] - corner(ca))
        along_col = _sign(r[:, None] - r2[None, :]) * (corner(cb) - own(cb, r2, c2)[..., None, :])
    return along_row + along_col


def polyline_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, log_alpha: jax.Array,
                                 log_beta: jax.Array, *, grid: tuple[int, int], scale: Optional[float] = None,
                                 paths: Sequence[str] = PATHS) -> jax.Array:
    """PPMA, dense: ``O = mean_{p in paths} softmax(scale·QKᵀ + log M_p)·V`` (official ``MambaAttentionAllDouble``).

    ``log M_p`` from ``polyline_mask_reference``; with both paths (the default) this is the official
    ``½·softmax(S + log M)·V + ½·softmax(S + log Mᵀ)·V``. O(B·H·N²) memory.

    Args:
      q: ``[B, N, Hq, D]``; k: ``[B, N, Hkv, D]``; v: ``[B, N, Hkv, Dv]`` (``Hq % Hkv == 0``, GQA), tokens of
        an ``Hg × Wg`` map in row-major order, ``N = Hg·Wg``.
      log_alpha, log_beta: ``[B, N, Hq]`` horizontal and vertical log decays (per query head).
      grid: ``(Hg, Wg)``.
      scale: logit scale, default ``1/sqrt(D)``.
      paths: the polyline directions averaged (``PATHS``; one of them alone is a one-direction variant).
    Returns:
      ``[B, N, Hq, Dv]`` in q's dtype.
    """
    paths = _check_attention(q, k, v, log_alpha, log_beta, grid, scale, paths)
    Hq, D = q.shape[2], q.shape[3]
    group = Hq // k.shape[2]
    kr, vr = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scale = D ** -0.5 if scale is None else scale
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * scale
    out = 0.0
    for path in paths:
        weights = jax.nn.softmax(s + polyline_mask_reference(log_alpha, log_beta, grid=grid, path=path, log=True),
                                 axis=-1)
        out = out + jnp.einsum("bhqk,bkhd->bqhd", weights, vr.astype(jnp.float32))
    return (out / len(paths)).astype(q.dtype)


def polyline_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, log_alpha: jax.Array, log_beta: jax.Array, *,
                           grid: tuple[int, int], scale: Optional[float] = None, paths: Sequence[str] = PATHS,
                           block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """PPMA in the blocked flash path: one ``flash_attention_xla`` per direction with its ``PolylineBias``, averaged.

    Same arguments and result as ``polyline_attention_reference`` (plus tile sizes, clipped to N). Memory:
    O(B·H·N·tile) for the tiles and O(B·H·N) for the cumulative tables, never ``[N, N]``. Work: two blocked
    passes (each ``N²·(D + Dv)`` multiply-adds per head, plus two table gathers per logit, the path's corner
    entries); the backward recomputes each tile and sums its gradient into the ``[B, H, Hg, Wg]`` tables
    (``PolylineBias``).
    Gradients flow to q, k, v and both log decays (the tables' gradients are pulled back through each tile by the
    blocked backward, then through the cumulative sums).
    """
    paths = _check_attention(q, k, v, log_alpha, log_beta, grid, scale, paths)
    out = 0.0
    for path in paths:
        bias = PolylineBias.from_log_decays(log_alpha, log_beta, grid=grid, path=path)
        out = out + flash_attention_xla(q, k, v, bias=bias, scale=scale, block_q=block_q,
                                        block_kv=block_kv).astype(jnp.float32)
    return (out / len(paths)).astype(q.dtype)


def polyline_attention(q: jax.Array, k: jax.Array, v: jax.Array, log_alpha: jax.Array, log_beta: jax.Array, *,
                       grid: tuple[int, int], scale: Optional[float] = None, paths: Sequence[str] = PATHS,
                       implementation: str = "auto") -> jax.Array:
    """Polyline path masked attention (Zhao et al. 2025; see the module docstring) through ``implementation``:
    "reference" (dense), "xla" (blocked, O(N·tile) memory) or "auto" (xla). Arguments as
    ``polyline_attention_reference``; no Pallas kernel evaluates this rule (``NotImplementedError``)."""
    options = dict(grid=grid, scale=scale, paths=paths)
    implementations = {"reference": functools.partial(polyline_attention_reference, **options),
                       "xla": functools.partial(polyline_attention_xla, **options)}
    return dispatch(implementations, implementation, q, k, v, log_alpha, log_beta, what="polyline attention")


__all__ = ["PATHS", "PolylineBias", "polyline_mask_reference", "polyline_attention_reference", "polyline_attention_xla",
           "polyline_attention"]
