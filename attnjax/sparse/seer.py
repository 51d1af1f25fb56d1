"""SeerAttention: a learned gate picks the key blocks each query block attends to.

Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (2024); public code
microsoft/SeerAttention (``seer_attn/attn_gate.py``, ``seer_attn/kernels/attn_pooling_kernel.py``,
``seer_attn/modules/common.py``).

- **Ground truth** (``block_max_attention``): the attention map ``P = softmax(scale·QKᵀ | mask)``
  max-pooled over each (query block, key block) tile, then normalized over the key blocks of each
  query-block row: ``G[i, j] = max_{t∈i, s∈j} P[t, s] / Σ_j' max_{t∈i, s∈j'} P[t, s]``. Computed
  blocked: the row log-sum-exp comes from the flash path, then a second pass over the tiles takes
  ``max exp(s - lse)`` per tile. The T×S map is never stored.
- **AttnGate** and its distillation (``gate_loss``, ``distillation_step``) own parameters, so they
  are modules: ``attnjax.nn.seer_gate``.
- **Selection** (``select_topk``, ``select_threshold``): dynamic ``BlockSparse`` lists from block
  scores, under jit.
- **Selector** ``Seer`` (registry name "seer"): by default it is the *oracle*, which selects from
  the ground truth and needs no trained weights. Give it a trained gate (``gate=``, e.g.
  ``attnjax.nn.AttnGate``) to select from the gate's scores instead.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import registry
from attnjax.masks import Mask
from attnjax.checks import check_positive
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.sparse.engine import BlockSelector, block_sparse_attention, fits_top_k
from attnjax.blocked.lists import BlockSparse, allowed_blocks, from_block_ids
from attnjax.sparse.pooling import pooled_attention, pooled_attention_reference
from attnjax.tiling import num_tiles

PAPER = "Gao et al. 2024, SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs"


# ----------------------------------------------------------------------------- ground truth

def _normalize_rows(tile_max: jax.Array) -> jax.Array:
    """Divide each query-block row by its sum over key blocks; a row with sum 0 stays 0."""
    total = tile_max.sum(-1, keepdims=True)
    return jnp.where(total > 0, tile_max / jnp.where(total > 0, total, 1.0), 0.0)


def block_max_attention_reference(
    q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int, mask: Optional[Mask] = None,
    scale: Optional[float] = None,
) -> jax.Array:
    """Dense reference of ``block_max_attention``: builds the whole ``[B, Hq, T, S]`` map.

    Returns float32 ``[B, Hq, nq, nk]``, each query-block row summing to 1 (0 if it sees nothing).
    """
    return _normalize_rows(pooled_attention_reference(q, k, block_q=block_q, block_kv=block_kv, pool="max",
                                                      mask=mask, scale=scale))


def block_max_attention(
    q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int, mask: Optional[Mask] = None,
    scale: Optional[float] = None,
) -> jax.Array:
    """SeerAttention's ground truth: the block-max-pooled attention map, normalized per row.

    ``G[b, h, i, j] = M[i, j] / Σ_j' M[i, j']`` with ``M[i, j] = max_{t∈block i, s∈block j} P[t, s]``
    and ``P = softmax_s(scale·q_t·k_s | mask)`` (per query head; GQA reads KV head ``h // G``).
    Blocked (``attnjax.sparse.pooling.pooled_attention`` with ``pool="max"``): memory O(T·block),
    never O(T·S). As in the public kernel (``attn_pooling_kernel.py``), the maximum is over every
    row of the query block.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``.
      block_q, block_kv: pooling tile (the gate's and the engine's block sizes).
      mask: optional ``attnjax.masks`` value (bottom-right aligned if T != S).
      scale: logit scale, default ``1/sqrt(D)``.
    Returns:
      float32 ``[B, Hq, nq, nk]``; rows sum to 1 (0 for a query block that sees no key). It is a
      training target: no gradient flows to q or k.
    """
    check_positive(block_q=block_q, block_kv=block_kv)
    return _normalize_rows(pooled_attention(q, k, block_q=block_q, block_kv=block_kv, pool="max", mask=mask,
                                            scale=scale))


def attention_recall(
    q: jax.Array, k: jax.Array, blocks: BlockSparse, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, implementation: str = "auto",
) -> jax.Array:
    """Attention mass that the listed blocks keep, per query row: ``Σ_{s∈blocks(t)} P[t, s]``.

    Computed without the T×S map as ``exp(lse_sparse - lse_full)``, the two log-sum-exps coming
    from the block-sparse engine and the flash path. Float32 ``[B, T, Hq]`` in [0, 1]; rows that
    see no key at all get 1.
    """
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, S, Hkv = k.shape[0], k.shape[1], k.shape[2]
    v_dummy = jnp.zeros((B, S, Hkv, 1), q.dtype)
    _, lse_full = flash_attention_xla(q, k, v_dummy, mask=mask, scale=scale, return_lse=True)
    _, lse_sparse = block_sparse_attention(q, k, v_dummy, blocks, mask=mask, scale=scale, return_lse=True,
                                           implementation=implementation)
    recall = jnp.exp(lse_sparse - jnp.where(jnp.isfinite(lse_full), lse_full, 0.0))
    return jnp.where(jnp.isfinite(lse_full), recall, 1.0)


# ----------------------------------------------------------------------------- selection

def _masked_top(scores: jax.Array, k: int, mask: Optional[jax.Array]):
    """Top-``k`` allowed blocks per row: (values, ids, allowed-at-slot), slots in descending score."""
    scores = jnp.asarray(scores, jnp.float32)
    ok = jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), scores.shape)
    nk = scores.shape[-1]
    if not 1 <= k <= nk:
        raise ValueError(f"the number of blocks must be in [1, {nk}], got {k}")
    values, ids = lax.top_k(jnp.where(ok, scores, -jnp.inf), k)
    hit = jnp.take_along_axis(ok, ids, axis=-1)
    return values, ids, hit


def _lists(ids: jax.Array, keep: jax.Array, nk: int, block_q: int, block_kv: int) -> BlockSparse:
    """Dynamic lists from chosen block ids ``[..., K]`` and which slots to keep."""
    return from_block_ids(ids, keep, block_q, block_kv, nk)


def select_topk(scores: jax.Array, k: int, mask: Optional[jax.Array] = None, *, block_q: int,
                block_kv: int) -> BlockSparse:
    """The ``k`` highest-scoring allowed key blocks of each query block, as dynamic lists.

    Args:
      scores: ``[B, H, nq, nk]`` block scores (gate probabilities or ground truth).
      k: static list length ``K`` (``1 ≤ k ≤ nk``); rows with fewer allowed blocks list them all.
      mask: optional bool block mask broadcastable to ``scores`` (``allowed_blocks``); disallowed
        blocks are never listed.
      block_q, block_kv: the tile sizes the lists describe.
    Returns:
      ``BlockSparse`` with jax arrays (jit-safe, no host sync), ``K = k``.
    """
    _, ids, hit = _masked_top(scores, k, mask)
    return _lists(ids, hit, scores.shape[-1], block_q, block_kv)


def select_threshold(scores: jax.Array, tau: float, max_blocks: int, mask: Optional[jax.Array] = None, *,
                     block_q: int, block_kv: int) -> BlockSparse:
    """Allowed key blocks with score ``> tau``, at most ``max_blocks`` per row (the highest).

    SeerAttention's threshold rule on the gate's softmax scores (``get_sparse_attn_mask_from_threshold``
    in the public code). One difference: the best allowed block is always kept, so no query block is
    left without keys. ``tau`` may be a traced scalar. Same arguments and result as ``select_topk``,
    with ``K = max_blocks``.
    """
    values, ids, hit = _masked_top(scores, max_blocks, mask)
    first = jnp.arange(max_blocks) == 0
    return _lists(ids, hit & ((values > tau) | first), scores.shape[-1], block_q, block_kv)


# ----------------------------------------------------------------------------- the selector

@registry.register
@dataclasses.dataclass(frozen=True)
class Seer(BlockSelector):
    """SeerAttention block selection (Gao et al. 2024) for the block-sparse engine.

    Two modes:

    - **oracle** (``gate=None``, the default): scores are the ground truth ``block_max_attention``
      of the actual q and k. It needs no trained weights and is the quality upper bound of
      SeerAttention's selection, but computing it costs a dense (blocked) pass over all tiles, so it
      is **not** faster than dense attention. The logit scale is ``1/sqrt(D)`` (``select`` does
      not see a custom ``scale``).
    - **gate** (``gate=`` a trained ``attnjax.nn.AttnGate``, or any callable
      ``gate(q, k, mask=) -> [B, Hq, nq, nk]`` with attributes ``block_q``/``block_kv`` equal to the
      selector's): scores are the gate's
      block probabilities, O((T/block)·(S/block)) to compute; this is SeerAttention at inference.
      The gate's parameters are constants of the config (train it with ``distillation_step``).

    Rows keep their ``top_k`` best allowed blocks, or, with ``threshold`` set, the blocks whose
    score exceeds it (at most ``top_k``, at least the best one). Blocks the mask rules out are
    never listed; inside listed tiles the engine applies the mask element by element.

    Attributes:
      block_q, block_kv: tile sizes (default 64).
      top_k: blocks per query block (clipped to ``nk``), the static list length.
      threshold: ``None`` for top-k, else the score threshold ``tau`` (scores are row-normalized).
      gate: ``None`` (oracle) or a trained gate (``attnjax.nn.AttnGate``).
    """

    name: ClassVar[str] = "seer"
    paper: ClassVar[str] = PAPER

    block_q: int = 64
    block_kv: int = 64
    top_k: int = 8
    threshold: Optional[float] = None
    gate: Optional[object] = None

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv, top_k=self.top_k)
        if self.gate is not None:
            if not callable(self.gate) or not hasattr(self.gate, "block_q") or not hasattr(self.gate, "block_kv"):
                raise TypeError(f"Seer.gate must be None or a gate (callable with block_q/block_kv, e.g. "
                                f"attnjax.nn.AttnGate), got {type(self.gate).__name__}")
            if (self.gate.block_q, self.gate.block_kv) != (self.block_q, self.block_kv):
                raise ValueError(f"Seer blocks ({self.block_q}, {self.block_kv}) differ from the gate's "
                                 f"({self.gate.block_q}, {self.gate.block_kv})")

    def scores(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> jax.Array:
        """Block scores ``[B, Hq, nq, nk]``: the ground truth (oracle) or the gate's probabilities."""
        q, k = lax.stop_gradient(q), lax.stop_gradient(k)
        if self.gate is None:
            return block_max_attention(q, k, block_q=self.block_q, block_kv=self.block_kv, mask=mask)
        return self.gate(q, k, mask=mask)

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        T, S = q.shape[1], k.shape[1]
        scores = self.scores(q, k, mask=mask)
        ok = allowed_blocks(mask, T, S, self.block_q, self.block_kv)
        K = min(self.top_k, num_tiles(S, self.block_kv))
        kw = dict(block_q=self.block_q, block_kv=self.block_kv)
        if self.threshold is None:
            return select_topk(scores, K, ok, **kw)
        return select_threshold(scores, self.threshold, K, ok, **kw)

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """Top-k: True when no query-block row allows more than ``min(top_k, nk)`` blocks. With a
        threshold the scores decide (data); only when no row allows more than one block is every
        row sure to be whole (the best block is always kept)."""
        K = min(self.top_k, num_tiles(S, self.block_kv)) if self.threshold is None else 1
        return fits_top_k(K, mask, T, S, self.block_q, self.block_kv)


__all__ = [
    "Seer", "attention_recall", "block_max_attention", "block_max_attention_reference", "select_threshold",
    "select_topk",
]
