"""Transformer-XL's relative position term as a bias rule that reads the queries.

Dai et al., "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context" (ACL 2019),
§3.3: the logit of query ``i`` and key ``j`` is

    A_ij = q_iᵀk_j + q_iᵀW_R R_(i−j) + uᵀk_j + vᵀW_R R_(i−j)          (terms (a), (b), (c), (d))

with ``R`` the sinusoid encoding of Vaswani et al. (no parameters), ``W_R`` a learned projection of it
(per head), and learned global content and position biases ``u``, ``v`` (per head). ``(a) + (c) =
(q_i + u)·k_j`` is an ordinary content logit; ``(b) + (d) = (q_i + v)·W_R R_(i−j)`` is what
``TransformerXLBias`` adds per tile. RCMHA (Sugiharto et al. 2023) uses this term after depthwise
convolutions of Q, K and V (``attnjax.nn.positional.rcmha``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.bias import Bias
from attnjax.masks import query_positions
from attnjax.positional.relative import chunked_relative_logits


def relative_sinusoids(offsets: jax.Array, dim: int, *, max_wavelength: float = 10000.0) -> jax.Array:
    """Transformer-XL's sinusoid encoding ``R_o`` of relative offsets ``o = i − j``: ``[..., dim]`` float32.

    ``R_o = [sin(o·ω_0), …, sin(o·ω_(dim/2−1)), cos(o·ω_0), …, cos(o·ω_(dim/2−1))]`` with
    ``ω_f = max_wavelength^(−2f/dim)``: Vaswani et al. 2017 §3.5's frequencies, in the sin-then-cos
    order of Dai et al.'s released code (``PositionalEmbedding``). ``dim`` must be even and positive.
    """
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"the sinusoid dimension must be a positive even int, got {dim!r}")
    frequencies = max_wavelength ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = jnp.asarray(offsets, jnp.float32)[..., None] * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _heads(name: str, x: jax.Array, num_heads: int, rank: int) -> None:
    shape = jnp.shape(x)
    if len(shape) != rank or shape[0] not in (1, num_heads):
        expected = "(H, d_R, D)" if rank == 3 else "(H, D)"
        raise ValueError(f"TransformerXLBias {name} has shape {shape}, expected {expected} with H in (1, {num_heads})")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"TransformerXLBias {name} must be a float array, got {jnp.result_type(x)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TransformerXLBias(Bias):
    """Dai et al. 2019 §3.3's position terms (b) + (d), ``scale·(q_i + v)·W_R R_(i−j)``, per tile.

    The content bias ``u`` enters through the queries: call
    ``attention(rule.content_queries(q), k, v, bias=rule)``, i.e. the engine's content logit is
    ``scale·(q_i + u)·k_j`` (terms (a) + (c)), and the rule, handed those same queries ``q + u``, adds
    ``scale·(q' − u + v)·W_R R_(i−j)`` = terms (b) + (d). So the whole logit is ``scale·A_ij`` (Dai et
    al.'s released code scales all four terms by ``1/√D``), and gradients reach ``q``, ``u``, ``v`` and
    ``W_R`` through the blocked ``xla`` path (its custom VJP back to the prepared table, autodiff of
    ``prepare`` from there) as through the reference.
    With ``u=None`` the queries pass unchanged and the rule adds ``scale·(q + v)·W_R R_(i−j)``.

    Cost. The blocked ``xla`` path calls ``prepare`` once per call: the sinusoids of every offset the call's
    (padded) tiles see, ``T + S − 1`` of them, projected in one matmul, ``E = scale·W_R R`` ``[H, T + S − 1, D]``
    float32 (``(T + S)·d_R·H·D`` multiply-adds, ``2·d_R/(B·T)`` of a full ``q·kᵀ`` at T = S; O(T) memory); each tile
    slices its ``tq + tk − 1`` offsets from it (``PreparedTransformerXLBias``). ``query_tile`` on this rule
    itself (the reference paths, any caller that doesn't prepare) builds them per tile instead, about
    ``(tq + tk)·d_R/(B·tq·tk)`` times the tile's ``q·kᵀ`` again. Either way a tile scores ``(q + v)·E`` by chunks
    of 128 query rows, each against the ``128 + tk − 1`` offsets it sees and skewed to ``[128, tk]`` (Huang et
    al. 2019's pad, reshape and slice; ``attnjax.positional.relative.chunked_relative_logits``, shared with
    ``RelativeEmbeddingBias``): ``B·H·tq·(128 + tk − 1)·D``, 1.25 times the tile's ``q·kᵀ`` at 512-wide tiles.
    That second ``q·kᵀ``-sized product per tile is the floor of terms (b) + (d) (a different ``D``-vector per
    offset ``i − j``: no rank-``D`` product of a query and a key gives it), so in flops the forward costs about
    ``(2 + 1.25)/2 ≈ 1.6`` times attention without a bias (``q·kᵀ`` and ``P·V`` per tile) and the backward
    about ``(5 + 3·1.25)/5 ≈ 1.75`` times (the recomputed term, its ``dq`` and its ``dE``): above the 1.3x
    that position-only rules reach. Measured on CPU at T = 8k (B = 1, H = 4, D = 64, d_R = 256, causal, one
    interleaved run on 2 busy cores): 1.75x forward and 2.05x forward and backward against no bias, above the
    flop ratios because the 128-row products run at about 65% of a 512-row ``q·kᵀ``'s speed per flop. Memory
    O(B·H·tq·(128 + tk)) per tile and O((T + S)·(d_R + H·D)) per call, never ``[T, S]``. Indices that are
    not contiguous runs give NaN logits rather than wrong ones.

    Query positions follow the library's bottom-right alignment (``attnjax.masks``), or
    ``query_offset + i`` when given (a decode step against a cache whose first ``length`` slots are
    filled passes ``query_offset=length``). Key ``j`` sits at position ``j``.

    Args:
      w_r: ``W_R``, ``[H, d_R, D]`` float, ``H`` in {1, Hq}; ``d_R`` (even) is the sinusoid dimension
        (``d_model`` in Transformer-XL), ``D`` the query head dim.
      v: the position bias, ``[H, D]`` float, ``H`` in {1, Hq}.
      u: the content bias, ``[H, D]`` float or ``None``; see ``content_queries``.
      scale: the logit scale, which must equal the ``scale`` given to ``attention``; ``None`` is the
        engine's default ``1/√D``.
      max_wavelength: the sinusoid base (10000 in Vaswani et al. and Transformer-XL).
      query_offset: ``None`` (bottom-right alignment) or an int scalar, the position of query row 0.
    """

    w_r: jax.Array
    v: jax.Array
    u: Optional[jax.Array] = None
    scale: Optional[float] = dataclasses.field(default=None, metadata=dict(static=True))
    max_wavelength: float = dataclasses.field(default=10000.0, metadata=dict(static=True))
    query_offset: Optional[jax.Array] = None
    differentiable = True
    reads_queries = True

    def content_queries(self, q: jax.Array) -> jax.Array:
        """``q [B, T, Hq, D]`` -> ``q + u`` (in q's dtype): the queries to give ``attention`` with this
        rule, so that its content logit is Dai et al.'s (a) + (c). ``q`` itself when ``u`` is None."""
        if self.u is None:
            return q
        return q + jnp.asarray(self.u).astype(q.dtype)

    def check(self, batch, num_heads, T, S):
        _heads("w_r", self.w_r, num_heads, 3)
        _heads("v", self.v, num_heads, 2)
        if self.u is not None:
            _heads("u", self.u, num_heads, 2)
        dim = jnp.shape(self.w_r)[1]
        if dim % 2:
            raise ValueError(f"TransformerXLBias w_r has shape {jnp.shape(self.w_r)}: its sinusoid dimension d_R "
                             f"(axis 1) must be even, got {dim}")
        for name, x in (("v", self.v), ("u", self.u)):
            if x is not None and jnp.shape(x)[1] != jnp.shape(self.w_r)[2]:
                raise ValueError(f"TransformerXLBias {name} has shape {jnp.shape(x)} but w_r has shape "
                                 f"{jnp.shape(self.w_r)}: both need the head dim D = {jnp.shape(self.w_r)[2]}")

    def _scale(self, head_dim: int) -> float:
        return head_dim ** -0.5 if self.scale is None else self.scale

    def _shift(self) -> jax.Array:
        """``v − u`` (``v`` when ``u`` is None), ``[H, D]`` float32: added to the queries ``q + u``, ``q + v``."""
        shift = jnp.asarray(self.v, jnp.float32)
        return shift if self.u is None else shift - jnp.asarray(self.u, jnp.float32)

    def _projected(self, offsets: jax.Array, head_dim: int) -> jax.Array:
        """``scale·W_R R_o`` for ``offsets [n]``: ``[H, n, D]`` float32 (heads first), ``n·d_R·H·D`` multiply-adds."""
        r = relative_sinusoids(offsets, jnp.shape(self.w_r)[1], max_wavelength=self.max_wavelength)
        return jnp.einsum("nr,hrd->hnd", r, jnp.asarray(self.w_r, jnp.float32) * self._scale(head_dim))

    def prepare(self, T, S, rows=None, columns=None):
        """A ``PreparedTransformerXLBias`` with ``scale·W_R R_o`` for every offset of the call's tiles: query rows
        ``< rows`` (default ``T``) against key columns ``< columns`` (default ``S``), ``rows + columns − 1``
        offsets, ``[H, rows + columns − 1, D]`` float32 built in one matmul (``(rows + columns)·d_R·H·D``
        multiply-adds, about ``2·d_R/(B·T)`` of the call's ``q·kᵀ``)."""
        rows, columns = T if rows is None else rows, S if columns is None else columns
        top = _positions(jnp.arange(rows)[-1:], T, S, self.query_offset)[0]  # the largest offset i − j (key 0)
        table = self._projected(top - jnp.arange(rows + columns - 1), jnp.shape(self.w_r)[2])
        return PreparedTransformerXLBias(table, self._shift(), top, self.query_offset)

    def query_tile(self, q, q_idx, kv_idx, T, S):
        _check_head_dim("w_r", self.w_r, q)
        tk = kv_idx.shape[0]
        rows = _positions(q_idx, T, S, self.query_offset)
        highest = rows[0] + (q.shape[2] - 1) - kv_idx[0]  # the largest i − j; column m holds offset highest − m
        e = self._projected(highest - jnp.arange(q.shape[2] + tk - 1), q.shape[-1])
        return _tile(q, e, self._shift(), rows, kv_idx)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PreparedTransformerXLBias(Bias):
    """``TransformerXLBias`` for one call (``TransformerXLBias.prepare``): its tiles slice a table of ``scale·W_R R_o``.

    A tile of ``tq`` rows and ``tk`` columns reads its ``tq + tk − 1`` offsets, columns ``top − (i − j)`` of
    ``table`` (``for_tile``: one ``lax.dynamic_slice``, no sinusoid or projection per tile), then scores them as
    ``TransformerXLBias`` does (its docstring gives the cost: about 1.6 times no bias in forward flops, 1.75 in
    the backward's). Gradients reach ``table`` and ``shift`` through the blocked path's custom VJP, which adds
    each tile's slice gradient into ``table``'s in place (``Bias.for_tile``), and ``w_r``, ``v``, ``u`` through
    ``prepare`` by ordinary autodiff. Tiles reaching outside the prepared extent, like indices that are not
    contiguous runs, give NaN logits rather than wrong ones.

    Args:
      table: ``[H, L, D]`` float32, ``table[:, m]`` holding ``scale·W_R R_(top − m)``.
      shift: ``[H, D]`` float32, ``v − u`` (``v`` when ``u`` is None).
      top: int scalar, the offset of row 0 (the largest ``i − j`` of the prepared extent).
      query_offset: as ``TransformerXLBias``.
    """

    table: jax.Array
    shift: jax.Array
    top: jax.Array
    query_offset: Optional[jax.Array] = None
    differentiable = True
    reads_queries = True

    def for_tile(self, q_idx, kv_idx, T, S):
        """The rule restricted to one tile: its ``tq + tk − 1`` table columns (one ``lax.dynamic_slice``), NaN
        where the tile reaches outside the prepared extent."""
        n = q_idx.shape[0] + kv_idx.shape[0] - 1
        top = _positions(q_idx[:1], T, S, self.query_offset)[0] + (q_idx.shape[0] - 1) - kv_idx[0]
        start = self.top - top
        window = jax.lax.dynamic_slice_in_dim(self.table, start, n, axis=1)
        in_range = (start >= 0) & (start + n <= self.table.shape[1])
        return PreparedTransformerXLBias(jnp.where(in_range, window, jnp.nan), self.shift, top, self.query_offset)

    def query_tile(self, q, q_idx, kv_idx, T, S):
        _check_head_dim("table", self.table, q)
        e = self.for_tile(q_idx, kv_idx, T, S).table
        return _tile(q, e, self.shift, _positions(q_idx, T, S, self.query_offset), kv_idx)


def _positions(q_idx: jax.Array, T: int, S: int, query_offset: Optional[jax.Array]) -> jax.Array:
    """Positions of query rows ``q_idx``: bottom-right aligned (``attnjax.masks``) or ``query_offset + q_idx``."""
    return query_positions(q_idx, T, S) if query_offset is None else q_idx + query_offset


def _check_head_dim(name: str, x: jax.Array, q: jax.Array) -> None:
    if jnp.shape(x)[-1] != q.shape[-1]:
        raise ValueError(f"TransformerXLBias {name} has shape {jnp.shape(x)}, expected head dim D = {q.shape[-1]} "
                         f"of the queries {q.shape}")


def _tile(q: jax.Array, e: jax.Array, shift: jax.Array, rows: jax.Array, kv_idx: jax.Array) -> jax.Array:
    """``(q + shift)·e`` skewed to ``[B, H, tq, tk]`` float32 (``e [H, tq + tk − 1, D]``, column ``m`` for offset
    ``highest − m``); NaN unless the rows and columns are contiguous runs."""
    tile = chunked_relative_logits(q.astype(jnp.float32) + shift[None, :, None, :], e, kv_idx.shape[0])
    contiguous = jnp.all(jnp.diff(rows) == 1) & jnp.all(jnp.diff(kv_idx) == 1)
    return tile + jnp.where(contiguous, 0.0, jnp.nan)


def transformer_xl_logits_reference(q: jax.Array, k: jax.Array, w_r: jax.Array, v: jax.Array,
                                    u: Optional[jax.Array] = None, *, scale: Optional[float] = None,
                                    max_wavelength: float = 10000.0,
                                    query_offset: Optional[int] = None) -> jax.Array:
    """Dai et al. 2019 §3.3's logits ``scale·A_ij``, dense: ``[B, Hq, T, S]`` float32.

    ``A_ij = q_iᵀk_j + q_iᵀW_R R_(i−j) + uᵀk_j + vᵀW_R R_(i−j)``, with ``R_(i−j)`` formed explicitly
    for every pair (``[T, S, d_R]``, ``relative_sinusoids``) and ``W_R R_(i−j)`` for every pair and head
    (``[Hq, T, S, D]``). Query ``i`` sits at position ``i + S − T`` (or ``query_offset + i``), key ``j``
    at ``j``. O(Hq·T·S·D) memory: for tests.

    Args:
      q: ``[B, T, Hq, D]`` (the queries themselves, without ``u``); k: ``[B, S, Hkv, D]``, ``Hq % Hkv == 0``.
      w_r: ``[H, d_R, D]``; v, u: ``[H, D]`` (``u=None`` is zero); ``H`` in {1, Hq}.
      scale: default ``1/√D``. max_wavelength, query_offset: as ``TransformerXLBias``.
    """
    _, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    q = q.astype(jnp.float32)
    k = jnp.repeat(k.astype(jnp.float32), Hq // Hkv, axis=2)
    u = jnp.zeros((1, D), jnp.float32) if u is None else jnp.asarray(u, jnp.float32)
    u, v = jnp.broadcast_to(u, (Hq, D)), jnp.broadcast_to(jnp.asarray(v, jnp.float32), (Hq, D))
    w_r = jnp.broadcast_to(jnp.asarray(w_r, jnp.float32), (Hq,) + jnp.shape(w_r)[1:])
    i = jnp.arange(T) + (S - T if query_offset is None else query_offset)
    r = relative_sinusoids(i[:, None] - jnp.arange(S)[None, :], w_r.shape[1], max_wavelength=max_wavelength)
    w_r_r = jnp.einsum("tsr,hrd->htsd", r, w_r)  # W_R R_(i−j)
    a = jnp.einsum("bthd,bshd->bhts", q, k)
    b = jnp.einsum("bthd,htsd->bhts", q, w_r_r)
    c = jnp.einsum("hd,bshd->bhs", u, k)[:, :, None, :]
    d = jnp.einsum("hd,htsd->hts", v, w_r_r)[None]
    return (D ** -0.5 if scale is None else scale) * (a + b + c + d)


__all__ = ["relative_sinusoids", "TransformerXLBias", "PreparedTransformerXLBias", "transformer_xl_logits_reference"]
