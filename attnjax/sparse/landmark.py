"""Landmark attention (catalog B9): one landmark token per block, attention to a block gated by its landmark.

Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (NeurIPS 2023, arXiv:2305.16300); public code ``epfml/landmark-attention``
(``lm_benchmark/models/landmark.py``: the landmark mask and ``LandmarkGroupedSoftmaxFunction``;
``llama/ltriton/flash_landmark_attention.py``: the fused Triton kernel).

The sequence holds one landmark token every ``block_size`` positions: position ``j`` is a landmark
when ``j % block_size == block_size − 1`` (the last token of each block; ``insert_landmarks`` builds
such a sequence from plain tokens, as the paper's training data does). Write ``p(j) = j // block_size``
for the block of position ``j``, ``L_b`` for the landmark of block ``b`` and ``s_ij = scale·q_i·k_j``.

**Grouped softmax** (Sec. 3.1, Eq. 1): ``σ_G(s)_j = exp(s_j) / Σ_{j': G_j' = G_j} exp(s_j')``, a
softmax within each group. For query ``i`` (causal, ``j ≤ i``) the groups are (Eq. 2):

- the *landmark group*: the regular tokens of the query's own block ``p(i)`` and the landmarks of
  every earlier block, ``L_b`` for ``b < p(i)``;
- one group per earlier block ``b < p(i)``: its regular tokens.

The landmark of the query's own block is left out (even when the query is that landmark; official
code: ``mask = attn_mask | (is_mem & last_section_mask)``). With ``S`` the grouped softmax, the
attention weight is (Eq. 3)::

    w_ij = S_ij                      p(j) = p(i), j regular     (own block, attended directly)
    w_ij = S_ij · S_{i, L_p(j)}      p(j) < p(i), j regular     (block softmax × landmark gate)
    w_ij = 0                         j a landmark, or j > i

so ``Σ_j w_ij = 1`` and ``out_i = Σ_j w_ij v_j``. This is what the official
``landmark_grouped_softmax`` computes (groups ``resp_mem_idx``, gates ``group_prob``); the corner
cases (own landmark excluded, a landmark query sees its own block directly) follow that code, which
the paper's text leaves implicit.

Equivalently, an earlier block ``b`` acts as one key with logit ``s_{i,L_b}`` and value
``o_ib = softmax_{j ∈ b}(s_ij) v_j``, competing with the own block's tokens in one softmax; or, token
by token, ``w_ij = softmax_j(a_ij)`` over the *adjusted logits*::

    a_ij = s_ij − ℓ_ib + s_{i,L_b}   (j regular in an earlier block b; ℓ_ib = logsumexp_{j' ∈ b} s_ij')
    a_ij = s_ij                      (j regular in the own block, j ≤ i)

The blocked path (``landmark_attention_xla``) runs FlashAttention-2 over ``a``: key tiles hold whole
landmark blocks, so ``ℓ_ib`` and the gate are local to a tile (the Triton kernel's ``normal_denom``
and ``landmark_qk`` per block of keys).

Equation numbers follow the task's citation of Sec. 3.1 (Eq. 1–3); the paper text itself was not readable
here, so every detail above is pinned to the official code (``tests/sparse/test_landmark.py`` compares the
reference with a NumPy transcription of ``landmark_grouped_softmax``).

Also here: ``Landmark``, a registered block selector ("landmark") that ranks key blocks by their last key
as a landmark (the retrieval rule of Sec. 3.2, per query block, plain softmax on the block-sparse engine;
see its docstring for how it departs from the paper). The per-token retrieval with the grouped softmax
at inference is ``attnjax.inference.landmark_retrieval``.

Alignment: queries are the last ``T`` of ``S`` positions (``T ≤ S``, the library's bottom-right rule),
so a chunk of queries against a longer key sequence works; landmark positions are counted on keys.
Positional encodings are the caller's (apply RoPE to q and k before the call).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.blocked.lists import BlockSparse, allowed_blocks
from attnjax.blocked.tiles import add_slice, kv_tiles, q_tiles, row_tiles, untile
from attnjax.checks import check_positive, check_qkv
from attnjax.dispatch import dispatch
from attnjax.masks import Mask, query_positions
from attnjax.sparse.engine import BlockSelector, fits_top_k
from attnjax.sparse.moba import own_blocks
from attnjax.sparse.seer import select_topk
from attnjax.tiling import num_tiles

PAPER = "Mohtashami & Jaggi 2023, Landmark Attention: Random-Access Infinite Context Length for Transformers"


# ----------------------------------------------------------------------------- landmark tokens

def is_landmark(length: int, block_size: int) -> np.ndarray:
    """Bool ``[length]``: position ``j`` holds a landmark, ``j % block_size == block_size − 1``."""
    check_positive(block_size=block_size)
    return np.arange(length) % block_size == block_size - 1


def insert_landmarks(tokens: jax.Array, *, every: int, landmark_id: int):
    """Insert a landmark token after every ``every`` tokens (the paper's training data, Sec. 3.1).

    A trailing group shorter than ``every`` gets no landmark (the official ``MemLMCache`` likewise only
    closes full blocks). The landmark blocks then have ``block_size = every + 1``.

    Args:
      tokens: int ``[B, N]``.
      every: regular tokens per block (the official ``mem_freq``).
      landmark_id: the landmark's token id.
    Returns:
      ``(tokens_with_landmarks [B, N + N // every], source [N + N // every])``: ``source[t]`` is the index
      in ``tokens`` of the token at position ``t``, or ``-1`` at a landmark (use it to build targets,
      e.g. ignore the loss at landmarks as the official code does). Positions are ``arange`` of the
      new length (the official ``lm_benchmark`` applies RoPE to the augmented sequence).
    """
    check_positive(every=every)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an int array [B, N], got {tokens.dtype} {tuple(tokens.shape)}")
    N = tokens.shape[1]
    n_full = N // every
    length = N + n_full
    landmark = is_landmark(length, every + 1) & (np.arange(length) < n_full * (every + 1))
    source = np.where(landmark, -1, np.arange(length) - np.arange(length) // (every + 1))
    out = jnp.where(landmark, jnp.asarray(landmark_id, tokens.dtype), tokens[:, np.maximum(source, 0)])
    return out, source


def _check(q, k, v, block_size):
    check_qkv(q, k, v)
    check_positive(block_size=block_size)
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one regular token and the landmark), got {block_size}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"landmark attention needs T <= S (queries are the last T key positions), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")


# ----------------------------------------------------------------------------- reference

def landmark_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, scale: Optional[float] = None,
    mask: Optional[Mask] = None,
) -> jax.Array:
    """Landmark attention, naive: the grouped softmax of Sec. 3.1, Eq. 1–3 on the full ``[T, S]`` scores.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``, ``T ≤ S``
        (queries at positions ``S − T + i``). Landmarks at key positions ``j % block_size == block_size − 1``.
      block_size: tokens per block, landmark included (``≥ 2``; the official ``mem_freq + 1``).
      scale: logit scale, default ``1/sqrt(D)``.
      mask: optional extra ``attnjax.masks`` value ANDed with the causal rule; a masked key leaves every
        group (a masked landmark removes its block's gate, so the block gets weight 0). A group left
        empty gets weight 0 (the official ``denom < 0.5`` rule). Used for retrieval at inference.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype: ``out_i = Σ_j w_ij v_j`` with ``w`` from Eq. 3 (module docstring).
    Memory O(T·S).
    """
    _check(q, k, v, block_size)
    if mask is not None:
        mask.check(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    G = Hq // Hkv
    qg = q.reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = s.reshape(B, Hq, T, S)

    i = query_positions(jnp.arange(T), T, S)[:, None]
    j = jnp.arange(S)[None, :]
    visible = j <= i
    if mask is not None:
        visible = visible & mask.dense(T, S)
    landmark = jnp.asarray(is_landmark(S, block_size))[None, :]
    own = (j // block_size == i // block_size) & ~landmark & visible        # own block, regular
    gate_keys = (j // block_size < i // block_size) & landmark & visible    # earlier blocks' landmarks
    earlier = (j // block_size < i // block_size) & ~landmark & visible     # earlier blocks' regular tokens

    # Eq. 1-2: the landmark group (own block + earlier landmarks), and one group per earlier block.
    s_group = _softmax(jnp.where(own | gate_keys, s, -jnp.inf), axis=-1)
    nb = num_tiles(S, block_size)
    pad = nb * block_size - S
    blocks = jnp.pad(jnp.where(earlier, s, -jnp.inf), ((0, 0),) * 3 + ((0, pad),), constant_values=-jnp.inf)
    s_block = _softmax(blocks.reshape(B, Hq, T, nb, block_size), axis=-1)
    # Eq. 3: an earlier block's tokens are gated by its landmark's weight in the landmark group.
    gate = jnp.pad(s_group, ((0, 0),) * 3 + ((0, pad),)).reshape(B, Hq, T, nb, block_size)[..., -1:]
    gated = (s_block * gate).reshape(B, Hq, T, nb * block_size)[..., :S]
    w = jnp.where(own, s_group, jnp.where(earlier, gated, 0.0))
    out = jnp.einsum("bkgts,bskd->btkgd", w.reshape(B, Hkv, G, T, S).astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, Hq, v.shape[-1]).astype(q.dtype)


def _softmax(x, axis):
    """Softmax that gives 0 (not NaN) on a slice of all ``-inf``."""
    m = jnp.max(x, axis=axis, keepdims=True)
    e = jnp.exp(x - jnp.where(jnp.isfinite(m), m, 0.0))
    z = jnp.sum(e, axis=axis, keepdims=True)
    return jnp.where(z > 0, e / jnp.where(z > 0, z, 1.0), 0.0)


# ----------------------------------------------------------------------------- blocked XLA path

def landmark_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, scale: Optional[float] = None,
    mask: Optional[Mask] = None, block_q: int = 256, block_kv: Optional[int] = None,
) -> jax.Array:
    """Landmark attention, blocked: FlashAttention-2 over the adjusted logits, with a custom VJP.

    Same arguments and result as ``landmark_attention_reference`` (``mask`` must be None: this path
    raises ``NotImplementedError`` for an extra mask). Key tiles hold ``block_kv / block_size`` whole
    landmark blocks (``block_kv`` a multiple of ``block_size``; default the largest multiple
    ``≤ 512``, at least one block), query tiles ``block_q`` rows; neither length need be a multiple.

    Per (query tile, key tile): the logits ``s`` [bq, bk], each block's local log-sum-exp ``ℓ_ib`` over
    its regular tokens and its landmark logit ``s_{i,L_b}``, the adjusted logits ``a`` (module
    docstring), then an online-softmax step over ``a``. Cost: the flops of causal softmax attention
    plus an ``O(bq·bk)`` reduction per tile; memory ``O(T·D + bq·bk)``, never ``O(T·S)``.

    Backward (recompute, FA2): ``P = exp(a − lse)``, ``dA = P ⊙ (dO·Vᵀ − δ)`` with ``δ_i = dO_i·O_i``;
    for an earlier block ``b`` with ``D_ib = Σ_{j ∈ b} dA_ij`` and ``π_ij = exp(s_ij − ℓ_ib)``:
    ``ds_ij = dA_ij − π_ij·D_ib`` for its regular tokens and ``ds_{i,L_b} = D_ib`` for its landmark
    (the gate); own-block tokens get ``ds = dA``. Gradients flow to q, k and v.
    """
    _check(q, k, v, block_size)
    if mask is not None:
        raise NotImplementedError("landmark_attention_xla takes no extra mask (the causal landmark rule is built "
                                  "in); use implementation='reference' for a masked call")
    check_positive(block_q=block_q)
    if block_kv is None:
        block_kv = block_size * max(1, 512 // block_size)
    check_positive(block_kv=block_kv)
    if block_kv % block_size:
        raise ValueError(f"block_kv ({block_kv}) must be a multiple of block_size ({block_size}): a key tile holds "
                         "whole landmark blocks")
    T, S, D = q.shape[1], k.shape[1], q.shape[-1]
    bk = min(block_kv, block_size * num_tiles(S, block_size))
    st = _Static(block_size=block_size, scale=D ** -0.5 if scale is None else float(scale),
                 block_q=min(block_q, T), block_kv=bk, T=T, S=S)
    return _landmark(q, k, v, st)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static config of the blocked path (hashable, a ``custom_vjp`` non-differentiable argument)."""

    block_size: int
    scale: float
    block_q: int
    block_kv: int
    T: int
    S: int


def grouped_logits(s: jax.Array, q_pos: jax.Array, kv_pos: jax.Array, kv_valid: jax.Array, block_size: int):
    """The adjusted logits of the grouped softmax on keys laid out in whole landmark blocks.

    Args:
      s: float32 logits ``[..., N]`` with ``N % block_size == 0``; the keys of each run of ``block_size``
        along the last axis form one landmark block (key positions ``kv_pos`` block-aligned), so a block's
        landmark logit is the run's last entry.
      q_pos: int query positions broadcastable to ``s`` without its last axis (e.g. ``[bq, 1]``).
      kv_pos: int key positions broadcastable to ``s`` (e.g. ``[bk]``, or ``[..., N]`` for gathered keys).
      kv_valid: bool, broadcastable like ``kv_pos``: False for padding (and keys removed by retrieval).
      block_size: tokens per landmark block.
    Returns:
      ``(a, pi, earlier, gate)``: ``a`` the adjusted logits (``s − ℓ_b + s_{L_b}`` on an earlier block's
      regular tokens, ``s`` on the own block's regular tokens at or before the query, ``-inf`` elsewhere;
      module docstring), ``pi = exp(s − ℓ_b)`` (0 off earlier regular tokens), and the bool masks of
      earlier blocks' regular tokens and of their landmarks (the gates). ``softmax(a)`` over the keys is
      Eq. 3's weight.
    """
    bs = block_size
    q_blk = q_pos // bs
    k_blk = kv_pos // bs
    landmark = kv_pos % bs == bs - 1
    earlier = (k_blk < q_blk) & ~landmark & kv_valid
    gate = (k_blk < q_blk) & landmark & kv_valid
    own = (k_blk == q_blk) & ~landmark & kv_valid & (kv_pos <= q_pos)
    shape = s.shape[:-1] + (s.shape[-1] // bs, bs)
    blocks = jnp.where(earlier, s, -jnp.inf).reshape(shape)
    m = blocks.max(-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(blocks - m)
    z = e.sum(-1, keepdims=True)
    ell = m + jnp.log(jnp.where(z > 0, z, 1.0))                      # ℓ_ib, finite everywhere
    pi = (e / jnp.where(z > 0, z, 1.0)).reshape(s.shape)            # π_ij (0 off earlier tokens)
    landmark_logit = s.reshape(shape)[..., -1:]                     # s_{i, L_b}
    adjusted = (s.reshape(shape) - ell + landmark_logit).reshape(s.shape)
    gate_ok = jnp.broadcast_to(gate, s.shape).reshape(shape)[..., -1:]
    a = jnp.where(earlier & jnp.broadcast_to(gate_ok, shape).reshape(s.shape), adjusted,
                  jnp.where(own, s, -jnp.inf))
    return a, pi, earlier, gate


def _tile_logits(st: _Static, qi, kj, q_pos, kv_idx):
    """``grouped_logits`` of one (query tile, key tile): qi ``[B, Hkv, G, bq, D]``, kj ``[B, Hkv, bk, D]``."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * st.scale
    return grouped_logits(s, q_pos[:, None], kv_idx, kv_idx < st.S, st.block_size)


def _hi(st: _Static, i):
    """One past the last key tile that query tile ``i`` can see (causal)."""
    last_pos = jnp.minimum((i + 1) * st.block_q, st.T) - 1 + (st.S - st.T)
    return last_pos // st.block_kv + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _landmark(q, k, v, st):
    return _forward(q, k, v, st)[0]


def _forward(q, k, v, st: _Static):
    B, T, Hq, _ = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = Hq // Hkv
    bq, bk = st.block_q, st.block_kv
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)

    def q_tile(args):
        i, qi = args
        q_pos = query_positions(i * bq + jnp.arange(bq), T, st.S)

        def body(j, carry):
            m, l, acc = carry
            kv_idx = j * bk + jnp.arange(bk)
            kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            a, *_ = _tile_logits(st, qi, kj, q_pos, kv_idx)
            m_new = jnp.maximum(m, a.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(a - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((B, Hkv, G, bq), -jnp.inf, jnp.float32), jnp.zeros((B, Hkv, G, bq), jnp.float32),
                jnp.zeros((B, Hkv, G, bq, Dv), jnp.float32))
        m, l, acc = lax.fori_loop(0, _hi(st, i), body, init)
        safe_l = jnp.where(l > 0, l, 1.0)
        out = jnp.where(l[..., None] > 0, acc / safe_l[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = lax.map(q_tile, (jnp.arange(num_tiles(T, bq)), q_tiles(q, bq, Hkv)))
    return untile(out, T), untile(lse, T)


def _landmark_fwd(q, k, v, st):
    out, lse = _forward(q, k, v, st)
    return out, (q, k, v, out, lse)


def _landmark_bwd(st: _Static, residuals, d_out):
    q, k, v, out, lse = residuals
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    bq, bk, bs = st.block_q, st.block_kv, st.block_size
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    stat = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # empty rows: every recomputed weight is 0

    def q_tile(carry, xs):
        dk, dv = carry
        i, qi, doi, lse_i, delta_i = xs
        q_pos = query_positions(i * bq + jnp.arange(bq), T, st.S)

        def body(j, inner):
            dqi, dk, dv = inner
            kv_idx = j * bk + jnp.arange(bk)
            kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            a, pi, earlier, gate = _tile_logits(st, qi, kj, q_pos, kv_idx)
            p = jnp.exp(a - lse_i[..., None])
            dvj = jnp.einsum("bhgqk,bhgqd->bhkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bhgqd,bhkd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            da = p * (dp - delta_i[..., None])
            shape = da.shape[:-1] + (bk // bs, bs)
            d_block = jnp.sum(jnp.where(earlier, da, 0.0).reshape(shape), -1, keepdims=True)   # D_ib
            d_block = jnp.broadcast_to(d_block, shape).reshape(da.shape)
            ds = jnp.where(earlier, da - pi * d_block, jnp.where(gate, d_block, da))
            ds = (ds * st.scale).astype(qi.dtype)
            dqi = dqi + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kj, preferred_element_type=jnp.float32)
            dkj = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            return dqi, add_slice(dk, dkj, j * bk), add_slice(dv, dvj, j * bk)

        dq0 = jnp.zeros(qi.shape, jnp.float32)
        dqi, dk, dv = lax.fori_loop(0, _hi(st, i), body, (dq0, dk, dv))
        return (dk, dv), dqi

    xs = (jnp.arange(num_tiles(T, bq)), q_tiles(q, bq, Hkv), q_tiles(d_out, bq, Hkv), row_tiles(stat, bq, Hkv),
          row_tiles(delta, bq, Hkv))
    (dk, dv), dq = lax.scan(q_tile, (jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32)), xs)
    dq = untile(dq, T)
    dk = dk[:, :, :k.shape[1]].transpose(0, 2, 1, 3)
    dv = dv[:, :, :v.shape[1]].transpose(0, 2, 1, 3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_landmark.defvjp(_landmark_fwd, _landmark_bwd)


# ----------------------------------------------------------------------------- dispatch

_PATHS = {"reference": landmark_attention_reference, "xla": landmark_attention_xla}


def landmark_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, scale: Optional[float] = None,
    mask: Optional[Mask] = None, implementation: str = "auto",
) -> jax.Array:
    """Landmark attention (Mohtashami & Jaggi 2023, Sec. 3.1, Eq. 1–3): causal attention in which an
    earlier block's tokens are weighted by their within-block softmax times the block's landmark gate.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (``T ≤ S``, GQA by fewer kv heads),
        with landmark tokens at key positions ``j % block_size == block_size − 1``.
      block_size: tokens per block, landmark included.
      scale: logit scale, default ``1/sqrt(D)``.
      mask: optional extra mask (reference path only; "auto" falls back to it).
      implementation: "reference" (O(T·S) memory), "xla" (blocked, O(T·tile)) or "auto".
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    return dispatch(_PATHS, implementation, q, k, v, what="landmark attention", block_size=block_size,
                    scale=scale, mask=mask)


# ----------------------------------------------------------------------------- block selector

def landmark_block_scores(q: jax.Array, k: jax.Array, candidates: jax.Array, *, block_q: int, block_kv: int,
                          scale: Optional[float] = None) -> jax.Array:
    """Landmark retrieval scores pooled over query blocks: float32 ``[B, Hq, nq, nk]``.

    Key block ``n``'s landmark is its last key, ``k[n·block_kv + block_kv − 1]`` (the last valid key of a
    short final block). For each query row ``t`` the landmark logits ``scale · q_t · k_{L_n}`` over the
    candidate blocks of its query block get a softmax; the score of (query block ``i``, key block ``n``) is
    the max of that probability over the rows of block ``i`` (the official ``max_over_tokens`` aggregate,
    ``lm_benchmark/models/caches/mem_cache.py``). Non-candidates score 0. Computed one query block at a
    time (``O(block_q · nk)`` memory per step); no gradient flows through it.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``.
      candidates: bool, broadcastable to ``[B, Hq, nq, nk]``: the blocks that compete.
    """
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    landmark_idx = np.minimum(np.arange(nk) * block_kv + block_kv - 1, S - 1)
    landmarks = k[:, landmark_idx].transpose(0, 2, 1, 3)                                       # [B, Hkv, nk, D]
    cand = jnp.broadcast_to(jnp.asarray(candidates, bool), (B, Hq, nq, nk))
    cand = cand.reshape(B, Hkv, G, nq, nk).transpose(3, 0, 1, 2, 4)                           # [nq, B, Hkv, G, nk]

    def tile(args):
        i, qi, ci = args
        logits = jnp.einsum("bhgqd,bhnd->bhgqn", qi, landmarks, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(ci[..., None, :], logits, -jnp.inf)
        m = logits.max(-1, keepdims=True)
        e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
        z = e.sum(-1, keepdims=True)
        p = e / jnp.where(z > 0, z, 1.0)
        rows = (i * block_q + jnp.arange(block_q) < T)[:, None]
        return jnp.where(rows, p, 0.0).max(-2)                                                # [B, Hkv, G, nk]

    pooled = lax.map(tile, (jnp.arange(nq), q_tiles(q, block_q, Hkv), cand))
    return pooled.transpose(1, 2, 3, 0, 4).reshape(B, Hq, nq, nk)


@registry.register
@dataclasses.dataclass(frozen=True)
class Landmark(BlockSelector):
    """Landmark retrieval (Mohtashami & Jaggi 2023, Sec. 3.2) as a block selector of the block-sparse engine.

    Key block ``n`` (``block_kv`` keys) is represented by its last key, the landmark's place in a landmark
    sequence. Each query block keeps its own key blocks (those holding its positions; the local context)
    and, per query head, the best of the other allowed blocks by ``landmark_block_scores`` (per-row softmax
    over the competing landmarks, max over the block's rows), ``top_k`` blocks in all. The engine then
    runs **plain softmax** over the listed blocks' tokens.

    Deviations from the paper, because the engine's tiles are plain softmax over listed blocks: selection is
    per query *block*, not per query token (``attnjax.inference.landmark_retrieval`` has the per-token rule);
    the retrieved blocks are not gated by their landmark's weight (the grouped softmax of
    ``landmark_attention``); landmark keys are attended like any key. On a sequence without landmark tokens
    each block's last key stands in for one (as in the conformance suite's random inputs).

    Attributes:
      block_q, block_kv: tile sizes; ``block_kv`` is the landmark block size (default 64).
      top_k: key blocks per query block, own blocks included (raised to the number of own blocks).
    """

    name: ClassVar[str] = "landmark"
    paper: ClassVar[str] = PAPER

    block_q: int = 64
    block_kv: int = 64
    top_k: int = 4

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv, top_k=self.top_k)

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> BlockSparse:
        T, S = q.shape[1], k.shape[1]
        own = own_blocks(T, S, self.block_q, self.block_kv)
        ok = allowed_blocks(mask, T, S, self.block_q, self.block_kv)
        scores = landmark_block_scores(q, k, jnp.asarray(ok) & ~own, block_q=self.block_q, block_kv=self.block_kv)
        return select_topk(jnp.where(own, jnp.inf, scores), self.list_length(T, S), ok, block_q=self.block_q,
                           block_kv=self.block_kv)

    def list_length(self, T: int, S: int) -> int:
        """``K = min(nk, max(top_k, own blocks per query block))``: blocks listed per query block."""
        own = own_blocks(T, S, self.block_q, self.block_kv)
        return min(num_tiles(S, self.block_kv), max(self.top_k, int(own.sum(-1).max(initial=0))))

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when no query block allows more than ``list_length(T, S)`` blocks (e.g. ``top_k·block_kv ≥ S``)."""
        return fits_top_k(self.list_length(T, S), mask, T, S, self.block_q, self.block_kv)


__all__ = [
    "PAPER", "Landmark", "grouped_logits", "is_landmark", "landmark_block_scores", "insert_landmarks",
    "landmark_attention", "landmark_attention_reference", "landmark_attention_xla",
]
