"""BiFormer bi-level routing attention (catalog B8).

Zhu, Wang, Ke, Zhang & Lau 2023, "BiFormer: Vision Transformer with Bi-Level Routing Attention",
CVPR 2023 (arXiv:2303.08810), Sec. 3.2; official code ``rayleizhu/BiFormer`` (``ops/bra_legacy.py``,
``ops/bra_nchw.py``, ``ops/torch/rrsda.py``). An ``H × W`` token grid is cut into regions; then

- region partition (Eq. 1): ``Q, K, V`` of the tokens, grouped by region (``X^r``);
- region-to-region routing (Eq. 2): region-mean queries and keys ``Q^r, K^r`` and their affinity
  ``A^r = Q^r (K^r)ᵀ``;
- (Eq. 3) ``I^r = topkIndex(A^r)``: each region keeps its ``top_k`` regions of highest affinity;
- token-to-token attention (Eq. 4): ``K^g = gather(K, I^r)``, ``V^g = gather(V, I^r)``;
- (Eq. 5) ``O = Attention(Q, K^g, V^g) + LCE(V)``, with ``LCE`` a depthwise convolution of ``V``
  (local context enhancement; 5×5 in the official models).

What follows the official code where the text leaves it open:

- **The own region is not forced in.** The official ``TopkRouting`` / ``nchwBRA`` take a plain
  ``torch.topk`` of ``A^r``; a region sees itself only if its own affinity ranks in its top ``k``.
- **One routing for all heads** (``per_head=False``): the official router takes the region means of
  the full ``C``-channel q and k, so ``A^r = Σ_h Q^r_h (K^r_h)ᵀ`` over heads and every head uses the
  same regions. With GQA, query head ``h`` pairs with KV head ``h // G``. ``per_head=True`` routes
  each query head on its own ``Q^r_h (K^r_{h//G})ᵀ`` (not in the paper).
- **Routing is not differentiated** (``diff_routing=False`` in every released model: the router
  detaches q and k); gradients reach q, k, v through the token-to-token attention only.
- The LCE channels are V's channels, heads-major (``(m c)`` in the official layout); with GQA a
  query head adds the LCE of its KV head.

Grids the regions don't tile: the official ``nchwBRA`` zero-pads the grid to whole regions, takes
region means over the valid tokens (``avg_pool2d(ceil_mode=True, count_include_pad=False)``) and
leaves the padded zero keys in the softmax (its "TODO: mask padding region"); the legacy code pads
the *input* before projection. Here the grid is padded to whole regions, region means are over
valid tokens (as ``nchwBRA``), and **padded keys are masked out**, so the result is Eqs. (2)-(5) on
the actual tokens with smaller edge regions.

Public names:

- ``biformer_attention_reference``: Eqs. (1)-(5) as written: per region, gather the routed regions'
  keys and values and attend (O(N · top_k · P) memory, P tokens per region), plus a naive LCE.
- ``Biformer``: the registered ``BlockSelector``. With ``grid=(H, W)`` and ``region=(rh, rw)`` the
  tokens are permuted (``attnjax.sparse.paro.GridPermutedSelector``) so each region is one query and
  key block of ``P = rh·rw`` tokens, its list is its ``top_k`` regions, and the block-sparse engine
  (reference / xla gather / pallas kernel) runs; with ``grid=None`` the regions are the engine's
  1-D tiles of a plain sequence (any ``T``, ``S``, masks), the form the sequence benchmark runs.
- ``biformer_attention``: the functional core of ``attnjax.nn.BiLevelRoutingAttention``: routed
  attention through the engine plus ``local_context_enhancement``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.api import attention
from attnjax.blocked.lists import BlockSparse, allowed_blocks, to_block_mask
from attnjax.checks import check_positive, check_qkv, describe
from attnjax.masks import Mask, Segments
from attnjax.sparse.engine import PATHS, fits_top_k, selected_attention
from attnjax.sparse.moba import block_means
from attnjax.sparse.paro import GridPermutedSelector, check_grid, inverse_permutation, permute_tokens
from attnjax.sparse.seer import select_topk
from attnjax.tiling import num_tiles

PAPER = "Zhu et al. 2023, BiFormer: Vision Transformer with Bi-Level Routing Attention (CVPR 2023)"


# ----------------------------------------------------------------------------- regions of a grid

def check_grid_region(grid, region) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``(grid, region)`` as tuples of two positive ints, else ``ValueError`` naming the argument."""
    for name, value in (("grid", grid), ("region", region)):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"{name} must be (height, width), got {describe(value)}")
    check_positive(**{"grid[0]": grid[0], "grid[1]": grid[1], "region[0]": region[0], "region[1]": region[1]})
    return tuple(grid), tuple(region)


def region_layout(grid: Tuple[int, int], region: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Region-major token order of an ``H × W`` grid padded to whole ``rh × rw`` regions.

    The grid is padded at the bottom and right to ``(⌈H/rh⌉·rh, ⌈W/rw⌉·rw)``; regions are numbered
    row-major, and the tokens of a region are contiguous (row-major inside it).

    Returns:
      ``(perm, counts)``: int ``[R·P]`` with ``perm[i]`` the row-major index ``y·W + x`` of the
      token at position ``i``, or ``N = H·W`` for a padded slot; and int ``[R]``, the valid tokens
      of each region (``R`` regions of ``P = rh·rw`` slots).
    """
    (H, W), (rh, rw) = check_grid_region(grid, region)
    nh, nw = num_tiles(H, rh), num_tiles(W, rw)
    y, x = np.arange(nh * rh)[:, None], np.arange(nw * rw)[None, :]
    index = np.where((y < H) & (x < W), y * W + x, H * W)
    perm = index.reshape(nh, rh, nw, rw).transpose(0, 2, 1, 3).reshape(-1)
    counts = (perm.reshape(nh * nw, rh * rw) < H * W).sum(-1)
    return perm, counts


def region_affinity(q: jax.Array, k: jax.Array, block_q: int, block_kv: int, *, q_counts=None, k_counts=None,
                    per_head: bool = False) -> jax.Array:
    """BiFormer's region affinity ``A^r = Q^r (K^r)ᵀ`` (Eq. 2) of contiguous regions: float32.

    ``Q^r`` is the mean of each block of ``block_q`` queries over its valid tokens (``q_counts``,
    int ``[nq]``: padded slots hold zeros and don't count; default: the tokens of the block), ``K^r``
    likewise. ``per_head=False``: ``[B, 1, nq, nk]``, summed over query heads (head ``h`` against KV
    head ``h // G``), the official router's full-channel product; ``per_head=True``: ``[B, Hq, nq, nk]``.
    No gradient flows through it (the official router detaches q and k).
    """
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, _, Hq, D = q.shape
    Hkv = k.shape[2]

    def means(x, block, counts):
        m = block_means(x, block)
        if counts is None:
            return m
        return m * (np.minimum(block, x.shape[1] - np.arange(m.shape[1]) * block) / np.asarray(counts))[:, None, None]

    q_means = means(q, block_q, q_counts).reshape(B, -1, Hkv, Hq // Hkv, D)
    key_means = means(k, block_kv, k_counts)
    if per_head:
        return jnp.einsum("bikgd,bnkd->bkgin", q_means, key_means).reshape(B, Hq, q_means.shape[1], -1)
    return jnp.einsum("bikgd,bnkd->bin", q_means, key_means)[:, None]


# ----------------------------------------------------------------------------- local context enhancement

def check_lce(v: jax.Array, kernel: jax.Array, bias: Optional[jax.Array]) -> None:
    """``ValueError`` unless ``kernel`` is ``[kh, kw, C]`` with odd ``kh, kw`` and ``C = Hkv·Dv`` of
    ``v [B, N, Hkv, Dv]``, and ``bias`` (if given) is ``[C]``."""
    C = v.shape[2] * v.shape[3]
    shape = tuple(getattr(kernel, "shape", ()))
    if len(shape) != 3 or shape[2] != C or shape[0] % 2 == 0 or shape[1] % 2 == 0:
        raise ValueError(f"lce_kernel must be [kh, kw, C] with odd kh, kw and C = Hkv·Dv = {C} for v "
                         f"{list(v.shape)}, got {describe(kernel)}")
    if bias is not None and tuple(getattr(bias, "shape", ())) != (C,):
        raise ValueError(f"lce_bias must be [C] = [{C}] for v {list(v.shape)}, got {describe(bias)}")


def local_context_enhancement(v: jax.Array, grid: Tuple[int, int], kernel: jax.Array,
                              bias: Optional[jax.Array] = None) -> jax.Array:
    """``LCE(V)`` of Eq. (5): a depthwise convolution of the values on their grid ("same" zero padding).

    ``v [B, H·W, Hkv, Dv]`` (row-major grid), ``kernel [kh, kw, C]`` (odd sizes, ``C = Hkv·Dv``
    channels heads-major, official ``lepe`` = ``Conv2d(C, C, k, padding=k//2, groups=C)``), ``bias [C]``.
    Returns float32 ``[B, H·W, Hkv, Dv]``: ``LCE(V)[y, x, c] = b_c + Σ_{i,j} w[i, j, c]·V[y+i-kh//2, x+j-kw//2, c]``.
    """
    check_lce(v, kernel, bias)
    B, N, Hkv, Dv = v.shape
    H, W = check_grid_region(grid, (1, 1))[0]
    check_grid(grid, N, N)
    image = v.astype(jnp.float32).reshape(B, H, W, Hkv * Dv)
    out = lax.conv_general_dilated(image, kernel.astype(jnp.float32)[:, :, None, :], (1, 1), "SAME",
                                   feature_group_count=Hkv * Dv, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.reshape(B, N, Hkv, Dv)


def lce_reference(v: jax.Array, grid: Tuple[int, int], kernel: jax.Array, bias: Optional[jax.Array] = None):
    """``LCE(V)`` as an explicit sum over the kernel's offsets on the zero-padded grid (naive form of
    ``local_context_enhancement``, same arguments and result)."""
    check_lce(v, kernel, bias)
    B, N, Hkv, Dv = v.shape
    H, W = check_grid_region(grid, (1, 1))[0]
    check_grid(grid, N, N)
    kh, kw = kernel.shape[:2]
    image = jnp.pad(v.astype(jnp.float32).reshape(B, H, W, Hkv * Dv),
                    ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    out = sum(image[:, i:i + H, j:j + W] * kernel[i, j].astype(jnp.float32) for i in range(kh) for j in range(kw))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.reshape(B, N, Hkv, Dv)


def add_lce(out: jax.Array, lce: jax.Array) -> jax.Array:
    """``out [B, N, Hq, Dv] + lce [B, N, Hkv, Dv]`` (query head ``h`` adds KV head ``h // G``), in out's dtype."""
    G = out.shape[2] // lce.shape[2]
    return (out.astype(jnp.float32) + jnp.repeat(lce, G, axis=2)).astype(out.dtype)


# ----------------------------------------------------------------------------- the reference

def biformer_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, grid: Tuple[int, int], region: Tuple[int, int], top_k: int = 4,
    per_head: bool = False, scale: Optional[float] = None, lce_kernel: Optional[jax.Array] = None,
    lce_bias: Optional[jax.Array] = None,
) -> jax.Array:
    """Bi-level routing attention as BiFormer's equations (Zhu et al. 2023, Sec. 3.2, Eqs. 1-5).

    1. (Eq. 1) Tokens of the ``H × W`` grid grouped into ``R`` regions of ``rh × rw`` (the grid padded
       at the bottom/right to whole regions; padded slots are no tokens).
    2. (Eq. 2) ``A^r = Q^r (K^r)ᵀ``, with ``Q^r``, ``K^r`` the per-region means over valid tokens
       (summed over heads, or per query head with ``per_head``).
    3. (Eq. 3) ``I^r = topkIndex(A^r)``: the ``min(top_k, R)`` regions of highest affinity (own region
       not forced, as the official code).
    4. (Eq. 4) ``K^g = gather(K, I^r)``, ``V^g = gather(V, I^r)``: ``top_k·P`` keys per region.
    5. (Eq. 5) ``O = softmax(scale·Q (K^g)ᵀ) V^g + LCE(V)`` per region (padded keys masked), with
       ``LCE`` = ``lce_reference`` when ``lce_kernel`` is given.

    Args:
      q: ``[B, H·W, Hq, D]``; k: ``[B, H·W, Hkv, D]``; v: ``[B, H·W, Hkv, Dv]`` (row-major grid).
      grid: ``(H, W)``; region: ``(rh, rw)`` tokens per region side; top_k: regions per region.
      per_head: route each query head separately (default: one routing for all heads, official).
      scale: logit scale, default ``1/sqrt(D)`` (the official layer uses ``C^-1/2``, see the layer).
      lce_kernel: ``[kh, kw, Hkv·Dv]`` depthwise kernel (odd sizes) or None; lce_bias: ``[Hkv·Dv]``.
    Returns:
      ``[B, H·W, Hq, Dv]`` in q's dtype.
    """
    check_qkv(q, k, v)
    check_grid(check_grid_region(grid, region)[0], q.shape[1], k.shape[1])
    check_positive(top_k=top_k)
    B, N, Hq, D = q.shape
    Hkv, Dv, G = k.shape[2], v.shape[3], Hq // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    perm, counts = region_layout(grid, region)
    R, P = counts.shape[0], perm.shape[0] // counts.shape[0]
    valid = jnp.asarray((perm < N).reshape(R, P))

    def regions(x):  # [B, N, h, d] -> float32 [B, R, P, h, d], padded slots zero
        return jnp.take(x.astype(jnp.float32), jnp.asarray(perm), axis=1, mode="fill",
                        fill_value=0).reshape(B, R, P, *x.shape[2:])

    qr, kr, vr = regions(q), regions(k), regions(v)
    q_mean = qr.sum(2) / counts[:, None, None]                                     # Q^r [B, R, Hq, D]
    k_mean = jnp.repeat(kr.sum(2) / counts[:, None, None], G, axis=2)              # K^r [B, R, Hq, D]
    affinity = jnp.einsum("bihd,bjhd->bhij", q_mean, k_mean)                       # A^r per head
    affinity = affinity if per_head else affinity.sum(1, keepdims=True)
    _, routed = lax.top_k(lax.stop_gradient(affinity), min(top_k, R))              # I^r [B, Hr, R, k]
    routed = jnp.broadcast_to(routed, (B, Hq) + routed.shape[2:])
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(Hq)[None, :, None, None]
    k_heads = jnp.repeat(kr, G, axis=3).transpose(0, 3, 1, 2, 4)                   # [B, Hq, R, P, D]
    v_heads = jnp.repeat(vr, G, axis=3).transpose(0, 3, 1, 2, 4)
    k_g = k_heads[b, h, routed].reshape(B, Hq, R, -1, D)                           # K^g [B, Hq, R, k·P, D]
    v_g = v_heads[b, h, routed].reshape(B, Hq, R, -1, Dv)                          # V^g
    valid_g = valid[routed].reshape(B, Hq, R, -1)
    logits = scale * jnp.einsum("bhrpd,bhrsd->bhrps", qr.transpose(0, 3, 1, 2, 4), k_g)
    logits = jnp.where(valid_g[:, :, :, None, :], logits, -jnp.inf)
    out = jnp.einsum("bhrps,bhrsd->brphd", jax.nn.softmax(logits, axis=-1), v_g).reshape(B, R * P, Hq, Dv)
    out = jnp.take(out, jnp.asarray(inverse_permutation(perm)[:N]), axis=1)
    if lce_kernel is not None:
        return add_lce(out, lce_reference(v, grid, lce_kernel, lce_bias)).astype(q.dtype)
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------- the selector

def region_attention(selector: "Biformer", implementation: str, q, k, v, *, mask=None, return_lse: bool = False,
                     **options):
    """``attnjax.attention`` signature (after the bound arguments) of ``Biformer`` on a grid.

    Regions that tile the grid: ``paro.permuted_selector_attention`` (permute, select, engine, permute
    back). Otherwise q, k, v are laid out on the padded grid (``region_layout``, zeros in the padded
    slots), the engine runs with a ``Segments`` mask that keeps padded keys from every query, and the
    output (and lse) of the real tokens is read back.
    """
    if mask is not None:
        raise NotImplementedError("Biformer with a grid permutes the tokens into regions; a fine mask "
                                  "(defined on the original order) is not supported")
    perm = selector.token_permutation(q, k)
    N = q.shape[1]
    pad = perm == N
    if not pad.any():
        return GridPermutedSelector.implementations(selector)[implementation](q, k, v, return_lse=return_lse,
                                                                             **options)
    padding = Segments(jnp.asarray(np.where(pad, 2, 1)[None], jnp.int32),
                       jnp.asarray(np.where(pad, 0, 1)[None], jnp.int32))

    def take(x):
        return jnp.take(x, jnp.asarray(perm), axis=1, mode="fill", fill_value=0)

    result = selected_attention(selector, implementation, take(q), take(k), take(v), mask=padding,
                                return_lse=return_lse, **options)
    back = inverse_permutation(perm)[:N]
    if return_lse:
        out, lse = result
        return permute_tokens(out, back), permute_tokens(lse, back)
    return permute_tokens(result, back)


@registry.register
@dataclasses.dataclass(frozen=True)
class Biformer(GridPermutedSelector):
    """BiFormer's bi-level routing (Zhu et al. 2023, Eqs. 2-4) as block lists; see the module docstring.

    Each region is one query block and one key block; its list is its ``min(top_k, R)`` regions of
    highest region-mean affinity ``A^r = Q^r (K^r)ᵀ`` among the blocks the mask allows (own region not
    forced, as the official code; dynamic lists with ``K = min(top_k, nk)``). Token-to-token attention
    inside the listed blocks is the engine's (Eq. 5 without LCE, which has parameters and lives in
    ``attnjax.nn.BiLevelRoutingAttention``).

    - ``grid=(H, W)``, ``region=(rh, rw)``: self-attention on the row-major grid (``T = S = H·W``); the
      paths lay the tokens out region by region (padded to whole regions when they don't tile the
      grid; padded keys masked), select and attend there, and put the output back in grid order.
      ``block_q = block_kv = rh·rw`` (set from ``region``). ``select`` takes q, k already in that
      layout (``token_permutation``). No fine mask.
    - ``grid=None``: a plain sequence; regions are the tiles of ``block_q`` queries and ``block_kv``
      keys (default 64), means over the valid tokens of each tile; any ``T``, ``S``, GQA, masks.

    Cost: the routing is ``O(N·D + R²·D)`` (means and a region affinity), the attention visits
    ``min(top_k, R)`` key blocks per query block: ``O(N·top_k·P·D)`` instead of ``O(N²·D)``.

    Attributes:
      block_q, block_kv: tile sizes (default 64 without a grid; ``rh·rw`` with one).
      top_k: regions each region attends to (official default 4; BiFormer-T/S/B stages 1, 4, 16).
      grid: ``(H, W)`` or None.
      region: ``(rh, rw)`` tokens per region side (with a grid only).
      per_head: route each query head separately instead of one routing for all heads (official).
    """

    name: ClassVar[str] = "biformer"
    paper: ClassVar[str] = PAPER

    block_q: Optional[int] = None
    block_kv: Optional[int] = None
    top_k: int = 4
    grid: Optional[Tuple[int, int]] = None
    region: Optional[Tuple[int, int]] = None
    per_head: bool = False

    def __post_init__(self):
        check_positive(top_k=self.top_k)
        if not isinstance(self.per_head, bool):
            raise TypeError(f"Biformer.per_head must be a bool, got {describe(self.per_head)}")
        if self.grid is None:
            if self.region is not None:
                raise ValueError(f"Biformer.region={self.region!r} needs a grid (grid=(H, W))")
            object.__setattr__(self, "block_q", 64 if self.block_q is None else self.block_q)
            object.__setattr__(self, "block_kv", 64 if self.block_kv is None else self.block_kv)
            check_positive(block_q=self.block_q, block_kv=self.block_kv)
            return
        if self.region is None:
            raise ValueError(f"Biformer.grid={self.grid!r} needs region=(rh, rw)")
        grid, region = check_grid_region(self.grid, self.region)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "region", region)
        P = region[0] * region[1]
        if self.block_q not in (None, P) or self.block_kv not in (None, P):
            raise ValueError(f"Biformer with region={region} has blocks of rh·rw = {P} tokens; got "
                             f"block_q={self.block_q!r}, block_kv={self.block_kv!r} (leave them unset)")
        object.__setattr__(self, "block_q", P)
        object.__setattr__(self, "block_kv", P)

    def token_permutation(self, q: jax.Array, k: jax.Array) -> np.ndarray:
        """``region_layout(grid, region)[0]``: int ``[R·P]``, the grid index of each slot (``N`` = padding);
        a permutation of the ``N = H·W`` tokens when the regions tile the grid."""
        check_grid(self.grid, q.shape[1], k.shape[1])
        return region_layout(self.grid, self.region)[0]

    def implementations(self):
        """Engine paths: plain (``grid=None``) or through ``region_attention`` (with a grid)."""
        if self.grid is None:
            return super().implementations()
        return {name: functools.partial(region_attention, self, name) for name in PATHS}

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        """Each region's ``min(top_k, nk)`` regions of highest ``region_affinity`` that ``mask`` allows (Eqs. 2-3).

        With a grid, q and k are in region layout (``T = S = R·P``, zeros in padded slots) and region
        means count the valid tokens only. Dynamic lists ``[B, 1 or Hq, nq, K]``.
        """
        T, S = q.shape[1], k.shape[1]
        counts = None
        if self.grid is not None:
            perm, counts = region_layout(self.grid, self.region)
            if T != perm.shape[0] or S != perm.shape[0]:
                raise ValueError(f"Biformer.select takes q and k in region layout (token_permutation): "
                                 f"T = S = {perm.shape[0]} for grid {self.grid}, region {self.region}; "
                                 f"got q {list(q.shape)}, k {list(k.shape)}")
        affinity = region_affinity(q, k, self.block_q, self.block_kv, q_counts=counts, k_counts=counts,
                                   per_head=self.per_head)
        ok = jnp.asarray(allowed_blocks(mask, T, S, self.block_q, self.block_kv))
        affinity = jnp.broadcast_to(affinity, jnp.broadcast_shapes(affinity.shape, ok.shape))
        K = min(self.top_k, num_tiles(S, self.block_kv))
        return select_topk(affinity, K, ok, block_q=self.block_q, block_kv=self.block_kv)

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when no query block's row allows more than ``min(top_k, nk)`` blocks (e.g. ``top_k ≥ R``)."""
        return fits_top_k(min(self.top_k, num_tiles(S, self.block_kv)), mask, T, S, self.block_q, self.block_kv)


def routed_token_mask(q: jax.Array, k: jax.Array, *, grid: Tuple[int, int], region: Tuple[int, int],
                      top_k: int = 4, per_head: bool = False) -> jax.Array:
    """The routed pattern in grid order: bool ``[B, Hl, N, N]``, token ``i`` may see token ``j`` iff ``j``'s
    region is among the ``top_k`` regions routed from ``i``'s (``Biformer.select``; ``Hl`` = 1, or ``Hq`` with
    ``per_head``). ``attnjax.attention(q, k, v, mask=masks.Explicit(mask))`` is then Eqs. (4)-(5) without LCE:
    O(N²) memory, for analysis and tests.
    """
    selector = Biformer(grid=grid, region=region, top_k=top_k, per_head=per_head)
    perm = selector.token_permutation(q, k)
    N = q.shape[1]

    def take(x):
        return jnp.take(x, jnp.asarray(perm), axis=1, mode="fill", fill_value=0)

    region_blocks = to_block_mask(selector.select(take(q), take(k)))
    region_of = jnp.asarray(inverse_permutation(perm)[:N] // selector.block_q)
    return region_blocks[:, :, region_of][:, :, :, region_of]


# ----------------------------------------------------------------------------- the functional core

def biformer_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, grid: Tuple[int, int], region: Tuple[int, int], top_k: int = 4,
    per_head: bool = False, scale: Optional[float] = None, lce_kernel: Optional[jax.Array] = None,
    lce_bias: Optional[jax.Array] = None, implementation: str = "auto",
) -> jax.Array:
    """Bi-level routing attention, Eq. (5) ``O = Attention(Q, K^g, V^g) + LCE(V)``, through the block engine.

    ``attnjax.attention(q, k, v, mechanism=Biformer(grid, region, top_k, per_head))`` (regions as
    blocks, ``implementation`` picks the engine path) plus ``local_context_enhancement(v, ...)``
    when ``lce_kernel`` is given. Same arguments and result as ``biformer_attention_reference``.
    """
    check_qkv(q, k, v)
    if lce_kernel is not None:
        check_lce(v, lce_kernel, lce_bias)
    mechanism = Biformer(grid=grid, region=region, top_k=top_k, per_head=per_head)
    out = attention(q, k, v, mechanism=mechanism, scale=scale, implementation=implementation)
    if lce_kernel is None:
        return out
    return add_lce(out, local_context_enhancement(v, grid, lce_kernel, lce_bias))


__all__ = [
    "Biformer", "biformer_attention", "biformer_attention_reference", "local_context_enhancement", "lce_reference",
    "region_affinity", "region_layout", "routed_token_mask", "PAPER",
]
