"""DaViT's channel group attention: self-attention among channel tokens, within groups of channels.

Ding et al., "DaViT: Dual Attention Vision Transformers", ECCV 2022, sec. 3.2 ("channel attention"); official code
dingmyu/davit (``ChannelAttention`` in ``timm/models/davit.py``). The transpose of the usual token map: a
channel is a token whose features are its values at all ``N`` positions, and the ``C`` channels are split into
``G`` groups (the heads) of ``C_g = C/G`` channels that attend among themselves::

    A_g = softmax(s · Q_gᵀ K_g)          # [C_g, C_g]: query channel × key channel, softmax over key channels
    out_g = (A_g V_gᵀ)ᵀ                  # [N, C_g]

with ``Q_g, K_g, V_g [N, C_g]``. Every channel token sees the whole image (global interactions), at
``O(N·C_g²)`` per group: linear in ``N``.

Scale: the official code scales by ``s = C_g^{-1/2}`` (``head_dim ** -0.5``), as the paper's ``√C_g``, not by
``N^{-1/2}`` (the ``dynamic_scale`` of the later ``ChannelAttentionV2`` of Florence-2 / timm, which ``scale=``
accepts). Which projection plays which role in the official code is the module's business
(``attnjax.nn.vision.davit.ChannelAttention``).

* ``channel_group_attention_reference``: the ``C_g × C_g`` maps from the definition, in float32.
* ``channel_group_attention``: the same maps through ``attnjax.attention`` with tokens and channels swapped
  (``C_g`` "tokens" of head dimension ``N``), so every attention path serves it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.checks import describe


def check_channel_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """``ValueError``/``TypeError`` unless q ``[B, N, G, Cq]``, k and v ``[B, N, G, Ck]``, one floating dtype."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 4:
            raise ValueError(f"{name} must have shape [batch, positions, groups, group_channels], got {describe(a)}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:3] != k.shape[:3]:
        raise ValueError(f"q must be [B, N, G, Cq] and k, v [B, N, G, Ck] (the same positions and groups): "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")


def channel_group_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                      scale: Optional[float] = None) -> jax.Array:
    """Channel group attention from its definition (DaViT, sec. 3.2)::

        A[b, g] = softmax_{c'}(s · Σ_n q[b, n, g, c] k[b, n, g, c'])      # [Cq, Ck] per group
        out[b, n, g, c] = Σ_{c'} A[b, g, c, c'] · v[b, n, g, c']

    in float32. Time ``O(B·N·G·Cq·Ck)``, memory the ``[B, G, Cq, Ck]`` maps.

    Args:
      q: ``[B, N, G, Cq]``; k, v: ``[B, N, G, Ck]`` (``N`` positions, ``G`` groups of channels).
      scale: ``s``, default ``1/√Ck`` (the official code's ``head_dim ** -0.5``).

    Returns:
      ``[B, N, G, Cq]`` in q's dtype.
    """
    check_channel_qkv(q, k, v)
    s = k.shape[-1] ** -0.5 if scale is None else scale
    hi = jax.lax.Precision.HIGHEST
    qf, kf, vf = (a.astype(jnp.float32) for a in (q, k, v))
    maps = jax.nn.softmax(s * jnp.einsum("bngc,bngd->bgcd", qf, kf, precision=hi), axis=-1)
    return jnp.einsum("bgcd,bngd->bngc", maps, vf, precision=hi).astype(q.dtype)


def channel_group_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                            implementation: str = "auto") -> jax.Array:
    """Channel group attention (DaViT, sec. 3.2) as softmax attention over channel tokens.

    ``out = (attention(qᵀ, kᵀ, vᵀ))ᵀ`` where ``xᵀ [B, C, G, N]`` swaps positions and channels: ``Cq`` query
    channels attend over ``Ck`` key channels in each group (head), the head dimension being the ``N`` positions;
    the same maps as ``channel_group_attention_reference``. Time ``O(B·N·G·Cq·Ck)``, linear in ``N``; memory
    the transposed copies of q, k, v and the output (``O(B·N·C)``) plus what the attention path holds (on the
    blocked ``"xla"`` path, tiles of the ``C_g × C_g`` logits).

    Args:
      q, k, v, scale: as ``channel_group_attention_reference``.
      implementation: as ``attnjax.attention`` (a path that can't take a head dimension of ``N`` raises
        ``NotImplementedError``; ``"auto"`` falls back).

    Returns:
      ``[B, N, G, Cq]`` in q's dtype.
    """
    check_channel_qkv(q, k, v)
    s = k.shape[-1] ** -0.5 if scale is None else scale
    qt, kt, vt = (jnp.transpose(a, (0, 3, 2, 1)) for a in (q, k, v))
    return jnp.transpose(attention(qt, kt, vt, scale=s, implementation=implementation), (0, 3, 2, 1))


__all__ = ["check_channel_qkv", "channel_group_attention_reference", "channel_group_attention"]
