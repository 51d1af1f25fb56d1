"""2-simplicial (trilinear, Kronecker) attention: each query attends to pairs of keys.

Clift et al., "Logic and the 2-Simplicial Transformer" (ICLR 2020); Roy et al., "Fast and
Simplex: 2-Simplicial Attention in Triton" (2025); Alman & Song, "How to Capture Higher-order
Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation" (2023)::

    s_ijl = scale · Σ_d q_id k_jd k'_ld,      A_ijl = softmax_{(j,l)}(s_ijl),
    out_i = Σ_{j,l} A_ijl (v_j ⊙ v'_l)

(Roy et al.'s trilinear form; Clift et al. use a related scalar triple product). The softmax
runs over all ``S²`` key pairs, so the dense form costs O(T·S²·D) time and O(T·S²) memory.

Complexity bounds. Alman & Song: if the entries of Q, K, K', V, V' are bounded by
``o(∛log n)``, the attention can be approximated in ``n^{1+o(1)}`` time; if they may be as
large as ``Ω(∛log n)``, no algorithm beats ``n^{3−o(1)}`` (under SETH). So exact 2-simplicial
attention is inherently cubic. Roy et al. make it practical with causal sliding windows:
query ``i`` (at position ``p``) pairs keys ``j ∈ (p − w1, p]`` with ``l ∈ (p − w2, p]``, for
O(T·w1·w2·D) time (they use ``w1 = 512, w2 = 32``). ``simplicial_attention_windowed`` computes
that with a scan over query blocks: O(B·Hq·block_q·w1·w2) live memory, forward and backward
(each block is rematerialized for the gradient), and O(T·D) saved residuals.

Causal alignment is the library's bottom-right rule (``attnjax.masks``): with ``T != S`` query
``i`` sits at key position ``i + S − T``. A query with no allowed pair outputs 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp

from attnjax import masks, registry
from attnjax.checks import check_qkv
from attnjax.blocked.scores import to_groups
from attnjax.tiling import check_broadcastable, num_tiles, pad_axis, rank4


def simplicial_attention_reference(
    q: jax.Array, k1: jax.Array, v1: jax.Array, k2: jax.Array, v2: jax.Array, *, causal: bool = False,
    scale: Optional[float] = None, window1: Optional[int] = None, window2: Optional[int] = None,
    key_mask: Optional[jax.Array] = None, return_lse: bool = False,
):
    """Dense 2-simplicial attention: the whole ``[B, Hq, T, S, S]`` logit tensor in float32.

    Args:
      q: ``[B, T, Hq, D]``; k1, k2: ``[B, S, Hkv, D]``; v1, v2: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      causal: pairs with ``j, l ≤ p_i`` only (``p_i = i + S − T``).
      scale: logit scale, default ``1/sqrt(D)``.
      window1, window2: causal windows, ``j > p_i − window1`` and ``l > p_i − window2``
        (``None``: unbounded); they need ``causal=True``.
      key_mask: bool broadcastable to ``[B, Hq, T, S]`` (``masks.Explicit``'s shapes), or ``None``: key ``j`` is
        usable by query ``i`` where True, and a pair ``(j, l)`` needs both of its keys usable (on top of
        ``causal`` and the windows). A cache's filled slots, for decoding.
      return_lse: also return the float32 log-sum-exp over pairs ``[B, T, Hq]``.
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, ``out_i = Σ_{j,l} A_ijl (v1_j ⊙ v2_l)``, and the lse if asked.
    """
    B, T, Hq, D, S, Hkv, scale = _check(q, k1, v1, k2, v2, causal, scale, window1, window2)
    usable = _key_groups(key_mask, (B, Hq, T, S), Hkv)                      # [B', Hkv', G', T', S]
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    qg = to_groups(f32(q).transpose(0, 2, 1, 3), Hkv)
    k1t, v1t, k2t, v2t = (f32(x).transpose(0, 2, 1, 3) for x in (k1, v1, k2, v2))
    s = scale * jnp.einsum("bhgid,bhjd,bhld->bhgijl", qg, k1t, k2t)
    allowed1 = _axis_mask(causal, window1).dense(T, S)[0, 0] & usable
    allowed2 = _axis_mask(causal, window2).dense(T, S)[0, 0] & usable
    valid = allowed1[..., :, None] & allowed2[..., None, :]
    p, lse = _pair_softmax(s.reshape(s.shape[:4] + (S * S,)), valid.reshape(valid.shape[:-2] + (S * S,)))
    out = jnp.einsum("bhgijl,bhjd,bhld->bhgid", p.reshape(s.shape), v1t, v2t)
    return _finish(out, lse, q.dtype, return_lse)


def simplicial_attention_windowed(
    q: jax.Array, k1: jax.Array, v1: jax.Array, k2: jax.Array, v2: jax.Array, *, causal: bool = True,
    scale: Optional[float] = None, window1: Optional[int] = None, window2: Optional[int] = None,
    key_mask: Optional[jax.Array] = None, block_q: int = 64, return_lse: bool = False,
):
    """2-simplicial attention over sliding key windows, blocked over queries (Roy et al. 2025).

    Query ``i`` (position ``p = i + S − T``) attends to the ``w1 × w2`` pairs ``j ∈ (p − w1, p]``,
    ``l ∈ (p − w2, p]`` (``w = min(window, S)``; ``None`` covers the whole context, which is exact).
    The windows are gathered per query, so the work is O(B·Hq·T·w1·w2·D) and a ``lax.map`` over
    blocks of ``block_q`` queries keeps O(B·Hq·block_q·w1·w2) floats live; each block is
    rematerialized in the backward pass (``jax.checkpoint``), so gradients by autodiff need no
    more. ``causal=False`` attends to all ``S²`` pairs (exact, cubic) and takes no windows.

    Args and returns as in ``simplicial_attention_reference``, plus ``block_q`` (queries per block). A
    ``key_mask`` is gathered at each query's window (``[B', Hq', block_q, w]`` per block).
    """
    B, T, Hq, D, S, Hkv, scale = _check(q, k1, v1, k2, v2, causal, scale, window1, window2)
    usable = _key_groups(key_mask, (B, Hq, T, S), Hkv)                      # [B', Hkv', G', T', S]
    if not isinstance(block_q, int) or block_q <= 0:
        raise ValueError(f"block_q must be a positive int, got {block_q!r}")
    w1 = S if window1 is None else min(window1, S)
    w2 = S if window2 is None else min(window2, S)
    bq = min(block_q, T)
    nb = num_tiles(T, bq)
    qg = to_groups(pad_axis(q, 1, bq).transpose(0, 2, 1, 3), Hkv)      # [B, Hkv, G, nb·bq, D]
    k1t, v1t, k2t, v2t = (x.transpose(0, 2, 1, 3) for x in (k1, v1, k2, v2))

    def window(i: jax.Array, w: int):
        """Key indices ``[bq, w]`` of the queries ``i`` and which of them are allowed (``[B', Hkv', G', bq, w]``)."""
        if not causal:
            idx, ok = jnp.broadcast_to(jnp.arange(w), (i.shape[0], w)), jnp.ones((i.shape[0], w), bool)
        else:
            p = masks.query_positions(i, T, S)[:, None]
            idx = p - w + 1 + jnp.arange(w)
            idx, ok = jnp.clip(idx, 0, S - 1), idx >= 0
        rows = jnp.take(usable, jnp.minimum(i, usable.shape[3] - 1), axis=3)          # [B', Hkv', G', bq, S]
        return idx, ok & jnp.take_along_axis(rows, jnp.broadcast_to(idx, rows.shape[:3] + idx.shape), axis=4)

    @jax.checkpoint
    def block(start: jax.Array):
        i = start + jnp.arange(bq)
        idx1, ok1 = window(i, w1)
        idx2, ok2 = window(i, w2)
        qb = jax.lax.dynamic_slice_in_dim(qg, start, bq, axis=3).astype(jnp.float32)
        k1w, v1w = (jnp.take(x, idx1, axis=2).astype(jnp.float32) for x in (k1t, v1t))   # [B, Hkv, bq, w1, ·]
        k2w, v2w = (jnp.take(x, idx2, axis=2).astype(jnp.float32) for x in (k2t, v2t))   # [B, Hkv, bq, w2, ·]
        qk = qb[:, :, :, :, None, :] * k1w[:, :, None]                                  # [B, Hkv, G, bq, w1, D]
        s = scale * jnp.einsum("bhgiad,bhicd->bhgiac", qk, k2w)
        valid = (ok1[..., :, None] & ok2[..., None, :]).reshape(ok1.shape[:3] + (bq, w1 * w2))
        p, lse = _pair_softmax(s.reshape(s.shape[:4] + (w1 * w2,)), valid)
        pv2 = jnp.einsum("bhgiac,bhicd->bhgiad", p.reshape(s.shape), v2w)             # Σ_l A_ijl v2_l
        return jnp.einsum("bhgiad,bhiad->bhgid", pv2, v1w), lse

    out, lse = jax.lax.map(block, jnp.arange(nb) * bq)                  # [nb, B, Hkv, G, bq, ·]
    out = jnp.moveaxis(out, 0, 3).reshape(B, Hkv, -1, nb * bq, out.shape[-1])[:, :, :, :T]
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, Hkv, -1, nb * bq)[..., :T]
    return _finish(out, lse, q.dtype, return_lse)


def _check(q, k1, v1, k2, v2, causal, scale, window1, window2):
    """Shapes and options; returns ``(B, T, Hq, D, S, Hkv, scale)``."""
    check_qkv(q, k1, v1)
    check_qkv(q, k2, v2)
    if k2.shape != k1.shape or v2.shape != v1.shape:
        raise ValueError(f"k2/v2 must match k1/v1 in shape: k1 {k1.shape}, k2 {k2.shape}, v1 {v1.shape}, v2 {v2.shape}")
    for name, w in (("window1", window1), ("window2", window2)):
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {w!r}")
        if w is not None and not causal:
            raise ValueError(f"{name}={w} needs causal=True: the windows of Roy et al. are causal")
    B, T, Hq, D = q.shape
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return B, T, Hq, D, k1.shape[1], k1.shape[2], D ** -0.5 if scale is None else scale


def _key_groups(key_mask: Optional[jax.Array], shape: tuple, Hkv: int) -> jax.Array:
    """``key_mask`` (bool, broadcastable to ``shape = (B, Hq, T, S)``; ``None``: all True) as ``[B', Hkv', G', T', S]``
    with query heads grouped by K/V head (each primed dim the full one or 1)."""
    if key_mask is None:
        return jnp.ones((1, 1, 1, 1, shape[3]), bool)
    m = jnp.asarray(key_mask)
    if m.dtype != jnp.bool_:
        raise TypeError(f"key_mask must be bool, got {m.dtype}")
    check_broadcastable("key_mask", m, shape)
    m = jnp.broadcast_to(rank4(m), rank4(m).shape[:3] + (shape[3],))
    H = m.shape[1]
    return m.reshape(m.shape[0], Hkv if H > 1 else 1, H // Hkv if H > 1 else 1, *m.shape[2:])


def _axis_mask(causal: bool, window: Optional[int]) -> masks.Mask:
    """Which keys of one axis a query may use: all, causal, or the last ``window`` (own position included)."""
    if not causal:
        return masks.Full()
    return masks.Causal() if window is None else masks.SlidingWindow(window - 1, 0)


def _pair_softmax(s: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the last (pair) axis of ``s`` where ``valid``; rows with no pair give 0 and lse ``-inf``."""
    s = jnp.where(valid, s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    e = jnp.exp(s - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    safe = jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, row_max + jnp.log(safe), -jnp.inf)[..., 0]
    return e / safe, lse


def _finish(out: jax.Array, lse: jax.Array, dtype, return_lse: bool):
    """``[B, Hkv, G, T, Dv]`` -> ``[B, T, Hq, Dv]`` in ``dtype`` (and lse ``[B, T, Hq]``)."""
    B, Hkv, G, T, Dv = out.shape
    out = out.reshape(B, Hkv * G, T, Dv).transpose(0, 2, 1, 3).astype(dtype)
    if return_lse:
        return out, lse.reshape(B, Hkv * G, T).transpose(0, 2, 1)
    return out


@registry.register
@dataclasses.dataclass(frozen=True)
class Simplicial:
    """2-simplicial attention under the ``attnjax.attention`` signature, with ``k' = k`` and ``v' = v``.

    ``s_ijl = scale·Σ_d q_id k_jd k_ld`` and ``out_i = Σ_{j,l} A_ijl (v_j ⊙ v_l)``: the one-key-set
    form (the attention tensor is symmetric in ``j, l``). For separate ``k'``/``v'`` (the papers'
    form) call ``simplicial_attention_windowed`` or use ``attnjax.nn.simplicial.SimplicialAttention``.

    ``mask`` is ``None`` (all ``S²`` pairs), ``masks.Causal()`` (pairs at or before the query), a
    ``masks.Explicit`` key mask or ``Causal() & Explicit`` (a pair needs both keys allowed: ``key_mask``);
    ``window1``/``window2`` restrict the causal pairs to Roy et al.'s sliding windows (their
    setting: ``Simplicial(window1=512, window2=32)``) and need ``masks.Causal()``. The defaults
    (``None``) are exact 2-simplicial attention, cubic in the length: O(T·S²) work even for "xla".
    Both implementations ("reference": dense; "xla": ``simplicial_attention_windowed``) honour the
    windows, so they compute the same function.
    """

    window1: Optional[int] = None
    window2: Optional[int] = None
    block_q: int = 64

    name: ClassVar[str] = "simplicial_2"
    family: ClassVar[str] = "softmax"
    paper: ClassVar[str] = "Clift et al. 2019 (2-simplicial Transformer); Roy et al. 2025 (Fast and Simplex)"
    supports: ClassVar[frozenset] = frozenset({"mask", "gqa", "cross", "return_lse"})
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ()

    def implementations(self):
        return {"reference": self._bind(simplicial_attention_reference),
                "xla": self._bind(functools.partial(simplicial_attention_windowed, block_q=self.block_q))}

    def _bind(self, fn):
        def attend(q, k, v, *, mask=None, bias=None, scale=None, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
                   rng=None, return_lse=False):
            used = {"bias": bias is not None, "logits_soft_cap": logits_soft_cap is not None,
                    "sinks": sinks is not None, "dropout": dropout_rate > 0}
            if any(used.values()):
                raise NotImplementedError(f"{self.name} does not support {sorted(o for o, on in used.items() if on)}")
            parts = [] if mask is None else [mask.a, mask.b] if isinstance(mask, masks.And) else [mask]
            causal = any(isinstance(m, masks.Causal) for m in parts)
            explicit = [m.mask for m in parts if isinstance(m, masks.Explicit)]
            if len(parts) != causal + len(explicit) or len(explicit) > 1:
                raise NotImplementedError(f"{self.name} serves mask=None, masks.Causal(), masks.Explicit(key mask) "
                                          f"or Causal() & Explicit, got {mask!r}")
            if not causal and (self.window1 is not None or self.window2 is not None):
                raise NotImplementedError(f"{self.name} windows ({self.window1}, {self.window2}) are causal: "
                                          "pass mask=masks.Causal()")
            return fn(q, k, v, k, v, causal=causal, scale=scale, window1=self.window1, window2=self.window2,
                      key_mask=explicit[0] if explicit else None, return_lse=return_lse)
        return attend
