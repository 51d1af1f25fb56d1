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
"""

from __future__ import annotations

import functools
from typing import ClassVar, Optional

import jax

from attnjax.blocked.lists import BlockSparse
from attnjax.checks import check_qkv
from attnjax.dispatch import dispatch
from attnjax.masks import Mask
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse.gather import block_sparse_attention_xla
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


class BlockSelector:
    """Base class of registered block selectors (decorate subclasses with ``registry.register``).

    A subclass is a frozen dataclass with fields ``block_q`` and ``block_kv`` (and its own
    parameters), class attributes ``name`` and ``paper``, and a method
    ``select(q, k, *, mask) -> BlockSparse``. ``select`` must honour ``mask`` at block level
    (``attnjax.sparse.allowed_blocks``); the engine applies it again element by element.
    """

    family: ClassVar[str] = "sparse"
    supports: ClassVar[frozenset] = frozenset({"mask", "logits_soft_cap", "return_lse", "gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        """The block lists for these queries and keys."""
        raise NotImplementedError(f"{type(self).__name__} must implement select()")

    def implementations(self):
        return {name: functools.partial(selected_attention, self, name) for name in PATHS}


def selected_attention(selector: BlockSelector, implementation: str, q, k, v, *, mask=None, scale=None,
                       logits_soft_cap=None, return_lse=False):
    """``attnjax.attention`` signature (after the two bound arguments): ``selector.select``, then the engine."""
    blocks = selector.select(q, k, mask=mask)
    return block_sparse_attention(q, k, v, blocks, mask=mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                  return_lse=return_lse, implementation=implementation)


__all__ = ["block_sparse_attention", "block_sparse_attention_reference", "BlockSelector", "PATHS", "selected_attention"]
