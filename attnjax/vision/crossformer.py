"""CrossFormer's long short distance attention (LSDA), dynamic position bias (DPB) and cross-scale embedding (CEL).

Wang et al., "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention", ICLR 2022, sec. 3
(official code: cheerss/CrossFormer, ``models/crossformer.py``; CrossFormer++, Wang et al., IEEE TPAMI 2023, is
the follow-up in the same repository).

* Cross-scale embedding layer (sec. 3.1, Fig. 2, Table 1): several convolutions with kernels of different sizes
  and one stride sample patches of several scales around each position; their outputs are concatenated along
  the channels, larger kernels getting fewer channels (``cross_scale_embedding``, ``cross_scale_channels``).
* LSDA (sec. 3.2, Fig. 3): successive blocks alternate two kinds of grouped self-attention. Short-distance
  attention (SDA) groups ``G × G`` adjacent embeddings (non-overlapping windows); long-distance attention (LDA)
  samples the map with a fixed interval ``I``, so a group is the embeddings that share ``(y mod I, x mod I)``,
  ``⌈H/I⌉ × ⌈W/I⌉`` of them (``lsda_attention``, on ``attnjax.vision.window``'s window and grid attention).
* DPB (sec. 3.3): the relative position bias of each group comes from an MLP applied to the offsets
  ``(Δy, Δx)``, so one set of weights serves any group size. ``relative_offsets`` lists the
  ``(2Gh − 1)·(2Gw − 1)`` offsets of a group (the official code's "mother set", Swin's table order); the MLP's
  output ``[(2Gh − 1)·(2Gw − 1), heads]`` is gathered into ``[heads, Gh·Gw, Gh·Gw]`` by Swin's relative position
  index (query − key), as ``relative_position_bias``; the MLP lives in ``attnjax.nn.vision.crossformer``.

Maps whose sides are not multiples of the group (SDA) or of the interval (LDA) are zero-padded at the bottom and
right and the padded keys masked, as CrossFormer++'s code does for SDA. For LDA, CrossFormer++ pads to multiples
of ``I·G`` and samples within each ``I·G`` block; here the groups are the residue classes modulo ``I`` over the
whole map (the ICLR definition), which coincides with it whenever ``H`` and ``W`` are multiples of ``I·G``
(every configuration of the paper: ``H = I·G``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.checks import check_positive, describe
from attnjax.vision.window import (Window, check_map, grid_attention, grid_attention_reference, grid_shape,
                                   window_attention, window_attention_reference, window_shape)

GROUP_SIZE = 7
"""SDA's group size ``G`` in every stage of the paper (Table 1)."""

INTERVAL = 8
"""LDA's interval ``I`` of the paper's first stage at 224×224 (56 = 8·7); 4, 2, 1 in stages 2-4."""


def relative_offsets(group: Window) -> np.ndarray:
    """DPB's inputs: the offsets ``(Δy, Δx)`` of a ``Gh × Gw`` group, float32 ``[(2Gh − 1)·(2Gw − 1), 2]``.

    Row ``(Δy + Gh − 1)·(2Gw − 1) + Δx + Gw − 1`` holds ``(Δy, Δx)`` for ``−Gh < Δy < Gh``, ``−Gw < Δx < Gw``: the
    official code's ``biases`` (CrossFormer, sec. 3.3), in the row order of Swin's relative position table, so
    ``attnjax.vision.window.relative_position_bias`` gathers the MLP's output into ``[heads, Gh·Gw, Gh·Gw]``.
    """
    gh, gw = window_shape(group, "group")
    dy, dx = np.meshgrid(np.arange(1 - gh, gh), np.arange(1 - gw, gw), indexing="ij")
    return np.stack([dy.ravel(), dx.ravel()], axis=-1).astype(np.float32)


def lsda_group(height: int, width: int, *, long_distance: bool, group_size: Window = GROUP_SIZE,
               interval: Window = INTERVAL) -> tuple[int, int]:
    """The group shape ``(Gh, Gw)`` of LSDA on an ``H × W`` map: ``G`` for SDA, ``(⌈H/Ih⌉, ⌈W/Iw⌉)`` for LDA."""
    check_positive(height=height, width=width)
    if long_distance:
        return grid_shape(height, width, interval=interval)[1]
    return window_shape(group_size, "group_size")


def lsda_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, long_distance: bool = False,
                   group_size: Window = GROUP_SIZE, interval: Window = INTERVAL,
                   position_table: Optional[jax.Array] = None, scale: Optional[float] = None,
                   implementation: str = "auto") -> jax.Array:
    """CrossFormer's LSDA (sec. 3.2): multi-head softmax attention within short- or long-distance groups.

    ``out[p] = Σ_{p' ∈ g(p)} softmax_{p'}(scale·q[p]·k[p'] + B[pos(p) − pos(p')]) v[p']`` per head, where ``g(p)`` is
    ``p``'s group and ``pos`` a pixel's ``(row, column)`` inside it:

    * SDA (``long_distance=False``): ``g(p)`` is ``p``'s ``G × G`` window of adjacent pixels (``pos(y, x) =
      (y mod Gh, x mod Gw)``), through ``attnjax.vision.window.window_attention``;
    * LDA (``long_distance=True``): ``g(p)`` is every pixel ``(y', x')`` with ``y' ≡ y (mod Ih)``,
      ``x' ≡ x (mod Iw)`` (``pos(y, x) = (y // Ih, x // Iw)``), through ``grid_attention``.

    Fast path: the groups are folded into the batch and attended by ``attnjax.attention``, ``O(H·W·Gh·Gw)`` logits
    per head computed blockwise, ``O(B·H·W·heads·(D + Dv))`` memory besides; no ``[H·W, H·W]`` array.

    Args:
      q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``; ``H``, ``W`` need not be multiples of ``G``/``I``.
      long_distance: LDA if True, else SDA (the paper alternates them, SDA first).
      group_size: ``G`` or ``(Gh, Gw)`` for SDA. interval: ``I`` or ``(Ih, Iw)`` for LDA.
      position_table: ``[(2Gh − 1)·(2Gw − 1), heads]``, the DPB's output on ``relative_offsets(group)`` with
        ``group = lsda_group(H, W, ...)``, or None for no position bias.
      scale: logit scale, default ``1/√D`` (the official code's ``head_dim ** -0.5``).
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    if long_distance:
        return grid_attention(q, k, v, interval=interval, relative_bias_table=position_table, scale=scale,
                              implementation=implementation)
    return window_attention(q, k, v, window_size=group_size, relative_bias_table=position_table, scale=scale,
                            implementation=implementation)


def lsda_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, long_distance: bool = False,
                             group_size: Window = GROUP_SIZE, interval: Window = INTERVAL,
                             position_table: Optional[jax.Array] = None,
                             scale: Optional[float] = None) -> jax.Array:
    """``lsda_attention`` as one dense masked softmax over all ``H·W`` tokens (``O((H·W)²)`` memory; for tests).

    Arguments and result as ``lsda_attention`` (``window_attention_reference`` / ``grid_attention_reference``).
    """
    if long_distance:
        return grid_attention_reference(q, k, v, interval=interval, relative_bias_table=position_table, scale=scale)
    return window_attention_reference(q, k, v, window_size=group_size, relative_bias_table=position_table,
                                      scale=scale)


def cross_scale_channels(out_channels: int, num_kernels: int) -> tuple[int, ...]:
    """CEL's channel split (CrossFormer, Table 1): ``D/2, D/4, …, D/2ⁿ⁻¹, D/2ⁿ⁻¹`` for ``n`` kernels, smallest first.

    The ``i``-th of ``n`` kernels (ascending size) gets ``D / 2^(i+1)`` channels and the last the same as the one
    before it (official ``PatchEmbed``: 4, 8, 16, 32 → D/2, D/4, D/8, D/8; ``PatchMerging``: 2, 4 → D/2, D/2).
    ``D`` must be a multiple of ``2ⁿ⁻¹``.
    """
    check_positive(out_channels=out_channels, num_kernels=num_kernels)
    if out_channels % 2 ** (num_kernels - 1):
        raise ValueError(f"out_channels ({out_channels}) must be a multiple of 2^(kernels − 1) = "
                         f"{2 ** (num_kernels - 1)} to split over {num_kernels} kernels")
    return tuple(out_channels // 2 ** min(i + 1, num_kernels - 1) for i in range(num_kernels))


def cross_scale_embedding(x: jax.Array, kernels: Sequence[jax.Array], biases: Sequence[Optional[jax.Array]], *,
                          stride: int) -> jax.Array:
    """CrossFormer's cross-scale embedding layer (sec. 3.1, Fig. 2): convolutions of several sizes, concatenated.

    ``y = concat_i(conv(x, kernel_i, stride=s, padding=(K_i − s)/2) + b_i)`` over the channels: every output
    position sees ``K_i × K_i`` patches centred on the same ``s × s`` cell, for each kernel size ``K_i``.

    Args:
      x: ``[B, H, W, C_in]`` with ``H, W ≥ s``.
      kernels: ``[K_i, K_i, C_in, C_i]`` each (HWIO), ``K_i ≥ s`` and ``K_i − s`` even (so all outputs are
        ``⌊H/s⌋ × ⌊W/s⌋``; the paper's 4, 8, 16, 32 at stride 4 and 2, 4 at stride 2 are).
      biases: ``[C_i]`` or None, one per kernel.
      stride: ``s``.

    Returns:
      ``[B, ⌊H/s⌋, ⌊W/s⌋, Σ C_i]`` in ``x``'s dtype.
    """
    check_map("x", x)
    check_positive(stride=stride)
    if len(kernels) == 0 or len(kernels) != len(biases):
        raise ValueError(f"kernels and biases must be non-empty and of one length, got {len(kernels)} kernels and "
                         f"{len(biases)} biases")
    if x.shape[1] < stride or x.shape[2] < stride:
        raise ValueError(f"x ({x.shape[1]}x{x.shape[2]}) must be at least stride ({stride}) on each side")
    outputs = []
    for i, (kernel, bias) in enumerate(zip(kernels, biases)):
        if (getattr(kernel, "ndim", None) != 4 or kernel.shape[0] != kernel.shape[1]
                or kernel.shape[2] != x.shape[-1] or kernel.shape[0] < stride or (kernel.shape[0] - stride) % 2):
            raise ValueError(f"kernels[{i}] must have shape [K, K, {x.shape[-1]}, C_out] with K >= stride ({stride}) "
                             f"and K - stride even, got {describe(kernel)}")
        if bias is not None and jnp.shape(bias) != (kernel.shape[3],):
            raise ValueError(f"biases[{i}] must have shape [{kernel.shape[3]}], got {describe(bias)}")
        pad = (kernel.shape[0] - stride) // 2
        y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(stride, stride),
                                         padding=((pad, pad), (pad, pad)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        outputs.append(y if bias is None else y + bias.astype(x.dtype))
    return jnp.concatenate(outputs, axis=-1)


__all__ = ["GROUP_SIZE", "INTERVAL", "relative_offsets", "lsda_group", "lsda_attention", "lsda_attention_reference",
           "cross_scale_channels", "cross_scale_embedding"]
