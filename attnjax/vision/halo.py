"""HaloNet blocked local self-attention: b×b query blocks attend to their (b + 2h)² haloed neighbourhood.

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", CVPR 2021,
sec. 2 ("blocked local self-attention", Fig. 1): the ``H × W`` map is cut into non-overlapping ``b × b``
query blocks; every query of a block attends to the keys of the same ``(b + 2h) × (b + 2h)`` region, the block
grown by a halo of ``h`` pixels on each side. Blocks share their neighbourhood, so the keys are gathered once
per block instead of once per pixel (SASA's centred windows), which breaks translational equivariance on
purpose. Strided self-attentive downsampling (sec. 2): with stride ``s`` the queries of a block are
subsampled (one per ``s × s`` pixels), the keys stay the block's haloed neighbourhood.

Conventions (where the paper is not explicit, following timm's ``timm/layers/halo_attn.py``, ``HaloAttn``):

* Keys outside the image: the map is zero-padded and the padded keys are **masked out**, so a border block
  attends to the real pixels of its neighbourhood only (timm lets the zero keys take part with a zero logit
  plus their relative term; here they get weight 0, as padding does in SASA and neighbourhood attention).
* ``H``, ``W`` need not be multiples of ``b``: the last blocks are padded (their padded queries are dropped
  from the output, their padded keys masked).
* Stride ``s`` (``b % s == 0``): query ``(y, x)`` of q's grid ``[⌈H/s⌉, ⌈W/s⌉]`` is pixel ``(s·y, s·x)``
  (timm's stride-``s`` 1×1 query convolution); it lies in block ``(⌊y/b_q⌋, ⌊x/b_q⌋)``, ``b_q = b/s``.
* Relative position logits (timm's ``PosEmbedRel``, from Bello et al.'s Attention Augmented Convolutional
  Networks): factorized learned tables ``r_h, r_w`` of shape ``[2·(b + 2h) − 1, D]``; query ``(i_y, i_x)``
  (position inside its block of ``b_q × b_q`` queries) and key ``(t_y, t_x)`` (position inside the
  ``(b + 2h)²`` halo window) add ``q·r_h[t_y − i_y + b + 2h − 1] + q·r_w[t_x − i_x + b + 2h − 1]`` to the
  logit, *unscaled* (timm's default ``scale_pos_embed=False``; its ``True`` equals tables multiplied by
  ``scale``). The index is timm's (query measured from the block's corner, key from the halo's), so rows
  ``0 .. 2h + b − b_q − 1`` of each table are never read (``0 .. 2h − 1`` at stride 1).

Paths: ``reference`` (dense masked softmax over all ``H·W`` keys, O(Tq·T) memory), ``xla`` (one halo window of
keys per block, O(B·n_blocks·(b + 2h)²·heads·D) memory, no ``[T, T]`` array) and ``pallas`` (the block-sparse
engine ``attnjax.sparse.engine.block_sparse_attention`` on a tile-major layout of ``b × b`` blocks, with
``HaloMask`` as the fine mask; it adds no per-pair logits, so it serves calls without relative tables or
bias). "auto" tries pallas on GPU/TPU, then xla.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.blocked.lists import BlockSparse, from_block_mask
from attnjax.checks import check_positive, check_scalar, describe
from attnjax.dispatch import dispatch
from attnjax.sparse.engine import block_sparse_attention
from attnjax.sparse.static import check_nonnegative
from attnjax.tiling import num_tiles

BLOCK_SIZE = 8
"""``b``: the query block size of HaloNet's models (timm's ``HaloAttn`` default)."""

HALO_SIZE = 3
"""``h``: the halo of HaloNet's models (timm's ``HaloAttn`` default)."""


@dataclasses.dataclass(frozen=True)
class HaloLayout:
    """The static geometry of halo attention on an ``H × W`` key map (module docstring).

    Attributes:
      height, width: ``H``, ``W`` of the key/value map.
      block_size: ``b``; halo_size: ``h``; stride: ``s`` (queries subsampled by ``s``, ``b % s == 0``).
    """

    height: int
    width: int
    block_size: int = BLOCK_SIZE
    halo_size: int = HALO_SIZE
    stride: int = 1

    def __post_init__(self):
        check_positive(block_size=self.block_size, stride=self.stride)
        check_nonnegative(halo_size=self.halo_size)
        if self.block_size % self.stride:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of stride ({self.stride}): each "
                             "block holds (block_size / stride)² queries")

    @property
    def window(self) -> int:
        """``b + 2h``: the side of a block's halo window."""
        return self.block_size + 2 * self.halo_size

    @property
    def query_block(self) -> int:
        """``b_q = b / s``: queries per block side."""
        return self.block_size // self.stride

    @property
    def blocks(self) -> tuple[int, int]:
        """``(n_h, n_w) = (⌈H/b⌉, ⌈W/b⌉)``: blocks per axis."""
        return num_tiles(self.height, self.block_size), num_tiles(self.width, self.block_size)

    @property
    def num_blocks(self) -> int:
        """``n_h·n_w``."""
        return self.blocks[0] * self.blocks[1]

    @property
    def query_shape(self) -> tuple[int, int]:
        """``(⌈H/s⌉, ⌈W/s⌉)``: q's grid."""
        return num_tiles(self.height, self.stride), num_tiles(self.width, self.stride)

    @property
    def table_size(self) -> int:
        """``2·(b + 2h) − 1``: rows of each relative position table."""
        return 2 * self.window - 1

    def relative_index(self) -> np.ndarray:
        """``int [b_q, b + 2h]``: timm's table row ``t − i + b + 2h − 1`` for query ``i`` of a block, key ``t``
        of its window (one axis)."""
        return np.arange(self.window)[None, :] - np.arange(self.query_block)[:, None] + self.window - 1

    def key_valid(self) -> np.ndarray:
        """``bool [n_h·n_w, (b + 2h)²]``: which keys of each block's halo window are pixels of the map."""
        (nh, nw), b, h, win = self.blocks, self.block_size, self.halo_size, self.window
        rows = (np.arange(nh)[:, None] * b - h + np.arange(win)[None, :])
        cols = (np.arange(nw)[:, None] * b - h + np.arange(win)[None, :])
        rows, cols = (rows >= 0) & (rows < self.height), (cols >= 0) & (cols < self.width)
        valid = rows[:, None, :, None] & cols[None, :, None, :]
        return valid.reshape(nh * nw, win * win)


def _check(q, k, v, block_size, halo_size, stride, relative_height, relative_width, bias, scale) -> HaloLayout:
    """Validate the arguments of every path; returns the layout."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if getattr(a, "ndim", None) != 5:
            raise ValueError(f"{name} must have shape [batch, height, width, heads, head_dim], got {describe(a)}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    if k.shape[:4] != v.shape[:4] or q.shape[4] != k.shape[4] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"k and v must share [batch, height, width, heads], q and k batch, heads and head_dim: "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    layout = HaloLayout(k.shape[1], k.shape[2], block_size, halo_size, stride)
    if q.shape[1:3] != layout.query_shape:
        raise ValueError(f"q must have the grid [⌈H/stride⌉, ⌈W/stride⌉] = {list(layout.query_shape)} of a "
                         f"{k.shape[1]}x{k.shape[2]} key map at stride {stride}, got q {list(q.shape)}")
    if (relative_height is None) != (relative_width is None):
        raise ValueError("relative_height and relative_width go together (HaloNet's factorized relative logits): "
                         "pass both or neither")
    D, heads = q.shape[4], q.shape[3]
    for name, table in (("relative_height", relative_height), ("relative_width", relative_width)):
        if table is not None and jnp.shape(table) != (layout.table_size, D):
            raise ValueError(f"{name} must have shape [2·(block_size + 2·halo_size) − 1, head_dim] = "
                             f"[{layout.table_size}, {D}], got {describe(table)}")
    shape = (heads, layout.query_block ** 2, layout.window ** 2)
    if bias is not None and jnp.shape(bias) != shape:
        raise ValueError(f"bias must have shape [heads, (block_size/stride)², (block_size + 2·halo_size)²] = "
                         f"{list(shape)}, got {describe(bias)}")
    if scale is not None:
        check_scalar("scale", scale)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
    return layout


def _scale(q: jax.Array, scale: Optional[float]) -> float:
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


def halo_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int = BLOCK_SIZE, halo_size: int = HALO_SIZE,
    stride: int = 1, relative_height: Optional[jax.Array] = None, relative_width: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None, scale: Optional[float] = None,
) -> jax.Array:
    """Dense reference: softmax over all ``H·W`` keys under the ``[Tq, T]`` halo mask (O(Tq·T) memory).

    Same arguments and result as ``halo_attention``; the mask, the relative table rows and the bias entries of
    every (query, key) pair come from the pixel coordinates directly.
    """
    L = _check(q, k, v, block_size, halo_size, stride, relative_height, relative_width, bias, scale)
    B, Hq, Wq, heads, D = q.shape
    H, W, Dv = k.shape[1], k.shape[2], v.shape[-1]
    b, h, bq, win = L.block_size, L.halo_size, L.query_block, L.window

    def axis(queries: int, keys: int):
        """Per (query, key) on one axis: inside the halo window, window position ``t``, query position ``i``."""
        yq, yk = np.arange(queries)[:, None], np.arange(keys)[None, :]
        block = yq // bq
        t = yk - (block * b - h)
        return (t >= 0) & (t < win), np.clip(t, 0, win - 1), np.broadcast_to(yq - block * bq, t.shape)

    in_y, ty, iy = axis(Hq, H)
    in_x, tx, ix = axis(Wq, W)

    def spread_y(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a[:, None, :, None], (Hq, Wq, H, W)).reshape(Hq * Wq, H * W)

    def spread_x(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a[None, :, None, :], (Hq, Wq, H, W)).reshape(Hq * Wq, H * W)

    allowed = spread_y(in_y) & spread_x(in_x)
    qf = q.reshape(B, Hq * Wq, heads, D)
    kf, vf = k.reshape(B, H * W, heads, D), v.reshape(B, H * W, heads, Dv)
    logits = _scale(q, scale) * jnp.einsum("bqhd,bkhd->bhqk", qf, kf, preferred_element_type=jnp.float32)
    if relative_height is not None:
        rel_y, rel_x = spread_y(ty - iy + win - 1), spread_x(tx - ix + win - 1)
        qh = jnp.einsum("bqhd,rd->bhqr", qf, relative_height, preferred_element_type=jnp.float32)
        qw = jnp.einsum("bqhd,rd->bhqr", qf, relative_width, preferred_element_type=jnp.float32)
        logits = logits + jnp.take_along_axis(qh, jnp.asarray(rel_y)[None, None], axis=-1)
        logits = logits + jnp.take_along_axis(qw, jnp.asarray(rel_x)[None, None], axis=-1)
    if bias is not None:
        rows, cols = spread_y(iy) * bq + spread_x(ix), spread_y(ty) * win + spread_x(tx)
        logits = logits + jnp.asarray(bias, jnp.float32)[:, rows, cols][None]
    weights = jax.nn.softmax(jnp.where(jnp.asarray(allowed), logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, vf.astype(jnp.float32))
    return out.reshape(B, Hq, Wq, heads, Dv).astype(q.dtype)


def query_blocks(q: jax.Array, layout: HaloLayout) -> jax.Array:
    """``[B, ⌈H/s⌉, ⌈W/s⌉, heads, D] -> [B, n_h·n_w, b_q², heads, D]``: q's blocks (zero-padded), row-major over
    blocks, queries row-major inside a block."""
    (nh, nw), bq = layout.blocks, layout.query_block
    B, Hq, Wq = q.shape[:3]
    q = jnp.pad(q, ((0, 0), (0, nh * bq - Hq), (0, nw * bq - Wq), (0, 0), (0, 0)))
    q = q.reshape(B, nh, bq, nw, bq, *q.shape[3:]).transpose(0, 1, 3, 2, 4, 5, 6)
    return q.reshape(B, nh * nw, bq * bq, *q.shape[5:])


def merge_query_blocks(x: jax.Array, layout: HaloLayout) -> jax.Array:
    """The inverse of ``query_blocks``: ``[B, n_h·n_w, b_q², heads, E] -> [B, ⌈H/s⌉, ⌈W/s⌉, heads, E]``."""
    (nh, nw), bq = layout.blocks, layout.query_block
    Hq, Wq = layout.query_shape
    x = x.reshape(x.shape[0], nh, nw, bq, bq, *x.shape[3:]).transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(x.shape[0], nh * bq, nw * bq, *x.shape[5:])[:, :Hq, :Wq]


def halo_windows(x: jax.Array, layout: HaloLayout) -> jax.Array:
    """Each block's halo window: ``[B, H, W, heads, E] -> [B, n_h·n_w, (b + 2h)², heads, E]``, zero outside the map.

    The map is zero-padded by ``h`` (and up to whole blocks); window ``(i, j)`` is the padded map's
    ``[i·b, i·b + b + 2h) × [j·b, j·b + b + 2h)``, cut as ``b + 2h`` strided slices (stride ``b``) per axis.
    """
    (nh, nw), b, h, win = layout.blocks, layout.block_size, layout.halo_size, layout.window
    B, H, W = x.shape[:3]
    x = jnp.pad(x, ((0, 0), (h, nh * b - H + h), (h, nw * b - W + h), (0, 0), (0, 0)))
    x = jnp.stack([x[:, t:t + (nh - 1) * b + 1:b] for t in range(win)], axis=2)       # [B, nh, win, Wp, ...]
    x = jnp.stack([x[:, :, :, t:t + (nw - 1) * b + 1:b] for t in range(win)], axis=4)  # [B, nh, win, nw, win, ...]
    x = x.transpose(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(B, nh * nw, win * win, *x.shape[5:])


def relative_logits(q_blocks: jax.Array, relative_height: jax.Array, relative_width: jax.Array,
                    layout: HaloLayout) -> jax.Array:
    """HaloNet's relative position logits per block (timm ``PosEmbedRel``; module docstring), float32.

    ``out[b, n, head, i, t] = q_i·r_h[t_y − i_y + b + 2h − 1] + q_i·r_w[t_x − i_x + b + 2h − 1]`` for query ``i``
    of block ``n`` and key ``t`` of its window.

    Args:
      q_blocks: ``[B, n_blocks, b_q², heads, D]`` (``query_blocks``).
      relative_height, relative_width: ``[2·(b + 2h) − 1, D]``.

    Returns:
      ``[B, n_blocks, heads, b_q², (b + 2h)²]``; memory O(B·n_blocks·heads·b_q²·(b + 2h)²).
    """
    bq, win = layout.query_block, layout.window
    index = layout.relative_index()
    B, n, _, heads, D = q_blocks.shape
    qb = q_blocks.reshape(B, n, bq, bq, heads, D)
    along_h = jnp.einsum("bnyxhd,ytd->bnhyxt", qb, relative_height[index], preferred_element_type=jnp.float32)
    along_w = jnp.einsum("bnyxhd,xud->bnhyxu", qb, relative_width[index], preferred_element_type=jnp.float32)
    logits = along_h[..., :, None] + along_w[..., None, :]
    return logits.reshape(B, n, heads, bq * bq, win * win)


def halo_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int = BLOCK_SIZE, halo_size: int = HALO_SIZE,
    stride: int = 1, relative_height: Optional[jax.Array] = None, relative_width: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None, scale: Optional[float] = None,
) -> jax.Array:
    """Halo attention by gathering one halo window of keys per block (Vaswani et al. 2021, sec. 2, Fig. 1).

    q is cut into blocks (``query_blocks``), k and v into the blocks' halo windows (``halo_windows``); each block
    runs one softmax over its ``(b + 2h)²`` keys, the keys outside the map masked. Memory
    O(B·n_blocks·(b + 2h)²·heads·(D + Dv)) for the windows and O(B·n_blocks·heads·b_q²·(b + 2h)²) for the
    logits; never a ``[T, T]`` array. Same arguments and result as ``halo_attention``.
    """
    L = _check(q, k, v, block_size, halo_size, stride, relative_height, relative_width, bias, scale)
    qb, kw, vw = query_blocks(q, L), halo_windows(k, L), halo_windows(v, L)
    logits = _scale(q, scale) * jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kw, preferred_element_type=jnp.float32)
    if relative_height is not None:
        logits = logits + relative_logits(qb, relative_height, relative_width, L)
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    valid = jnp.asarray(L.key_valid())[None, :, None, None, :]
    weights = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bnhqk,bnkhd->bnqhd", weights, vw.astype(jnp.float32))
    return merge_query_blocks(out, L).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class HaloMask(masks.Mask):
    """The halo predicate on the tile-major token order of ``tiles`` (a static, structural mask).

    Queries: block ``n`` (row-major over the ``n_h × n_w`` blocks) holds tokens ``n·b_q² + (y·b_q + x)`` for the
    queries ``(y, x)`` of the block; keys: block ``n`` holds tokens ``n·b² + (y·b + x)``. Query ``(i·b_q + y,
    j·b_q + x)`` of q's grid may see key pixel ``(Y, X)`` iff both are real (not padding) and ``Y ∈ [i·b − h,
    i·b + b + h)``, ``X ∈ [j·b − h, j·b + b + h)``. ``tile`` is integer arithmetic on the index vectors, so the
    Pallas kernel evaluates it in-kernel.
    """

    layout: HaloLayout

    @property
    def num_queries(self) -> int:
        """Tile-major query tokens, padding included: ``n_blocks·b_q²``."""
        return self.layout.num_blocks * self.layout.query_block ** 2

    @property
    def num_keys(self) -> int:
        """Tile-major key tokens, padding included: ``n_blocks·b²``."""
        return self.layout.num_blocks * self.layout.block_size ** 2

    def tile(self, q_idx, kv_idx, T, S):
        L = self.layout
        (nh, nw), b, h, bq = L.blocks, L.block_size, L.halo_size, L.query_block
        Hq, Wq = L.query_shape
        q_block, q_off = q_idx // (bq * bq), q_idx % (bq * bq)
        qi, qj = q_block // nw, q_block % nw
        q_ok = (q_block < nh * nw) & (qi * bq + q_off // bq < Hq) & (qj * bq + q_off % bq < Wq)
        k_block, k_off = kv_idx // (b * b), kv_idx % (b * b)
        ky, kx = (k_block // nw) * b + k_off // b, (k_block % nw) * b + k_off % b
        k_ok = (k_block < nh * nw) & (ky < L.height) & (kx < L.width)
        top, left = (qi * b - h)[:, None], (qj * b - h)[:, None]
        ok = (q_ok[:, None] & k_ok[None, :] & (ky[None, :] >= top) & (ky[None, :] < top + L.window)
              & (kx[None, :] >= left) & (kx[None, :] < left + L.window))
        return ok[None, None]

    def check(self, batch, num_heads, T, S):
        if (T, S) != (self.num_queries, self.num_keys):
            raise ValueError(f"HaloMask covers {self.num_queries} tile-major queries and {self.num_keys} keys, "
                             f"got T={T}, S={S}")

    def block_summary(self, T, S, block_q, block_kv):
        L = self.layout
        if (T, S, block_q, block_kv) != (self.num_queries, self.num_keys, L.query_block ** 2, L.block_size ** 2):
            return np.full((1, 1, num_tiles(T, block_q), num_tiles(S, block_kv)), masks.PARTIAL, np.int8)
        codes_y = _axis_codes(L.height, L.query_shape[0], L)
        codes_x = _axis_codes(L.width, L.query_shape[1], L)
        codes = np.minimum(codes_y[:, None, :, None], codes_x[None, :, None, :])
        return codes.reshape(L.num_blocks, L.num_blocks)[None, None]

    def block_lists(self) -> BlockSparse:
        """Static lists: each query block's nonempty key blocks (its own and the neighbours its halo reaches)."""
        codes = self.block_summary(self.num_queries, self.num_keys, self.layout.query_block ** 2,
                                   self.layout.block_size ** 2)
        return from_block_mask(codes != masks.EMPTY, self.layout.query_block ** 2, self.layout.block_size ** 2)


jax.tree_util.register_dataclass(HaloMask, data_fields=[], meta_fields=["layout"])


def _axis_codes(length: int, query_length: int, layout: HaloLayout) -> np.ndarray:
    """``int8 [n, n]``: EMPTY / PARTIAL / FULL of query block ``i`` against key block ``i'`` along one axis."""
    b, h, bq, win = layout.block_size, layout.halo_size, layout.query_block, layout.window
    n = num_tiles(length, b)
    top = np.arange(n)[:, None] * b - h
    first = np.arange(n)[None, :] * b
    last = np.minimum(first + b, length) - 1
    nonempty = (first < top + win) & (last >= top)
    full = (nonempty & (first + b <= length) & (first >= top) & (first + b <= top + win)
            & ((np.arange(n) + 1) * bq <= query_length)[:, None])
    return np.where(nonempty, np.where(full, masks.FULL, masks.PARTIAL), masks.EMPTY).astype(np.int8)


def halo_attention_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int = BLOCK_SIZE, halo_size: int = HALO_SIZE,
    stride: int = 1, relative_height: Optional[jax.Array] = None, relative_width: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None, scale: Optional[float] = None,
) -> jax.Array:
    """Halo attention on the block-sparse engine's Pallas kernel (``attnjax.sparse.engine.block_sparse_attention``).

    Tokens are laid out tile-major (one engine block = one ``b × b`` block of keys, one ``b_q × b_q`` block of
    queries), the static lists name the key blocks each query block's halo reaches, and ``HaloMask`` is the fine
    mask inside them. Memory O(B·T·heads·(D + Dv)) plus the kernel's tiles. The engine adds no per-pair logits:
    ``NotImplementedError`` for relative tables or bias (and for tile sizes the kernel can't serve), so "auto"
    falls back to ``halo_attention_xla``.
    """
    L = _check(q, k, v, block_size, halo_size, stride, relative_height, relative_width, bias, scale)
    if relative_height is not None or bias is not None:
        raise NotImplementedError("the block-sparse engine adds no per-pair logits: halo attention with relative "
                                  "position tables or a bias needs implementation='xla' or 'reference'")
    B, heads, b = q.shape[0], q.shape[3], L.block_size
    mask = HaloMask(L)
    qt = query_blocks(q, L).reshape(B, mask.num_queries, heads, q.shape[-1])
    key_layout = HaloLayout(L.height, L.width, b, L.halo_size, 1)
    kt, vt = (query_blocks(x, key_layout).reshape(B, mask.num_keys, heads, x.shape[-1]) for x in (k, v))
    out = block_sparse_attention(qt, kt, vt, mask.block_lists(), mask=mask, scale=_scale(q, scale),
                                 implementation="pallas")
    return merge_query_blocks(out.reshape(B, L.num_blocks, L.query_block ** 2, heads, v.shape[-1]), L)


_PATHS = {"reference": halo_attention_reference, "xla": halo_attention_xla, "pallas": halo_attention_pallas}


def halo_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int = BLOCK_SIZE, halo_size: int = HALO_SIZE,
    stride: int = 1, relative_height: Optional[jax.Array] = None, relative_width: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None, scale: Optional[float] = None, implementation: str = "auto",
) -> jax.Array:
    """HaloNet blocked local self-attention (Vaswani et al., CVPR 2021, sec. 2; module docstring).

    For query ``p`` of block ``n`` (``b_q × b_q`` queries, ``b × b`` pixels) and the keys ``p'`` of the map inside
    the block's ``(b + 2h)²`` halo window ``N(n)``::

        out[p] = Σ_{p' ∈ N(n)} softmax_{p'}(scale·q_p·k_{p'} + q_p·r_h[Δ_y] + q_p·r_w[Δ_x] + bias[i, t]) v_{p'}

    (``Δ`` timm's relative index, ``i``/``t`` the positions of ``p``/``p'`` in the block/window; the relative and
    bias terms only when given). Keys outside the map are masked out.

    Args:
      q: ``[B, ⌈H/s⌉, ⌈W/s⌉, heads, D]`` (``[B, H, W, heads, D]`` at stride 1); k: ``[B, H, W, heads, D]``;
        v: ``[B, H, W, heads, Dv]``. ``H``, ``W`` need not be multiples of ``block_size``.
      block_size: ``b`` (8 in HaloNet); halo_size: ``h ≥ 0`` (3 in HaloNet; 0 is plain blocked attention).
      stride: ``s``, queries subsampled by ``s`` (sec. 2, strided self-attentive downsampling);
        ``block_size % stride == 0``.
      relative_height, relative_width: HaloNet's factorized relative position tables ``[2·(b + 2h) − 1, D]``
        (both or neither), added unscaled as timm does.
      bias: ``[heads, b_q², (b + 2h)²]`` added to every block's logits (query in block × key in window), or None.
      scale: logit scale, default ``1/√D``.
      implementation: "reference", "xla", "pallas" or "auto" (pallas on GPU/TPU when it serves, else xla).

    Returns:
      ``[B, ⌈H/s⌉, ⌈W/s⌉, heads, Dv]`` in q's dtype.
    """
    _check(q, k, v, block_size, halo_size, stride, relative_height, relative_width, bias, scale)
    return dispatch(_PATHS, implementation, q, k, v, what="halo attention", block_size=block_size,
                    halo_size=halo_size, stride=stride, relative_height=relative_height,
                    relative_width=relative_width, bias=bias, scale=scale)


__all__ = ["BLOCK_SIZE", "HALO_SIZE", "HaloLayout", "HaloMask", "halo_attention", "halo_attention_pallas",
           "halo_attention_reference", "halo_attention_xla", "halo_windows", "merge_query_blocks", "query_blocks",
           "relative_logits"]
