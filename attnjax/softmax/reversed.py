"""Reversed attention (DependencyViT): softmax over the query axis, so each key sends one unit of message.

Ding, Shen, Fan, Chen, Chen, Luo, Tenenbaum, Gan, "Visual Dependency Transformers: Dependency Tree
Emerges from Reversed Attention", CVPR 2023 (arXiv:2304.03282).

Softmax attention normalizes rows: query ``i`` gathers from the keys. Reversed attention
normalizes columns: key ``j`` (a child) spreads one unit of message over the queries ``i``
(its parents) allowed to receive it:

    A_ij = exp(s_ij) / Σ_{i' allowed} exp(s_i'j),    out_i = Σ_j A_ij v_j,

with ``s_ij = cap·tanh((scale·q_i·k_j + b_ij)/cap)`` as in softmax attention. Each column with an
allowed query sums to 1 (to less than 1 with a sink, which lets a child send to nobody). Rows are
not normalized: a parent with many children receives a lot. The paper writes
``A_R = softmax(Q Kᵀ)ᵀ``, which is this with the roles of the two learned projections exchanged.
Its head selector ``P`` and message controller ``M`` scale each child's message. Fold them into
the values (``out_i = Σ_j A_ij (p_j m_j v_j)``) or pass them as ``head_weights`` to the readouts.

Readouts: ``dependency_parents`` (each child's argmax parent per head, blocked),
``dependency_mask`` (the paper's soft dependency mask ``A_M = Σ_h A_R^h``, dense) and
``tree_parents`` (the dependency tree: each child's argmax parent in ``A_M``).

The blocked path (``reversed_attention_xla``, O(T·tile) memory) makes two calls to the blocked
softmax ``flash_attention_xla``:

1. ``lse_j = logsumexp_i s_ij`` is the row log-sum-exp of the transposed problem (queries ``k``,
   keys ``q``, mask and bias transposed), per query head.
2. Softmax attention with the column bias ``−lse_j`` gives the row-normalized
   ``Ô_i = Σ_j e^{s_ij − lse_j} v_j / Σ_j e^{s_ij − lse_j}`` and its row log-sum-exp
   ``L_i = log Σ_j A_ij ≤ log S``, so ``out_i = Ô_i·e^{L_i}``.

Both calls have custom VJPs. The column bias is an array bias, so its gradient flows back
through pass 1's ``lse``, and the gradients are exact.

There is no Pallas path. The GPU flash kernel expands an array bias to ``[B, H, T, S]``, and the
TPU kernel takes none, so pass 2 would lose the O(T) memory. It needs a kernel input for a
per-column term.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.bias import as_bias
from attnjax.dropout import dropout_seed
from attnjax.masks import Mask
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked.scores import (allowed, dense_operands, dropout_multiplier, raw_logits, score_spec, soft_cap,
                                    to_groups)
from attnjax.meshes import vary_like
from attnjax.tiling import pad_axis, rank4


def reversed_attention_weights(
    q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
) -> jax.Array:
    """The dense reversed-attention matrix ``A [B, Hq, T, S]`` (float32), normalized over queries.

    ``A_ij = exp(s_ij) / (Σ_{i' allowed} exp(s_i'j) + exp(sink))``; 0 where masked, and a column
    with no allowed query is all 0. Arguments as in ``reversed_attention_reference``.
    """
    B, T, Hq, _ = q.shape
    p, _ = _column_softmax(q, k, mask, bias, scale, logits_soft_cap, sinks, 0.0)
    return p.reshape(B, Hq, T, k.shape[1])


def _column_softmax(q, k, mask, bias, scale, logits_soft_cap, sinks, dropout_rate):
    """Column-normalized weights ``[B, Hkv, G, T, S]`` and the ScoreSpec."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale, logits_soft_cap, dropout_rate)
    qg, kt, _, q_idx, kv_idx = dense_operands(q, k, k)
    s = soft_cap(raw_logits(qg, kt, q_idx, kv_idx, as_bias(bias), spec), logits_soft_cap)
    s = jnp.where(allowed(mask, q_idx, kv_idx, spec), s, -jnp.inf)
    if sinks is not None:
        sink = to_groups(jnp.asarray(sinks, jnp.float32)[None, :, None, None], Hkv)
        s = jnp.concatenate([s, jnp.broadcast_to(sink, s.shape[:-2] + (1, S))], axis=-2)
    col_max = jnp.max(s, axis=-2, keepdims=True)
    col_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(col_max), col_max, 0.0))
    e = jnp.exp(s - col_max)
    total = jnp.sum(e, axis=-2, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    return p[..., :T, :], spec


def reversed_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
    dropout_rate: float = 0.0, rng: Optional[jax.Array] = None, return_lse: bool = False,
) -> jax.Array:
    """Naive reversed attention: ``out_i = Σ_j A_ij v_j`` with A normalized over the query axis.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``.
      mask: an ``attnjax.masks`` value (which parents ``i`` child ``j`` may send to).
      bias, scale, logits_soft_cap: as in softmax attention.
      sinks: ``[Hq]`` logits of a "nobody" parent that joins every column's normalizer.
      dropout_rate, rng: dropout on ``A`` (the same hash-based masks as ``attnjax.dropout``).
      return_lse: not supported (the statistic is per column); raises NotImplementedError.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype; a query that receives from no key gets 0.
    """
    if return_lse:
        raise NotImplementedError("reversed attention normalizes columns; it has no per-query log-sum-exp")
    B, T, Hq, _ = q.shape
    p, spec = _column_softmax(q, k, mask, bias, scale, logits_soft_cap, sinks, dropout_rate)
    if dropout_rate > 0:
        p = p * dropout_multiplier(dropout_seed(rng), B, Hq, jnp.arange(T), jnp.arange(spec.S), spec)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", p, v.transpose(0, 2, 1, 3).astype(jnp.float32))
    return out.reshape(B, Hq, T, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def reversed_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
    dropout_rate: float = 0.0, rng: Optional[jax.Array] = None, return_lse: bool = False,
    block_q: int = 512, block_kv: int = 512,
) -> jax.Array:
    """Blocked reversed attention: two ``flash_attention_xla`` calls, O(T·tile) memory, exact grads.

    Same arguments and result as ``reversed_attention_reference``. ``k`` is repeated to the
    ``Hq`` query heads for the transposed pass, because each query head normalizes its own
    columns. A bias is made dense (``[B, Hq, T, S]`` once added to the column term), so only
    ``bias=None`` keeps memory at O(T·tile).
    Raises NotImplementedError for ``logits_soft_cap`` (the cap would also bend the column bias)
    and ``return_lse``.
    """
    if return_lse:
        raise NotImplementedError("reversed attention normalizes columns; it has no per-query log-sum-exp")
    if logits_soft_cap is not None:
        raise NotImplementedError("reversed_attention_xla has no logits_soft_cap; use implementation='reference'")
    B, T, Hq, D = q.shape
    S = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    bias = as_bias(bias)
    dense_bias = None if bias is None else rank4(bias.dense(T, S))
    col_lse = _column_lse(q, k, mask, dense_bias, scale, sinks, block_q, block_kv)  # [B, S, Hq]
    column_bias = jnp.where(jnp.isfinite(col_lse), -col_lse, 0.0).transpose(0, 2, 1)[:, :, None, :]
    if dense_bias is not None:
        column_bias = column_bias + dense_bias
    out, row_lse = flash_attention_xla(q, k, v, mask=mask, bias=column_bias, scale=scale, dropout_rate=dropout_rate,
                                       rng=rng, return_lse=True, block_q=block_q, block_kv=block_kv)
    return (out.astype(jnp.float32) * jnp.exp(row_lse)[..., None]).astype(q.dtype)


def _column_lse(q, k, mask, dense_bias, scale, sinks, block_q, block_kv) -> jax.Array:
    """``logsumexp_i s_ij`` per query head, ``[B, S, Hq]`` float32 (``-inf`` for a column with no query)."""
    B, T, Hq, _ = q.shape
    group = Hq // k.shape[2]
    transposed_queries = jnp.repeat(k, group, axis=2)  # query head h = hk·G + g reads kv head hk
    no_values = vary_like(jnp.zeros((B, T, Hq, 1), q.dtype), q, k)
    _, lse = flash_attention_xla(
        transposed_queries, q, no_values, mask=None if mask is None else TransposedMask(mask),
        bias=None if dense_bias is None else jnp.swapaxes(dense_bias, -1, -2), scale=scale, sinks=sinks,
        return_lse=True, block_q=block_kv, block_kv=block_q)
    return lse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TransposedMask(Mask):
    """``mask`` with queries and keys swapped: allows ``(j, i)`` iff ``mask`` allows ``(i, j)``.

    For the transposed problem of ``T' = S`` queries and ``S' = T`` keys; tiles and block
    summaries are the inner mask's, transposed.
    """

    mask: Mask

    def check(self, batch, num_heads, T, S):
        self.mask.check(batch, num_heads, S, T)

    def tile(self, q_idx, kv_idx, T, S):
        return jnp.swapaxes(self.mask.tile(kv_idx, q_idx, S, T), -1, -2)

    def block_summary(self, T, S, block_q, block_kv):
        summary = self.mask.block_summary(S, T, block_kv, block_q)
        return (np if isinstance(summary, np.ndarray) else jnp).swapaxes(summary, -1, -2)


def dependency_parents(
    q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias=None, scale: Optional[float] = None,
    block_q: int = 512,
) -> jax.Array:
    """Each child's parent per head: ``parent[b, j, h] = argmax_i A^h_ij``, int32 ``[B, S, Hq]``.

    The column softmax is monotone within a column, so this is ``argmax_i s_ij`` over the allowed
    queries (ties go to the smaller ``i``); ``-1`` where child ``j`` has no allowed parent. In
    DependencyViT the tree emerges as these argmax parents (Ding et al. 2023). Blocked over query
    tiles of ``block_q``: memory O(block_q·S).

    Args:
      q: ``[B, T, Hq, D]`` (parents); k: ``[B, S, Hkv, D]`` (children).
      mask, bias, scale: as in ``reversed_attention_reference`` (a soft cap doesn't move an argmax).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale)
    bq = min(block_q, T)
    bias = as_bias(bias)
    kt, kv_idx = k.transpose(0, 2, 1, 3), jnp.arange(S)
    qg = to_groups(pad_axis(q, 1, bq).transpose(0, 2, 1, 3), Hkv)  # [B, Hkv, G, T_pad, D]
    tiles = jnp.moveaxis(qg.reshape(qg.shape[:3] + (-1, bq, D)), 3, 0)  # [nq, B, Hkv, G, bq, D]

    def tile(carry, xs):
        best, parent = carry
        i, qi = xs
        q_idx = i * bq + jnp.arange(bq)
        s = raw_logits(qi, kt, q_idx, kv_idx, bias, spec)
        ok = allowed(mask, q_idx, kv_idx, spec) & (q_idx < T)[:, None]
        s = jnp.where(ok, s, -jnp.inf)
        tile_best = s.max(axis=-2)
        better = tile_best > best
        tile_parent = jnp.argmax(s, axis=-2).astype(jnp.int32) + i * bq
        return (jnp.where(better, tile_best, best), jnp.where(better, tile_parent, parent)), None

    G = Hq // Hkv
    init = vary_like((jnp.full((B, Hkv, G, S), -jnp.inf, jnp.float32), jnp.full((B, Hkv, G, S), -1, jnp.int32)),
                     q, k, bias, mask)
    (_, parent), _ = jax.lax.scan(tile, init, (jnp.arange(tiles.shape[0]), tiles))
    return parent.reshape(B, Hq, S).transpose(0, 2, 1)


def dependency_mask(
    q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, sinks: Optional[jax.Array] = None,
    head_weights: Optional[jax.Array] = None,
) -> jax.Array:
    """The soft dependency mask ``A_M[b, i, j] = Σ_h w[b, j, h]·A^h_ij``, float32 ``[B, T, S]`` (dense).

    DependencyViT sums the reversed attention over heads after its head selector ``P`` and
    message controller ``M`` scale each child's message: pass their product as
    ``head_weights [B, S, Hq]`` (default 1). Other arguments as in
    ``reversed_attention_weights``.
    """
    a = reversed_attention_weights(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                                   sinks=sinks)
    if head_weights is not None:
        a = a * jnp.asarray(head_weights, jnp.float32).transpose(0, 2, 1)[:, :, None, :]
    return a.sum(axis=1)


def tree_parents(soft_dependency_mask: jax.Array) -> jax.Array:
    """The dependency tree of ``A_M [B, T, S]``: each child's argmax parent, int32 ``[B, S]``.

    ``-1`` where a column is all zero (the child sends to nobody). In self-attention a child
    that is its own parent is a root.
    """
    parent = jnp.argmax(soft_dependency_mask, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(soft_dependency_mask > 0, axis=1), parent, -1)


@registry.register
@dataclasses.dataclass(frozen=True)
class Reversed:
    """Reversed attention (DependencyViT): softmax over queries, ``out_i = Σ_j A_ij v_j``.

    ``block_q``/``block_kv`` set the xla path's tiles. The xla path has no soft cap, so "auto"
    falls back to the reference for one.
    """

    block_q: int = 512
    block_kv: int = 512

    name: ClassVar[str] = "reversed"
    family: ClassVar[str] = "softmax"
    paper: ClassVar[str] = "Ding et al. 2023, Visual Dependency Transformers (CVPR)"
    supports: ClassVar[frozenset] = frozenset(
        {"mask", "bias", "logits_soft_cap", "sinks", "dropout", "gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def implementations(self):
        return {
            "reference": reversed_attention_reference,
            "xla": functools.partial(reversed_attention_xla, block_q=self.block_q, block_kv=self.block_kv),
        }
