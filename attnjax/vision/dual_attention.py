"""DANet's position and channel attention modules (Fu et al., "Dual Attention Network for Scene Segmentation",
CVPR 2019, sec. 3.2-3.3, eqs. 1-4), as used by Sinha & Dolz, "Multi-scale self-guided attention for medical
image segmentation" (IEEE JBHI 2020).

* PAM (eqs. 1-2): ``B, C, D`` are 1×1 convolutions of ``A``; ``E_i = α Σ_j softmax_j(B_i · C_j) D_j + A_i``
  over the ``N = H·W`` positions, computed with ``attnjax.attention`` (one head, scale 1), so a long ``N``
  never forms the dense ``[N, N]`` map.
* CAM (eqs. 3-4): ``E_c = β Σ_d softmax_d(A_c · A_d) A_d + A_c`` over the ``C`` channels (each channel a vector
  of ``N`` values), the small ``[C, C]`` map formed densely.

Shapes: ``x [B, H, W, C]`` (NHWC).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.api import attention

CAM_ENERGIES = ("similarity", "max_minus")
"""CAM's logits: ``"similarity"``, the paper's ``A_c · A_d`` (eq. 3); ``"max_minus"``, the official code's
``max_d(A_c · A_d) - A_c · A_d`` (``CAM_Module`` in github.com/junfu1115/DANet, ``encoding/nn/da_att.py``,
copied by Sinha & Dolz), whose softmax equals ``softmax_d(-A_c · A_d)``: it favours the least similar
channels."""


def position_attention(x: jax.Array, wb: jax.Array, bb: Optional[jax.Array], wc: jax.Array, bc: Optional[jax.Array],
                       wd: jax.Array, bd: Optional[jax.Array], alpha: jax.Array,
                       implementation: str = "auto") -> jax.Array:
    """PAM: ``E_i = α Σ_j softmax_j(B_i · C_j) D_j + A_i`` (Fu et al. 2019, eqs. 1-2).

    Eq. 1 names the two reduced maps the other way round (``s_ji ∝ exp(B_i · C_j)``, normalized over ``i``,
    is position ``i``'s weight in output ``j``); this is the official code's form, queries ``B`` from
    ``query_conv`` and keys ``C`` from ``key_conv`` (the same family: the two learned 1×1 convolutions swap
    names).

    Args:
      x: ``A [B, H, W, C]``.
      wb, bb: ``[C, C']``, ``[C']`` or ``None``: the query map ``B`` (``C' = C/8`` in the paper).
      wc, bc: ``[C, C']``, ``[C']`` or ``None``: the key map ``C`` (a bias here cancels in the softmax).
      wd, bd: ``[C, C]``, ``[C]`` or ``None``: the value map ``D``.
      alpha: ``α []``, the learned scale (0 at initialization in the paper).
      implementation: ``attnjax.attention``'s (``"auto"``: blocked, ``O(N)`` memory, where available).

    Returns:
      ``[B, H, W, C]``.
    """
    Bn, H, W, C = x.shape
    a = x.reshape(Bn, H * W, C)

    def conv1x1(w, b):
        y = a @ w.astype(x.dtype)
        return (y if b is None else y + b.astype(x.dtype))[:, :, None, :]

    out = attention(conv1x1(wb, bb), conv1x1(wc, bc), conv1x1(wd, bd), scale=1.0, implementation=implementation)
    return (alpha.astype(x.dtype) * out.reshape(Bn, H, W, C) + x).astype(x.dtype)


def channel_attention(x: jax.Array, beta: jax.Array, energy: str = "similarity") -> jax.Array:
    """CAM: ``E_c = β Σ_d softmax_d(A_c · A_d) A_d + A_c`` (Fu et al. 2019, eqs. 3-4); ``A_c`` is channel ``c``'s
    map flattened to ``N = H·W`` values.

    Args:
      x: ``A [B, H, W, C]``.
      beta: ``β []``, the learned scale (0 at initialization in the paper).
      energy: "similarity" (eq. 3) or "max_minus" (the official code, ``CAM_ENERGIES``).

    Returns:
      ``[B, H, W, C]``; the ``[C, C]`` logits, softmax and sum in float32.
    """
    if energy not in CAM_ENERGIES:
        raise ValueError(f"energy must be one of {CAM_ENERGIES}, got {energy!r}")
    Bn, H, W, C = x.shape
    a = x.reshape(Bn, H * W, C).astype(jnp.float32)
    logits = jnp.einsum("bnc,bnd->bcd", a, a)
    if energy == "max_minus":
        logits = jnp.max(logits, axis=-1, keepdims=True) - logits
    out = jnp.einsum("bcd,bnd->bnc", jax.nn.softmax(logits, axis=-1), a).reshape(Bn, H, W, C)
    return (beta.astype(jnp.float32) * out + x.astype(jnp.float32)).astype(x.dtype)


__all__ = ["CAM_ENERGIES", "position_attention", "channel_attention"]
