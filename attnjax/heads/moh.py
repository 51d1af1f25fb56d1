"""MoH: multi-head attention as a mixture of heads (Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as
Mixture-of-Head Attention", 2024; official code github.com/SkyworkAI/MoH).

Multi-head attention is a sum over heads, ``MHA(X) = Σ_i H^i W_O^i`` (sec. 3.1). MoH treats the heads as
experts (sec. 3.2): per token ``x_t``, ``h_s`` shared heads are always on and a router picks the top-k of the
other ``h - h_s`` (routed) heads; the output is the weighted sum ``Σ_i g_i H^i W_O^i`` with the two-stage
routing scores

    ``g_i = α₁ · Softmax(W_s x_t)_i``                     for a shared head ``i``,
    ``g_i = α₂ · Softmax(W_r x_t)_i``                     for a routed head in the top-k of ``W_r x_t``,
    ``g_i = 0``                                           otherwise,   ``[α₁, α₂] = Softmax(W_h x_t)``,

and the load-balance loss over the routed heads ``L_b = Σ_i f_i P_i`` with ``f_i`` the fraction of tokens
that select head ``i`` and ``P_i`` the mean routed probability ``Softmax(W_r x_t)_i`` (sec. 3.2; the total
loss is ``L_task + β L_b``, β = 0.01).

The official MoH-ViT / MoH-DiT code (``AggregatedAttention.forward``) rescales these scores: the routed
probabilities are renormalized over the selected heads and each group's weights are multiplied by its head
count (``k``, ``h_s``), and ``[α₁, α₂]`` by 2, so that a head's weight is 1 on average as in plain MHA; its
balance loss is ``(h - h_s)·Σ_i f_i P_i``. ``official_scaling=True`` selects those forms.

Paths:

- ``moh_attention_reference``: every head, multiplied by its (zero for unselected) weight: ``O(h·T·S)``.
- ``moh_attention``: only the active heads. Each token's ``h_s + k`` (head, token) query rows are gathered,
  sorted by (batch, KV head, position) and packed into one sequence; the keys and values of every (batch,
  KV head) are laid end to end, and each packed row may see the key interval of its own (batch, KV head),
  up to its position when causal. One blocked softmax pass (``attnjax.attention``, "xla") over the packed
  rows skips the key tiles outside every row's interval, so the attention work is ``(h_s + k)/h`` of the
  all-heads pass (plus a few partial tiles at group edges); the rows are then unsorted and weighted.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive, check_qkv, describe
from attnjax.softmax import Softmax
from attnjax.tiling import num_tiles

BALANCE_LOSS_WEIGHT = 0.01
"""β of ``L = L_task + β·L_b`` (MoH sec. 3.2)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadRouting:
    """Per-token head choice of MoH: which heads are active and with what weight.

    Attributes:
      index: int32 ``[B, T, h_s + k]``, the active heads of each token: the shared heads ``0..h_s-1``, then the
        routed top-k in decreasing router score (head ids count the shared heads first, ``h_s..h-1``).
      weights: float32 ``[B, T, h_s + k]``, the routing scores ``g_i`` of those heads.
      probs: float32 ``[B, T, h - h_s]``, the routed probabilities ``Softmax(W_r x_t)`` (for ``L_b``).
      num_shared: ``h_s`` (static).
    """

    index: jax.Array
    weights: jax.Array
    probs: jax.Array
    num_shared: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_heads(self) -> int:
        """``h = h_s + (h - h_s)``."""
        return self.num_shared + self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        """``k``, the routed heads each token selects."""
        return self.index.shape[-1] - self.num_shared

    def gates(self) -> jax.Array:
        """The dense float32 scores ``[B, T, h]``: ``g_i`` of the active heads, 0 elsewhere."""
        return jnp.einsum("bta,btah->bth", self.weights, jax.nn.one_hot(self.index, self.num_heads))


def moh_routing(routed_logits: Optional[jax.Array], top_k: int, *, shared_logits: Optional[jax.Array] = None,
                balance_logits: Optional[jax.Array] = None, num_shared: Optional[int] = None,
                official_scaling: bool = False) -> HeadRouting:
    """MoH's two-stage routing scores from the router logits of each token (sec. 3.2).

    ``g_i = α₁·Softmax(W_s x_t)_i`` (shared), ``α₂·Softmax(W_r x_t)_i`` on the top-k routed heads, 0 elsewhere,
    ``[α₁, α₂] = Softmax(W_h x_t)``. Top-k is taken on the logits (the softmax keeps their order); ties go to
    the lower head index (``jax.lax.top_k``).

    Args:
      routed_logits: ``W_r x_t``, ``[B, T, h - h_s]``; ``None`` when every head is shared.
      top_k: ``k``, routed heads per token, ``1 <= k <= h - h_s`` (0 when there are no routed heads).
      shared_logits: ``W_s x_t``, ``[B, T, h_s]``; ``None`` for ``h_s <= 1`` (one shared head has weight 1,
        give ``num_shared``).
      balance_logits: ``W_h x_t``, ``[B, T, 2]`` (shared, routed); needed when there are shared and routed
        heads, ignored otherwise (then ``α = 1`` for the one group).
      num_shared: ``h_s`` when ``shared_logits`` is None (0 or 1; default 0).
      official_scaling: the official code's weights: routed probabilities renormalized over the selected
        heads, groups scaled by their head counts and ``α`` by 2 (so head weights average 1).
    Returns:
      A ``HeadRouting`` (float32 weights and probabilities).
    """
    if shared_logits is not None:
        hs = _check_logits("shared_logits", shared_logits).shape[-1]
        if num_shared is not None and num_shared != hs:
            raise ValueError(f"num_shared={num_shared} disagrees with shared_logits {describe(shared_logits)}")
    else:
        hs = 0 if num_shared is None else num_shared
        if hs not in (0, 1):
            raise ValueError(f"num_shared={hs} > 1 needs shared_logits [B, T, {hs}] (W_s x_t)")
    hr = 0 if routed_logits is None else _check_logits("routed_logits", routed_logits).shape[-1]
    if hr == 0 and top_k != 0:
        raise ValueError(f"top_k={top_k} needs routed_logits [B, T, h - h_s]")
    if hr > 0 and not (isinstance(top_k, int) and 1 <= top_k <= hr):
        raise ValueError(f"top_k must be an int in [1, {hr}] (the routed heads), got {describe(top_k)}")
    given = [x for x in (routed_logits, shared_logits) if x is not None]
    if not given:
        raise ValueError("MoH routing needs routed_logits or shared_logits (their [B, T] sets the shape)")
    lead = given[0].shape[:2]
    if any(x.shape[:2] != lead for x in given):
        raise ValueError(f"routed_logits {describe(routed_logits)} and shared_logits {describe(shared_logits)} "
                         "must share [B, T]")
    both = hs > 0 and hr > 0
    if both:
        if balance_logits is None or _check_logits("balance_logits", balance_logits).shape != (*lead, 2):
            raise ValueError(f"balance_logits must be [B, T, 2] = {[*lead, 2]} (W_h x_t) with shared and routed "
                             f"heads, got {describe(balance_logits)}")
        alpha = jax.nn.softmax(balance_logits.astype(jnp.float32), axis=-1)
    else:
        alpha = jnp.ones((*lead, 2), jnp.float32)
    group = 2.0 if (official_scaling and both) else 1.0

    parts_index, parts_weight = [], []
    if hs:
        shared = (jnp.ones((*lead, 1), jnp.float32) if shared_logits is None
                  else jax.nn.softmax(shared_logits.astype(jnp.float32), axis=-1))
        if official_scaling:
            shared = shared * hs
        parts_index.append(jnp.broadcast_to(jnp.arange(hs, dtype=jnp.int32), (*lead, hs)))
        parts_weight.append(group * alpha[..., :1] * shared)
    if hr:
        probs = jax.nn.softmax(routed_logits.astype(jnp.float32), axis=-1)
        _, chosen = jax.lax.top_k(routed_logits, top_k)
        selected = jnp.take_along_axis(probs, chosen, axis=-1)
        if official_scaling:
            total = jnp.sum(selected, axis=-1, keepdims=True)
            selected = top_k * selected / jnp.maximum(total, jnp.finfo(jnp.float32).eps)
        parts_index.append(hs + chosen.astype(jnp.int32))
        parts_weight.append(group * alpha[..., 1:] * selected)
    else:
        probs = jnp.zeros((*lead, 0), jnp.float32)
    return HeadRouting(jnp.concatenate(parts_index, -1), jnp.concatenate(parts_weight, -1), probs, hs)


def moh_balance_loss(routing: HeadRouting, *, official_scaling: bool = False) -> jax.Array:
    """MoH's load-balance loss over the routed heads (sec. 3.2): ``L_b = Σ_{i=h_s+1}^{h} f_i P_i``.

    ``f_i = (1/T)·Σ_t 1(token t selects head i)`` and ``P_i = (1/T)·Σ_t Softmax(W_r x_t)_i``, over all
    ``B·T`` tokens. ``f_i`` is a count (no gradient); the gradient reaches the router through ``P_i``.
    ``official_scaling``: the official code's ``(h - h_s)·Σ_i f_i P_i`` (``mean(me·ce)·E²``). It is
    ``k/(h - h_s)`` (or ``k``) when the load and the mean probabilities are uniform. Returns a float32 scalar
    (0 without routed heads).
    """
    hr = routing.probs.shape[-1]
    if hr == 0:
        return jnp.zeros((), jnp.float32)
    chosen = routing.index[..., routing.num_shared:] - routing.num_shared
    selected = jnp.sum(jax.nn.one_hot(chosen, hr, dtype=jnp.float32), axis=-2)  # [B, T, hr]
    f = jnp.mean(selected.reshape(-1, hr), axis=0)
    p = jnp.mean(routing.probs.reshape(-1, hr), axis=0)
    loss = jnp.sum(jax.lax.stop_gradient(f) * p)
    return loss * hr if official_scaling else loss


def moh_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array, *,
                            mask: Optional[masks.Mask] = None, scale: Optional[float] = None) -> jax.Array:
    """Every head, weighted: ``out[:, t, i] = g_{t,i} · softmax(q_i k_iᵀ·scale) v_i`` (MoH eq. in sec. 3.2).

    Args:
      q: ``[B, T, h, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (GQA: head ``i`` reads KV head
        ``i // (h // Hkv)``).
      gates: ``[B, T, h]`` routing scores, 0 for the heads a token does not select (``HeadRouting.gates()``).
      mask, scale: as ``attnjax.attention``.
    Returns:
      ``[B, T, h, Dv]`` in q's dtype: the weighted head outputs ``g_i H^i`` before the output projection.
      Cost ``O(h·T·S·D)`` time and a ``[B, h, T, S]`` map (the naive softmax).
    """
    check_qkv(q, k, v)
    _check_gates(gates, q)
    heads = attention(q, k, v, mask=mask, scale=scale, implementation="reference")
    return (heads.astype(jnp.float32) * gates.astype(jnp.float32)[..., None]).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _KeyIntervals(masks.Mask):
    """Row ``r`` of the packed queries may see key columns ``lo[b, r] <= j <= hi[b, r]`` (``hi < lo``: none)."""

    lo: jax.Array
    hi: jax.Array

    def __repr__(self) -> str:
        return f"_KeyIntervals(lo={self.lo.dtype}{list(self.lo.shape)}, hi={self.hi.dtype}{list(self.hi.shape)})"

    def tile(self, q_idx, kv_idx, T, S):
        lo = jnp.take(self.lo, q_idx, axis=1, mode="clip")[:, :, None]
        hi = jnp.take(self.hi, q_idx, axis=1, mode="clip")[:, :, None]
        return ((lo <= kv_idx) & (kv_idx <= hi))[:, None]

    def block_summary(self, T, S, block_q, block_kv):
        """Exact per tile: EMPTY when no row's interval meets the key tile, FULL when every row's covers it."""
        nq = num_tiles(T, block_q)
        pad = nq * block_q - T
        lo = jnp.pad(self.lo, ((0, 0), (0, pad)), constant_values=S).reshape(-1, nq, block_q, 1)
        hi = jnp.pad(self.hi, ((0, 0), (0, pad)), constant_values=-1).reshape(-1, nq, block_q, 1)
        first = np.arange(num_tiles(S, block_kv)) * block_kv
        last = np.minimum(first + block_kv, S) - 1
        meets = jnp.any((lo <= last) & (hi >= first), axis=2)
        real = (np.arange(nq * block_q) < T).reshape(1, nq, block_q, 1)
        covers = jnp.all(((lo <= first) & (hi >= last)) | ~real, axis=2)
        code = jnp.where(meets, jnp.where(covers, masks.FULL, masks.PARTIAL), masks.EMPTY).astype(jnp.int8)
        return code[:, None]


def moh_attention(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, weights: jax.Array, *,
                  mask: Optional[masks.Mask] = None, q_positions: Optional[jax.Array] = None,
                  scale: Optional[float] = None, block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """The active heads only: ``out[:, t, i] = g_{t,i}·softmax(q_i k_iᵀ·scale) v_i`` for ``i`` in ``index[:, t]``.

    Equal to ``moh_attention_reference`` with the dense gates of ``(index, weights)`` (MoH sec. 3.2). Each
    token's active (head, token) query rows are gathered and sorted by (batch, KV head, position) into one
    packed sequence of ``N = B·T·A`` rows; every (batch, KV head)'s keys and values are laid end to end, and a
    row sees only its own group's keys (up to its position when causal). One blocked softmax pass
    (``attnjax.attention``, "xla", tiles ``block_q × block_kv``) skips the key tiles no row of a query tile sees,
    so its work is about ``A/h`` of the all-heads pass; then the rows are unsorted and weighted. When the groups
    average at least ``block_q`` rows (long sequences), each group starts a query tile, so that no tile visits two
    groups' keys (at most ``B·Hkv·block_q`` rows of padding); shorter inputs (decoding) pack without gaps.

    Args:
      q: ``[B, T, h, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (GQA as ``attnjax.attention``).
      index: int ``[B, T, A]``, the ``A`` distinct active heads of each token (``HeadRouting.index``).
      weights: ``[B, T, A]``, their scores ``g`` (``HeadRouting.weights``); gradients flow to them.
      mask: ``None`` or ``masks.Causal()`` (NotImplementedError for other masks).
      q_positions: int ``[T]`` or ``[B, T]``, the key index each query sits at for ``Causal`` (default the
        bottom-right alignment ``t + S - T``); a query sees keys ``<= its position``. For KV-cache decoding.
      scale: logit scale, default ``1/sqrt(D)``.
      block_q, block_kv: tiles of the packed pass.
    Returns:
      ``[B, T, h, Dv]`` in q's dtype, zero for the inactive heads. Memory: the packed rows ``O(N·D)``, one
      copy of K and V, and ``O(N·block_kv)`` temporaries; never a ``[T, S]`` map.
    """
    check_qkv(q, k, v)
    check_positive(block_q=block_q, block_kv=block_kv)
    B, T, H, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    A = _check_routing(index, weights, q)
    causal = _check_causal(mask)
    if q_positions is not None and not causal:
        raise ValueError("q_positions place the queries for masks.Causal(); pass mask=masks.Causal()")
    positions = jnp.broadcast_to(jnp.arange(T) + (S - T), (B, T)) if q_positions is None else \
        _check_positions(q_positions, B, T)
    group = jnp.arange(B, dtype=jnp.int32)[:, None, None] * Hkv + index.astype(jnp.int32) // (H // Hkv)
    sort_key = (group * T + jnp.arange(T, dtype=jnp.int32)[None, :, None]).reshape(-1)
    order = jnp.argsort(sort_key, stable=True)
    N, G = B * T * A, B * Hkv
    inverse = jnp.zeros(N, jnp.int32).at[order].set(jnp.arange(N, dtype=jnp.int32))
    rows = jnp.take_along_axis(q, index[..., None].astype(jnp.int32), axis=2).reshape(N, D)[order]
    lo = (group.reshape(-1) * S)[order]
    reach = jnp.minimum(positions, S - 1)[:, :, None] if causal else jnp.full((B, T, 1), S - 1)
    hi = (group * S + reach).reshape(-1)[order]
    slot = jnp.arange(N, dtype=jnp.int32)  # where each sorted row sits in the packed sequence
    if N >= G * block_q:  # long groups: each starts a query tile (static choice; see the docstring)
        rows, lo, hi, slot = _align_groups(rows, lo, hi, group.reshape(-1)[order], G, block_q, empty=G * S)
    keys = k.transpose(0, 2, 1, 3).reshape(1, G * S, 1, D)
    values = v.transpose(0, 2, 1, 3).reshape(1, G * S, 1, Dv)
    packed = attention(rows[None, :, None], keys, values, mechanism=Softmax(block_q=block_q, block_kv=block_kv),
                       mask=_KeyIntervals(lo[None], hi[None]), scale=scale, implementation="xla")
    out = packed[0, :, 0][slot[inverse]].reshape(B, T, A, Dv).astype(jnp.float32)
    out = out * weights.astype(jnp.float32)[..., None]
    return jnp.einsum("btah,btad->bthd", jax.nn.one_hot(index, H, dtype=jnp.float32), out).astype(q.dtype)


def _align_groups(rows, lo, hi, group, num_groups: int, block: int, empty: int):
    """Packed rows (sorted by group) laid out so that every group starts a query tile of ``block`` rows: a tile
    then sees one group's keys only, where a tile spanning two groups would visit the key tiles of both. A
    group's last tile is filled with copies of its last row (same key interval: they add no key tile and are
    dropped); the slots after the last group get empty intervals (their tiles are skipped). Returns the laid-out
    ``rows, lo, hi`` (length a multiple of ``block``, at most ``N + num_groups·block``) and each sorted row's slot.
    """
    N = rows.shape[0]
    counts = jnp.zeros(num_groups, jnp.int32).at[group].add(1)
    start = jnp.cumsum(counts) - counts
    padded = -(-counts // block) * block
    end = jnp.cumsum(padded)
    padded_start = end - padded
    slots = jnp.arange(num_tiles(N + num_groups * (block - 1), block) * block, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(end, slots, side="right"), num_groups - 1)
    valid = slots < end[-1]
    source = jnp.where(valid, start[g] + jnp.minimum(slots - padded_start[g], counts[g] - 1), 0)
    lo = jnp.where(valid, lo[source], empty)
    hi = jnp.where(valid, hi[source], -1)
    return rows[source], lo, hi, padded_start[group] + jnp.arange(N, dtype=jnp.int32) - start[group]


def _check_logits(name: str, x) -> jax.Array:
    if not hasattr(x, "ndim") or x.ndim != 3 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point [B, T, n] array, got {describe(x)}")
    return x


def _check_gates(gates, q: jax.Array) -> None:
    if not hasattr(gates, "shape") or tuple(gates.shape) != q.shape[:3]:
        raise ValueError(f"gates must be [B, T, h] = {list(q.shape[:3])} for q {list(q.shape)}, got {describe(gates)}")


def _check_routing(index, weights, q: jax.Array) -> int:
    B, T, H, _ = q.shape
    if not hasattr(index, "shape") or index.ndim != 3 or index.shape[:2] != (B, T) or \
            not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"index must be an int [B, T, A] array with [B, T] = {[B, T]}, got {describe(index)}")
    if not 1 <= index.shape[2] <= H:
        raise ValueError(f"index must hold 1..h = {H} active heads per token, got {describe(index)}")
    if not hasattr(weights, "shape") or tuple(weights.shape) != tuple(index.shape):
        raise ValueError(f"weights must match index {list(index.shape)}, got {describe(weights)}")
    return index.shape[2]


def _check_causal(mask) -> bool:
    if mask is None:
        return False
    if isinstance(mask, masks.Causal):
        return True
    raise NotImplementedError(f"moh_attention takes mask=None or masks.Causal(), got {type(mask).__name__}; "
                              "use moh_attention_reference for other masks")


def _check_positions(q_positions, B: int, T: int) -> jax.Array:
    p = jnp.asarray(q_positions)
    if p.ndim not in (1, 2) or p.shape[-1] != T or (p.ndim == 2 and p.shape[0] not in (1, B)) or \
            not jnp.issubdtype(p.dtype, jnp.integer):
        raise ValueError(f"q_positions must be int [T] or [B, T] with T={T}, B={B}, got {describe(p)}")
    return jnp.broadcast_to(p, (B, T)).astype(jnp.int32)


__all__ = ["BALANCE_LOSS_WEIGHT", "HeadRouting", "moh_routing", "moh_balance_loss", "moh_attention_reference",
           "moh_attention"]
