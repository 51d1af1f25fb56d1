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
    ``W_R`` through the blocked ``xla`` path (``jax.vjp`` of ``query_tile``) as through the reference.
    With ``u=None`` the queries pass unchanged and the rule adds ``scale·(q + v)·W_R R_(i−j)``.

    Per tile of ``tq`` query rows and ``tk`` key columns (contiguous runs, as every path passes them)
    the offsets ``i − j`` span ``n = tq + tk − 1`` values. The rule builds their sinusoids ``[n, d_R]``
    on the fly, projects them, ``E = W_R R`` ``[n, H, D]`` (``n·d_R·H·D`` multiply-adds: about
    ``(tq + tk)·d_R/(B·tq·tk)`` times the tile's ``q·kᵀ``, one ``q·kᵀ`` at B = 1, d_R = 256, 512-wide tiles), and scores ``(q + v)·E`` by chunks of 64 query rows, each
    against the ``64 + tk − 1`` offsets it sees and skewed to ``[64, tk]`` (Huang et al. 2019's pad,
    reshape and slice; ``attnjax.positional.relative.chunked_relative_logits``, shared with
    ``RelativeEmbeddingBias``): ``B·H·tq·(64 + tk − 1)·D``, about 1.1 times the tile's ``q·kᵀ``. Memory
    O(B·H·tq·(64 + tk) + n·(d_R + H·D)) per tile, never ``[T, S]``. Indices that are not contiguous runs
    give NaN logits rather than wrong ones.

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

    def query_tile(self, q, q_idx, kv_idx, T, S):
        B, Hq, tq, D = q.shape
        if jnp.shape(self.w_r)[2] != D:
            raise ValueError(f"TransformerXLBias w_r has shape {jnp.shape(self.w_r)}, expected head dim D = {D} "
                             f"of the queries {q.shape}")
        tk = kv_idx.shape[0]
        rows = query_positions(q_idx, T, S) if self.query_offset is None else q_idx + self.query_offset
        scale = D ** -0.5 if self.scale is None else self.scale
        highest = rows[0] + (tq - 1) - kv_idx[0]  # the largest i − j; column m holds offset highest − m
        r = relative_sinusoids(highest - jnp.arange(tq + tk - 1), jnp.shape(self.w_r)[1],
                               max_wavelength=self.max_wavelength)
        e = jnp.einsum("nr,hrd->nhd", r, jnp.asarray(self.w_r, jnp.float32) * scale)
        shift = jnp.asarray(self.v, jnp.float32)
        if self.u is not None:
            shift = shift - jnp.asarray(self.u, jnp.float32)
        tile = chunked_relative_logits(q.astype(jnp.float32) + shift[None, :, None, :], e, tk)
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


__all__ = ["relative_sinusoids", "TransformerXLBias", "transformer_xl_logits_reference"]
