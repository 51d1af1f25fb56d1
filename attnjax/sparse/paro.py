"""PAROAttention (catalog B6): pattern-aware token reordering, block selection, INT8/INT4 attention.

Zhao et al. 2025, "PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized
Attention in Visual Generation Models" (arXiv:2506.16054; kernels: ``jamescsq47/PAROAtten``).

Visual tokens come from a ``(frames, height, width)`` grid flattened to a sequence. A head whose
attention is local along one axis gives a scattered map in frame-major order but a block-diagonal
one once that axis is innermost. PARO picks, per head and offline from calibration inputs, one of
the six axis orders (``AXIS_ORDERS``, as in the public ``permute_qk``: FHW, FWH, HFW, HWF, WFH,
WHF), then sparsifies and quantizes block by block in that order.

- ``choose_permutation``: PARO's offline choice of an order per head (paper Sec. 4.1, Eq. 1-3): with
  ``rule="paro"`` each order is scored by ``paro_metrics`` on the post-softmax map ``P`` cut into
  ``block_q × block_kv`` tiles. *Sparsity* (Eq. 1): ``M_sparse``, the share of tiles in which at least a
  share ``sigma`` of the entries are below ``eps`` (the paper's examples: ``eps = 1e-3``, ``sigma = 90%``).
  *Quantization* (Eq. 2): ``M_quant``, the mean over tiles of the **incoherence** ``Ψ = max|x| / mean|x|``
  of the tile (``1`` for a uniform tile). ``combine_metrics`` (Eq. 3) divides each term by its sum over
  the six candidates and weights them ``α`` and ``1 − α``; the smallest score wins. Eq. 3 as printed
  adds ``M_sparse`` itself and minimizes, which would prefer the order with *fewer* skippable tiles;
  this module uses the sparsity cost ``1 − M_sparse`` in its place (the paper does not report ``α``).
  Provenance: the equations were read from two third-party transcriptions of the arXiv text (one
  citing its LaTeX source), not from the paper itself, which could not be opened here; the public
  code (``jamescsq47/PAROAtten``) has the kernels only and loads a precomputed ``permute_plan``. The
  older ``rule="concentration"`` (share of each query block's mass in its top ``⌈density·nk⌉`` key
  blocks, higher is better) is kept as the default of the function for compatibility; the ``Paro``
  selector uses ``rule="paro"``.
- ``Paro``: the registered selector. Per KV head, one order (a query head uses its KV head's, so
  K/V shared by a GQA group are permuted once and consistently). Tokens are permuted, each query
  block keeps its ``⌈density·nk⌉`` key blocks of largest attention mass, the engine runs, and the
  output is permuted back.
- ``quantized_attention_reference``: INT8 or INT4 Q·Kᵀ and P·V (``qk_bits``, ``pv_bits``; ``None``
  keeps that product in float) with int32 accumulation and per-block scales, dequantized, as in
  PARO's SageAttention-based kernels; ``quantize_symmetric`` is the block quantizer (symmetric, values
  in ``[-(2^(b-1)-1), 2^(b-1)-1]``: ``[-127, 127]`` for INT8, ``[-7, 7]`` for INT4).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.masks import Mask
from attnjax.checks import check_positive
from attnjax.blocked.scores import allowed, dense_operands, raw_logits, score_spec
from attnjax.blocked.tiles import kv_tiles, q_tiles
from attnjax.sparse.engine import PATHS, BlockSelector, fits_top_k, selected_attention
from attnjax.blocked.lists import BlockSparse, allowed_blocks
from attnjax.sparse.pooling import pooled_attention
from attnjax.sparse.seer import select_topk
from attnjax.tiling import num_tiles, pad_axis

PAPER = ("Zhao et al. 2025, PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized "
         "Attention in Visual Generation Models")

AXIS_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
"""The six orders of the grid axes (0 = frames, 1 = height, 2 = width), outermost first."""


# ----------------------------------------------------------------------------- token permutations

def grid_permutation(grid: Tuple[int, int, int], order: Tuple[int, int, int]) -> np.ndarray:
    """Token order of a frame-major ``(F, H, W)`` grid read with axes ``order`` (outermost first).

    ``perm[i]`` is the original index of the token at position ``i``: ``x_permuted = x[:, perm]``.
    """
    return np.arange(int(np.prod(grid))).reshape(grid).transpose(order).ravel()


def permute_tokens(x: jax.Array, perm) -> jax.Array:
    """``y[:, i, h] = x[:, perm[h, i], h]`` for ``x [B, N, H, ...]``; ``perm`` is ``[N]`` (every head) or ``[H, N]``."""
    if perm.ndim == 1:
        return jnp.take(x, jnp.asarray(perm), axis=1)
    idx = jnp.asarray(perm).T.reshape((1,) + perm.T.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, idx, axis=1)


def inverse_permutation(perm):
    """The inverse of each permutation along the last axis (NumPy in, NumPy out)."""
    return np.argsort(perm, axis=-1) if isinstance(perm, np.ndarray) else jnp.argsort(perm, axis=-1)


def permuted_selector_attention(selector: BlockSelector, implementation: str, q, k, v, *, mask=None,
                                return_lse: bool = False, **options):
    """A selector's path on permuted tokens: permute q, k, v, select and attend, permute back.

    ``selector.token_permutation(q, k)`` gives ``[N]`` (all heads) or ``[Hkv, N]`` (per KV head;
    query head ``h`` uses row ``h // G``). Self-attention only, and no fine mask: a mask is
    defined on the original order.
    """
    if mask is not None:
        raise NotImplementedError(f"{type(selector).__name__} permutes the tokens of its grid; a fine mask "
                                  "(defined on the original order) is not supported")
    Hq, Hkv = q.shape[2], k.shape[2]
    perm = selector.token_permutation(q, k)
    q_perm = perm if perm.ndim == 1 else perm.repeat(Hq // Hkv, axis=0)
    result = selected_attention(selector, implementation, permute_tokens(q, q_perm), permute_tokens(k, perm),
                                 permute_tokens(v, perm), mask=None, return_lse=return_lse, **options)
    back = inverse_permutation(q_perm)
    if return_lse:
        out, lse = result
        return permute_tokens(out, back), permute_tokens(lse, back)
    return permute_tokens(result, back)


class GridPermutedSelector(BlockSelector):
    """A selector with a ``grid`` field: with a grid, its paths run ``permuted_selector_attention``
    (tokens reordered by ``token_permutation`` around the engine); without one, the plain engine paths."""

    def implementations(self):
        if self.grid is None:
            return super().implementations()
        return {name: functools.partial(permuted_selector_attention, self, name) for name in PATHS}


# ----------------------------------------------------------------------------- block mass

def block_attention_mass(q: jax.Array, k: jax.Array, block_q: int, block_kv: int, *,
                         mask: Optional[Mask] = None, scale: Optional[float] = None) -> jax.Array:
    """Attention mass per tile, averaged over the query block's rows (blocked, O(T·block) memory).

    ``M[b, h, i, n] = (1/|i|) Σ_{t ∈ block i, s ∈ block n} softmax_s(scale·q_t·k_s | mask)`` with
    ``|i|`` the valid rows of query block ``i``: float32 ``[B, Hq, nq, nk]``, each row summing to 1
    (0 for rows that see no key); ``attnjax.sparse.pooling.pooled_attention`` with ``pool="sum"``.
    No gradient flows to q or k.
    """
    T = q.shape[1]
    mass = pooled_attention(q, k, block_q=block_q, block_kv=block_kv, pool="sum", mask=mask, scale=scale)
    rows = np.minimum(block_q, T - np.arange(num_tiles(T, block_q)) * block_q).astype(np.float32)
    return mass / rows[:, None]


def budget(density: float, num_kv_blocks: int) -> int:
    """Key blocks per query block at ``density``: ``⌈density·nk⌉``, at least 1."""
    return min(num_kv_blocks, max(1, math.ceil(density * num_kv_blocks)))


def block_concentration(mass: jax.Array, density: float) -> jax.Array:
    """Share of each query block's mass in its top ``budget(density, nk)`` key blocks.

    ``mass [..., nq, nk] -> [..., nq]``; a row with no mass counts as fully concentrated (1).
    """
    top, _ = lax.top_k(mass, budget(density, mass.shape[-1]))
    total = mass.sum(-1)
    return jnp.where(total > 0, top.sum(-1) / jnp.where(total > 0, total, 1.0), 1.0)


RULES = ("concentration", "paro")
"""Rules of ``choose_permutation``: "concentration" (kept top-block mass, higher is better) and "paro"
(the paper's combined sparsity + incoherence metric, Eq. 1-3, lower is better)."""


def tile_statistics(q: jax.Array, k: jax.Array, block_q: int, block_kv: int, *, eps: float,
                    scale: Optional[float] = None) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Per tile of ``P = softmax_s(scale·q_t·k_s)``: entries below ``eps``, largest entry, sum.

    One query block at a time with its whole key rows (``lax.map``): O(T·S·D) work, O(block_q·S)
    memory. Only real rows and columns count (the last tiles may be short). No mask, no gradient.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``, ``Hq % Hkv == 0``.
      block_q, block_kv: the tiles.
      eps: an entry ``P[t, s] < eps`` is counted as small.
      scale: logit scale, default ``1/sqrt(D)``.
    Returns:
      ``(small, peak, total)``, float32 ``[B, Hq, nq, nk]`` each.
    """
    check_positive(block_q=block_q, block_kv=block_kv)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale)
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    kv_idx = jnp.arange(nk * block_kv)
    kt = kv_tiles(k, block_kv)

    def q_tile(args):
        i, qi = args
        q_idx = i * block_q + jnp.arange(block_q)
        s = raw_logits(qi, kt, q_idx, kv_idx, None, spec)
        p = jax.nn.softmax(jnp.where(kv_idx < S, s, -jnp.inf), axis=-1)
        real = ((q_idx < T)[:, None] & (kv_idx < S)[None, :]).reshape(block_q, nk, block_kv)
        tiles = p.reshape(p.shape[:-1] + (nk, block_kv))
        small = jnp.sum(real & (tiles < eps), axis=(-3, -1)).astype(jnp.float32)
        peak = jnp.max(jnp.where(real, tiles, 0.0), axis=(-3, -1))
        total = jnp.sum(jnp.where(real, tiles, 0.0), axis=(-3, -1))
        return jnp.stack([small, peak, total])

    stats = lax.map(q_tile, (jnp.arange(nq), q_tiles(q, block_q, Hkv)))
    small, peak, total = stats.transpose(1, 2, 3, 4, 0, 5).reshape(3, B, Hq, nq, nk)
    return small, peak, total


def paro_metrics(q: jax.Array, k: jax.Array, block_q: int, block_kv: int, *, eps: float = 1e-3,
                 sigma: float = 0.9, scale: Optional[float] = None) -> Tuple[jax.Array, jax.Array]:
    """PARO's two block-wise scores of the attention map ``P = softmax(scale·q·kᵀ)`` in the given order
    (Zhao et al. 2025, Sec. 4.1, Eq. 1 and 2).

    Tiles are ``block_q × block_kv`` (the paper's ``b × b``, ``k²`` tiles); tile ``(i, n)`` has ``r_i``
    real rows and ``c_n`` real columns (the last ones may be short, which the paper does not treat):

    - Eq. 1, sparsity: ``n_in = #{(t, s) in the tile : P[t, s] < eps}`` and
      ``M_sparse = mean_{i,n} [ n_in ≥ sigma·r_i·c_n ]``, the share of tiles that are mostly negligible
      (higher means more tiles a block-sparse pass can skip);
    - Eq. 2, quantization: ``M_quant = mean_{i,n} Ψ(P_in)`` with the incoherence
      ``Ψ(x) = max|x| / ((1/g) Σ|x|)`` over the ``g = r_i·c_n`` entries (``1`` for an all-zero tile), in
      ``[1, g]``; lower means a per-tile scale quantizes the tile with less error.

    From ``tile_statistics`` (O(T·S·D) work, O(block_q·S) memory), no mask (self-attention on a grid).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``.
      block_q, block_kv: the tiles (PARO's kernel blocks, 64 in the paper).
      eps: value under which an entry of ``P`` is small (paper's example ``1e-3``), > 0.
      sigma: share of small entries that makes a tile sparse (paper's example 90%), in ``[0, 1]``.
      scale: logit scale, default ``1/sqrt(D)``.
    Returns:
      ``(M_sparse, M_quant)``, float32 ``[B, Hq]`` each.
    """
    _check_sparse_thresholds(eps, sigma)
    T, S = q.shape[1], k.shape[1]
    small, peak, total = tile_statistics(q, k, block_q, block_kv, eps=eps, scale=scale)
    rows = np.minimum(block_q, T - np.arange(num_tiles(T, block_q)) * block_q).astype(np.float32)
    cols = np.minimum(block_kv, S - np.arange(num_tiles(S, block_kv)) * block_kv).astype(np.float32)
    size = rows[:, None] * cols[None, :]
    m_sparse = (small >= sigma * size).astype(jnp.float32).mean((-2, -1))
    mean = total / size
    psi = jnp.where(total > 0, peak / jnp.where(total > 0, mean, 1.0), 1.0)
    return m_sparse, psi.mean((-2, -1))


def _check_sparse_thresholds(eps: float, sigma: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be in [0, 1], got {sigma!r}")


def combine_metrics(m_sparse: jax.Array, m_quant: jax.Array, alpha: float = 0.5) -> jax.Array:
    """PARO's combined score over the candidate orders (axis 0), lower is better (Sec. 4.1, Eq. 3).

    ``M^Θ = α·C^Θ / Σ_Θ' C^Θ' + (1−α)·M_quant^Θ / Σ_Θ' M_quant^Θ'`` with the sparsity cost
    ``C = 1 − M_sparse`` (the share of tiles that are not sparse). Eq. 3 as printed has ``M_sparse``
    where ``C`` stands, which with the paper's "smallest ``M`` wins" would prefer fewer skippable tiles
    (the module docstring). A term whose candidates all sum to 0 contributes 0.

    Args:
      m_sparse, m_quant: ``[num_candidates, ...]`` from ``paro_metrics``.
      alpha: weight of the sparsity term, in ``[0, 1]`` (not reported in the paper).
    Returns:
      ``[num_candidates, ...]`` float32.
    """
    def share(x):
        total = x.sum(0, keepdims=True)
        return jnp.where(total > 0, x / jnp.where(total > 0, total, 1.0), 0.0)

    return alpha * share(1.0 - m_sparse) + (1.0 - alpha) * share(m_quant)


def choose_permutation(q: jax.Array, k: jax.Array, grid: Tuple[int, int, int], block_q: int,
                       block_kv: Optional[int] = None, *, density: float = 0.25,
                       scale: Optional[float] = None, rule: str = "concentration", alpha: float = 0.5,
                       eps: float = 1e-3, sigma: float = 0.9) -> Tuple[jax.Array, jax.Array]:
    """PARO's offline choice of an axis order per KV head, from calibration inputs.

    For each order in ``AXIS_ORDERS`` the tokens of q and k are permuted and scored, averaged over
    the batch and the query heads of the KV head's group:

    - ``rule="paro"`` (Zhao et al. 2025, Sec. 4.1, Eq. 1-3): ``paro_metrics`` (share of sparse tiles
      with ``eps`` and ``sigma``, and mean tile incoherence), combined over the six candidates by
      ``combine_metrics`` with weight ``alpha``; the order with the **smallest** score wins.
    - ``rule="concentration"``: ``block_concentration`` of ``block_attention_mass`` at ``density``;
      the **largest** wins.

    Ties go to the earlier order.

    Args:
      q: ``[B, N, Hq, D]``; k: ``[B, N, Hkv, D]`` with ``N = F·H·W`` tokens in frame-major order.
      grid: ``(F, H, W)``.
      block_q, block_kv: tile sizes (``block_kv`` defaults to ``block_q``).
      density: share of key blocks a query block keeps ("concentration" only).
      scale: logit scale, default ``1/sqrt(D)``.
      rule: one of ``RULES``.
      alpha: weight of the sparsity term ("paro" only), in ``[0, 1]``.
      eps, sigma: an entry below ``eps`` is small, a tile with a share ``≥ sigma`` of small entries is
        sparse ("paro" only; the paper's examples ``1e-3`` and 90%).
    Returns:
      ``(orders, scores)``: int32 ``[Hkv]`` indices into ``AXIS_ORDERS`` and float32 ``[6, Hkv]``, the
      score of every candidate (concentration, or the combined PARO metric).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    _check_sparse_thresholds(eps, sigma)
    block_kv = block_q if block_kv is None else block_kv
    check_grid(grid, q.shape[1], k.shape[1])
    Hq, Hkv = q.shape[2], k.shape[2]

    def per_kv_head(x):
        return x.mean(0).reshape(Hkv, Hq // Hkv).mean(-1)

    sparse, quant, conc = [], [], []
    for order in AXIS_ORDERS:
        perm = grid_permutation(grid, order)
        qp, kp = permute_tokens(q, perm), permute_tokens(k, perm)
        if rule == "paro":
            m_sparse, m_quant = paro_metrics(qp, kp, block_q, block_kv, eps=eps, sigma=sigma, scale=scale)
            sparse.append(per_kv_head(m_sparse))
            quant.append(per_kv_head(m_quant))
        else:
            mass = block_attention_mass(qp, kp, block_q, block_kv, scale=scale)
            conc.append(per_kv_head(block_concentration(mass, density).mean(-1)))
    if rule == "paro":
        scores = combine_metrics(jnp.stack(sparse), jnp.stack(quant), alpha)
        return jnp.argmin(scores, axis=0).astype(jnp.int32), scores
    scores = jnp.stack(conc)
    return jnp.argmax(scores, axis=0).astype(jnp.int32), scores


def check_grid(grid: Tuple[int, int, int], T: int, S: int) -> int:
    """``N = F·H·W``; ``ValueError`` unless a self-attention call has ``T = S = N`` tokens."""
    N = int(np.prod(grid))
    if T != N or S != N:
        raise ValueError(f"a token grid {tuple(grid)} needs T = S = {N}, got T={T}, S={S}")
    return N


# ----------------------------------------------------------------------------- the selector

@registry.register
@dataclasses.dataclass(frozen=True)
class Paro(GridPermutedSelector):
    """PAROAttention's reordered block-sparse attention (Zhao et al. 2025); see the module docstring.

    Each query block keeps its ``budget(density, nk)`` key blocks of largest attention mass
    (``block_attention_mass`` of the actual q and k, an oracle of the paper's calibrated static
    mask: it costs a dense pass, so this selector is not faster than dense attention; its use is
    the quality of the reordered block pattern). Blocks the mask rules out are never listed.

    With ``grid=(F, H, W)`` (self-attention, ``T = S = F·H·W``) the tokens are permuted per KV head
    before selection and the output is permuted back; ``orders`` gives each KV head's index into
    ``AXIS_ORDERS`` (e.g. from ``choose_permutation`` on calibration inputs), or ``None`` to choose
    them from each call's own inputs with PARO's rule (``choose_permutation(rule="paro")``, default
    ``alpha``, ``eps`` and ``sigma``). ``select`` takes q and k already in that order. A fine mask
    is not supported with a grid. With ``grid=None`` no tokens move (any T, S, masks allowed).
    Selection uses the logit scale ``1/sqrt(D)`` (``select`` does not see a custom ``scale``).

    Attributes:
      block_q, block_kv: tile sizes (default 64).
      grid: ``(frames, height, width)`` or ``None``.
      orders: per-KV-head order indices (a tuple of ``Hkv`` ints in ``[0, 6)``), or ``None``.
      density: share of key blocks each query block keeps; the static list length is the budget.
    """

    name: ClassVar[str] = "paro"
    paper: ClassVar[str] = PAPER

    block_q: int = 64
    block_kv: int = 64
    grid: Optional[Tuple[int, int, int]] = None
    orders: Optional[Tuple[int, ...]] = None
    density: float = 0.25

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"Paro.density must be in (0, 1], got {self.density!r}")
        if self.grid is not None:
            if not isinstance(self.grid, tuple) or len(self.grid) != 3:
                raise ValueError(f"Paro.grid must be (frames, height, width) or None, got {self.grid!r}")
            check_positive(frames=self.grid[0], height=self.grid[1], width=self.grid[2])
        if self.orders is not None:
            if self.grid is None:
                raise ValueError("Paro.orders needs a grid")
            if not isinstance(self.orders, tuple) or any(o not in range(len(AXIS_ORDERS)) for o in self.orders):
                raise ValueError(f"Paro.orders must be a tuple of ints in [0, {len(AXIS_ORDERS)}), got {self.orders!r}")

    def token_permutation(self, q: jax.Array, k: jax.Array):
        """Per-KV-head token orders ``[Hkv, N]``: NumPy from ``orders``, else chosen from q and k."""
        check_grid(self.grid, q.shape[1], k.shape[1])
        table = np.stack([grid_permutation(self.grid, order) for order in AXIS_ORDERS])
        if self.orders is not None:
            if len(self.orders) != k.shape[2]:
                raise ValueError(f"Paro.orders has {len(self.orders)} entries, expected one per KV head ({k.shape[2]})")
            return table[np.asarray(self.orders)]
        orders, _ = choose_permutation(q, k, self.grid, self.block_q, self.block_kv, rule="paro")
        return jnp.asarray(table)[orders]

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        T, S = q.shape[1], k.shape[1]
        mass = block_attention_mass(q, k, self.block_q, self.block_kv, mask=mask)
        ok = allowed_blocks(mask, T, S, self.block_q, self.block_kv)
        K = budget(self.density, num_tiles(S, self.block_kv))
        return select_topk(mass, K, ok, block_q=self.block_q, block_kv=self.block_kv)

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when no query-block row allows more than ``budget(density, nk)`` blocks."""
        return fits_top_k(budget(self.density, num_tiles(S, self.block_kv)), mask, T, S, self.block_q,
                          self.block_kv)


# ----------------------------------------------------------------------------- INT8 / INT4 attention

BITS = (4, 8)
"""Integer widths of ``quantized_attention_reference`` (``None`` keeps a product in float)."""


def int_max(bits: int) -> int:
    """Largest level of a symmetric ``bits``-bit quantizer: ``2^(bits-1) - 1`` (127 for INT8, 7 for INT4)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return 2 ** (bits - 1) - 1


def quantize_symmetric(x: jax.Array, axes: Tuple[int, ...], bits: int = 8) -> Tuple[jax.Array, jax.Array]:
    """Symmetric block quantizer: ``x ≈ q·s`` with ``s = max|x| / L`` over ``axes`` (kept as size 1),
    ``q = clip(round(x/s), -L, L)`` and ``L = int_max(bits)``.

    Values are in ``[-127, 127]`` (INT8) or ``[-7, 7]`` (INT4, SageAttention's symmetric INT4, as PARO's
    kernels use); both are stored as ``int8`` (XLA has no INT4 matmul on every backend). An all-zero block
    gets ``s = 1``. The rounding error is at most ``s/2`` per element, and ``q·s == x`` exactly when every
    element of ``x`` is an integer multiple of ``s`` (e.g. ``x = q·s`` with a power-of-two ``s`` and a block
    reaching ``±L``).

    Returns:
      ``(q, s)``: int8 values shaped like ``x``, float32 scales with ``axes`` of size 1.
    """
    top = int_max(bits)
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    s = jnp.where(amax > 0, amax / top, 1.0)
    return jnp.clip(jnp.round(x / s), -top, top).astype(jnp.int8), s


def quantize_int8(x: jax.Array, axes: Tuple[int, ...]) -> Tuple[jax.Array, jax.Array]:
    """``quantize_symmetric(x, axes, bits=8)``: values in ``[-127, 127]``, ``s = max|x| / 127``."""
    return quantize_symmetric(x, axes, 8)


def _check_bits(name: str, bits: Optional[int]) -> None:
    if bits is not None and bits not in BITS:
        raise ValueError(f"{name} must be one of {BITS} or None (float), got {bits!r}")


def quantized_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
    block_q: int = 64, block_kv: int = 64, qk_bits: Optional[int] = 8, pv_bits: Optional[int] = 8,
) -> jax.Array:
    """Softmax attention with integer ``Q·Kᵀ`` and ``P·V`` (PAROAttention's quantized attention).

    - K is smoothed first (its mean over tokens subtracted, per head and channel, as SageAttention,
      on which PARO's kernels build): it shifts each row's logits by a constant, so softmax is unchanged.
    - Q and K (``qk_bits``): symmetric ``quantize_symmetric`` with one scale per (head, block of
      ``block_q`` / ``block_kv`` tokens); ``S = (Q_int·K_intᵀ)·s_q·s_k·scale`` with the integer product
      accumulated in int32. ``qk_bits=None``: ``S`` in float32.
    - P (``pv_bits``): ``P̃ = exp(S - rowmax) ∈ [0, 1]``, symmetric with one scale per tile
      (``s_p[i, n] = max P̃_tile / L`` over query block ``i`` × key block ``n``): the block-wise grouping
      whose error PARO's incoherence ``max/mean`` (``paro_metrics``) measures.
    - V (``pv_bits``): symmetric, one scale per (head, key block, channel).
    - ``O = Σ_n (P̃_int[i, n]·V_int[n])·s_p[i, n]·s_v[n]`` accumulated in int32 per tile, divided by
      the row sum of the dequantized ``P̃``. ``pv_bits=None``: ``O = P̃·V / rowsum(P̃)`` in float32.

    ``L = int_max(bits)``: 127 (INT8) or 7 (INT4). The paper's settings (Table 1) are INT8 QK + INT8 PV
    and INT4 QK + INT4 PV; any combination is accepted. Granularity against the paper and its public
    kernels (``jamescsq47/PAROAtten``): the 64×64 tile group of ``P̃`` is the paper's (Sec. 4.3);
    Q and K per (head, token block) with K smoothed match the code's ``per_block_int8`` (``BLKQ = BLKK
    = 64``; its ``per_warp`` variant gives Q one scale per 32 rows). Where they differ: the public INT8
    P·V kernel scales ``P̃ ∈ [0, 1]`` by a fixed 127, not by the tile maximum, and takes V already in
    INT8 without a scale; its only INT4 P·V kernel (in the history, not at HEAD) used one scale for
    a whole 64-key V tile and unsigned levels ``[0, 15]`` for ``P̃``, where this symmetric quantizer
    uses ``[0, 7]``. The paper states none of the scale, zero-point or accumulation choices.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      mask: optional ``attnjax.masks`` value; scale: logit scale, default ``1/sqrt(D)``.
      block_q, block_kv: token blocks that share a quantization scale.
      qk_bits, pv_bits: 8, 4, or ``None`` (that product in float32).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype; a row with no allowed key is 0.
    """
    check_positive(block_q=block_q, block_kv=block_kv)
    _check_bits("qk_bits", qk_bits)
    _check_bits("pv_bits", pv_bits)
    B, T, Hq, _ = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    spec = score_spec(q, k, scale)
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)
    qg, kt, vt = qg.astype(jnp.float32), kt.astype(jnp.float32), vt.astype(jnp.float32)
    kt = kt - kt.mean(axis=2, keepdims=True)
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)

    if qk_bits is None:
        s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, kt) * spec.scale
    else:
        q_blocks = pad_axis(qg, 3, block_q).reshape(B, Hkv, -1, nq, block_q, qg.shape[-1])
        q_int, s_q = quantize_symmetric(q_blocks, (4, 5), qk_bits)
        q_int = q_int.reshape(B, Hkv, -1, nq * block_q, qg.shape[-1])[:, :, :, :T]
        s_q = jnp.repeat(s_q.reshape(B, Hkv, -1, nq), block_q, axis=-1)[..., :T, None]
        k_int, s_k = quantize_symmetric(pad_axis(kt, 2, block_kv).reshape(B, Hkv, nk, block_kv, -1), (3, 4), qk_bits)
        k_int = k_int.reshape(B, Hkv, nk * block_kv, -1)[:, :, :S]
        s_k = jnp.repeat(s_k.reshape(B, Hkv, 1, 1, nk), block_kv, axis=-1)[..., :S]
        s_int = jnp.einsum("bhgqd,bhkd->bhgqk", q_int, k_int, preferred_element_type=jnp.int32)
        s = s_int.astype(jnp.float32) * s_q * s_k * spec.scale
    ok = allowed(mask, q_idx, kv_idx, spec)
    m = jnp.max(jnp.where(ok, s, -jnp.inf), -1, keepdims=True)
    p = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)

    if pv_bits is None:
        o = jnp.einsum("bhgqk,bhkd->bhgqd", p, vt)
        rowsum = p.sum(-1, keepdims=True)
    else:
        G = p.shape[2]
        tiles = pad_axis(pad_axis(p, 3, block_q), 4, block_kv).reshape(B, Hkv, G, nq, block_q, nk, block_kv)
        p_int, s_p = quantize_symmetric(tiles, (4, 6), pv_bits)
        v_int, s_v = quantize_symmetric(pad_axis(vt, 2, block_kv).reshape(B, Hkv, nk, block_kv, Dv), (3,), pv_bits)
        o_int = jnp.einsum("bhgiqnk,bhnkd->bhgiqnd", p_int, v_int, preferred_element_type=jnp.int32)
        o = jnp.einsum("bhgiqnd,bhgin,bhnd->bhgiqd", o_int.astype(jnp.float32), s_p[:, :, :, :, 0, :, 0],
                       s_v[:, :, :, 0])
        rowsum = jnp.einsum("bhgiqn,bhgin->bhgiq", p_int.astype(jnp.float32).sum(-1), s_p[:, :, :, :, 0, :, 0])
        o = o.reshape(B, Hkv, G, nq * block_q, Dv)[:, :, :, :T]
        rowsum = rowsum.reshape(B, Hkv, G, nq * block_q, 1)[:, :, :, :T]
    out = jnp.where(rowsum > 0, o / jnp.where(rowsum > 0, rowsum, 1.0), 0.0)
    return out.reshape(B, Hq, T, Dv).transpose(0, 2, 1, 3).astype(q.dtype)


__all__ = [
    "AXIS_ORDERS", "BITS", "RULES", "Paro", "block_attention_mass", "block_concentration", "budget", "check_grid",
    "choose_permutation", "combine_metrics", "grid_permutation", "int_max", "inverse_permutation", "paro_metrics",
    "permute_tokens", "permuted_selector_attention", "quantize_int8", "quantize_symmetric",
    "quantized_attention_reference", "tile_statistics",
]
