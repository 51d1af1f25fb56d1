"""SeerAttention: a learned gate picks the key blocks each query block attends to.

Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (2024); public code
microsoft/SeerAttention (``seer_attn/attn_gate.py``, ``seer_attn/kernels/attn_pooling_kernel.py``,
``seer_attn/modules/common.py``).

- **Ground truth** (``block_max_attention``): the attention map ``P = softmax(scale·QKᵀ | mask)``
  max-pooled over each (query block, key block) tile, then normalized over the key blocks of each
  query-block row: ``G[i, j] = max_{t∈i, s∈j} P[t, s] / Σ_j' max_{t∈i, s∈j'} P[t, s]``. Computed
  blocked: the row log-sum-exp comes from the flash path, then a second pass over the tiles takes
  ``max exp(s - lse)`` per tile. The T×S map is never stored.
- **AttnGate**: pooled queries (mean over the query block) and pooled keys (max ‖ min ‖ mean over
  the key block), a linear projection per head, then
  ``softmax_j(q̃_i·k̃_j / √d_gate)`` over the key blocks that the block-level mask allows.
- **Distillation** (``gate_loss``, ``distillation_step``): KL(G ‖ gate) with optax. Only the gate
  is trained; q and k are fixed inputs.
- **Selection** (``select_topk``, ``select_threshold``): dynamic ``BlockSparse`` lists from block
  scores, under jit.
- **Selector** ``Seer`` (registry name "seer"): by default it is the *oracle*, which selects from
  the ground truth and needs no trained weights. Give it a trained ``AttnGate`` (``gate=``) to
  select from the gate's scores instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from attnjax import registry
from attnjax.masks import Mask
from attnjax.nn.checks import check_positive
from attnjax.positional import RoPE
from attnjax.softmax.flash_xla import flash_attention_xla
from attnjax.sparse.engine import BlockSelector, block_sparse_attention
from attnjax.sparse.lists import BlockSparse, allowed_blocks, from_block_ids
from attnjax.sparse.pooling import pooled_attention, pooled_attention_reference
from attnjax.tiling import num_tiles, pad_axis

PAPER = "Gao et al. 2024, SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs"
POOLINGS = ("avg", "max", "min")


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


# ----------------------------------------------------------------------------- the gate

def _block_pool(x: jax.Array, block: int, kinds: Sequence[str]) -> jax.Array:
    """``[B, L, H, D]`` -> ``[B, ceil(L/block), H, len(kinds)·D]`` float32, each pooling over the
    valid (unpadded) tokens of a block, concatenated in the order of ``kinds``."""
    B, L, H, D = x.shape
    n = num_tiles(L, block)
    tiles = pad_axis(x.astype(jnp.float32), 1, block).reshape(B, n, block, H, D)
    valid = (jnp.arange(n * block) < L).reshape(1, n, block, 1, 1)
    pooled = {
        "avg": lambda: jnp.where(valid, tiles, 0.0).sum(2) / valid.sum(2),
        "max": lambda: jnp.where(valid, tiles, -jnp.inf).max(2),
        "min": lambda: jnp.where(valid, tiles, jnp.inf).min(2),
    }
    return jnp.concatenate([pooled[kind]() for kind in kinds], axis=-1)


class AttnGate(nnx.Module):
    """SeerAttention's AttnGate: block-level attention scores from pooled queries and keys.

    ``q̃_i = pool_q(Q_block i) W_q^h``, ``k̃_j = pool_k(K_block j) W_k^{h_kv}`` and
    ``gate[b, h, i, :] = softmax_j(q̃_i · k̃_j / √d_gate)`` over the key blocks that the mask allows
    at block level (``attnjax.sparse.allowed_blocks``); other blocks get exactly 0. Defaults follow
    the paper: queries average-pooled, keys max ‖ min ‖ average pooled (Gao et al. 2024).

    GQA as in the public code: ``W_q`` is per query head, ``W_k`` per KV head, and the pooled key
    of KV head ``h_kv`` serves the ``Hq / Hkv`` query heads of its group, so the gate scores each
    query head. Both projections are always present (the public code drops ``W_q`` in one special
    case; here the gate is uniform).

    RoPE: in the paper's model the gate reads q and k *before* RoPE and rotates the projected
    pooled features at each block's first position (query blocks bottom-right aligned). Pass
    ``rope`` to do the same; leave it ``None`` when the inputs already carry positions (the ``Seer``
    selector receives post-RoPE q and k from ``attnjax.attention``).

    Args:
      head_dim: ``D`` of q and k.
      num_heads: query heads ``Hq``; num_kv_heads: ``Hkv`` (default ``Hq``), dividing ``Hq``.
      block_q, block_kv: pooling blocks (the engine's block sizes).
      gate_dim: projected feature size ``d_gate`` (default ``head_dim``; even when ``rope`` is given).
      q_pooling, k_pooling: poolings from ("avg", "max", "min"), concatenated in this order.
      rope: optional ``attnjax.positional.RoPE`` for pre-RoPE inputs (see above).
      param_dtype: dtype of the projections.
      rngs: ``params`` initializes the projections (normal, std ``1/sqrt(fan_in)``).
    """

    def __init__(
        self, head_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, block_q: int = 64,
        block_kv: int = 64, gate_dim: Optional[int] = None, q_pooling: Sequence[str] = ("avg",),
        k_pooling: Sequence[str] = ("max", "min", "avg"), rope: Optional[RoPE] = None,
        param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        gate_dim = head_dim if gate_dim is None else gate_dim
        check_positive(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, block_q=block_q,
                       block_kv=block_kv, gate_dim=gate_dim)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, kinds in (("q_pooling", q_pooling), ("k_pooling", k_pooling)):
            if not kinds or any(kind not in POOLINGS for kind in kinds):
                raise ValueError(f"{name} must be a non-empty sequence from {POOLINGS}, got {kinds!r}")
        if rope is not None:
            rope.frequencies(gate_dim)  # raises ValueError if the rotary dim doesn't fit gate_dim
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.block_q, self.block_kv, self.gate_dim = block_q, block_kv, gate_dim
        self.q_pooling, self.k_pooling = tuple(q_pooling), tuple(k_pooling)
        self.rope = rope

        def weight(heads, fan_in):
            w = jax.random.normal(rngs.params(), (heads, fan_in, gate_dim), jnp.float32) * fan_in ** -0.5
            return nnx.Param(w.astype(param_dtype))

        self.w_q = weight(num_heads, head_dim * len(self.q_pooling))
        self.w_k = weight(num_kv_heads, head_dim * len(self.k_pooling))

    def logits(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> jax.Array:
        """Gate logits ``q̃_i·k̃_j / √d_gate``, float32 ``[B, Hq, nq, nk]``, ``-inf`` on blocks the mask
        rules out. ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]``."""
        B, T, Hq, D = q.shape
        S, Hkv = k.shape[1], k.shape[2]
        if (D, Hq, Hkv) != (self.head_dim, self.num_heads, self.num_kv_heads) or k.shape[-1] != D:
            raise ValueError(f"AttnGate built for head_dim={self.head_dim}, heads {self.num_heads}/"
                             f"{self.num_kv_heads} (q/kv), got q {q.shape}, k {k.shape}")
        w_q, w_k = self.w_q[...].astype(jnp.float32), self.w_k[...].astype(jnp.float32)
        pq = jnp.einsum("bnhi,hio->bnho", _block_pool(q, self.block_q, self.q_pooling), w_q)
        pk = jnp.einsum("bnhi,hio->bnho", _block_pool(k, self.block_kv, self.k_pooling), w_k)
        nq, nk = pq.shape[1], pk.shape[1]
        if self.rope is not None:
            pq = self.rope(pq, jnp.arange(nq) * self.block_q + (S - T))
            pk = self.rope(pk, jnp.arange(nk) * self.block_kv)
        pq = pq.reshape(B, nq, Hkv, Hq // Hkv, self.gate_dim)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", pq, pk).reshape(B, Hq, nq, nk) * self.gate_dim ** -0.5
        ok = jnp.asarray(allowed_blocks(mask, T, S, self.block_q, self.block_kv))
        return jnp.where(ok, s, -jnp.inf)

    def __call__(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> jax.Array:
        """Block scores: softmax over allowed key blocks, float32 ``[B, Hq, nq, nk]`` (0 elsewhere;
        a row with no allowed block is all 0)."""
        s = self.logits(q, k, mask=mask)
        ok = jnp.isfinite(s)
        p = jax.nn.softmax(jnp.where(ok, s, -1e30), axis=-1)
        return jnp.where(ok, p, 0.0)


# ----------------------------------------------------------------------------- distillation

def gate_loss(
    gate: AttnGate, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
    target: Optional[jax.Array] = None, skip_fraction: float = 0.25,
) -> jax.Array:
    """Distillation loss: ``KL(G ‖ gate)`` per query-block row, averaged over the rows used.

    ``G`` is ``block_max_attention(q, k, ...)`` at the gate's block sizes (or ``target`` when
    given, e.g. computed once for several steps). The public code uses ``torch.nn.KLDivLoss``
    (mean over every element), i.e. this loss divided by ``nk``; like it, the first
    ``skip_fraction`` of the query blocks (the short causal rows) are left out "for training
    stability". Rows whose ground truth is all 0 (they see no key) are left out too.

    Returns a float32 scalar; gradients flow to the gate's parameters only.
    """
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}")
    if target is None:
        target = block_max_attention(q, k, block_q=gate.block_q, block_kv=gate.block_kv, mask=mask, scale=scale)
    target = lax.stop_gradient(target.astype(jnp.float32))
    s = gate.logits(lax.stop_gradient(q), lax.stop_gradient(k), mask=mask)
    log_gate = jax.nn.log_softmax(jnp.where(jnp.isfinite(s), s, -1e30), axis=-1)
    positive = target > 0
    log_target = jnp.log(jnp.where(positive, target, 1.0))
    kl_rows = jnp.sum(jnp.where(positive, target * (log_target - log_gate), 0.0), axis=-1)  # [B, Hq, nq]
    nq = kl_rows.shape[-1]
    used = positive.any(-1) & (jnp.arange(nq) >= int(skip_fraction * nq))
    return jnp.sum(jnp.where(used, kl_rows, 0.0)) / jnp.maximum(used.sum(), 1)


@nnx.jit(static_argnames=("scale", "skip_fraction"))
def distillation_step(
    gate: AttnGate, optimizer: nnx.Optimizer, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, target: Optional[jax.Array] = None, skip_fraction: float = 0.25,
) -> jax.Array:
    """One optax step on ``gate_loss`` (jitted); returns the loss before the update.

    ``optimizer`` is ``nnx.Optimizer(gate, tx, wrt=nnx.Param)``; q and k are fixed inputs (the
    attention weights that produce them are not trained), as in SeerAttention's post-training
    distillation. Example::

        gate = AttnGate(D, Hq, num_kv_heads=Hkv, block_q=64, block_kv=64, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(gate, optax.adam(1e-3), wrt=nnx.Param)
        for q, k in batches:
            loss = distillation_step(gate, optimizer, q, k, mask=masks.Causal())
    """
    def loss_fn(g):
        return gate_loss(g, q, k, mask=mask, scale=scale, target=target, skip_fraction=skip_fraction)

    loss, grads = nnx.value_and_grad(loss_fn)(gate)
    optimizer.update(gate, grads)
    return loss


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
    - **gate** (``gate=`` a trained ``AttnGate`` with the same block sizes): scores are the gate's
      block probabilities, O((T/block)·(S/block)) to compute; this is SeerAttention at inference.
      The gate's parameters are constants of the config (train it with ``distillation_step``).

    Rows keep their ``top_k`` best allowed blocks, or, with ``threshold`` set, the blocks whose
    score exceeds it (at most ``top_k``, at least the best one). Blocks the mask rules out are
    never listed; inside listed tiles the engine applies the mask element by element.

    Attributes:
      block_q, block_kv: tile sizes (default 64).
      top_k: blocks per query block (clipped to ``nk``), the static list length.
      threshold: ``None`` for top-k, else the score threshold ``tau`` (scores are row-normalized).
      gate: ``None`` (oracle) or a trained ``AttnGate``.
    """

    name: ClassVar[str] = "seer"
    paper: ClassVar[str] = PAPER

    block_q: int = 64
    block_kv: int = 64
    top_k: int = 8
    threshold: Optional[float] = None
    gate: Optional[AttnGate] = None

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv, top_k=self.top_k)
        if self.gate is not None:
            if not isinstance(self.gate, AttnGate):
                raise TypeError(f"Seer.gate must be an AttnGate or None, got {type(self.gate).__name__}")
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


__all__ = [
    "AttnGate", "Seer", "attention_recall", "block_max_attention", "block_max_attention_reference",
    "distillation_step", "gate_loss", "select_threshold", "select_topk",
]
