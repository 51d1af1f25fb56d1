"""The block-sparse softmax engine: one op, three paths, and the base class of every selector.

``block_sparse_attention(q, k, v, blocks, mask=...)`` is softmax attention in which query block
``(b, h, i)`` sees only the key blocks listed in ``blocks`` (an ``attnjax.sparse.BlockSparse``),
and inside those tiles only the pairs that the optional fine ``mask`` allows::

    out_i = Σ_j softmax_j(s_ij | j ∈ blocks(i), mask(i, j)) v_j,   s_ij = scale · q_i · k_j

Paths: ``reference`` (dense masked softmax, O(T·S) memory), ``xla`` (gathers the listed key tiles
slot by slot, O(T·block) memory; ``attnjax.sparse.gather``) and ``pallas`` (the kernel in
``pallas_kernels.block_sparse``). "auto" tries pallas on GPU/TPU, then xla. A query row with no
allowed key gets 0 (and lse −inf).

A *selector* is a registered config class deriving from ``BlockSelector``: it only implements
``select(q, k, mask=...) -> BlockSparse`` and inherits the three paths, so
``attnjax.attention(q, k, v, mechanism=Selector(...))`` runs attention restricted to its blocks.

A selector also says, from static quantities alone (``T``, ``S``, heads, block sizes, its config
and the blocks a structural mask allows), whether it lists every block the mask allows
(``selects_every_block``). Then the call is dense softmax attention at block-sparse cost, and
``selected_attention``, the one place every selector's paths go through, warns at trace time with a
``DenseSelectionWarning`` whose text is fixed by the mechanism, config, lengths and mask, so Python's
default filter shows it once per configuration. Filter it by its class::

    warnings.filterwarnings("ignore", category=attnjax.sparse.DenseSelectionWarning)
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import ClassVar, Optional

import jax
import numpy as np

from attnjax.blocked.lists import BlockSparse, allowed_blocks
from attnjax.checks import check_qkv
from attnjax.dispatch import dispatch
from attnjax.masks import Mask
from attnjax.meshes import accepts_explicit_meshes
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse.gather import block_sparse_attention_xla
from attnjax.tiling import num_tiles
from pallas_kernels.block_sparse import block_sparse_attention_pallas

PATHS = ("reference", "xla", "pallas")


def block_sparse_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, blocks: BlockSparse, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
):
    """Dense reference: softmax attention under the mask ``blocks & mask`` (O(T·S) memory)."""
    full_mask = blocks if mask is None else blocks & mask
    return softmax_attention_reference(q, k, v, mask=full_mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                       return_lse=return_lse)


_PATHS = {"reference": block_sparse_attention_reference, "xla": block_sparse_attention_xla,
          "pallas": block_sparse_attention_pallas}


@accepts_explicit_meshes
def block_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, blocks: BlockSparse, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
    implementation: str = "auto",
):
    """Softmax attention restricted to the listed key blocks (Block-sparse attention).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      blocks: ``BlockSparse`` lists with ``nq = ceil(T / block_q)`` and ``nk = ceil(S / block_kv)``.
      mask: optional fine mask (any ``attnjax.masks`` value) applied inside the listed tiles.
      scale: logit scale, default ``1/sqrt(D)``; logits_soft_cap: ``cap·tanh(s/cap)``.
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]``.
      implementation: "reference", "xla", "pallas" or "auto".
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse)``.
    """
    check_qkv(q, k, v)
    if not isinstance(blocks, BlockSparse):
        raise TypeError(f"blocks must be an attnjax.sparse.BlockSparse, got {type(blocks).__name__}")
    B, T, Hq, _ = q.shape
    S = k.shape[1]
    blocks.check(B, Hq, T, S)
    if mask is not None:
        mask.check(B, Hq, T, S)
    kwargs = dict(mask=mask, scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse)
    return dispatch(_PATHS, implementation, q, k, v, blocks, what="block-sparse attention", **kwargs)


class DenseSelectionWarning(UserWarning):
    """A block selector whose configuration lists every block the mask allows at the given lengths:
    the call is dense softmax attention at block-sparse cost (``BlockSelector.selects_every_block``)."""


class BlockSelector:
    """Base class of registered block selectors (decorate subclasses with ``registry.register``).

    A subclass is a frozen dataclass with fields ``block_q`` and ``block_kv`` (and its own
    parameters), class attributes ``name`` and ``paper``, and a method
    ``select(q, k, *, mask) -> BlockSparse``. ``select`` must honour ``mask`` at block level
    (``attnjax.sparse.allowed_blocks``); the engine applies it again element by element. A subclass
    whose config can be dense at some lengths overrides ``selects_every_block``.
    """

    family: ClassVar[str] = "sparse"
    supports: ClassVar[frozenset] = frozenset({"mask", "logits_soft_cap", "return_lse", "gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        """The block lists for these queries and keys."""
        raise NotImplementedError(f"{type(self).__name__} must implement select()")

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when ``select`` lists every block that ``mask`` allows whatever q and k hold, decided
        from ``T``, ``S``, ``num_heads``, the block sizes and the config (a data mask counts as allowing
        every block, ``static_allowed_blocks``). False when some allowed block can be left out; the
        base class says False, which is all a content-routed selector can say before seeing data."""
        return False

    def implementations(self):
        return {name: functools.partial(selected_attention, self, name) for name in PATHS}


def static_allowed_blocks(mask: Optional[Mask], T: int, S: int, block_q: int, block_kv: int) -> np.ndarray:
    """``allowed_blocks`` when the mask is structural (NumPy), else every block: bool ``[Bm, Hm, nq, nk]``.

    A superset of the blocks the mask allows, known at trace time.
    """
    allowed = allowed_blocks(mask, T, S, block_q, block_kv)
    if isinstance(allowed, np.ndarray):
        return allowed
    return np.ones((1, 1, num_tiles(T, block_q), num_tiles(S, block_kv)), bool)


def covers_allowed(pattern: np.ndarray, mask: Optional[Mask], T: int, S: int, block_q: int, block_kv: int) -> bool:
    """True when a static block pattern (bool, broadcastable to ``[Bm, Hm, nq, nk]``) holds every
    block in ``static_allowed_blocks``: a selector that always lists it is dense."""
    allowed = static_allowed_blocks(mask, T, S, block_q, block_kv)
    return bool(np.all(np.asarray(pattern, bool) | ~allowed))


def fits_top_k(list_length: int, mask: Optional[Mask], T: int, S: int, block_q: int, block_kv: int) -> bool:
    """True when no query-block row has more than ``list_length`` blocks in ``static_allowed_blocks``:
    a top-``list_length`` selection among the allowed blocks then lists them all."""
    allowed = static_allowed_blocks(mask, T, S, block_q, block_kv)
    return int(allowed.sum(-1).max(initial=0)) <= list_length


def warn_if_dense(selector: BlockSelector, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> None:
    """``DenseSelectionWarning`` when ``selector.selects_every_block(T, S, num_heads, mask)`` (and
    ``T, S > 0``). The message depends only on the mechanism, its config, the lengths and the mask
    (whose repr shows arrays by shape only), so the default warning filter shows it once per configuration."""
    if T == 0 or S == 0 or not selector.selects_every_block(T, S, num_heads, mask):
        return
    warnings.warn(
        f"mechanism {selector.name!r} selects every block at T={T}, S={S}, mask={mask!r} "
        f"({_config_summary(selector)}): this is dense softmax attention at block-sparse cost; use "
        f"mechanism='softmax', or a configuration that leaves blocks out at this length",
        DenseSelectionWarning)


def _config_summary(selector: BlockSelector) -> str:
    """``field=value`` for the config's plain fields (numbers, strings, tuples), type names for the rest."""
    plain = (int, float, str, bool, tuple, type(None))
    return ", ".join(
        f"{f.name}={getattr(selector, f.name)!r}" if isinstance(getattr(selector, f.name), plain)
        else f"{f.name}={type(getattr(selector, f.name)).__name__}"
        for f in dataclasses.fields(selector))


def selected_attention(selector: BlockSelector, implementation: str, q, k, v, *, mask=None, scale=None,
                       logits_soft_cap=None, return_lse=False):
    """``attnjax.attention`` signature (after the two bound arguments): ``selector.select``, then the engine.

    Warns (``warn_if_dense``) when the selector's config lists every allowed block at these lengths.
    """
    blocks = selector.select(q, k, mask=mask)
    warn_if_dense(selector, q.shape[1], k.shape[1], q.shape[2], mask)
    return block_sparse_attention(q, k, v, blocks, mask=mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                  return_lse=return_lse, implementation=implementation)


__all__ = [
    "block_sparse_attention", "block_sparse_attention_reference", "BlockSelector", "DenseSelectionWarning", "PATHS",
    "covers_allowed", "fits_top_k", "selected_attention", "static_allowed_blocks", "warn_if_dense",
]
