"""ConDaFormer's disassembled window attention on a dense voxel grid: a cubic window cut into three planes.

Duan et al., "ConDaFormer: Disassembled Transformer with Local Structure Enhancement for 3D Point Cloud
Understanding", NeurIPS 2023 (abstract in the project's seed list ``/work/shared/seeds/003_*.txt``); official
code LHDuan/ConDaFormer, ``pcr/models/condaformer/modules.py`` (``Window_Attention``) and ``utils.py``.

Instead of attending within a ``w × w × w`` cube, the heads are split into three equal groups and each group
attends within one family of 2-D planes of the cube: the ``w × w × 1`` windows (same z), the ``w × 1 × w``
windows (same y) and the ``1 × w × w`` windows (same x). The outputs of the three groups are concatenated
along the heads (``forward_qkv_one_pass``: heads ``[0, h/3)`` on the xy planes, ``[h/3, 2h/3)`` on xz,
``[2h/3, h)`` on yz), not summed. The paper works on sparse point clouds; on a dense grid
``[B, F, H, W]`` = ``(z, y, x)`` a token attends, in head group ``g``, to the tokens that share its
coordinate along grid axis ``g`` and its ``w × w`` window along the other two axes.

Shifted windows (alternate blocks, ``shift=True``): the window grid moves by ``⌊w/2⌋`` without wrapping
(``get_indices_params`` voxelizes ``xyz + w/2``): windows at the border are cropped, never cyclically rolled.

Contextual relative position encoding (Stratified Transformer's, which ConDaFormer keeps: tables ``q_table``,
``k_table``, ``v_table`` of shape ``[2L − 1, 3, h/3, D]`` shared by the three head groups): with
``Δ_a = p_a(i) − p_a(j)`` the in-window offset of query ``i`` from key ``j`` along axis ``a``,

    logit_ij = scale·q_i·(k_j + Σ_a Tq[Δ_a + L − 1, a]) + k_j·Σ_a Tk[Δ_a + L − 1, a]
    out_i    = Σ_j softmax_j(logit_ij) (v_j + Σ_a Tv[Δ_a + L − 1, a])

(the official CUDA kernels ``dot_prod_with_idx_all_tri_plane`` and ``attention_step2_with_rel_pos_value_tri_plane``,
with the query pre-multiplied by the scale, so the key-table term is not scaled). Points there have continuous
coordinates quantized at ``quant_size`` (0.25 voxel, ``L = w/quant_size``); a dense grid has integer
coordinates, so here the step is one voxel, ``L = w``, and the tables are ``[2w − 1, 3, h/3, D]``. The table's
axis dimension follows the grid axes ``(0, 1, 2) = (F, H, W)``.

Fast path: the windows of each plane family are folded into the batch (reshapes; the three families stacked
into one call, as every window has ``w²`` tokens) and attended with ``attnjax.attention``; the position terms
ride along as extra channels: ``q' = [scale·q, scale·Q_a, e_a(i)]``, ``k' = [k, e_a(j), K_a(j)]``,
``v' = [v, e_a(j)]`` with ``e_a`` the one-hot in-window position along an in-plane axis ``a``,
``Q_a(i)[c] = q_i·Tq[p_a(i) − c + w − 1, a]`` and ``K_a(j)[c] = k_j·Tk[c − p_a(j) + w − 1, a]``, so
``q'·k'`` is the logit above; the value part returns the attention mass per key position, which multiplies
``Tv``. The out-of-plane offset is always 0: its key term ``k_j·Tk[w − 1, g]`` joins ``K_a``, its query term
is the same for every key of a row and cancels in the softmax, and its value term is ``Tv[w − 1, g]``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive, describe
from attnjax.softmax.softmax import softmax_attention_reference

PLANES = ("xy", "xz", "yz")
"""The plane family of each head group: group ``g`` keeps grid axis ``g`` of ``(F, H, W) = (z, y, x)`` fixed."""


def in_plane_axes(axis: int) -> tuple[int, int]:
    """The two grid axes (of 0, 1, 2) that span the planes of head group ``axis``."""
    return tuple(a for a in range(3) if a != axis)


def plane_grid(length: int, window: int, shift: int) -> int:
    """Windows along an in-plane axis of ``length`` tokens: ``⌈(length + shift)/window⌉``."""
    return -(-(length + shift) // window)


def plane_partition(x: jax.Array, axis: int, window: int, shift: int = 0) -> jax.Array:
    """Fold the ``w × w`` plane windows of head group ``axis`` into the batch.

    Args:
      x: ``[B, D0, D1, D2, C]``.
      axis: the grid axis (0, 1 or 2) the planes keep fixed.
      window: ``w``; shift: the window grid's offset ``s`` (0 or ``⌊w/2⌋``): window ``⌊(c + s)/w⌋`` along each
        in-plane axis, zero padding at both ends.

    Returns:
      ``[B·D_axis·n1·n2, w², C]``, batch-major, then the fixed coordinate, then the windows row-major; tokens
      row-major: token ``r·w + c`` sits at ``(r, c)`` = the in-window positions along the two in-plane axes.
    """
    a1, a2 = in_plane_axes(axis)
    B, C = x.shape[0], x.shape[-1]
    L, L1, L2 = x.shape[1 + axis], x.shape[1 + a1], x.shape[1 + a2]
    n1, n2 = plane_grid(L1, window, shift), plane_grid(L2, window, shift)
    x = x.transpose(0, 1 + axis, 1 + a1, 1 + a2, 4)
    x = jnp.pad(x, ((0, 0), (0, 0), (shift, n1 * window - L1 - shift), (shift, n2 * window - L2 - shift), (0, 0)))
    x = x.reshape(B, L, n1, window, n2, window, C).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B * L * n1 * n2, window * window, C)


def plane_merge(windows: jax.Array, axis: int, window: int, shift: int, grid: Sequence[int]) -> jax.Array:
    """The inverse of ``plane_partition``: ``[B·D_axis·n1·n2, w², C] -> [B, D0, D1, D2, C]``, padding cropped."""
    a1, a2 = in_plane_axes(axis)
    L, L1, L2 = grid[axis], grid[a1], grid[a2]
    n1, n2 = plane_grid(L1, window, shift), plane_grid(L2, window, shift)
    C = windows.shape[-1]
    B = windows.shape[0] // (L * n1 * n2)
    x = windows.reshape(B, L, n1, n2, window, window, C).transpose(0, 1, 2, 4, 3, 5, 6)
    x = x.reshape(B, L, n1 * window, n2 * window, C)[:, :, shift:shift + L1, shift:shift + L2]
    return x.transpose(np.argsort((0, 1 + axis, 1 + a1, 1 + a2, 4)))


def plane_valid(grid: Sequence[int], axis: int, window: int, shift: int = 0) -> np.ndarray:
    """``bool [D_axis·n1·n2, w²]``: True where a plane window's token is a grid token, False on padding."""
    a1, a2 = in_plane_axes(axis)
    n1, n2 = plane_grid(grid[a1], window, shift), plane_grid(grid[a2], window, shift)
    rows = (np.arange(n1 * window) >= shift) & (np.arange(n1 * window) < shift + grid[a1])
    cols = (np.arange(n2 * window) >= shift) & (np.arange(n2 * window) < shift + grid[a2])
    valid = (rows[:, None] & cols[None, :]).reshape(n1, window, n2, window).transpose(0, 2, 1, 3)
    return np.tile(valid.reshape(n1 * n2, window * window), (grid[axis], 1))


def check_condaformer_inputs(q: jax.Array, k: jax.Array, v: jax.Array, window_size: int, tables) -> None:
    """``ValueError`` naming the argument unless q, k ``[B, F, H, W, heads, D]``, v ``[B, F, H, W, heads, Dv]``
    with ``heads % 3 == 0``, a positive ``window_size`` and, if given, tables ``(Tq, Tk, Tv)`` of shapes
    ``[2w − 1, 3, heads/3, D]``, ``[2w − 1, 3, heads/3, D]``, ``[2w − 1, 3, heads/3, Dv]``."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 6:
            raise ValueError(f"{name} must have shape [batch, depth, height, width, heads, head_dim], "
                             f"got {describe(a)}")
    if q.shape[:5] != k.shape[:5] or k.shape[:5] != v.shape[:5] or q.shape[5] != k.shape[5]:
        raise ValueError(f"q, k, v must share [batch, depth, height, width, heads] (and q, k head_dim): "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[4] % 3:
        raise ValueError(f"heads must be a multiple of 3 (one group per plane family), got {q.shape[4]}")
    check_positive(window_size=window_size)
    if tables is not None:
        if not isinstance(tables, (tuple, list)) or len(tables) != 3:
            raise ValueError(f"tables must be None or (q_table, k_table, v_table), got {describe(tables)}")
        size, groups = 2 * window_size - 1, q.shape[4] // 3
        for name, table, dim in zip(("q_table", "k_table", "v_table"), tables, (q.shape[5], q.shape[5], v.shape[5])):
            if jnp.shape(table) != (size, 3, groups, dim):
                raise ValueError(f"{name} must have shape [2w - 1, 3, heads/3, {dim}] = {[size, 3, groups, dim]}, "
                                 f"got {describe(table)}")


def condaformer_attention(q: jax.Array, k: jax.Array, v: jax.Array, window_size: int = 4, *, shift: bool = False,
                          tables: Optional[Sequence[jax.Array]] = None, scale: Optional[float] = None,
                          implementation: str = "auto") -> jax.Array:
    """Disassembled window attention (ConDaFormer): three head groups, each within its family of planes.

    Head group ``g`` (heads ``[g·h/3, (g+1)·h/3)``): token ``i`` attends to the tokens ``j`` with the same
    coordinate along grid axis ``g`` and the same window ``⌊(c_a + s)/w⌋`` along the other two axes ``a``,
    with the logit and output of the module docstring (plain ``softmax(scale·q·k) v`` without ``tables``).

    Fast path: plane windows folded into the batch (``plane_partition``), the three groups in one
    ``attnjax.attention`` call, padded keys masked; the relative positions as extra channels. Memory:
    O(B·T·heads·(D + 4w + Dv + 2w)) for the folded copies, ``T = F·H·W``, plus ``attnjax.attention``'s; never a
    ``[T, T]`` array. Work: ``T·w²`` logits per head instead of ``T·w³`` for the cube.

    Args:
      q, k: ``[B, F, H, W, heads, D]``; v: ``[B, F, H, W, heads, Dv]``; ``heads`` a multiple of 3; ``F``, ``H``,
        ``W`` need not be multiples of the window (border windows are cropped).
      window_size: ``w``, the edge of the cubic window (the official code's default 4; its ScanNet model 10).
      shift: move the window grid by ``⌊w/2⌋`` (ConDaFormer's odd blocks), without wrapping.
      tables: None, or ``(Tq, Tk, Tv)``: ``[2w − 1, 3, heads/3, D]``, ``[2w − 1, 3, heads/3, D]`` and
        ``[2w − 1, 3, heads/3, Dv]``, the contextual relative position tables, shared by the three groups.
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, F, H, W, heads, Dv]`` in q's dtype.
    """
    check_condaformer_inputs(q, k, v, window_size, tables)
    B, F, H, W, heads, D = q.shape
    Dv, G, w = v.shape[-1], heads // 3, window_size
    s = w // 2 if shift else 0
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    grid = (F, H, W)

    def fold(a: jax.Array, g: int) -> jax.Array:
        part = a[..., g * G:(g + 1) * G, :]
        folded = plane_partition(part.reshape(B, F, H, W, G * a.shape[-1]), g, w, s)
        return folded.reshape(folded.shape[0], w * w, G, a.shape[-1])

    qs, ks, vs, valid = [], [], [], []
    for g in range(3):
        qg, kg, vg = fold(q, g), fold(k, g), fold(v, g)
        if tables is not None:
            qg, kg, vg = augment(qg, kg, vg, g, w, tables, scale)
        qs.append(qg)
        ks.append(kg)
        vs.append(vg)
        valid.append(np.tile(plane_valid(grid, g, w, s), (B, 1)))
    valid = np.concatenate(valid)
    mask = None if valid.all() else masks.Explicit(jnp.asarray(valid)[:, None, None, :])
    out = attention(jnp.concatenate(qs), jnp.concatenate(ks), jnp.concatenate(vs), mask=mask,
                    scale=1.0 if tables is not None else scale, implementation=implementation)
    sizes = np.cumsum([x.shape[0] for x in qs])[:-1]
    groups = []
    for g, og in enumerate(jnp.split(out, sizes)):
        if tables is not None:
            og = value_positions(og, g, w, tables[2], Dv)
        og = plane_merge(og.reshape(og.shape[0], w * w, G * Dv), g, w, s, grid)
        groups.append(og.reshape(B, F, H, W, G, Dv))
    return jnp.concatenate(groups, axis=4)


def window_positions(window: int) -> tuple[np.ndarray, np.ndarray]:
    """In-window positions ``(r, c)`` of the ``w²`` row-major tokens of a plane window (int ``[w²]`` each)."""
    return np.divmod(np.arange(window * window), window)


def augment(q: jax.Array, k: jax.Array, v: jax.Array, axis: int, window: int, tables: Sequence[jax.Array],
            scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The folded ``[n, w², G, ·]`` q, k, v of head group ``axis`` with the contextual position channels:
    ``q' = [scale·q, scale·Q_1, scale·Q_2, e_1, e_2]``, ``k' = [k, e_1, e_2, K_1 + k·Tk[w − 1, axis], K_2]``,
    ``v' = [v, e_1, e_2]`` (module docstring), so that ``q'·k'`` (scale 1) is ConDaFormer's logit."""
    tq, tk, _ = tables
    offsets = np.arange(window)[:, None] - np.arange(window)[None, :] + window - 1  # [p, c] -> p − c + w − 1
    q_extra, k_extra, onehots = [], [], []
    for position, a in zip(window_positions(window), in_plane_axes(axis)):
        q_rows = tq[:, a][offsets[position]]           # [w², w, G, D]: Tq[p(i) − c + w − 1, a]
        k_rows = tk[:, a][offsets[:, position].T]      # [w², w, G, D]: Tk[c − p(j) + w − 1, a]
        q_extra.append(jnp.einsum("ntgd,tcgd->ntgc", q, q_rows.astype(q.dtype), preferred_element_type=jnp.float32))
        k_extra.append(jnp.einsum("ntgd,tcgd->ntgc", k, k_rows.astype(k.dtype), preferred_element_type=jnp.float32))
        onehots.append(jnp.broadcast_to(jnp.asarray(np.eye(window)[position][:, None, :], q.dtype),
                                        q.shape[:2] + (q.shape[2], window)))
    k_extra[0] = k_extra[0] + jnp.einsum("ntgd,gd->ntg", k, tk[window - 1, axis].astype(k.dtype),
                                         preferred_element_type=jnp.float32)[..., None]
    q_new = jnp.concatenate([(scale * q.astype(jnp.float32)).astype(q.dtype)]
                            + [(scale * e).astype(q.dtype) for e in q_extra] + onehots, axis=-1)
    k_new = jnp.concatenate([k] + [o.astype(k.dtype) for o in onehots] + [e.astype(k.dtype) for e in k_extra], axis=-1)
    v_new = jnp.concatenate([v] + [o.astype(v.dtype) for o in onehots], axis=-1)
    return q_new, k_new, v_new


def value_positions(out: jax.Array, axis: int, window: int, tv: jax.Array, dv: int) -> jax.Array:
    """``o_i + Σ_a Σ_c m_a(i)[c]·Tv[p_a(i) − c + w − 1, a] + Tv[w − 1, axis]·Σ_c m_1(i)[c]`` from the
    attention output ``[o, m_1, m_2]`` of ``augment``'s ``v'`` (``m_a``: the attention mass per key position)."""
    offsets = np.arange(window)[:, None] - np.arange(window)[None, :] + window - 1
    result = out[..., :dv].astype(jnp.float32)
    masses = (out[..., dv:dv + window].astype(jnp.float32), out[..., dv + window:].astype(jnp.float32))
    for mass, position, a in zip(masses, window_positions(window), in_plane_axes(axis)):
        rows = tv[:, a][offsets[position]].astype(jnp.float32)   # [w², w, G, Dv]
        result = result + jnp.einsum("ntgc,tcgd->ntgd", mass, rows)
    result = result + masses[0].sum(-1, keepdims=True) * tv[window - 1, axis].astype(jnp.float32)
    return result.astype(out.dtype)


def condaformer_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, window_size: int = 4, *,
                                    shift: bool = False, tables: Optional[Sequence[jax.Array]] = None,
                                    scale: Optional[float] = None) -> jax.Array:
    """``condaformer_attention`` as a dense masked softmax over all ``T = F·H·W`` tokens per head group, the
    position terms gathered pair by pair (O(T²·(heads + 2w)) memory)."""
    check_condaformer_inputs(q, k, v, window_size, tables)
    B, F, H, W, heads, D = q.shape
    Dv, G, w = v.shape[-1], heads // 3, window_size
    s = w // 2 if shift else 0
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    T = F * H * W
    coords = np.stack(np.unravel_index(np.arange(T), (F, H, W)), axis=-1)
    windows = (coords + s) // w
    offsets = np.clip(coords[:, None, :] - coords[None, :, :] + w - 1, 0, 2 * w - 2)  # [T, T, 3]
    qf, kf, vf = (a.reshape(B, T, heads, a.shape[-1]) for a in (q, k, v))
    outs = []
    for g in range(3):
        a1, a2 = in_plane_axes(g)
        allowed = ((coords[:, None, g] == coords[None, :, g]) & (windows[:, None, a1] == windows[None, :, a1])
                   & (windows[:, None, a2] == windows[None, :, a2]))
        qg, kg, vg = (a[:, :, g * G:(g + 1) * G] for a in (qf, kf, vf))
        if tables is None:
            outs.append(softmax_attention_reference(qg, kg, vg, mask=masks.Explicit(jnp.asarray(allowed)), scale=scale))
            continue
        tq, tk, tv = (t.astype(jnp.float32) for t in tables)
        qg32, kg32 = qg.astype(jnp.float32), kg.astype(jnp.float32)
        logits = scale * jnp.einsum("bigd,bjgd->bgij", qg32, kg32, precision="highest")
        for a in range(3):
            q_table = jnp.einsum("bigd,rgd->bgir", qg32, tq[:, a], precision="highest")
            k_table = jnp.einsum("bjgd,rgd->bgjr", kg32, tk[:, a], precision="highest")
            index = jnp.asarray(offsets[None, None, :, :, a])  # [1, 1, i, j]: Δ_a(i, j) + w − 1
            logits = logits + scale * jnp.take_along_axis(q_table, index, axis=3)
            logits = logits + jnp.take_along_axis(k_table, index.transpose(0, 1, 3, 2), axis=3).transpose(0, 1, 3, 2)
        weights = jax.nn.softmax(jnp.where(jnp.asarray(allowed), logits, -jnp.inf), axis=-1)
        out = jnp.einsum("bgij,bjgd->bigd", weights, vg.astype(jnp.float32), precision="highest")
        for a in range(3):
            mass = jnp.einsum("bgij,ijr->bigr", weights, jnp.asarray(np.eye(2 * w - 1)[offsets[:, :, a]], jnp.float32),
                              precision="highest")
            out = out + jnp.einsum("bigr,rgd->bigd", mass, tv[:, a], precision="highest")
        outs.append(out.astype(q.dtype))
    return jnp.concatenate(outs, axis=2).reshape(B, F, H, W, heads, Dv)


__all__ = ["PLANES", "in_plane_axes", "plane_grid", "plane_partition", "plane_merge", "plane_valid",
           "check_condaformer_inputs", "condaformer_attention", "window_positions", "augment", "value_positions",
           "condaformer_attention_reference"]
