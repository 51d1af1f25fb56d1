"""Efficient attentive probing: learnable queries cross-attend to frozen features, without redundant projections.

Efficient probing (EP; Psomas et al., "Attention, Please! Revisiting Attentive Probing for Masked Image
Modeling", arXiv 2506.10178, 2025, Fig. 1 and the method section; ICLR 2026 as "... Through the Lens of
Efficiency") pools the ``N`` patch tokens ``x_n ∈ R^D`` of a frozen encoder into one vector for a linear
classifier. With ``M`` learnable queries ``q_j ∈ R^D`` and one value projection ``W_v ∈ R^{D×D'}`` split
column-wise into ``M`` blocks ``W_v^j ∈ R^{D×D'/M}``:

    a_j = softmax_n(s · q_jᵀ x_n),      y_j = Σ_n a_j(n) W_v^jᵀ x_n,      y = [y_1; …; y_M] ∈ R^{D'},

with ``s = 1/√D`` and ``D' = D / d_out`` (the official code, billpsomas/efficient-probing ``poolings/ep.py``,
``EfficientProbing``: one head, no bias, ``M = 32``, ``d_out = 1``).

Against a standard multi-head attentive probe (multi-head cross-attention, MHCA, with ``M`` heads of width
``d_h``): MHCA computes ``y = W_o [y_1; …; y_M]`` with ``a_j = softmax_n((W_q^j u)ᵀ (W_k^j x_n) / √d_h)`` from one
learned query ``u``. The logit ``uᵀ W_q^jᵀ W_k^j x_n`` is linear in ``x_n`` through the single vector
``W_k^jᵀ W_q^j u ∈ R^D``, so EP learns that vector directly as ``q_j`` (dropping ``W_q`` and ``W_k``: multi-query
cross-attention in the full feature space) and leaves out ``W_o``, which the linear classifier after the probe
absorbs. Only ``W_v`` remains: ``M·D + D·D'`` parameters against MHCA's ``D + 4D²``. The paper claims "up to a
10× speed-up over conventional multi-head attention" (abstract); this library does not benchmark it.

* ``efficient_probing_reference``: the official code's order (project every token with ``W_v``, then pool).
* ``efficient_probing``: the fast path pools first and projects the ``M`` pooled vectors after, using
  ``Σ_n a_j(n) W_v^jᵀ x_n = W_v^jᵀ Σ_n a_j(n) x_n``: the pooling is one ``attnjax.attention`` call with the
  ``M`` queries as the query axis (memory ``O(B·M·N)`` at most, never ``[N, N]``), and the projection costs
  ``O(B·D·D')`` instead of ``O(B·N·D·D')``.
* ``efficient_probing_weights``: the attention maps ``a_j`` (the paper's interpretable attention maps).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_scalar, describe
from attnjax.dispatch import dispatch
from attnjax.vision.mil import masked_softmax


def check_probe_inputs(x: jax.Array, queries: jax.Array, w_v: Optional[jax.Array],
                       valid: Optional[jax.Array]) -> None:
    """ValueError/TypeError naming the argument unless ``x [B, N, D]``, ``queries [M, D]``, ``w_v [D, D']`` with
    ``M | D'``, and ``valid`` bool ``[B, N]`` fit together."""
    if getattr(x, "ndim", None) != 3:
        raise ValueError(f"x must have shape [batch, tokens, dim], got {describe(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got {describe(x)}")
    D = x.shape[2]
    if getattr(queries, "ndim", None) != 2 or queries.shape[1] != D:
        raise ValueError(f"queries must have shape [num_queries, {D}] for x of shape {list(x.shape)}, "
                         f"got {describe(queries)}")
    if w_v is not None:
        if getattr(w_v, "ndim", None) != 2 or w_v.shape[0] != D or w_v.shape[1] % queries.shape[0]:
            raise ValueError(f"w_v must have shape [{D}, D'] with D' a multiple of num_queries = {queries.shape[0]}, "
                             f"got {describe(w_v)}")
    if valid is not None and (getattr(valid, "dtype", None) != jnp.bool_ or valid.shape != x.shape[:2]):
        raise ValueError(f"valid must be a bool array [batch, tokens] = {list(x.shape[:2])}, got {describe(valid)}")


def probe_scale(scale: Optional[float], dim: int) -> float:
    """``scale`` checked, or EP's default ``1/√D``."""
    if scale is None:
        return dim ** -0.5
    check_scalar("scale", scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return float(scale)


def efficient_probing_weights(x: jax.Array, queries: jax.Array, *, scale: Optional[float] = None,
                              valid: Optional[jax.Array] = None) -> jax.Array:
    """EP's attention maps ``a_j(n) = softmax_n(s · q_jᵀ x_n)`` (Psomas et al. 2025), ``float32 [B, M, N]``.

    Args:
      x: ``[B, N, D]`` frozen token features; queries: ``[M, D]``; scale: ``s``, default ``1/√D``.
      valid: bool ``[B, N]``, False on padding tokens (weight 0); a row without valid tokens is all zeros.
    """
    check_probe_inputs(x, queries, None, valid)
    s = probe_scale(scale, x.shape[2])
    logits = s * jnp.einsum("md,bnd->bmn", queries.astype(jnp.float32), x.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
    return masked_softmax(logits, None if valid is None else valid[:, None, :])


def efficient_probing_reference(x: jax.Array, queries: jax.Array, w_v: jax.Array, *, scale: Optional[float] = None,
                                valid: Optional[jax.Array] = None) -> jax.Array:
    """EP in the official code's order: ``v = x W_v`` for every token, split into ``M`` blocks, query ``j`` pools
    block ``j`` with its weights ``a_j``. Shapes as ``efficient_probing``."""
    check_probe_inputs(x, queries, w_v, valid)
    B, N, _ = x.shape
    M = queries.shape[0]
    a = efficient_probing_weights(x, queries, scale=scale, valid=valid)
    v = jnp.einsum("bnd,de->bne", x.astype(jnp.float32), w_v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("bmn,bnmc->bmc", a, v.reshape(B, N, M, -1), precision=jax.lax.Precision.HIGHEST)
    return y.reshape(B, -1).astype(x.dtype)


def efficient_probing_pooled(x: jax.Array, queries: jax.Array, w_v: jax.Array, *, scale: Optional[float] = None,
                             valid: Optional[jax.Array] = None, implementation: str = "xla") -> jax.Array:
    """EP pooling first (``attnjax.attention`` with the queries as ``M`` query tokens of one head), then the
    block-diagonal projection of the ``M`` pooled vectors. Shapes as ``efficient_probing``."""
    check_probe_inputs(x, queries, w_v, valid)
    B, N, D = x.shape
    M = queries.shape[0]
    q = jnp.broadcast_to(queries.astype(x.dtype)[None, :, None, :], (B, M, 1, D))
    kv = x[:, :, None, :]
    mask = None if valid is None else masks.Explicit(valid[:, None, None, :])
    pooled = attention(q, kv, kv, mask=mask, scale=probe_scale(scale, D), implementation=implementation)[:, :, 0]
    y = jnp.einsum("bmd,dmc->bmc", pooled.astype(jnp.float32), w_v.astype(jnp.float32).reshape(D, M, -1),
                   precision=jax.lax.Precision.HIGHEST)
    return y.reshape(B, -1).astype(x.dtype)


_PATHS = {"reference": efficient_probing_reference,
          "xla": functools.partial(efficient_probing_pooled, implementation="xla"),
          "pallas": functools.partial(efficient_probing_pooled, implementation="pallas")}


def efficient_probing(x: jax.Array, queries: jax.Array, w_v: jax.Array, *, scale: Optional[float] = None,
                      valid: Optional[jax.Array] = None, implementation: str = "auto") -> jax.Array:
    """Efficient probing (Psomas et al., arXiv 2506.10178, 2025, Fig. 1):
    ``y_j = Σ_n softmax_n(s · q_jᵀ x_n) W_v^jᵀ x_n`` for learned queries ``q_j``, and ``y = [y_1; …; y_M]``.

    Multi-query cross-attention pooling with learnable queries: no query, key or output projection, one value
    projection whose ``D'`` output columns are split evenly over the ``M`` queries.

    Args:
      x: ``[B, N, D]`` frozen token features (patch tokens, optionally with [CLS]).
      queries: ``[M, D]`` learnable queries ``q_j``.
      w_v: ``[D, D']`` value projection; ``D'`` a multiple of ``M`` (EP's ``D' = D / d_out``).
      scale: ``s``, default ``1/√D`` (EP's ``head_dim**-0.5`` with one head).
      valid: bool ``[B, N]``, False on padding tokens; a row without valid tokens pools to 0.
      implementation: "xla" or "pallas" (pool with ``attnjax.attention`` on that path, then project: memory
        ``O(B·M·N)`` for the weights, ``O(B·D·D')`` projection work), "reference" (project all tokens, then
        pool), or "auto" (xla on CPU; the first that serves on GPU/TPU).

    Returns:
      ``[B, D']`` in x's dtype: ``[y_1; …; y_M]``, query ``j`` filling columns ``j·D'/M … (j+1)·D'/M − 1``.
    """
    return dispatch(_PATHS, implementation, x, queries, w_v, scale=scale, valid=valid, what="efficient probing")


__all__ = ["efficient_probing", "efficient_probing_reference", "efficient_probing_pooled",
           "efficient_probing_weights"]
