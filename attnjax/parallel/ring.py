"""Ring attention: exact softmax attention with the sequence sharded over a mesh axis.

Li et al., "Sequence Parallelism: Long Sequence Training from System Perspective" (Ring
Self-Attention, 2021); Liu et al., "Ring Attention with Blockwise Transformers" (2023); load
balancing by Brandon et al., "Striped Attention" (2023) and the zigzag layout of
ring-flash-attention.

Each of the ``W`` devices of ``axis_name`` holds ``T/W`` queries and the matching keys/values.
For ``W`` steps, each device attends its queries to the K/V block it holds, then passes that
block to the next rank with ``lax.ppermute`` (so at step ``s`` it holds rank ``r - s``'s block).
Step results merge by online softmax: with block outputs ``O_s`` and log-sum-exps ``ℓ_s``,
``L = logsumexp_s ℓ_s`` and ``O = Σ_s exp(ℓ_s - L)·O_s``.

The per-step attention is the library's blocked softmax (``flash_attention_xla(...,
return_lse=True)``), with the mask of the pair evaluated at global positions
(``layouts.AtPositions``): its block summary is computed from the position range of each tile,
so the blocked path skips empty tiles inside a step. A ``lax.switch`` on the summary skips a step
with no allowed pair at all (e.g. the steps whose keys are all in the future under a causal mask in
the contiguous layout) and runs a step where every pair is allowed without a mask (a static tile
schedule, no element masks: the past steps of the contiguous causal layout). With ``layout="zigzag"`` every step of every rank has half a block of
causal work, so the ranks finish together.

Backward (``jax.custom_vjp``): K/V go around the ring again together with dK/dV accumulators;
each step runs FlashAttention-2's blocked backward with the *global* output and log-sum-exp
(``P = exp(s - L)``, ``dS = P ⊙ (dO·Vᵀ - rowsum(dO ⊙ O) + dL)``), so no block output is recomputed
and nothing is differentiated through the loop. After ``W`` hops dK/dV are back on their owners.

K and V may have different head counts (DiffQKV, Lin et al. 2025, "Sigma", Fig. 3): the blocked
steps read K head ``h // (Hq/Hk)`` and V head ``h // (Hq/Hv)`` by index, and each block travels
(and its dK, dV accumulate) with its own head count: a hop moves ``B·T·(Hk·D + Hv·Dv)`` values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import masks
from attnjax.dispatch import check_implementation
from attnjax.masks import block_schedule
from attnjax.meshes import vary_like
from attnjax.parallel.layouts import default_block, local_positions, mask_at_positions
from attnjax.parallel.sharding import AxisNames, check_local_inputs, sequence_parallel_call
from attnjax.blocked.flash_xla import flash_attention_xla, flash_attention_xla_backward


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring-attention call (hashable: a custom_vjp nondiff argument)."""

    axis_name: str
    world: int
    layout: str
    mask: masks.Mask
    scale: float
    logits_soft_cap: Optional[float]
    block_q: int
    block_kv: int


def ring_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str, mask: Optional[masks.Mask] = masks.Causal(),
    layout: str = "contiguous", segment_ids: Optional[jax.Array] = None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None, implementation: str = "auto", block_q: Optional[int] = None,
    block_kv: Optional[int] = None, return_lse: bool = False,
):
    """Ring attention on this device's shards; call inside ``shard_map`` over ``axis_name``.

    Args:
      q: ``[B, T, Hq, D]``, k: ``[B, T, Hk, D]``, v: ``[B, T, Hv, Dv]``: this device's ``T``
        tokens (``Hq % Hk == 0``, ``Hq % Hv == 0``; query head ``h`` reads K head ``h // (Hq/Hk)``
        and V head ``h // (Hq/Hv)``; K/V heads are never repeated).
      axis_name: the mesh axis the sequence is sharded over (``W`` devices, ``N = W·T`` tokens).
      mask: a structural mask over the global ``[N, N]`` matrix (``Causal()``, ``Full()``,
        ``SlidingWindow``, ``ChunkedCausal``, ``&``/``|``), applied at global positions;
        ``None`` = ``Full()``.
      layout: "contiguous", "zigzag" or "striped": which global positions this rank holds
        (``attnjax.parallel.layouts``); the inputs must already be in that order.
      segment_ids: int ``[B, T]`` ids of this device's tokens for packed sequences (tokens attend
        only within their segment); they travel around the ring with K/V.
      scale: logit scale (default ``1/sqrt(D)``); logits_soft_cap: ``cap·tanh(s/cap)``.
      implementation: "auto" or "xla" (the blocked XLA path, on every backend); others raise
        NotImplementedError.
      block_q, block_kv: tiles of the per-step blocked attention (default ``ring_block``).
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]`` over all ``N`` keys.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype (a row with no allowed key is 0), and ``lse`` if asked.
    """
    check_implementation(implementation)
    if implementation not in ("auto", "xla"):
        raise NotImplementedError(f"ring_attention runs the blocked XLA softmax per step; implementation="
                                  f"{implementation!r} is not available (use 'auto' or 'xla')")
    world, mask = check_local_inputs(q, k, v, axis_name=axis_name, layout=layout, mask=mask, segment_ids=segment_ids,
                                     kv_heads=True)
    T = q.shape[1]
    block = ring_block(T, layout)
    st = _Ring(axis_name, world, layout, mask, q.shape[-1] ** -0.5 if scale is None else scale, logits_soft_cap,
               min(block_q or block, T), min(block_kv or block, T))
    out, lse = _ring(q, k, v, segment_ids, st)
    return (out, lse) if return_lse else out


CPU_TILES_PER_STEP = 8
"""On CPU the ring's per-step tiles default to ``T/8`` of the local length (at least 128, at most the
layout's default): measured on 8 CPU devices (``experiments/bench_ring.py``), fwd+bwd at local lengths
1024 and 2048 ran fastest with tiles of 128 and 256, against 512 (1.5× and 1.4× slower)."""


def ring_block(local_len: int, layout: str) -> int:
    """The default tile of a ring step: ``default_block``, and on the CPU backend ``local_len / 8`` within
    ``[128, default_block]`` (``CPU_TILES_PER_STEP``)."""
    block = default_block(local_len, layout)
    if jax.default_backend() != "cpu":
        return block
    return min(block, max(128, local_len // CPU_TILES_PER_STEP))


def ring_attention_sharded(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh, seq_axis: str,
                           batch_axis: AxisNames = None, head_axis: AxisNames = None, layout: str = "contiguous",
                           segment_ids: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
                           **kwargs) -> jax.Array:
    """``ring_attention`` on global arrays: ``shard_map`` over ``mesh`` with the sequence over
    ``seq_axis`` and, optionally, the batch over ``batch_axis`` and heads over ``head_axis``.

    Inputs are global ``[B, N, H, D]`` arrays **in ``layout`` order** (``to_layout``); the output
    is in the same order. ``positions`` (the global positions of the tokens, as laid out) are
    checked against ``layout`` when given. Other keyword arguments go to ``ring_attention``.

    Example (zigzag on a 2 x 4 data x sequence mesh)::

      zq, zk, zv = (to_layout(x, "zigzag", 4) for x in (q, k, v))
      out = from_layout(ring_attention_sharded(zq, zk, zv, mesh=mesh, seq_axis="sp", batch_axis="data",
                                               layout="zigzag", mask=Causal()), "zigzag", 4)
    """
    return sequence_parallel_call(ring_attention, q, k, v, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis,
                                  head_axis=head_axis, layout=layout, segment_ids=segment_ids, positions=positions,
                                  kv_heads=True, **kwargs)


def _step_mask(st: _Ring, q_pos, src, q_ids, kv_ids) -> masks.Mask:
    """The mask between this rank's queries and rank ``src``'s keys, by global position."""
    return mask_at_positions(st.mask, q_pos, local_positions(st.layout, st.world, src, q_pos.shape[0]), q_ids, kv_ids)


SKIP, UNMASKED, MASKED = 0, 1, 2
"""Kinds of ring step: no allowed pair (skipped), every pair allowed (the blocked path without a mask:
a static schedule, no element masks), some pairs (the blocked path with the step's mask)."""


def _step_kind(mask: masks.Mask, T: int, st: _Ring) -> jax.Array:
    """``SKIP``, ``UNMASKED`` or ``MASKED`` from the step's block summary (a traced int32 for ``lax.switch``)."""
    codes, _, _ = block_schedule(mask, T, T, st.block_q, st.block_kv)
    return jnp.where(jnp.all(codes == masks.EMPTY), SKIP,
                     jnp.where(jnp.all(codes == masks.FULL), UNMASKED, MASKED)).astype(jnp.int32)


def _rotate(axis_name: str, world: int, *xs):
    """Send each array to the next rank along the ring (rank ``r`` -> ``r + 1 mod W``)."""
    perm = [(i, (i + 1) % world) for i in range(world)]
    return tuple(None if x is None else lax.ppermute(x, axis_name, perm) for x in xs)


def _merge(o, lse, o_s, lse_s):
    """Online-softmax merge of two partial results (float32; ``-inf`` lse = nothing seen)."""
    new = jnp.logaddexp(lse, lse_s)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    w, w_s = jnp.exp(lse - safe), jnp.exp(lse_s - safe)
    return w[..., None] * o + w_s[..., None] * o_s.astype(jnp.float32), new


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, segment_ids, st: _Ring):
    return _ring_forward(q, k, v, segment_ids, st)


def _ring_forward(q, k, v, segment_ids, st: _Ring):
    B, T, Hq, _ = q.shape
    rank = lax.axis_index(st.axis_name)
    q_pos = local_positions(st.layout, st.world, rank, T)

    def step(s, carry):
        o, lse, kb, vb, ids = carry
        mask = _step_mask(st, q_pos, (rank - s) % st.world, segment_ids, ids)

        def attend(acc, step_mask):
            o_s, lse_s = flash_attention_xla(q, kb, vb, mask=step_mask, scale=st.scale,
                                             logits_soft_cap=st.logits_soft_cap, return_lse=True, block_q=st.block_q,
                                             block_kv=st.block_kv)
            return _merge(*acc, o_s, lse_s)

        branches = (lambda acc: acc, lambda acc: attend(acc, None), lambda acc: attend(acc, mask))
        return lax.switch(_step_kind(mask, T, st), branches, (o, lse))

    def step_and_rotate(s, carry):
        o, lse = step(s, carry)
        return (o, lse, *_rotate(st.axis_name, st.world, *carry[2:]))

    o0 = vary_like(jnp.zeros((B, T, Hq, v.shape[-1]), jnp.float32), q, k, v, segment_ids, rank)
    lse0 = vary_like(jnp.full((B, T, Hq), -jnp.inf, jnp.float32), q, k, v, segment_ids, rank)
    carry = lax.fori_loop(0, st.world - 1, step_and_rotate, (o0, lse0, k, v, segment_ids))
    o, lse = step(st.world - 1, carry)
    return o.astype(q.dtype), lse


def _ring_fwd(q, k, v, segment_ids, st: _Ring):
    out, lse = _ring_forward(q, k, v, segment_ids, st)
    return (out, lse), (q, k, v, segment_ids, out, lse)


def _ring_bwd(st: _Ring, residuals, cotangents):
    q, k, v, segment_ids, out, lse = residuals
    d_out, d_lse = cotangents
    T = q.shape[1]
    rank = lax.axis_index(st.axis_name)
    q_pos = local_positions(st.layout, st.world, rank, T)

    def step(s, carry):
        dq, dk, dv, kb, vb, ids = carry
        mask = _step_mask(st, q_pos, (rank - s) % st.world, segment_ids, ids)

        def backward(acc, step_mask):  # the blocked backward with the global out and lse: P = exp(s - L)
            grads = flash_attention_xla_backward(q, kb, vb, out, lse, d_out, d_lse, mask=step_mask, scale=st.scale,
                                                 logits_soft_cap=st.logits_soft_cap, block_q=st.block_q,
                                                 block_kv=st.block_kv)
            return tuple(a + g.astype(jnp.float32) for a, g in zip(acc, grads))

        branches = (lambda acc: acc, lambda acc: backward(acc, None), lambda acc: backward(acc, mask))
        return lax.switch(_step_kind(mask, T, st), branches, (dq, dk, dv))

    def step_and_rotate(s, carry):
        dq, dk, dv = step(s, carry)
        return (dq, *_rotate(st.axis_name, st.world, dk, dv, *carry[3:]))

    zeros = [vary_like(jnp.zeros(x.shape, jnp.float32), residuals, cotangents, rank) for x in (q, k, v)]
    carry = lax.fori_loop(0, st.world - 1, step_and_rotate, (*zeros, k, v, segment_ids))
    dq, dk, dv = step(st.world - 1, carry)
    dk, dv = _rotate(st.axis_name, st.world, dk, dv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


__all__ = ["ring_attention", "ring_attention_sharded"]
