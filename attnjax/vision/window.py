"""Window and grid attention on image-like token maps: Swin's (shifted) windows, MaxViT's grid, CrossFormer's LDA.

Window (local) self-attention splits an ``H × W`` map into non-overlapping ``wh × ww`` windows and runs
multi-head attention on the ``wh·ww`` tokens of each window separately (Liu et al., "Swin Transformer:
Hierarchical Vision Transformer using Shifted Windows", ICCV 2021, sec. 3.2); MOAT uses it without the shift
(Yang et al., ICLR 2023). Grid (dilated) attention groups tokens that lie a fixed interval apart (Tu et al.,
"MaxViT: Multi-Axis Vision Transformer", ECCV 2022, sec. 3.2, grid attention; Wang et al., "CrossFormer",
ICLR 2022, sec. 3.2, long-distance attention).

* ``window_partition`` / ``window_merge``: ``[B, H, W, C] <-> [B·nW, wh·ww, C]``, zero-padding the bottom and
  right edges up to multiples of the window (``nW = ⌈H/wh⌉·⌈W/ww⌉``); ``window_valid`` marks the real pixels.
* ``grid_partition`` / ``grid_merge``: the same for dilated groups: a group is the pixels that share
  ``(y mod Ih, x mod Iw)`` for the interval ``(Ih, Iw)``.
* ``relative_position_index`` / ``relative_position_bias``: Swin's learned relative position bias (eq. 4),
  with Swin's table layout ``[(2·wh − 1)·(2·ww − 1), heads]`` so that published weights load unchanged.
* ``window_attention`` (shifted windows included) and ``grid_attention``: multi-head softmax attention within
  each window or group through ``attnjax.attention``, with references written as one dense masked softmax over
  all ``H·W`` tokens.

Order of the windows: batch-major, then window rows, then window columns (``b·nH·nW + i·nW + j``); tokens
inside a window are row-major. Padding is zeros, as Swin's official code pads; the attention masks padded keys,
so a border window attends over its real pixels only. (Swin's code leaves padded keys unmasked, so its border
windows also attend to the projection biases of zero tokens: identical whenever the map is a multiple of the
window, the case of all its published models.)

Cost: the fast paths fold windows or groups into the batch: O(H·W·wh·ww) logits per head, computed tile by tile
by the blocked ``xla`` path (or the flash kernels), O(H·W) memory beyond the inputs; never an ``[HW, HW]`` array.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, ClassVar, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks, registry
from attnjax.api import attention
from attnjax.checks import check_image_qkv, describe

Window = Union[int, tuple[int, int]]
"""A window size (or grid size, or interval): ``w`` (square) or ``(wh, ww)``."""


def window_shape(window: Window, name: str = "window") -> tuple[int, int]:
    """``(wh, ww)`` from ``w`` or ``(wh, ww)``; ``ValueError`` naming ``name`` unless positive ints."""
    pair = (window, window) if isinstance(window, (int, np.integer)) else window
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0 for w in pair)):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints, "
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
    xp = np if isinstance(x, np.ndarray) else jnp
    wh, ww = window_shape(window)
    B, H, W, C = x.shape
    nh, nw = window_grid(H, W, (wh, ww))
    x = xp.pad(x, ((0, 0), (0, nh * wh - H), (0, nw * ww - W), (0, 0)))
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
    return window_partition(np.ones((1, height, width, 1), bool), window)[..., 0]


def grid_shape(height: int, width: int, *, interval: Optional[Window] = None,
               grid_size: Optional[Window] = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((Ih, Iw), (Gh, Gw))``: the interval between a group's pixels and the group's shape, from either.

    Given the interval ``I`` (CrossFormer's LDA), a group holds ``G = ⌈H/I⌉`` pixels per axis; given the group
    shape ``G`` (MaxViT's grid), the interval is ``I = ⌈H/G⌉``. Either way the map is padded to ``I·G ≥ H``.
    """
    if (interval is None) == (grid_size is None):
        raise ValueError(f"give exactly one of interval and grid_size, got interval={describe(interval)}, "
                         f"grid_size={describe(grid_size)}")
    if interval is not None:
        ih, iw = window_shape(interval, "interval")
        return (ih, iw), (-(-height // ih), -(-width // iw))
    gh, gw = window_shape(grid_size, "grid_size")
    return (-(-height // gh), -(-width // gw)), (gh, gw)


def grid_partition(x: jax.Array, interval: Window, group: Window) -> jax.Array:
    """Fold dilated groups into the batch (MaxViT's grid partition; CrossFormer's LDA grouping).

    Args:
      x: ``[B, H, W, C]`` (jax or NumPy), zero-padded at the bottom and right to ``Ih·Gh × Iw·Gw`` (``≥ H × W``).
      interval: ``(Ih, Iw)``, the distance between neighbouring pixels of a group.
      group: ``(Gh, Gw)``, the pixels of a group per axis.

    Returns:
      ``[B·Ih·Iw, Gh·Gw, C]``: group ``(r, s)`` of image ``b`` is row ``b·Ih·Iw + r·Iw + s`` and holds, row-major,
      the pixels ``(m·Ih + r, n·Iw + s)`` for ``m < Gh``, ``n < Gw``.
    """
    check_map("x", x)
    (ih, iw), (gh, gw) = window_shape(interval, "interval"), window_shape(group, "group")
    B, H, W, C = x.shape
    if H > ih * gh or W > iw * gw:
        raise ValueError(f"a {H}x{W} map does not fit {gh}x{gw} groups at interval {ih}x{iw}")
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.pad(x, ((0, 0), (0, ih * gh - H), (0, iw * gw - W), (0, 0)))
    x = x.reshape(B, gh, ih, gw, iw, C).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(B * ih * iw, gh * gw, C)


def grid_merge(groups: jax.Array, interval: Window, group: Window, height: int, width: int) -> jax.Array:
    """The inverse of ``grid_partition``: ``[B·Ih·Iw, Gh·Gw, C] -> [B, H, W, C]``, padding cropped."""
    (ih, iw), (gh, gw) = window_shape(interval, "interval"), window_shape(group, "group")
    if getattr(groups, "ndim", None) != 3 or groups.shape[1] != gh * gw or groups.shape[0] % (ih * iw):
        raise ValueError(f"groups must have shape [B·{ih * iw}, {gh * gw}, C], got {describe(groups)}")
    C = groups.shape[-1]
    B = groups.shape[0] // (ih * iw)
    x = groups.reshape(B, ih, iw, gh, gw, C).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(B, gh * ih, gw * iw, C)[:, :height, :width]


def relative_position_index(window: Window) -> np.ndarray:
    """Swin's ``relative_position_index``: int ``[wh·ww, wh·ww]``, ``(Δy + wh − 1)·(2·ww − 1) + Δx + ww − 1``.

    ``Δy = y_i − y_j``, ``Δx = x_i − x_j`` for tokens ``i`` (query), ``j`` (key) of a ``wh × ww`` window, row-major
    (Liu et al. 2021, sec. 3.2, "Relative position bias"; microsoft/Swin-Transformer ``WindowAttention``).
    """
    wh, ww = window_shape(window)
    y, x = np.divmod(np.arange(wh * ww), ww)
    return (y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + x[:, None] - x[None, :] + ww - 1


def relative_position_bias(table: jax.Array, window: Window) -> jax.Array:
    """Swin's relative position bias inside a window (Liu et al. 2021, sec. 3.2, eq. 4).

    ``B[h, i, j] = table[relative_position_index(window)[i, j], h]``: the bias for the offset of query ``i``
    from key ``j``. (MOAT's official code indexes by key − query, a flip of this table.)

    Args:
      table: ``[(2·wh − 1)·(2·ww − 1), heads]``, the learned biases in Swin's layout.
      window: ``w`` or ``(wh, ww)``.

    Returns:
      ``[heads, wh·ww, wh·ww]``.
    """
    wh, ww = window_shape(window)
    rows = (2 * wh - 1) * (2 * ww - 1)
    if getattr(table, "ndim", None) != 2 or table.shape[0] != rows:
        raise ValueError(f"relative_bias_table must have shape [(2·wh − 1)·(2·ww − 1), heads] = [{rows}, heads] "
                         f"for a {wh}x{ww} window, got {describe(table)}")
    return jnp.moveaxis(jnp.asarray(table)[relative_position_index((wh, ww))], -1, 0)


def shifted_window_regions(height: int, width: int, window: Window, shift: Window) -> np.ndarray:
    """Swin's attention-mask regions of the cyclically shifted, padded map: int ``[Hp, Wp]``.

    After padding to ``Hp × Wp`` (multiples of the window) and rolling by ``−shift``, pixels in the same window
    attend to each other only if they carry the same label (Swin, sec. 3.2, "Efficient batch computation for
    shifted configuration", Fig. 4): per axis the slices ``[0, Hp − wh)``, ``[Hp − wh, Hp − sh)``, ``[Hp − sh, Hp)``
    are regions 0, 1, 2, and the label is ``3·row_region + column_region``. Padding pixels get ``−1``, so real
    queries never attend to them.
    """
    (wh, ww), (sh, sw) = window_shape(window), window_shape_or_zero(shift)
    nh, nw = window_grid(height, width, (wh, ww))
    hp, wp = nh * wh, nw * ww

    def axis_regions(length: int, w: int, s: int) -> np.ndarray:
        region = np.zeros(length, np.int32)
        if s:
            region[length - w:length - s], region[length - s:] = 1, 2
        return region

    labels = 3 * axis_regions(hp, wh, sh)[:, None] + axis_regions(wp, ww, sw)[None, :]
    real = np.zeros((hp, wp), bool)
    real[:height, :width] = True
    return np.where(np.roll(real, (-sh, -sw), axis=(0, 1)), labels, -1)


def window_shape_or_zero(shift: Window) -> tuple[int, int]:
    """``(sh, sw)`` from a shift ``s`` or ``(sh, sw)`` of non-negative ints; ``ValueError`` naming ``shift_size``."""
    pair = (shift, shift) if isinstance(shift, (int, np.integer)) else shift
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in pair)):
        raise ValueError(f"shift_size must be a non-negative int or a pair of them, got {describe(shift)}")
    return int(pair[0]), int(pair[1])


def group_bias(bias: Optional[jax.Array], relative_bias_table: Optional[jax.Array], group: tuple[int, int],
               heads: int) -> Optional[jax.Array]:
    """The ``[heads, T, T]`` logit bias shared by every window or group (``T = wh·ww``): ``bias`` plus the
    relative position bias of ``relative_bias_table``, either or neither."""
    T = group[0] * group[1]
    if bias is not None and jnp.shape(bias) != (heads, T, T):
        raise ValueError(f"bias must have shape [heads, wh·ww, wh·ww] = [{heads}, {T}, {T}], got {describe(bias)}")
    if relative_bias_table is None:
        return bias
    if jnp.shape(relative_bias_table)[-1:] != (heads,):
        raise ValueError(f"relative_bias_table must have shape [(2·wh − 1)·(2·ww − 1), heads={heads}], "
                         f"got {describe(relative_bias_table)}")
    table_bias = relative_position_bias(relative_bias_table, group)
    return table_bias if bias is None else bias + table_bias


@dataclasses.dataclass(frozen=True)
class TokenGroups:
    """How window or grid attention folds an ``H × W`` map into ``G`` groups of ``T`` tokens and back.

    ``fold`` maps ``[B, H, W, n]`` to ``[B·G, T, n]`` and ``unfold`` back; ``labels`` (int ``[G, T]``) says which
    keys of its group a query sees (those with its label, as ``masks.Segments``, so the blocked path and kernels
    skip empty tiles), or is None where every token of a group sees every other.
    """

    fold: Callable[[jax.Array], jax.Array]
    unfold: Callable[[jax.Array], jax.Array]
    labels: Optional[np.ndarray]

    def tokens(self, a: jax.Array) -> jax.Array:
        """``[B, H, W, heads, n] -> [B·G, T, heads, n]``."""
        B, H, W, heads, n = a.shape
        flat = self.fold(a.reshape(B, H, W, heads * n))
        return flat.reshape(*flat.shape[:2], heads, n)

    def mask(self, batch: int) -> Optional[masks.Mask]:
        """The ``masks.Segments`` of the labels for ``batch`` maps, or None."""
        return None if self.labels is None else masks.Segments(jnp.asarray(np.tile(self.labels, (batch, 1))))


def window_groups(height: int, width: int, window_size: Window, shift_size: Window = (0, 0)) -> TokenGroups:
    """The (shifted) windows of ``window_attention`` on an ``H × W`` map (``ValueError`` for a shift not smaller
    than the window)."""
    wh, ww = window_shape(window_size, "window_size")
    sh, sw = window_shape_or_zero(shift_size)
    if sh >= wh or sw >= ww:
        raise ValueError(f"shift_size must be smaller than window_size per axis, got shift_size={(sh, sw)}, "
                         f"window_size={(wh, ww)}")
    nh, nw = window_grid(height, width, (wh, ww))
    hp, wp = nh * wh, nw * ww
    regions = shifted_window_regions(height, width, (wh, ww), (sh, sw))
    labels = window_partition(regions[None, :, :, None], (wh, ww))[..., 0]

    def fold(a: jax.Array) -> jax.Array:
        a = jnp.pad(a, ((0, 0), (0, hp - height), (0, wp - width), (0, 0)))
        return window_partition(jnp.roll(a, (-sh, -sw), axis=(1, 2)), (wh, ww))

    def unfold(a: jax.Array) -> jax.Array:
        return jnp.roll(window_merge(a, (wh, ww), hp, wp), (sh, sw), axis=(1, 2))[:, :height, :width]

    return TokenGroups(fold, unfold, None if (labels == labels[:, :1]).all() else labels)


def grid_groups(height: int, width: int, *, grid_size: Optional[Window] = None,
                interval: Optional[Window] = None) -> tuple[TokenGroups, tuple[int, int]]:
    """The dilated groups of ``grid_attention`` on an ``H × W`` map, and the group's shape ``(Gh, Gw)``."""
    intervals, group = grid_shape(height, width, interval=interval, grid_size=grid_size)
    real = grid_partition(np.ones((1, height, width, 1), np.int32), intervals, group)[..., 0]

    def fold(a: jax.Array) -> jax.Array:
        return grid_partition(a, intervals, group)

    def unfold(a: jax.Array) -> jax.Array:
        return grid_merge(a, intervals, group, height, width)

    return TokenGroups(fold, unfold, None if real.all() else real - 1), group


def attend_in_groups(q, k, v, groups: TokenGroups, bias, scale, implementation) -> jax.Array:
    """Attention inside each group of ``groups``: one ``attnjax.attention`` call over ``[B·G, T, heads, ·]``."""
    B, H, W, heads, Dv = v.shape
    out = attention(groups.tokens(q), groups.tokens(k), groups.tokens(v), mask=groups.mask(B), bias=bias,
                    scale=scale, implementation=implementation)
    return groups.unfold(out.reshape(*out.shape[:2], heads * Dv)).reshape(B, H, W, heads, Dv)


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window_size: Window, shift_size: Window = (0, 0),
                     relative_bias_table: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
                     scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Multi-head softmax attention within (shifted) non-overlapping windows (Swin, sec. 3.2; MOAT).

    ``out[p] = Σ_{p' ∈ win(p)} softmax_{p'}(scale·q[p]·k[p'] + B[p, p']) v[p']`` per head. Without a shift,
    ``win(p)`` is the pixels of ``p``'s window. With ``shift_size = s`` (Swin's SW-MSA) the map, padded to
    multiples of the window, is rolled by ``−s``, split into windows, each pixel attends to the pixels of its
    window that came from the same region of the unrolled map (``shifted_window_regions``), and the result is
    rolled back by ``+s``. Padded keys are always masked out.

    Args:
      q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``. ``H``, ``W`` need not be multiples of the window.
      window_size: ``w`` or ``(wh, ww)``.
      shift_size: ``s`` or ``(sh, sw)``, each ``0 ≤ s < w`` (Swin uses ``⌊w/2⌋`` in every other block).
      relative_bias_table: ``[(2·wh − 1)·(2·ww − 1), heads]``, Swin's learned table, indexed by
        ``relative_position_index`` (gradients flow to it); or None.
      bias: ``[heads, wh·ww, wh·ww]``, another logit bias shared by every window (e.g. CrossFormer's dynamic
        position bias), or None.
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype. Memory O(B·H·W·heads·(D + Dv)) beyond the blocked attention.
    """
    B, H, W, heads, _ = check_image_qkv(q, k, v)
    groups = window_groups(H, W, window_size, shift_size)
    bias = group_bias(bias, relative_bias_table, window_shape(window_size, "window_size"), heads)
    return attend_in_groups(q, k, v, groups, bias, scale, implementation)


def window_attention_inputs(q: jax.Array, k: jax.Array, *, window_size: Window, shift_size: Window = (0, 0),
                            relative_bias_table: Optional[jax.Array] = None, bias: Optional[jax.Array] = None
                            ) -> tuple[jax.Array, jax.Array, Optional[masks.Mask], Optional[jax.Array]]:
    """What ``window_attention`` hands to ``attnjax.attention``: ``(q_w, k_w, mask, bias)`` with the windows as
    the batch, ``q_w, k_w [B·nW, wh·ww, heads, D]``, the shifted windows' region mask (or None) and the
    ``[heads, wh·ww, wh·ww]`` bias (or None). Arguments as ``window_attention``; for attention analysis
    (``attnjax.nn.capture``)."""
    B, H, W, heads, _ = check_image_qkv(q, k, k)
    groups = window_groups(H, W, window_size, shift_size)
    bias = group_bias(bias, relative_bias_table, window_shape(window_size, "window_size"), heads)
    return groups.tokens(q), groups.tokens(k), groups.mask(B), bias


def grid_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, grid_size: Optional[Window] = None,
                   interval: Optional[Window] = None, relative_bias_table: Optional[jax.Array] = None,
                   bias: Optional[jax.Array] = None, scale: Optional[float] = None,
                   implementation: str = "auto") -> jax.Array:
    """Multi-head softmax attention within dilated groups: MaxViT's grid attention, CrossFormer's LDA.

    Pixels ``p = (y, x)`` and ``p' = (y', x')`` attend to each other iff ``y ≡ y' (mod Ih)`` and ``x ≡ x' (mod Iw)``:
    each group is a sparse ``Gh × Gw`` grid spread over the whole map (MaxViT, sec. 3.2, "grid attention" with a
    fixed ``G × G`` grid; CrossFormer, sec. 3.2, "long distance attention" with a fixed interval ``I``). Give
    ``grid_size`` (MaxViT) or ``interval`` (CrossFormer); see ``grid_shape``. Padded keys are masked.

    Args:
      q, k: ``[B, H, W, heads, D]``; v: ``[B, H, W, heads, Dv]``.
      grid_size: ``G`` or ``(Gh, Gw)``, the group's shape; or
      interval: ``I`` or ``(Ih, Iw)``, the distance between a group's pixels.
      relative_bias_table: ``[(2·Gh − 1)·(2·Gw − 1), heads]``, indexed by the offsets inside the group (MaxViT's
        relative attention), or None.
      bias: ``[heads, Gh·Gw, Gh·Gw]`` shared by every group, or None.
      scale: logit scale, default ``1/√D``. implementation: as ``attnjax.attention``.

    Returns:
      ``[B, H, W, heads, Dv]`` in q's dtype; O(B·H·W·Gh·Gw) logits per head, computed blockwise.
    """
    B, H, W, heads, _ = check_image_qkv(q, k, v)
    groups, group = grid_groups(H, W, grid_size=grid_size, interval=interval)
    return attend_in_groups(q, k, v, groups, group_bias(bias, relative_bias_table, group, heads), scale,
                            implementation)


def grid_attention_inputs(q: jax.Array, k: jax.Array, *, grid_size: Optional[Window] = None,
                          interval: Optional[Window] = None, relative_bias_table: Optional[jax.Array] = None,
                          bias: Optional[jax.Array] = None
                          ) -> tuple[jax.Array, jax.Array, Optional[masks.Mask], Optional[jax.Array]]:
    """What ``grid_attention`` hands to ``attnjax.attention``: ``(q_g, k_g, mask, bias)`` with the groups as the
    batch, ``q_g, k_g [B·G, Gh·Gw, heads, D]``, the padding mask (or None) and the ``[heads, Gh·Gw, Gh·Gw]`` bias
    (or None). Arguments as ``grid_attention``; for attention analysis (``attnjax.nn.capture``)."""
    B, H, W, heads, _ = check_image_qkv(q, k, k)
    groups, group = grid_groups(H, W, grid_size=grid_size, interval=interval)
    return groups.tokens(q), groups.tokens(k), groups.mask(B), group_bias(bias, relative_bias_table, group, heads)


def dense_group_attention(q, k, v, group_of: np.ndarray, position_in_group: np.ndarray, group: tuple[int, int],
                          bias, relative_bias_table, scale) -> jax.Array:
    """Softmax over all ``H·W`` keys masked to the query's group: the dense form the references share.

    ``group_of``: int ``[H·W]``, the group (and region) label of each pixel, row-major; ``position_in_group``:
    int ``[H·W, 2]``, each pixel's ``(row, column)`` inside its ``group``-shaped window, for the biases.
    """
    B, H, W, heads, D = q.shape
    T = H * W
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    flat = [a.reshape(B, T, heads, a.shape[-1]).astype(jnp.float32) for a in (q, k, v)]
    logits = scale * jnp.einsum("bthd,bshd->bhts", flat[0], flat[1], precision="highest")
    pos = position_in_group[:, 0] * group[1] + position_in_group[:, 1]
    bias = group_bias(bias, relative_bias_table, group, heads)
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)[:, pos[:, None], pos[None, :]]
    same = group_of[:, None] == group_of[None, :]
    weights = jax.nn.softmax(jnp.where(same, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", weights, flat[2], precision="highest")
    return out.reshape(B, H, W, heads, v.shape[-1]).astype(q.dtype)


def window_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, window_size: Window,
                               shift_size: Window = (0, 0), relative_bias_table: Optional[jax.Array] = None,
                               bias: Optional[jax.Array] = None, scale: Optional[float] = None) -> jax.Array:
    """``window_attention`` as one dense masked softmax over all ``H·W`` tokens (O((HW)²) memory; for tests).

    Pixel ``(y, x)`` sits at ``(y', x') = ((y − sh) mod Hp, (x − sw) mod Wp)`` of the shifted padded map; two pixels
    attend iff they share the window ``(y' // wh, x' // ww)`` and the region label of ``shifted_window_regions``.
    Arguments and result as ``window_attention``.
    """
    B, H, W, heads, _ = check_image_qkv(q, k, v)
    wh, ww = window_shape(window_size, "window_size")
    sh, sw = window_shape_or_zero(shift_size)
    nh, nw = window_grid(H, W, (wh, ww))
    y, x = np.divmod(np.arange(H * W), W)
    ys, xs = (y - sh) % (nh * wh), (x - sw) % (nw * ww)
    regions = shifted_window_regions(H, W, (wh, ww), (sh, sw))
    group_of = ((ys // wh) * nw + xs // ww) * 9 + regions[ys, xs]
    position = np.stack([ys % wh, xs % ww], axis=-1)
    return dense_group_attention(q, k, v, group_of, position, (wh, ww), bias, relative_bias_table, scale)


def grid_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, grid_size: Optional[Window] = None,
                             interval: Optional[Window] = None, relative_bias_table: Optional[jax.Array] = None,
                             bias: Optional[jax.Array] = None, scale: Optional[float] = None) -> jax.Array:
    """``grid_attention`` as one dense masked softmax over all ``H·W`` tokens (O((HW)²) memory; for tests).

    Pixels attend iff ``y ≡ y' (mod Ih)`` and ``x ≡ x' (mod Iw)``; a pixel's place in its group is
    ``(y // Ih, x // Iw)``. Arguments and result as ``grid_attention``.
    """
    B, H, W, heads, _ = check_image_qkv(q, k, v)
    (ih, iw), group = grid_shape(H, W, interval=interval, grid_size=grid_size)
    y, x = np.divmod(np.arange(H * W), W)
    position = np.stack([y // ih, x // iw], axis=-1)
    return dense_group_attention(q, k, v, (y % ih) * iw + x % iw, position, group, bias, relative_bias_table, scale)


PARTITIONS = ("window", "grid")
"""How ``Windows`` groups tokens: Swin's (shifted) windows or MaxViT's dilated grid."""


@registry.register
@dataclasses.dataclass(frozen=True)
class Windows:
    """Window or grid attention as a registered mechanism on ``[B, T, H, D]`` tokens.

    The ``T`` tokens are the row-major pixels of ``grid = (height, width)`` (default ``(1, T)``, a 1-D map);
    ``partition="window"`` is ``window_attention`` (Swin's W-MSA, or SW-MSA with ``shift_size``),
    ``partition="grid"`` is ``grid_attention`` with ``window_size`` as MaxViT's grid. Self-attention only
    (``S = T``), the same heads for q, k, v; no other mask or bias through ``attnjax.attention`` (the windows'
    relative position bias is ``window_attention``'s ``relative_bias_table``).
    """

    window_size: Window = 7
    shift_size: Window = 0
    partition: str = "window"
    grid: Optional[tuple[int, int]] = None

    name: ClassVar[str] = "window"
    family: ClassVar[str] = "vision"
    paper: ClassVar[str] = "Liu et al. 2021 (Swin Transformer, ICCV); Tu et al. 2022 (MaxViT, ECCV), grid attention"
    supports: ClassVar[frozenset] = frozenset()
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def __post_init__(self):
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {describe(self.partition)}")

    def implementations(self):
        return {name: functools.partial(windows_registered, self, name) for name in ("reference", "xla")}


def windows_registered(config: Windows, implementation: str, q, k, v, *, mask=None, bias=None, scale=None,
                       **options) -> jax.Array:
    """``attnjax.attention`` signature for ``Windows``: tokens to the map, the op, back to tokens."""
    if mask is not None or bias is not None or any(options.get(o) for o in ("logits_soft_cap", "sinks",
                                                                               "dropout_rate", "return_lse")):
        raise NotImplementedError("window attention takes no mask, bias, soft cap, sinks, dropout or lse "
                                  "through attnjax.attention")
    B, T, heads, _ = q.shape
    if k.shape[1] != T or k.shape[2] != heads:
        raise NotImplementedError(f"window attention is self-attention with the same heads for q, k, v; got "
                                  f"q {list(q.shape)}, k {list(k.shape)}")
    height, width = config.grid or (1, T)
    if height * width != T:
        raise ValueError(f"grid {config.grid} has {height * width} pixels but q has T={T} tokens")
    maps = [a.reshape(B, height, width, heads, a.shape[-1]) for a in (q, k, v)]
    if config.partition == "grid":
        kwargs = dict(grid_size=config.window_size, scale=scale)
        out = (grid_attention_reference(*maps, **kwargs) if implementation == "reference"
               else grid_attention(*maps, implementation=implementation, **kwargs))
    else:
        kwargs = dict(window_size=config.window_size, shift_size=config.shift_size, scale=scale)
        out = (window_attention_reference(*maps, **kwargs) if implementation == "reference"
               else window_attention(*maps, implementation=implementation, **kwargs))
    return out.reshape(B, T, heads, v.shape[-1])


__all__ = ["Window", "window_shape", "window_grid", "window_partition", "window_merge", "window_valid",
           "grid_shape", "grid_partition", "grid_merge", "relative_position_index", "relative_position_bias",
           "shifted_window_regions", "TokenGroups", "window_groups", "grid_groups",
           "window_attention", "window_attention_inputs", "grid_attention", "grid_attention_inputs",
           "window_attention_reference", "grid_attention_reference", "PARTITIONS", "Windows"]
