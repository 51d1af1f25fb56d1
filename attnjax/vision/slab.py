"""SLAB's simplified linear attention (SLA): ReLU-kernel linear attention plus a depth-wise convolution of V.

Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
Normalization", ICML 2024 (arXiv 2405.11582), sec. 3 (SLA). Only the abstract and summaries of the paper were
available here, so subsection and equation numbers are not cited; the formulas follow the official code. With the
ReLU kernel ``φ = ReLU`` (Q, K, V from the block's projections)::

    O_i = Σ_j (φ(Q_i)·φ(K_j)) V_j / (Σ_j φ(Q_i)·φ(K_j) + ε)  +  DWC(V)_i

over all ``N = H·W`` pixels of the map, per head. ``DWC`` is a depth-wise ``k × k`` convolution (``k = 5``) over
each head's ``Dv`` channels with one kernel shared by every head, stride 1 and zero padding ``⌊k/2⌋`` (the
official code, xinghaochen/SLAB ``SimplifiedLinearAttention``: ``nn.Conv2d(head_dim, head_dim, 5,
groups=head_dim)`` applied to ``V`` with the heads folded into the batch). There is no score scale, and
``ε = 1e-6`` as in the official code (``z = 1 / (q·Σ_j k_j + 1e-6)``), which is also
``attnjax.linear.linear_attention.NORMALIZER_EPS``. The learned position encoding that the official code adds
to K before the ReLU has parameters and lives in the module (``attnjax.nn.vision.slab``).

Paths: ``simplified_linear_attention_reference`` forms the ``[N, N]`` matrix ``φ(Q)φ(K)ᵀ``;
``simplified_linear_attention`` computes it right product first through ``attnjax.linear.linear_attention``
(``feature_map="relu"``, ``causal=False``, ``normalize=True``, ``scale=1``): ``φ(K)ᵀ[V, 1]`` first, then
``φ(Q)`` times it, O(N·D·Dv) time and an O(heads·D·Dv) state, never an ``[N, N]`` array.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.checks import check_image_qkv, describe
from attnjax.linear.linear_attention import linear_attention
from attnjax.vision.large_kernel import depthwise_conv

SLA_EPSILON = 1e-6
"""``ε`` of the SLA normalizer, the official code's ``1e-6``."""


def check_sla_inputs(q: jax.Array, k: jax.Array, v: jax.Array, dwc_kernel: jax.Array,
                     dwc_bias: Optional[jax.Array]) -> None:
    """``ValueError`` unless q, k ``[B, H, W, heads, D]``, v ``[B, H, W, heads, Dv]``, ``dwc_kernel [k, k, 1, Dv]``
    with ``k`` odd and ``dwc_bias [Dv]`` or None; ``TypeError`` unless they are floating point."""
    check_image_qkv(q, k, v)
    if not jnp.issubdtype(dwc_kernel.dtype, jnp.floating):
        raise TypeError(f"dwc_kernel must be a floating-point array, got {describe(dwc_kernel)}")
    dv = v.shape[-1]
    if getattr(dwc_kernel, "ndim", None) != 4 or dwc_kernel.shape[2:] != (1, dv):
        raise ValueError(f"dwc_kernel must have shape [k, k, 1, Dv={dv}] (depth-wise over each head's channels, "
                         f"HWIO), got {describe(dwc_kernel)}")
    if dwc_kernel.shape[0] % 2 == 0 or dwc_kernel.shape[1] % 2 == 0:
        raise ValueError(f"dwc_kernel must have odd spatial sizes (the convolution keeps H and W), got "
                         f"{describe(dwc_kernel)}")
    if dwc_bias is not None and jnp.shape(dwc_bias) != (dv,):
        raise ValueError(f"dwc_bias must have shape [Dv] = [{dv}], got {describe(dwc_bias)}")


def value_convolution(v: jax.Array, dwc_kernel: jax.Array, dwc_bias: Optional[jax.Array] = None) -> jax.Array:
    """SLA's ``DWC(V)``: every head's ``[H, W, Dv]`` map convolved depth-wise with the same kernel.

    ``out[b, y, x, h, c] = Σ_{r, s} v[b, y + r − ⌊k/2⌋, x + s − ⌊k/2⌋, h, c] · dwc_kernel[r, s, 0, c] + dwc_bias[c]``
    (zeros outside the map).

    Args:
      v: ``[B, H, W, heads, Dv]``.
      dwc_kernel: ``[k, k, 1, Dv]``, odd ``k`` (HWIO of a depth-wise ``nnx.Conv`` over ``Dv`` channels).
      dwc_bias: ``[Dv]`` or None.

    Returns:
      ``[B, H, W, heads, Dv]`` in v's dtype.
    """
    B, H, W, heads, dv = v.shape
    folded = v.transpose(0, 3, 1, 2, 4).reshape(B * heads, H, W, dv)
    bias = None if dwc_bias is None else dwc_bias.astype(v.dtype)
    out = depthwise_conv(folded, dwc_kernel.astype(v.dtype), bias)
    return out.reshape(B, heads, H, W, dv).transpose(0, 2, 3, 1, 4)


def simplified_linear_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, dwc_kernel: jax.Array,
                                          dwc_bias: Optional[jax.Array] = None) -> jax.Array:
    """SLA written plainly (SLAB, sec. 3): the ``[N, N]`` ReLU-kernel weights, row-normalized, plus ``DWC(V)``.

    ``A = ReLU(Q) ReLU(K)ᵀ`` per head over the ``N = H·W`` pixels, ``O = A V / (A 1 + ε) + DWC(V)``, float32,
    ``ε = SLA_EPSILON``. Memory: the whole ``[B, heads, N, N]`` matrix.

    Args:
      q, k: ``[B, H, W, heads, D]`` (before the ReLU); v: ``[B, H, W, heads, Dv]``.
      dwc_kernel: ``[k, k, 1, Dv]``, odd ``k``; dwc_bias: ``[Dv]`` or None (see ``value_convolution``).

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    check_sla_inputs(q, k, v, dwc_kernel, dwc_bias)
    B, H, W, heads, _ = q.shape
    fq, fk, vf = (a.reshape(B, H * W, heads, a.shape[-1]).astype(jnp.float32) for a in (q, k, v))
    weights = jnp.einsum("bihc,bjhc->bhij", jax.nn.relu(fq), jax.nn.relu(fk), precision=jax.lax.Precision.HIGHEST)
    numerator = jnp.einsum("bhij,bjhd->bihd", weights, vf, precision=jax.lax.Precision.HIGHEST)
    out = numerator / (weights.sum(-1).transpose(0, 2, 1)[..., None] + SLA_EPSILON)
    conv = value_convolution(v.astype(jnp.float32), dwc_kernel.astype(jnp.float32),
                             None if dwc_bias is None else dwc_bias.astype(jnp.float32))
    return (out.reshape(v.shape) + conv).astype(q.dtype)


def simplified_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, dwc_kernel: jax.Array,
                                dwc_bias: Optional[jax.Array] = None, *, implementation: str = "auto") -> jax.Array:
    """SLA (SLAB, sec. 3), right product first: ``O = ReLU(Q)(ReLU(K)ᵀV) / (ReLU(Q)(ReLU(K)ᵀ1) + ε) + DWC(V)``.

    The attention term is ``attnjax.linear.linear_attention(feature_map="relu", causal=False, normalize=True,
    scale=1)`` on the pixels flattened into a sequence (its normalizer ``ε`` is ``SLA_EPSILON``); the
    convolution is ``value_convolution``. Cost: O(B·heads·N·D·Dv) time for the attention plus
    O(B·heads·N·Dv·k²) for the convolution; memory O(B·heads·D·(Dv + 1)) for the ``φ(K)ᵀ[V, 1]`` state beyond
    the inputs and output, no ``[N, N]`` array.

    Args:
      q, k: ``[B, H, W, heads, D]`` (before the ReLU); v: ``[B, H, W, heads, Dv]``.
      dwc_kernel: ``[k, k, 1, Dv]``, odd ``k``; dwc_bias: ``[Dv]`` or None.
      implementation: ``linear_attention``'s path for the attention term: "xla" (right product), "reference"
        (its quadratic form) or "auto".

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    check_sla_inputs(q, k, v, dwc_kernel, dwc_bias)
    B, H, W, heads, _ = q.shape
    out = linear_attention(*(a.reshape(B, H * W, heads, a.shape[-1]) for a in (q, k, v)), feature_map="relu",
                           causal=False, normalize=True, scale=1.0, implementation=implementation)
    return (out.reshape(v.shape) + value_convolution(v, dwc_kernel, dwc_bias)).astype(q.dtype)


__all__ = ["SLA_EPSILON", "check_sla_inputs", "value_convolution", "simplified_linear_attention_reference",
           "simplified_linear_attention"]
