"""EchoAtt: a later layer reuses an earlier layer's attention probabilities with its own values
(Rajabzadeh, Jafari, Sharma, Jami, Kwon, Ghodsi, Chen, Rezagholizadeh, "EchoAtt: Attend, Copy, then Adjust
for More Efficient Large Language Models", 2024).

EchoAtt measures how alike the attention matrices of a model's layers are (the paper's analysis: the cosine
similarity of the maps on the same tokens), groups consecutive inner layers with similar maps into shared
attention blocks, and lets every layer of a block after the first reuse the first layer's attention matrix:
layer ``l`` of a block anchored at layer ``e`` computes

    ``out_l = softmax(q_e k_eᵀ·scale) · V_l``,

with its own values ``V_l`` (and output projection) and no query/key projections of its own.

Paths:

- ``echo_attention_reference(probabilities, v)``: the stored ``[B, H, T, S]`` map of the anchor layer
  (``attention_probabilities``) times ``V_l``: what "copy the attention matrix" reads literally.
- ``echo_attention(q_e, k_e, v_l)``: the map recomputed tile by tile from the anchor's ``q_e``, ``k_e``,
  never stored. Without ``lse`` this is exactly ``attnjax.attention(q_e, k_e, v_l)`` (the blocked online
  softmax). With the anchor's log-sum-exp ``lse`` (``attnjax.attention(..., return_lse=True)`` of the
  anchor layer) the row normalizer is already known, so each tile's weights are ``exp(s − lse)`` directly:
  no running max, no rescaling of the accumulator and no final division.

``layer_similarity`` computes EchoAtt's layer-by-layer similarity blockwise (one query tile of every layer's
map at a time), and ``echo_groups`` turns it into shared blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.api import attention
from attnjax.blocked import flash_attention_xla_backward
from attnjax.blocked.scores import allowed, dense_operands, raw_logits, score_spec, to_groups
from attnjax.blocked.tiles import kv_tiles, q_tiles, row_tiles, untile
from attnjax.checks import check_options, check_positive, check_qk, check_qkv, describe
from attnjax.dispatch import check_implementation
from attnjax.masks import Mask, block_schedule
from attnjax.tiling import num_tiles, pad_axis

METRICS = ("cosine", "js")
"""``layer_similarity`` metrics: "cosine" (EchoAtt's), "js" (``1 − JS/ln 2`` of each query's two rows)."""


def attention_probabilities(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                            scale: Optional[float] = None) -> jax.Array:
    """The stored softmax map ``softmax(q kᵀ·scale)`` of one layer, float32 ``[B, Hq, T, S]``.

    ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]`` (query head ``h`` reads key head ``h // (Hq // Hkv)``); ``mask``
    and ``scale`` as ``attnjax.attention``. A row with no allowed key is all zeros. Memory ``O(B·Hq·T·S)``.
    """
    check_qk(q, k)
    check_options(q, k, mask=mask, bias=None, scale=scale, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
                  rng=None)
    B, T, Hq, _ = q.shape
    spec = score_spec(q, k, scale)
    qg, kt, _, q_idx, kv_idx = dense_operands(q, k, k)
    s = jnp.where(allowed(mask, q_idx, kv_idx, spec), raw_logits(qg, kt, q_idx, kv_idx, None, spec), -jnp.inf)
    p = jnp.exp(s - _safe(jax.nn.logsumexp(s, axis=-1, keepdims=True)))
    return p.reshape(B, Hq, T, k.shape[1])


def echo_attention_reference(probabilities: jax.Array, v: jax.Array) -> jax.Array:
    """``out_l = A_e · V_l`` from the anchor layer's stored map (EchoAtt's shared attention: copy the matrix).

    Args:
      probabilities: ``[B, Hq, T, S]``, the anchor's map (``attention_probabilities``).
      v: ``[B, S, Hkv, Dv]``, this layer's values, ``Hq % Hkv == 0`` (head ``h`` reads value head
        ``h // (Hq // Hkv)``).
    Returns:
      ``[B, T, Hq, Dv]`` in v's dtype.
    """
    if not hasattr(probabilities, "ndim") or probabilities.ndim != 4:
        raise ValueError(f"probabilities must be [B, Hq, T, S], got {describe(probabilities)}")
    if not hasattr(v, "ndim") or v.ndim != 4:
        raise ValueError(f"v must be [B, S, Hkv, Dv], got {describe(v)}")
    B, Hq, T, S = probabilities.shape
    if v.shape[0] != B or v.shape[1] != S or Hq % v.shape[2]:
        raise ValueError(f"v {describe(v)} must be [B, S, Hkv, Dv] with B={B}, S={S} and Hkv dividing Hq={Hq} of "
                         f"probabilities {describe(probabilities)}")
    p = probabilities.astype(jnp.float32).reshape(B, v.shape[2], Hq // v.shape[2], T, S)
    out = jnp.einsum("bhgts,bshd->btghd", p, v.astype(jnp.float32))
    return out.transpose(0, 1, 3, 2, 4).reshape(B, T, Hq, v.shape[-1]).astype(v.dtype)


def echo_attention(q_e: jax.Array, k_e: jax.Array, v: jax.Array, *, lse: Optional[jax.Array] = None,
                   mask: Optional[Mask] = None, scale: Optional[float] = None, implementation: str = "auto",
                   block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """``out_l = softmax(q_e k_eᵀ·scale) · V_l``, the anchor's map recomputed tile by tile (EchoAtt).

    Args:
      q_e, k_e: the anchor layer's ``[B, T, Hq, D]`` queries and ``[B, S, Hkv, D]`` keys.
      v: this layer's ``[B, S, Hkv, Dv]`` values.
      lse: the anchor's float32 log-sum-exp ``[B, T, Hq]`` (``attnjax.attention(q_e, k_e, v_e,
        return_lse=True)``), or None. With it each tile's weights are ``exp(s − lse)``: one pass with no running
        max, rescaling or final division, and a custom VJP (FlashAttention-2's backward with the row term
        cancelled; ``d lse = −dO·out``). Gradients flow to ``q_e``, ``k_e``, ``v`` and ``lse``.
      mask, scale: as ``attnjax.attention`` (the anchor's).
      implementation: without ``lse``, passed to ``attnjax.attention``; with it, "auto" or "xla" (the blocked
        pass; NotImplementedError otherwise).
      block_q, block_kv: tiles of the ``lse`` pass (skipping the tiles the mask empties).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype. Memory ``O(T·tile)``; never a ``[T, S]`` map.
    """
    if lse is None:
        return attention(q_e, k_e, v, mask=mask, scale=scale, implementation=implementation)
    check_implementation(implementation)
    if implementation not in ("auto", "xla"):
        raise NotImplementedError(f"echo_attention with lse is the blocked 'xla' pass, not {implementation!r}")
    check_qkv(q_e, k_e, v)
    check_options(q_e, k_e, mask=mask, bias=None, scale=scale, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
                  rng=None)
    check_positive(block_q=block_q, block_kv=block_kv)
    if not hasattr(lse, "shape") or tuple(lse.shape) != q_e.shape[:3]:
        raise ValueError(f"lse must be [B, T, Hq] = {list(q_e.shape[:3])}, got {describe(lse)}")
    static = _Static(scale=q_e.shape[-1] ** -0.5 if scale is None else float(scale),
                     block_q=min(block_q, q_e.shape[1]), block_kv=min(block_kv, k_e.shape[1]))
    return _echo(q_e, k_e, v, lse.astype(jnp.float32), mask, static)


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    block_q: int
    block_kv: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _echo(q, k, v, lse, mask, st):
    return _echo_forward(q, k, v, lse, mask, st)


def _echo_forward(q, k, v, lse, mask, st: _Static):
    B, T, Hq, _ = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, bq, bk = Hq // Hkv, st.block_q, st.block_kv
    spec = score_spec(q, k, st.scale)
    codes, lo, hi = block_schedule(mask, T, S, bq, bk)
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)

    def q_tile(args):
        i, qi, lse_i = args
        q_idx = i * bq + jnp.arange(bq)
        finite = jnp.isfinite(lse_i)[..., None]
        offset = jnp.where(finite, lse_i[..., None], 0.0)

        def visit(j, acc, apply_mask):
            kv_idx = j * bk + jnp.arange(bk)
            kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            p = jnp.exp(raw_logits(qi, kj, q_idx, kv_idx, None, spec) - offset)
            keep = finite & (allowed(mask, q_idx, kv_idx, spec) if apply_mask else True)
            p = jnp.where(keep, p, 0.0)
            return acc + jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)

        def body(j, acc):
            return lax.switch(codes[i, j], [lambda a: a, lambda a: visit(j, a, True), lambda a: visit(j, a, False)],
                              acc)

        acc0 = jnp.zeros((B, Hkv, G, bq, Dv), jnp.float32)
        return lax.fori_loop(lo[i], hi[i], body, acc0).astype(q.dtype)

    nq = num_tiles(T, bq)
    out = lax.map(q_tile, (jnp.arange(nq), q_tiles(q, bq, Hkv), row_tiles(lse, bq, Hkv)))
    return untile(out, T)


def _echo_fwd(q, k, v, lse, mask, st):
    out = _echo_forward(q, k, v, lse, mask, st)
    return out, (q, k, v, lse, mask, out)


def _echo_bwd(st: _Static, residuals, d_out):
    q, k, v, lse, mask, out = residuals
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    # FlashAttention-2's backward forms dS = P ⊙ (dO·Vᵀ − δ + d_lse); with d_lse = δ that is P ⊙ dO·Vᵀ, the
    # derivative of exp(s − lse)·V at fixed lse. The lse itself gets −Σ_j P_ij dO_i·v_j = −δ_i.
    dq, dk, dv = flash_attention_xla_backward(q, k, v, out, lse, d_out, delta, mask=mask, scale=st.scale,
                                              block_q=st.block_q, block_kv=st.block_kv)
    return dq, dk, dv, jnp.where(jnp.isfinite(lse), -delta, 0.0), None


_echo.defvjp(_echo_fwd, _echo_bwd)


def layer_similarity(qs: Sequence[jax.Array], ks: Sequence[jax.Array], *, mask: Optional[Mask] = None,
                     scale: Optional[float] = None, metric: str = "cosine", per_row: bool = False,
                     block_q: int = 128) -> jax.Array:
    """EchoAtt's layer-by-layer similarity of attention maps on the same tokens, one query tile at a time.

    For layers ``l, m`` and head ``h`` (EchoAtt's analysis compares attention matrices by cosine similarity):

    - "cosine": ``Σ_ij A^l_ij A^m_ij / (‖A^l‖_F ‖A^m‖_F)``, the flattened maps, as
      ``attnjax.analysis.attention_similarity``; ``per_row=True``: the mean over queries of the rows' cosines.
    - "js": ``1 − JS(A^l_i, A^m_i)/ln 2`` averaged over queries (Jensen–Shannon divergence of the rows, a
      similarity in ``[0, 1]`` like the cosine).

    Every layer's map of one tile of ``block_q`` queries is formed at a time, ``O(L·B·Hq·block_q·S)`` memory,
    and the pair sums are accumulated; no ``[T, S]`` map is stored.

    Args:
      qs, ks: per layer ``q [B, T, Hq, D_l]`` and ``k [B, S, Hkv_l, D_l]`` (same ``B, T, Hq, S`` in every layer).
      mask, scale: as ``attnjax.attention``, for every layer (``scale`` defaults to each layer's ``1/√D_l``).
      metric: one of ``METRICS``; per_row: for "cosine" (rows where either map is empty are skipped).
      block_q: queries per step.
    Returns:
      float32 ``[L, L, B, Hq]`` (symmetric, 1 on the diagonal for non-empty maps).
    """
    qs, ks = list(qs), list(ks)
    if not qs or len(qs) != len(ks):
        raise ValueError(f"qs and ks must list the same (>= 1) number of layers, got {len(qs)} and {len(ks)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_positive(block_q=block_q)
    for l, (q, k) in enumerate(zip(qs, ks)):
        check_qk(q, k, where=f"layer {l}: ")
        if q.shape[:3] != qs[0].shape[:3] or k.shape[:2] != ks[0].shape[:2]:
            raise ValueError(f"layer {l}: q {describe(q)}, k {describe(k)} must share [B, T, Hq] and [B, S] with "
                             f"layer 0 (q {describe(qs[0])}, k {describe(ks[0])})")
        check_options(q, k, mask=mask, bias=None, scale=scale, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
                      rng=None)
    L, (B, T, Hq, _) = len(qs), qs[0].shape
    S = ks[0].shape[1]
    bq = min(block_q, T)
    nq = num_tiles(T, bq)
    padded = [pad_axis(q, 1, bq) for q in qs]
    kts = [k.transpose(0, 2, 1, 3) for k in ks]
    specs = [score_spec(q, k, scale) for q, k in zip(qs, ks)]
    kv_idx = jnp.arange(S)

    def tile_log_p(i):
        q_idx = i * bq + jnp.arange(bq)
        out = []
        for q, kt, spec in zip(padded, kts, specs):
            qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1).transpose(0, 2, 1, 3)
            qi = to_groups(qi, kt.shape[1])
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kt, preferred_element_type=jnp.float32) * spec.scale
            keep = allowed(mask, q_idx, kv_idx, spec) & (q_idx < T)[:, None]
            s = jnp.where(keep, s, -jnp.inf).reshape(B, Hq, bq, S)
            out.append(s - _safe(jax.nn.logsumexp(s, axis=-1, keepdims=True)))
        return jnp.stack(out)  # [L, B, Hq, bq, S], -inf where masked

    def step(carry, i):
        log_p = tile_log_p(i)
        p = jnp.exp(log_p)
        if metric == "cosine":
            dots = jnp.einsum("lbhqs,mbhqs->lmbhq", p, p)
            if not per_row:
                return (carry[0] + jnp.sum(dots, -1),), None
            sq = jnp.diagonal(dots).transpose(3, 0, 1, 2)  # [L, B, Hq, bq]
            valid = (sq[:, None] > 0) & (sq[None] > 0)
            cos = jnp.where(valid, dots / jnp.sqrt(jnp.where(valid, sq[:, None] * sq[None], 1.0)), 0.0)
        else:
            valid = (jnp.sum(p, -1)[:, None] > 0) & (jnp.sum(p, -1)[None] > 0)
            cos = jnp.where(valid, 1.0 - _js_rows(p, log_p) / math.log(2.0), 0.0)
        return (carry[0] + jnp.sum(cos, -1), carry[1] + jnp.sum(valid, -1)), None

    zeros = jnp.zeros((L, L, B, Hq), jnp.float32)
    carry0 = (zeros,) if metric == "cosine" and not per_row else (zeros, zeros)
    sums, _ = lax.scan(step, carry0, jnp.arange(nq))
    if metric == "cosine" and not per_row:
        sq = jnp.diagonal(sums[0]).transpose(2, 0, 1)  # [L, B, Hq]
        norm = jnp.sqrt(sq[:, None] * sq[None])
        return jnp.where(norm > 0, sums[0] / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jnp.where(sums[1] > 0, sums[0] / jnp.maximum(sums[1], 1.0), 0.0)


def _js_rows(p: jax.Array, log_p: jax.Array) -> jax.Array:
    """Jensen–Shannon divergence (nats) between every pair of layers' rows, ``[L, B, H, q, S]`` ->
    ``[L, L, B, H, q]``."""
    m = 0.5 * (p[:, None] + p[None])
    log_m = jnp.log(jnp.where(m > 0, m, 1.0))

    def kl(pa, log_pa):
        return jnp.sum(jnp.where(pa > 0, pa * (log_pa - log_m), 0.0), -1)

    return 0.5 * kl(p[:, None], log_p[:, None]) + 0.5 * kl(p[None], log_p[None])


def echo_groups(similarity: jax.Array, threshold: float, *, max_size: Optional[int] = None
                ) -> tuple[tuple[int, ...], ...]:
    """Consecutive layers grouped into EchoAtt's shared attention blocks from a layer similarity matrix.

    Greedy from the first layer: a block starts at an anchor layer ``a`` and takes each following layer ``j``
    while ``similarity[a, j] >= threshold`` and the block has fewer than ``max_size`` layers; the first layer
    of every block computes attention and the others reuse it. EchoAtt groups similar inner layers into blocks
    of a chosen size; the threshold rule is our reading of "layers with high similarity".

    Args:
      similarity: ``[L, L]`` or ``[L, L, ...]`` (e.g. ``layer_similarity``'s ``[L, L, B, Hq]``; the trailing
        axes are averaged), higher = more alike.
      threshold: the least similarity to the anchor for a layer to join its block.
      max_size: the most layers per block (None: no limit).
    Returns:
      The blocks as tuples of layer indices, in order; singletons keep their own attention.
    """
    sim = jnp.asarray(similarity, jnp.float32)
    if sim.ndim < 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be [L, L, ...], got {describe(similarity)}")
    if max_size is not None:
        check_positive(max_size=max_size)
    sim = jax.device_get(sim.reshape(sim.shape[0], sim.shape[1], -1).mean(-1))
    groups, current = [], [0]
    for j in range(1, sim.shape[0]):
        if sim[current[0], j] >= threshold and (max_size is None or len(current) < max_size):
            current.append(j)
        else:
            groups.append(tuple(current))
            current = [j]
    groups.append(tuple(current))
    return tuple(groups)


def _safe(lse: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


__all__ = ["METRICS", "attention_probabilities", "echo_attention_reference", "echo_attention", "layer_similarity",
           "echo_groups"]
