"""Non-overlapping window attention on NHWC feature maps: partition into windows, attend within each, merge.

Window (local) self-attention splits an ``H × W`` map into non-overlapping ``wh × ww`` windows and runs
multi-head attention on the ``wh·ww`` tokens of each window separately (Liu et al., "Swin Transformer:
Hierarchical Vision Transformer using Shifted Windows", ICCV 2021, sec. 3.2, "Self-attention in
non-overlapped windows"); MOAT uses it without the shift (Yang et al., ICLR 2023: its MBConv exchanges
information across windows).

* ``window_partition``: ``[B, H, W, C] -> [B·nW, wh·ww, C]``, the windows folded into the batch, zero-padding
  the bottom and right edges up to multiples of the window (``nW = ⌈H/wh⌉·⌈W/ww⌉``).
* ``window_merge``: the inverse, ``[B·nW, wh·ww, C] -> [B, H, W, C]``, cropping the padding.
* ``window_valid``: which tokens of each window are real pixels (not padding).
* ``relative_position_bias``: Swin's learned relative position bias ``B[h, i, j] = table[h, Δy, Δx]`` (eq. 4).
* ``window_attention``: per-window multi-head softmax attention through ``attnjax.attention``, padding keys masked.

Order of the windows: batch-major, then window rows, then window columns (``b·nH·nW + i·nW + j``); tokens
inside a window are row-major. Padding is zeros, as Swin's official code pads; ``window_attention`` masks the
padded keys so the result is attention over the real pixels of each (possibly cropped) border window.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import describe

Window = Union[int, tuple[int, int]]
"""A window size: ``w`` (square) or ``(wh, ww)``."""


def window_shape(window: Window) -> tuple[int, int]:
    """``(wh, ww)`` from ``w`` or ``(wh, ww)``; ``ValueError`` naming ``window`` unless positive ints."""
    pair = (window, window) if isinstance(window, (int, np.integer)) else window
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0 for w in pair)):
        raise ValueError(f"window must be a positive int or a pair (height, width) of positive ints, "
                         f"got {describe(window)}")
    return int(pair[0]), int(pair[1])


def window_grid(height: int, width: int, window: Window) -> tuple[int, int]:
    """``(nH, nW) = (⌈H/wh⌉, ⌈W/ww⌉)``: the number of windows along each axis, padding included."""
    wh, ww = window_shape(window)
    return -(-height // wh), -(-width // ww)


def check_map(name: str, x: jax.Array) -> None:
    """``ValueError`` naming ``name`` unless ``x`` has rank 4 ``[batch, height, width, channels]``."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must have shape [batch, height, width, channels], got {describe(x)}")


def window_partition(x: jax.Array, window: Window) -> jax.Array:
    """Fold the non-overlapping windows of ``x`` into the batch (Swin, sec. 3.2).

    Args:
      x: ``[B, H, W, C]``.
      window: ``w`` or ``(wh, ww)``; ``H`` and ``W`` need not be multiples of it: the bottom and right
        edges are zero-padded to ``nH·wh × nW·ww`` first.

    Returns:
      ``[B·nH·nW, wh·ww, C]``; window ``(i, j)`` of image ``b`` is row ``b·nH·nW + i·nW + j``, its tokens
      row-major: ``out[b·nH·nW + i·nW + j, r·ww + s] = x_padded[b, i·wh + r, j·ww + s]``.
    """
    check_map("x", x)
    wh, ww = window_shape(window)
    B, H, W, C = x.shape
    nh, nw = window_grid(H, W, (wh, ww))
    x = jnp.pad(x, ((0, 0), (0, nh * wh - H), (0, nw * ww - W), (0, 0)))
    x = x.reshape(B, nh, wh, nw, ww, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B * nh * nw, wh * ww, C)


def window_merge(windows: jax.Array, window: Window, height: int, width: int) -> jax.Array:
    """The inverse of ``window_partition``: ``[B·nH·nW, wh·ww, C] -> [B, H, W, C]``, padding cropped.

    Args:
      windows: ``[B·nH·nW, wh·ww, C]`` in ``window_partition``'s order.
      window: the window size used to partition; height, width: ``H``, ``W`` of the map before padding.
    """
    wh, ww = window_shape(window)
    nh, nw = window_grid(height, width, (wh, ww))
    if getattr(windows, "ndim", None) != 3 or windows.shape[1] != wh * ww or windows.shape[0] % (nh * nw):
        raise ValueError(f"windows must have shape [B·{nh * nw}, {wh * ww}, C] for a {height}x{width} map in "
                         f"{wh}x{ww} windows, got {describe(windows)}")
    C = windows.shape[-1]
    B = windows.shape[0] // (nh * nw)
    x = windows.reshape(B, nh, nw, wh, ww, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, nh * wh, nw * ww, C)[:, :height, :width]


def window_valid(height: int, width: int, window: Window) -> np.ndarray:
    """``bool [nH·nW, wh·ww]``: True where a window's token is a pixel of the ``H × W`` map, False on padding."""
    wh, ww = window_shape(window)
    nh, nw = window_grid(height, width, (wh, ww))
    rows = np.arange(nh * wh) < height
    cols = np.arange(nw * ww) < width
    valid = (rows[:, None] & cols[None, :]).reshape(nh, wh, nw, ww).transpose(0, 2, 1, 3)
    return valid.reshape(nh * nw, wh * ww)


def relative_position_bias(table: jax.Array, window: Window) -> jax.Array:
    """Swin's relative position bias inside a window (Liu et al. 2021, sec. 3.2, eq. 4).

    ``B[h, i, j] = table[h, y_i − y_j + wh − 1, x_i − x_j + ww − 1]`` for tokens ``i``, ``j`` of a
    ``wh × ww`` window at rows/columns ``(y, x)``: the offset of the query from the key. (MOAT's official
    code indexes by key − query, i.e. ``table[:, ::-1, ::-1]`` of this.)

    Args:
      table: ``[heads, 2·wh − 1, 2·ww − 1]``, the learned biases.
      window: ``w`` or ``(wh, ww)``.

    Returns:
      ``[heads, wh·ww, wh·ww]``.
    """
    wh, ww = window_shape(window)
    if getattr(table, "ndim", None) != 3 or table.shape[1:] != (2 * wh - 1, 2 * ww - 1):
        raise ValueError(f"table must have shape [heads, {2 * wh - 1}, {2 * ww - 1}] for a {wh}x{ww} window, "
                         f"got {describe(table)}")
    y, x = np.divmod(np.arange(wh * ww), ww)
    return table[:, y[:, None] - y[None, :] + wh - 1, x[:, None] - x[None, :] + ww - 1]


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: Window, *, bias: Optional[jax.Array] = None,
                     scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Multi-head softmax attention within non-overlapping windows (Swin, sec. 3.2; MOAT).

    ``out[b, p] = Σ_{p' ∈ win(p)} softmax_{p'}(scale·q[b, p]·k[b, p'] + bias) v[b, p']`` for each head, where
    ``win(p)`` is the set of pixels of the map in ``p``'s window (a border window is cropped by the map's
    edge: padded keys are masked out). The windows are folded into the batch and attended with
    ``attnjax.attention``.

    Args:
      q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``.
      window: ``w`` or ``(wh, ww)``; ``H``, ``W`` need not be multiples of it.
      bias: ``[heads, wh·ww, wh·ww]`` added to every window's logits (e.g. ``relative_position_bias``), or None.
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 5:
            raise ValueError(f"{name} must have shape [batch, height, width, heads, head_dim], got {describe(a)}")
    if q.shape[:4] != k.shape[:4] or k.shape[:4] != v.shape[:4] or q.shape[4] != k.shape[4]:
        raise ValueError(f"q, k, v must share [batch, height, width, heads] (and q, k head_dim): "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    wh, ww = window_shape(window)
    B, H, W, heads, D = q.shape
    T = wh * ww
    if bias is not None and jnp.shape(bias) != (heads, T, T):
        raise ValueError(f"bias must have shape [heads, wh·ww, wh·ww] = [{heads}, {T}, {T}], got {describe(bias)}")

    def windows(a: jax.Array) -> jax.Array:
        flat = window_partition(a.reshape(B, H, W, -1), (wh, ww))
        return flat.reshape(flat.shape[0], T, heads, a.shape[-1])

    mask = None
    valid = window_valid(H, W, (wh, ww))
    if not valid.all():
        mask = masks.Explicit(jnp.asarray(np.tile(valid, (B, 1)))[:, None, None, :])
    out = attention(windows(q), windows(k), windows(v), mask=mask, bias=bias, scale=scale,
                    implementation=implementation)
    Dv = v.shape[-1]
    return window_merge(out.reshape(out.shape[0], T, heads * Dv), (wh, ww), H, W).reshape(B, H, W, heads, Dv)


__all__ = ["Window", "window_shape", "window_grid", "window_partition", "window_merge", "window_valid",
           "relative_position_bias", "window_attention"]
