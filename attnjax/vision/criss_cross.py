"""Criss-cross attention: every pixel attends to its row and its column with one softmax (CCNet).

Huang et al., "CCNet: Criss-Cross Attention for Semantic Segmentation", ICCV 2019 / TPAMI 2020, sec. 3.2
(criss-cross attention, eqs. 1-2). Official code: speedinghzl/CCNet, ``cc_attention/functions.py`` (a CUDA
kernel ``ca_weight`` / ``ca_map``) and its later pure-PyTorch ``CrissCrossAttention``.

For a pixel ``u = (i, j)`` of an ``H × W`` map, ``Ω_u`` is the set of the ``H + W − 1`` pixels in row ``i`` or
column ``j`` (``u`` itself once). The affinities ``d_{u,u'} = scale·q_u·k_{u'}`` for ``u' ∈ Ω_u`` go through one
softmax over those ``H + W − 1`` keys (eq. 1, the "affinity" operation) and weight the values (eq. 2,
"aggregation"); the residual ``+ H_u`` of eq. 2, the official code's learned ``γ`` and the 1×1 projections live
in ``recurrent_criss_cross`` (the modules: ``attnjax.nn.vision.criss_cross``). The official pure-PyTorch code builds the row logits over all ``W`` keys and
the column logits over all ``H`` keys with the pixel's own position set to ``−∞``, so it is counted once; so
does ``criss_cross_attention`` here.

* ``criss_cross_attention_reference``: a dense masked softmax over all ``T = H·W`` tokens, the ``[T, T]`` mask
  "same row or same column" built from the coordinates (``criss_cross_mask``).
* ``criss_cross_attention``: the fast path; row logits ``[B, H, W, heads, W]`` and column logits
  ``[B, H, W, heads, H]``, a joint softmax, two weighted sums. Memory ``O(B·heads·H·W·(H + W))``, never
  ``[T, T]``.
* ``recurrent_criss_cross``: the CCA module on a feature map (projections, attention, ``γ``-scaled residual),
  looped ``R`` times with shared weights (RCCA, sec. 3.3).

Cost (the paper's claims, abstract and sec. 1): against a non-local block over all ``H·W``
pixels, the recurrent criss-cross module (two loops) uses 11× less GPU memory and about 85% fewer FLOPs.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.checks import check_image_qkv, check_scalar, describe


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    """``scale`` as a float, ``1/√D`` when None; ``ValueError``/``TypeError`` naming ``scale`` unless a number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    check_scalar("scale", scale)
    return float(scale)


def criss_cross_mask(height: int, width: int) -> np.ndarray:
    """``bool [T, T]``, ``T = H·W`` row-major: True where key ``(i', j')`` is on query ``(i, j)``'s criss-cross path,
    ``i' = i`` or ``j' = j`` (CCNet sec. 3.2, the set ``Ω_u``); each row has ``H + W − 1`` True entries."""
    i, j = np.divmod(np.arange(height * width), width)
    return (i[:, None] == i[None, :]) | (j[:, None] == j[None, :])


def criss_cross_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                    scale: Optional[float] = None) -> jax.Array:
    """Criss-cross attention as a dense masked softmax over all ``T = H·W`` pixels (CCNet sec. 3.2, eqs. 1-2).

    ``out[u] = Σ_{u'} softmax_{u'}(scale·q_u·k_{u'} + M[u, u']) v_{u'}`` with ``M = 0`` on ``u``'s row and column,
    ``−∞`` elsewhere (``criss_cross_mask``). Quadratic: ``[B, heads, T, T]`` logits, for tests and small maps.

    Args:
      q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``.
      scale: logit scale, default ``1/√D`` (CCNet uses none: pass ``scale=1.0``).

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    check_image_qkv(q, k, v)
    B, H, W, heads, D = q.shape
    scale = resolve_scale(scale, D)
    qf, kf, vf = (a.astype(jnp.float32).reshape(B, H * W, heads, a.shape[-1]) for a in (q, k, v))
    logits = scale * jnp.einsum("bthd,bshd->bhts", qf, kf)
    logits = jnp.where(jnp.asarray(criss_cross_mask(H, W)), logits, -jnp.inf)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), vf)
    return out.reshape(B, H, W, heads, v.shape[-1]).astype(q.dtype)


def criss_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None) -> jax.Array:
    """Criss-cross attention (CCNet sec. 3.2, eqs. 1-2): each pixel attends to its row and column, one softmax.

    For pixel ``(i, j)``: row logits ``r_s = scale·q[i, j]·k[i, s]`` (``s < W``) and column logits
    ``c_t = scale·q[i, j]·k[t, j]`` (``t < H``, ``t ≠ i``: the pixel's own key is in the row already, so its column
    copy is ``−∞``, as the official code masks it). With ``Z = Σ_s e^{r_s} + Σ_t e^{c_t}``::

        out[i, j] = Σ_s (e^{r_s} / Z) v[i, s] + Σ_t (e^{c_t} / Z) v[t, j]

    Fast path: the row and column logits are computed separately and normalized by one joint maximum and sum
    (float32 statistics); memory ``O(B·heads·H·W·(H + W))`` for the logits and weights, against
    ``O(B·heads·(H·W)²)`` for dense attention over all pixels. Equals ``criss_cross_attention_reference``.

    Args:
      q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``. CCNet is single-head (``heads = 1``).
      scale: logit scale, default ``1/√D``; CCNet's module uses none (``scale=1.0``).

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    check_image_qkv(q, k, v)
    H, D = q.shape[1], q.shape[4]
    scale = resolve_scale(scale, D)
    f32 = jnp.float32
    row = scale * jnp.einsum("bijhd,bishd->bijhs", q, k, preferred_element_type=f32)
    col = scale * jnp.einsum("bijhd,btjhd->bijht", q, k, preferred_element_type=f32)
    own = np.eye(H, dtype=bool)[:, None, None, :]                       # [i, 1, 1, t]: t == i
    col = jnp.where(own, -jnp.inf, col)
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(row, axis=-1, keepdims=True),   # finite: the row holds
                                          jnp.max(col, axis=-1, keepdims=True)))  # the pixel itself
    e_row, e_col = jnp.exp(row - m), jnp.exp(col - m)
    z = jnp.sum(e_row, axis=-1, keepdims=True) + jnp.sum(e_col, axis=-1, keepdims=True)
    vf = v.astype(f32)
    out = (jnp.einsum("bijhs,bishd->bijhd", e_row / z, vf)
           + jnp.einsum("bijht,btjhd->bijhd", e_col / z, vf))
    return out.astype(q.dtype)


def recurrent_criss_cross(x: jax.Array, wq: jax.Array, bq: Optional[jax.Array], wk: jax.Array, bk: Optional[jax.Array],
                          wv: jax.Array, bv: Optional[jax.Array], gamma: jax.Array, *, num_heads: int = 1,
                          recurrence: int = 1) -> jax.Array:
    """CCNet's criss-cross attention module, ``recurrence`` times with the same weights (sec. 3.2-3.3).

    One loop (eq. 2 with the official code's learned ``γ``): ``Q, K, V = 1×1 convs of H`` and
    ``H'_u = γ·Σ_{u' ∈ Ω_u} softmax(Q_u·K_{u'}) V_{u'} + H_u``, through ``criss_cross_attention`` with
    ``scale=1.0`` (CCNet scales no logits). The recurrent criss-cross attention (RCCA) feeds ``H'`` to the same
    module again: after ``R = 2`` loops every pixel has a path from every pixel (sec. 3.3).

    Args:
      x: ``H [B, H, W, C]``.
      wq, bq: ``[C, C']``, ``[C']`` or None: the query map (``C' = C/8`` in the paper).
      wk, bk: ``[C, C']``, ``[C']`` or None: the key map (a bias here cancels in the softmax).
      wv, bv: ``[C, C]``, ``[C]`` or None: the value map.
      gamma: ``γ []``, the learned scale of the attention branch (0 at initialization in the official code).
      num_heads: split ``C'`` and ``C`` into this many heads (CCNet: 1).
      recurrence: ``R``, the number of loops (2 in the paper's RCCA).

    Returns:
      ``[B, H, W, C]`` in x's dtype.
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must have shape [batch, height, width, channels], got {describe(x)}")
    B, H, W, C = x.shape
    reduced = wq.shape[-1]
    if wq.shape != (C, reduced) or wk.shape != (C, reduced) or wv.shape != (C, C):
        raise ValueError(f"wq, wk must have shape [C, C'] and wv [C, C] with C = {C}: "
                         f"wq {list(wq.shape)}, wk {list(wk.shape)}, wv {list(wv.shape)}")
    if not isinstance(recurrence, int) or isinstance(recurrence, bool) or recurrence < 1:
        raise ValueError(f"recurrence must be a positive int, got {describe(recurrence)}")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 \
            or reduced % num_heads or C % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing C' = {reduced} and C = {C}, "
                         f"got {describe(num_heads)}")

    def conv1x1(h: jax.Array, w: jax.Array, b: Optional[jax.Array]) -> jax.Array:
        y = h @ w.astype(h.dtype)
        y = y if b is None else y + b.astype(h.dtype)
        return y.reshape(B, H, W, num_heads, -1)

    for _ in range(recurrence):
        out = criss_cross_attention(conv1x1(x, wq, bq), conv1x1(x, wk, bk), conv1x1(x, wv, bv), scale=1.0)
        x = (jnp.asarray(gamma, x.dtype) * out.reshape(B, H, W, C) + x).astype(x.dtype)
    return x


__all__ = ["resolve_scale", "criss_cross_mask", "criss_cross_attention_reference",
           "criss_cross_attention", "recurrent_criss_cross"]
