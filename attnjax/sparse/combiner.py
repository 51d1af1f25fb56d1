"""Combiner (catalog B11): full attention through a structured factorization, at sparse cost.

Ren et al. 2021, "Combiner: Full Attention Transformer with Sparse Computation Cost" (NeurIPS 2021,
arXiv:2107.05768); public code ``google-research/google-research/combiner`` (``jax/model/layer.py``,
``tf/approx_attention.py``).

Attention is the conditional expectation ``A(x_i) = E_{p(j|i)}[v_j]`` (Sec. 3). Combiner splits the
keys a query may use into a direct part ``Ω_i^0`` and regions ``Ω_i^1 … Ω_i^{n_i}`` that partition
the rest, and factorizes (Sec. 3, the MoE-style factorization)::

    p(j|i) = p(j|i)                    j ∈ Ω_i^0        (direct expectation)
    p(j|i) = p(Ω_i^r|i) · q(j|Ω_i^r)   j ∈ Ω_i^r        (local expectation of region r)

    A(x_i) = Σ_{j∈Ω_i^0} p(j|i) v_j + Σ_r p(Ω_i^r|i) Σ_{j∈Ω_i^r} q(j|Ω_i^r) v_j

with one normalizer over direct keys and region summaries,
``p(j|i) ∝ exp(s·q_i·k_j)``, ``p(Ω_r|i) ∝ exp(s·q_i·k_{Ω_r})``, and the within-region distribution
``q(j|Ω_r) = softmax_{j∈Ω_r}(s·q_{Ω_r}·k_j)`` that does not depend on ``i``. The summaries are
parameter-free max poolings, ``q_{Ω_r} = max_{j∈Ω_r} q_j`` and ``k_{Ω_r} = max_{j∈Ω_r} k_j``
(Sec. 3.2; the public code's ``pool-max`` / ``identity-max`` summary). Every row of the factorized
matrix sums to 1 and every allowed key gets a positive weight: full attention, one layer.

The three variants of Sec. 4 (tokens ``0 … T-1``; causal = the autoregressive setting):

- **fixed** (Combiner-Fixed, from the Sparse Transformer's fixed pattern; ``sqrt_fixed_full`` /
  ``_SelfAttSqrtn`` in the public code): consecutive segments of ``w`` tokens. ``Ω_i^0`` is the
  query's own segment (causal: its keys ``≤ i``); the regions are the other segments (causal: the
  earlier ones). Cost ``O(T·(w + T/w))``.
- **logsparse** (Combiner-Logsparse, from the LogSparse Transformer; ``_SelfAttLogn`` in the public
  code): ``Ω_i^0 = {i}``; the regions are the aligned dyadic blocks ``[(c-1)·2^l, c·2^l)`` with
  ``c = ⌊i/2^l⌋`` odd, which partition ``[0, i)`` (one per set bit of ``i``). Non-causal adds the
  mirrored blocks ``[(c+1)·2^l, (c+2)·2^l)`` for ``c`` even, which partition ``(i, T)``.
  Cost ``O(T log T)``.
- **axial** (Combiner-Axial, from the Axial Transformer): tokens on rows of ``w``, token ``i`` at row
  ``s``, column ``u``. ``Ω_i^0`` is the axial pattern, the query's row (causal: columns ``≤ u``) and
  its column (causal: rows ``< s``); each other column ``t ≠ u`` gives a region, the part of column
  ``t`` above row ``s`` (non-causal: and a second one below it). Cost ``O(T·(w + T/w))``.

Where the public code and this file differ: (1) non-causal Combiner-Fixed in the public TF code
also attends to the summary of the query's own segment, which its direct part already covers; here
the regions are the *other* segments, so that the supports partition the keys as Sec. 3 requires.
(2) The public axial code (``axial_mixture_unidir`` / ``_AxialMixtureAtt``) adds a second,
overlapping set of row-wise summaries on top of the column regions (Combiner-Mixture); this file
builds the partition of Combiner-Axial without that mixture. (3) Only max pooling is offered (the
public code also has mean/sum and a learned "deepset" pooling). Equation numbers of the paper were not
checked against its PDF here; the section numbers name the parts followed.

Paths: ``combiner_attention_reference`` builds the factorized ``T × T`` matrix from the NumPy
supports of ``combiner_supports`` (``combiner_matrix`` returns it), ``combiner_attention_xla`` runs
the variant's structured form (segments, dyadic levels or the row/column grid) without it.
Masks: ``None`` (bidirectional) or ``masks.Causal()``; self-attention only (the summaries pool the
queries at the key positions), so ``T == S``. GQA: query head ``h`` reads KV head ``h // G``; the
pooled summary query is per query head.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.checks import check_qkv
from attnjax.masks import Causal, Mask
from attnjax.tiling import num_tiles, pad_axis

VARIANTS = ("fixed", "logsparse", "axial")
_NEG = -jnp.inf


class CombinerSupports(NamedTuple):
    """The supports of Combiner's factorization for a length ``T`` (NumPy bools).

    direct: ``[T, T]``, ``direct[i, j]``: key ``j ∈ Ω_i^0``.
    members: ``[R, T]``, ``members[r, j]``: key ``j`` belongs to region ``r``.
    assign: ``[T, R]``, ``assign[i, r]``: region ``r`` is one of query ``i``'s ``Ω_i^r`` (never empty).
    """

    direct: np.ndarray
    members: np.ndarray
    assign: np.ndarray


def default_region_size(T: int) -> int:
    """``⌈√T⌉``: the segment (fixed) or row (axial) length that gives the ``O(T√T)`` cost of Sec. 4."""
    return max(1, math.isqrt(max(T - 1, 0)) + 1)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _region_size(region_size: Optional[int], T: int) -> int:
    if region_size is None:
        return default_region_size(T)
    if not isinstance(region_size, (int, np.integer)) or isinstance(region_size, bool) or region_size < 1:
        raise ValueError(f"region_size must be a positive int or None, got {region_size!r}")
    return int(region_size)


def combiner_supports(variant: str, T: int, *, causal: bool, region_size: Optional[int] = None) -> CombinerSupports:
    """Direct parts and regions of a Combiner variant, by a plain loop over the queries (module docstring).

    Args:
      variant: "fixed", "logsparse" or "axial".
      T: sequence length.
      causal: the autoregressive supports (keys ``≤ i``) or the bidirectional ones (all keys).
      region_size: segment length (fixed) or row length (axial); default ``⌈√T⌉``; unused by logsparse.
    Returns:
      ``CombinerSupports``; for each query the direct part and its regions partition the keys it may use.
    """
    _check_variant(variant)
    w = _region_size(region_size, T)
    regions: list[frozenset] = []
    index: dict[frozenset, int] = {}
    direct = np.zeros((T, T), bool)
    assigned: list[list[int]] = []

    def region(keys) -> int:
        key = frozenset(int(j) for j in keys)
        if key not in index:
            index[key] = len(regions)
            regions.append(key)
        return index[key]

    for i in range(T):
        mine: list[int] = []
        if variant == "fixed":
            c = i // w
            seg = range(c * w, min((c + 1) * w, T))
            direct[i, [j for j in seg if not causal or j <= i]] = True
            for r in range(num_tiles(T, w)):
                if r < c or (r > c and not causal):
                    mine.append(region(range(r * w, min((r + 1) * w, T))))
        elif variant == "logsparse":
            direct[i, i] = True
            for lev in range(max(T - 1, 0).bit_length()):
                size, c = 1 << lev, i >> lev
                if c % 2 == 1:
                    mine.append(region(range((c - 1) * size, c * size)))
                elif not causal and (c + 1) * size < T:
                    mine.append(region(range((c + 1) * size, min((c + 2) * size, T))))
        else:
            s, u = divmod(i, w)
            rows = num_tiles(T, w)
            for t in range(w):
                if s * w + t < T and (not causal or t <= u):
                    direct[i, s * w + t] = True
            for r in range(rows):
                if r * w + u < T and (r < s or (r > s and not causal)):
                    direct[i, r * w + u] = True
            for t in range(w):
                if t == u:
                    continue
                above = [r * w + t for r in range(s)]
                below = [r * w + t for r in range(s + 1, rows) if r * w + t < T]
                if above:
                    mine.append(region(above))
                if below and not causal:
                    mine.append(region(below))
        assigned.append(mine)
    members = np.zeros((len(regions), T), bool)
    for r, keys in enumerate(regions):
        members[r, sorted(keys)] = True
    assign = np.zeros((T, len(regions)), bool)
    for i, mine in enumerate(assigned):
        assign[i, mine] = True
    return CombinerSupports(direct, members, assign)


def _causal(mask: Optional[Mask], what: str) -> bool:
    """True for ``Causal()``, False for ``None``; ``NotImplementedError`` for any other mask."""
    if mask is None:
        return False
    if isinstance(mask, Causal):
        return True
    raise NotImplementedError(f"{what} supports mask=None or masks.Causal() only, got {mask!r}")


def _check(q, k, v, what: str) -> None:
    check_qkv(q, k, v)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{what} is self-attention (its summaries pool the queries at the key positions): q and k "
                         f"must have one length, got q {q.shape}, k {k.shape}")


def _scale(scale: Optional[float], D: int) -> float:
    return D ** -0.5 if scale is None else float(scale)


def _masked_softmax(logits: jax.Array, ok) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last axis of the allowed entries (0 elsewhere, rows with none are 0) and its lse."""
    logits = jnp.where(ok, logits, _NEG)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(ok, jnp.exp(logits - m), 0.0)
    total = e.sum(-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    return p, jnp.log(total[..., 0]) + m[..., 0]


def combiner_matrix(q: jax.Array, k: jax.Array, *, variant: str, mask: Optional[Mask] = None,
                    region_size: Optional[int] = None, scale: Optional[float] = None,
                    return_lse: bool = False):
    """The factorized attention matrix of Combiner, written out (Sec. 3; module docstring).

    ``P[i, j] = p(j|i)`` for ``j ∈ Ω_i^0`` plus ``Σ_r p(Ω_i^r|i) q(j|Ω_i^r)`` over the regions holding ``j``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``.
      variant, region_size: as in ``combiner_supports``; mask: ``None`` or ``masks.Causal()``.
      scale: logit scale ``s``, default ``1/√D``.
    Returns:
      float32 ``[B, Hq, T, T]`` (each row sums to 1), and the joint log-normalizer ``[B, T, Hq]`` with ``return_lse``.
    """
    check_qkv(q, k, k)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"combiner is self-attention: q and k must have one length, got q {q.shape}, k {k.shape}")
    causal = _causal(mask, "combiner")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    s = _scale(scale, D)
    sup = combiner_supports(variant, T, causal=causal, region_size=region_size)
    members, direct, assign = jnp.asarray(sup.members), jnp.asarray(sup.direct), jnp.asarray(sup.assign)
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    kf = k.astype(jnp.float32)
    # Region summaries: max-pooled query (per query head) and key (Sec. 3.2).
    q_reg = jnp.max(jnp.where(members[None, :, :, None, None, None], qg[:, None], _NEG), axis=2)
    k_reg = jnp.max(jnp.where(members[None, :, :, None, None], kf[:, None], _NEG), axis=2)
    nonempty = members.any(1)
    q_reg = jnp.where(nonempty[None, :, None, None, None], q_reg, 0.0)
    k_reg = jnp.where(nonempty[None, :, None, None], k_reg, 0.0)
    # q(j|Ω_r): softmax over the region's keys of s·q_Ω·k_j.
    within, _ = _masked_softmax(s * jnp.einsum("brhgd,bjhd->bhgrj", q_reg, kf), members[None, None, None])
    direct_logits = s * jnp.einsum("bihgd,bjhd->bhgij", qg, kf)
    region_logits = s * jnp.einsum("bihgd,brhd->bhgir", qg, k_reg)
    ok = jnp.concatenate([direct, assign], axis=-1)[None, None, None]
    p, lse = _masked_softmax(jnp.concatenate([direct_logits, region_logits], axis=-1), ok)
    matrix = p[..., :T] + jnp.einsum("bhgir,bhgrj->bhgij", p[..., T:], within)
    matrix = matrix.reshape(B, Hq, T, T)
    if return_lse:
        return matrix, lse.reshape(B, Hq, T).transpose(0, 2, 1)
    return matrix


def combiner_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, variant: str,
                                 region_size: Optional[int] = None, mask: Optional[Mask] = None,
                                 scale: Optional[float] = None, return_lse: bool = False):
    """Combiner attention from the written-out factorized matrix: ``out = P v`` (``combiner_matrix``).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``.
      variant: "fixed", "logsparse" or "axial"; region_size: segment/row length (default ``⌈√T⌉``).
      mask: ``None`` or ``masks.Causal()``; scale: default ``1/√D``; return_lse: also the joint log-normalizer.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse [B, T, Hq] float32)``. O(T²) memory.
    """
    _check(q, k, v, "combiner")
    matrix, lse = combiner_matrix(q, k, variant=variant, mask=mask, region_size=region_size, scale=scale,
                                  return_lse=True)
    B, T, Hq, _ = q.shape
    Hkv = k.shape[2]
    vf = v.astype(jnp.float32)
    out = jnp.einsum("bhgij,bjhe->bihge", matrix.reshape(B, Hkv, Hq // Hkv, T, T), vf)
    out = out.reshape(B, T, Hq, v.shape[-1]).astype(q.dtype)
    return (out, lse) if return_lse else out


def _summaries(qb, kb, vb, valid, s):
    """Max-pooled summaries of blocks: ``qb [B, n, m, Hkv, G, D]``, ``kb [B, n, m, Hkv, D]``,
    ``vb [B, n, m, Hkv, Dv]``, ``valid [n, m]`` -> key ``[B, n, Hkv, D]``, value ``[B, n, Hkv, G, Dv]``."""
    q_hat = jnp.max(jnp.where(valid[None, :, :, None, None, None], qb, _NEG), axis=2)
    k_hat = jnp.max(jnp.where(valid[None, :, :, None, None], kb, _NEG), axis=2)
    any_valid = valid.any(1)
    q_hat = jnp.where(any_valid[None, :, None, None, None], q_hat, 0.0)
    k_hat = jnp.where(any_valid[None, :, None, None], k_hat, 0.0)
    w, _ = _masked_softmax(s * jnp.einsum("bnhgd,bnjhd->bnhgj", q_hat, kb), valid[None, :, None, None, :])
    return k_hat, jnp.einsum("bnhgj,bnjhe->bnhge", w, vb)


def _joint(parts):
    """Softmax over the concatenated logits of ``parts`` (``(logits, ok)`` pairs on one last axis): probabilities
    split back per part, and the lse."""
    logits = jnp.concatenate([jnp.where(ok, x, _NEG) for x, ok in parts], axis=-1)
    ok = jnp.concatenate([jnp.broadcast_to(ok, x.shape) for x, ok in parts], axis=-1)
    p, lse = _masked_softmax(logits, ok)
    sizes = np.cumsum([x.shape[-1] for x, _ in parts])[:-1]
    return jnp.split(p, sizes, axis=-1), lse


def _fixed_xla(q, k, v, w: int, causal: bool, s: float):
    B, T, Hkv, G, D = q.shape
    Dv = v.shape[-1]
    nb = num_tiles(T, w)
    qb = pad_axis(q, 1, w).reshape(B, nb, w, Hkv, G, D)
    kb = pad_axis(k, 1, w).reshape(B, nb, w, Hkv, D)
    vb = pad_axis(v, 1, w).reshape(B, nb, w, Hkv, Dv)
    valid = jnp.asarray((np.arange(nb * w) < T).reshape(nb, w))
    k_hat, v_hat = _summaries(qb, kb, vb, valid, s)
    pos = np.arange(w)
    local_ok = valid[:, None, :] & (jnp.asarray(pos[None, :] <= pos[:, None]) if causal else True)
    seg = np.arange(nb)
    region_ok = jnp.asarray(seg[None, :] < seg[:, None] if causal else seg[None, :] != seg[:, None])
    local = s * jnp.einsum("bcihgd,bcjhd->bchgij", qb, kb)
    region = s * jnp.einsum("bcihgd,brhd->bchgir", qb, k_hat)
    (p_local, p_region), lse = _joint([(local, local_ok[None, :, None, None]),
                                       (region, region_ok[None, :, None, None, None, :])])
    out = jnp.einsum("bchgij,bcjhe->bcihge", p_local, vb) + jnp.einsum("bchgir,brhge->bcihge", p_region, v_hat)
    return out.reshape(B, nb * w, Hkv, G, Dv)[:, :T], lse.transpose(0, 1, 4, 2, 3).reshape(B, nb * w, Hkv, G)[:, :T]


def _logsparse_xla(q, k, v, causal: bool, s: float):
    B, T, Hkv, G, D = q.shape
    Dv = v.shape[-1]
    levels = max(T - 1, 0).bit_length()
    Tp = 1 << levels
    qp, kp, vp = (pad_axis(x, 1, Tp) for x in (q, k, v))
    valid_all = np.arange(Tp) < T
    pos = np.arange(T)
    logits = [s * jnp.einsum("bthgd,bthd->bthg", q, k)]
    oks = [np.ones(T, bool)]
    values = [jnp.broadcast_to(v[:, :, :, None], (B, T, Hkv, G, Dv))]
    for lev in range(levels):
        size = 1 << lev
        n = Tp // size
        k_hat, v_hat = _summaries(qp.reshape(B, n, size, Hkv, G, D), kp.reshape(B, n, size, Hkv, D),
                                  vp.reshape(B, n, size, Hkv, Dv), jnp.asarray(valid_all.reshape(n, size)), s)
        c = pos >> lev
        left = c % 2 == 1
        ok = left if causal else left | ((c + 1) * size < T)
        r = np.clip(np.where(left, c - 1, c + 1), 0, n - 1)
        logits.append(s * jnp.einsum("bthgd,bthd->bthg", q, k_hat[:, r]))
        oks.append(ok)
        values.append(v_hat[:, r])
    ok = jnp.asarray(np.stack(oks, -1))[None, :, None, None, :]
    p, lse = _masked_softmax(jnp.stack(logits, -1), ok)
    return jnp.einsum("bthgl,bthgle->bthge", p, jnp.stack(values, -2)), lse


def _exclusive_cummax(x, valid, axis: int, reverse: bool):
    """Max over the rows strictly before (``reverse``: after) each row along ``axis``, invalid entries skipped."""
    x = jnp.where(valid, x, _NEG)
    cm = lax.cummax(x, axis=axis, reverse=reverse)
    fill = jnp.full_like(lax.slice_in_dim(cm, 0, 1, axis=axis), _NEG)
    if reverse:
        return jnp.concatenate([lax.slice_in_dim(cm, 1, None, axis=axis), fill], axis=axis)
    return jnp.concatenate([fill, lax.slice_in_dim(cm, 0, -1, axis=axis)], axis=axis)


def _column_summaries(qg, kg, vg, valid, region_ok, before: bool, s: float):
    """Summaries of the column part above (``before``) or below each row: key ``[B, n, w, Hkv, D]`` and
    value ``[B, n, w, Hkv, G, Dv]`` for region (row ``s``, column ``t``); ``region_ok [n, w]``: non-empty."""
    n = qg.shape[1]
    q_hat = _exclusive_cummax(qg, valid[None, :, :, None, None, None], 1, reverse=not before)
    k_hat = _exclusive_cummax(kg, valid[None, :, :, None, None], 1, reverse=not before)
    q_hat = jnp.where(region_ok[None, :, :, None, None, None], q_hat, 0.0)
    k_hat = jnp.where(region_ok[None, :, :, None, None], k_hat, 0.0)
    rows = np.arange(n)
    order = rows[None, :] < rows[:, None] if before else rows[None, :] > rows[:, None]
    ok = jnp.asarray(order)[:, None, :] & valid.T[None, :, :]
    w_in, _ = _masked_softmax(s * jnp.einsum("bsthgd,brthd->bsthgr", q_hat, kg), ok[None, :, :, None, None, :])
    return k_hat, jnp.einsum("bsthgr,brthe->bsthge", w_in, vg)


def _axial_xla(q, k, v, w: int, causal: bool, s: float):
    B, T, Hkv, G, D = q.shape
    Dv = v.shape[-1]
    n = num_tiles(T, w)
    qg = pad_axis(q, 1, w).reshape(B, n, w, Hkv, G, D)
    kg = pad_axis(k, 1, w).reshape(B, n, w, Hkv, D)
    vg = pad_axis(v, 1, w).reshape(B, n, w, Hkv, Dv)
    flat = np.arange(n * w).reshape(n, w)
    valid_np = flat < T
    valid = jnp.asarray(valid_np)
    rows, cols = np.arange(n), np.arange(w)
    other_col = cols[None, :] != cols[:, None]
    # Direct: the query's row and its column.
    row_ok = valid[:, None, :] & (jnp.asarray(cols[None, :] <= cols[:, None]) if causal else True)
    col_order = rows[None, :] < rows[:, None] if causal else rows[None, :] != rows[:, None]
    col_ok = jnp.asarray(col_order)[:, None, :] & valid.T[None, :, :]
    parts = [(s * jnp.einsum("bsuhgd,bsthd->bshgut", qg, kg), row_ok[None, :, None, None]),
             (s * jnp.einsum("bsuhgd,bruhd->bshgur", qg, kg), col_ok[None, :, None, None])]
    values = []
    for before in (True,) if causal else (True, False):
        nonempty = (rows > 0)[:, None] & np.ones(w, bool) if before else (rows[:, None] + 1) * w + cols[None, :] < T
        k_hat, v_hat = _column_summaries(qg, kg, vg, valid, jnp.asarray(nonempty), before, s)
        ok = jnp.asarray(nonempty[:, None, :] & other_col[None])
        parts.append((s * jnp.einsum("bsuhgd,bsthd->bshgut", qg, k_hat), ok[None, :, None, None]))
        values.append(v_hat)
    probs, lse = _joint(parts)
    out = (jnp.einsum("bshgut,bsthe->bsuhge", probs[0], vg) + jnp.einsum("bshgur,bruhe->bsuhge", probs[1], vg))
    for p, v_hat in zip(probs[2:], values):
        out = out + jnp.einsum("bshgut,bsthge->bsuhge", p, v_hat)
    lse = lse.transpose(0, 1, 4, 2, 3).reshape(B, n * w, Hkv, G)
    return out.reshape(B, n * w, Hkv, G, Dv)[:, :T], lse[:, :T]


def combiner_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, variant: str,
                           region_size: Optional[int] = None, mask: Optional[Mask] = None,
                           scale: Optional[float] = None, return_lse: bool = False):
    """Combiner attention in its structured form, without the ``T × T`` matrix (module docstring).

    fixed: per segment, ``w`` local logits plus ``T/w`` segment summaries; logsparse: the query itself
    plus one dyadic block summary per level (``log₂ T``), each level's summaries pooled in ``O(T)``;
    axial: row (``w``) + column (``T/w``) + one column-part summary per other column (``w``, twice when
    bidirectional), the summaries from an exclusive running max down (and up) each column.
    Cost ``O(T·(w + T/w)·D)`` (fixed, axial) or ``O(T·log T·D)`` (logsparse), same memory order, float32.

    Args and returns as ``combiner_attention_reference``.
    """
    _check(q, k, v, "combiner")
    _check_variant(variant)
    causal = _causal(mask, "combiner")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    s = _scale(scale, D)
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    if variant == "fixed":
        out, lse = _fixed_xla(qg, kf, vf, _region_size(region_size, T), causal, s)
    elif variant == "logsparse":
        out, lse = _logsparse_xla(qg, kf, vf, causal, s)
    else:
        out, lse = _axial_xla(qg, kf, vf, _region_size(region_size, T), causal, s)
    out = out.reshape(B, T, Hq, v.shape[-1]).astype(q.dtype)
    return (out, lse.reshape(B, T, Hq)) if return_lse else out


class _Combiner:
    """Shared registry plumbing of the three Combiner variants (the ``variant`` class attribute)."""

    variant: ClassVar[str]
    family: ClassVar[str] = "sparse"
    paper: ClassVar[str] = ("Ren et al. 2021, Combiner: Full Attention Transformer with Sparse Computation Cost "
                            "(NeurIPS)")
    supports: ClassVar[frozenset] = frozenset({"mask", "gqa", "return_lse"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def _region(self) -> Optional[int]:
        return getattr(self, "region_size", None)

    def implementations(self):
        kw = dict(variant=self.variant, region_size=self._region())
        return {"reference": functools.partial(combiner_attention_reference, **kw),
                "xla": functools.partial(combiner_attention_xla, **kw)}


def _check_region_field(region_size) -> None:
    if region_size is not None:
        _region_size(region_size, 1)


@registry.register
@dataclasses.dataclass(frozen=True)
class CombinerFixed(_Combiner):
    """Combiner-Fixed (Ren et al. 2021, Sec. 4): own segment direct, other segments through max-pooled summaries.

    Attributes:
      region_size: segment length ``w``; ``None`` = ``⌈√T⌉`` (the ``O(T√T)`` choice).
    """

    region_size: Optional[int] = None
    name: ClassVar[str] = "combiner_fixed"
    variant: ClassVar[str] = "fixed"

    def __post_init__(self):
        _check_region_field(self.region_size)


@registry.register
@dataclasses.dataclass(frozen=True)
class CombinerLogsparse(_Combiner):
    """Combiner-Logsparse (Ren et al. 2021, Sec. 4): the query itself direct, the rest through ``log₂ T`` dyadic
    block summaries (no parameters to set)."""

    name: ClassVar[str] = "combiner_logsparse"
    variant: ClassVar[str] = "logsparse"


@registry.register
@dataclasses.dataclass(frozen=True)
class CombinerAxial(_Combiner):
    """Combiner-Axial (Ren et al. 2021, Sec. 4): row and column direct, the other columns' parts above (and
    below, bidirectional) the query's row through max-pooled summaries.

    Attributes:
      region_size: row length ``w``; ``None`` = ``⌈√T⌉``.
    """

    region_size: Optional[int] = None
    name: ClassVar[str] = "combiner_axial"
    variant: ClassVar[str] = "axial"

    def __post_init__(self):
        _check_region_field(self.region_size)


__all__ = [
    "VARIANTS", "CombinerSupports", "combiner_supports", "combiner_matrix", "combiner_attention_reference",
    "combiner_attention_xla", "default_region_size", "CombinerFixed", "CombinerLogsparse", "CombinerAxial",
]
