"""Strip self-attention (SSA) of S2AFormer: full-resolution queries over spatially reduced keys and values.

Xu et al., "S2AFormer: Strip Self-Attention for Efficient Vision Transformer", IEEE TIP 2025 (arXiv 2505.22195),
sec. III (the SSA of the Hybrid Perception Block). SSA "reduces the spatial dimensions of K and V while
compressing the channel dimensions of Q and K" (abstract):

* spatial reduction: a depth-wise ``rh × rw`` convolution with stride ``(rh, rw)`` turns the ``H × W`` map into
  ``h × w = ⌊H/rh⌋ × ⌊W/rw⌋`` tokens, from which K and V are projected (``spatial_reduction``);
* channel compression: Q and K are projected to ``d_k`` channels per head, fewer than V's ``d_v``;
* attention: ``out = softmax(scale · Q Kᵀ) V`` per head, an ``N × n`` map (``N = H·W`` queries, ``n = h·w``
  keys), a thin strip of the ``N × N`` map of full self-attention (``strip_attention``).

The method section of the paper was not available here (only its abstract and secondary summaries): the
placement of the depth-wise reduction (on the block input ``x``, before the K/V projections, as PVT's spatial
reduction), its kernel = stride = reduction ratio with no padding (PVT's ``Conv2d(k=r, s=r)``: the last
``H mod rh`` rows and ``W mod rw`` columns feed no key), and the absence of a normalization after it are
inferred, not read from the paper.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.checks import describe
from attnjax.vision.window import Window, check_map, window_shape


def reduced_grid(height: int, width: int, reduction: Window) -> tuple[int, int]:
    """``(h, w) = (⌊H/rh⌋, ⌊W/rw⌋)``: the key/value grid after a stride-``(rh, rw)`` reduction without padding."""
    rh, rw = window_shape(reduction)
    return height // rh, width // rw


def spatial_reduction(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """SSA's spatial reduction: a depth-wise ``rh × rw`` convolution with stride ``(rh, rw)``, no padding.

    ``y[b, i, j, c] = Σ_{r < rh, s < rw} x[b, i·rh + r, j·rw + s, c] · kernel[r, s, 0, c] + bias[c]``.

    Args:
      x: ``[B, H, W, C]`` with ``H ≥ rh`` and ``W ≥ rw``.
      kernel: ``[rh, rw, 1, C]`` (the HWIO layout of a depth-wise ``nnx.Conv``); its spatial size is the
        reduction ratio.
      bias: ``[C]`` or None.

    Returns:
      ``[B, ⌊H/rh⌋, ⌊W/rw⌋, C]`` in ``x``'s dtype.
    """
    check_map("x", x)
    C = x.shape[-1]
    if getattr(kernel, "ndim", None) != 4 or kernel.shape[2:] != (1, C):
        raise ValueError(f"kernel must have shape [rh, rw, 1, {C}] (depth-wise, HWIO) for x {describe(x)}, "
                         f"got {describe(kernel)}")
    if bias is not None and jnp.shape(bias) != (C,):
        raise ValueError(f"bias must have shape [{C}], got {describe(bias)}")
    rh, rw = kernel.shape[:2]
    if x.shape[1] < rh or x.shape[2] < rw:
        raise ValueError(f"x ({x.shape[1]}x{x.shape[2]}) must be at least as large as the {rh}x{rw} reduction")
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(rh, rw), padding="VALID",
                                     feature_group_count=C, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias.astype(x.dtype)


def check_strip_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """``ValueError`` unless q ``[B, H, W, heads, Dk]``, k ``[B, h, w, heads, Dk]``, v ``[B, h, w, heads, Dv]``."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 5:
            raise ValueError(f"{name} must have shape [batch, height, width, heads, head_dim], got {describe(a)}")
    if (k.shape[:4] != v.shape[:4] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
            or q.shape[4] != k.shape[4]):
        raise ValueError(f"q must be [B, H, W, heads, Dk], k [B, h, w, heads, Dk] and v [B, h, w, heads, Dv] "
                         f"(keys and values on the reduced grid): q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}")


def strip_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                              scale: Optional[float] = None) -> jax.Array:
    """SSA's attention written plainly (S2AFormer, sec. III): ``softmax(scale · Q Kᵀ) V`` over the reduced keys.

    ``out[b, p, h] = Σ_{p'} softmax_{p'}(scale · q[b, p, h] · k[b, p', h]) v[b, p', h]`` for every pixel ``p`` of
    the ``H × W`` map and every token ``p'`` of the reduced ``h × w`` grid, in float32. Memory: the whole
    ``[B, heads, H·W, h·w]`` logit map.

    Args:
      q: ``[B, H, W, heads, Dk]``; k: ``[B, h, w, heads, Dk]``; v: ``[B, h, w, heads, Dv]``.
      scale: logit scale, default ``1/√Dk``.

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    check_strip_qkv(q, k, v)
    B, H, W, heads, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = (a.reshape(B, -1, heads, a.shape[-1]).astype(jnp.float32) for a in (q, k, v))
    logits = scale * jnp.einsum("bthd,bshd->bhts", qf, kf, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), vf, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(B, H, W, heads, v.shape[-1]).astype(q.dtype)


def strip_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: Optional[float] = None,
                    implementation: str = "auto") -> jax.Array:
    """SSA's attention (S2AFormer, sec. III): every pixel attends to the ``h·w`` tokens of the reduced grid.

    The same formula as ``strip_attention_reference``, with the pixels flattened into a sequence and attended
    through ``attnjax.attention`` (``T = H·W`` queries, ``S = h·w`` keys, no mask). Memory: on the blocked
    ``"xla"`` path (what ``"auto"`` picks on CPU) one query tile × key tile of logits at a time plus the
    float32 softmax statistics, ``O(B·heads·H·W)``, never the ``[H·W, h·w]`` map.

    Args:
      q: ``[B, H, W, heads, Dk]`` (channel-compressed queries at full resolution).
      k: ``[B, h, w, heads, Dk]``; v: ``[B, h, w, heads, Dv]`` (projected from the reduced map).
      scale: logit scale, default ``1/√Dk``.
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    check_strip_qkv(q, k, v)
    B, H, W, heads, _ = q.shape
    out = attention(*(a.reshape(B, -1, heads, a.shape[-1]) for a in (q, k, v)), scale=scale,
                    implementation=implementation)
    return out.reshape(B, H, W, heads, v.shape[-1])


__all__ = ["reduced_grid", "spatial_reduction", "check_strip_qkv", "strip_attention_reference", "strip_attention"]
