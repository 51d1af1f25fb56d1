"""CrossViT's cross-attention fusion: one branch's CLS token is the only query over the other branch's patches.

Chen, Fan & Panda, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image Classification", ICCV 2021,
sec. 3.4 (cross-attention fusion; the small branch follows the same equations with the roles swapped). For the
large branch ``l`` and the small branch ``s``::

    x'   = [f^l(x^l_cls) ‖ x^s_patch]                              # the projected CLS joins the other branch
    q    = x'_cls W_q,  k = x' W_k,  v = x' W_v
    CA   = softmax(q kᵀ / √(C/h)) v                                # one query: cost linear in N
    y_cls = f^l(x^l_cls) + W_o·MCA(LN(x'))
    z^l  = [g^l(y_cls) ‖ x^l_patch]

``f`` projects the CLS to the other branch's width and ``g`` back. The official code (IBM/CrossViT,
``models/crossvit.py``: ``MultiScaleBlock``, ``CrossAttention``) fuses both branches from their pre-fusion tokens.
This file holds the parameter-free parts: building ``x'`` and the single-query attention.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.checks import describe
from attnjax.softmax.softmax import softmax_attention_reference


def fusion_tokens(cls: jax.Array, patches: jax.Array) -> jax.Array:
    """``x' = [cls ‖ patches]`` (sec. 3.4): ``cls [B, 1, C]`` (one branch's projected CLS) before ``patches [B, N, C]``
    (the other branch's patch tokens, its own CLS dropped) -> ``[B, 1 + N, C]``."""
    if getattr(cls, "ndim", None) != 3 or cls.shape[1] != 1:
        raise ValueError(f"cls must have shape [batch, 1, channels], got {describe(cls)}")
    if getattr(patches, "ndim", None) != 3 or patches.shape[0] != cls.shape[0] or patches.shape[2] != cls.shape[2]:
        raise ValueError(f"patches must have shape [batch, tokens, channels] = [{cls.shape[0]}, N, {cls.shape[2]}] "
                         f"to join cls, got {describe(patches)}")
    return jnp.concatenate([cls, patches.astype(cls.dtype)], axis=1)


def check_cls_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """``ValueError`` unless q is one query ``[B, 1, Hq, D]`` and k, v are ``[B, S, Hkv, D | Dv]``."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 4:
            raise ValueError(f"{name} must have shape [batch, tokens, heads, head_dim], got {describe(a)}")
    if q.shape[1] != 1:
        raise ValueError(f"q must be the CLS query alone, [batch, 1, heads, head_dim], got {describe(q)}")


def cls_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                        implementation: str = "auto") -> jax.Array:
    """CrossViT's cross-attention (sec. 3.4): the CLS query attends to all of ``x'``.

    ``out[b] = Σ_s softmax_s(scale·q[b]·k[b, s]) v[b, s]`` with ``k, v`` from ``x' = [f(cls) ‖ patches]``. One query,
    so compute and memory are ``O(heads·(1 + N))``, linear in the other branch's length (the paper's point against
    all-to-all fusion). Runs through ``attnjax.attention``.

    Args:
      q: ``[B, 1, Hq, D]``, the projected CLS token's query; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``.
      scale: logit scale, default ``1/√D`` (the paper's ``1/√(C/h)``).
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, 1, Hq, Dv]`` in q's dtype.
    """
    check_cls_qkv(q, k, v)
    return attention(q, k, v, scale=scale, implementation=implementation)


def cls_cross_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                  scale: Optional[float] = None) -> jax.Array:
    """``cls_cross_attention`` written plainly (sec. 3.4): the dense float32 softmax of ``softmax_attention_reference``."""
    check_cls_qkv(q, k, v)
    return softmax_attention_reference(q, k, v, scale=scale)


__all__ = ["fusion_tokens", "cls_cross_attention", "cls_cross_attention_reference"]
