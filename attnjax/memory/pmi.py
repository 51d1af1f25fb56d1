"""PMI: the perception–memory–inference module's memory operations, as pure functions.

Zeng, Lin, Hu, Huang and Zhang, "Understanding AI Cognition: A Neural Module for Inference Inspired by Human
Memory Mechanisms" (arXiv:2310.09297; ICLR 2024 as "A Framework for Inference Inspired by Human Memory
Mechanisms"). The memory module holds a working memory ``M_w ∈ R^{N×D_m}`` (``N`` slots) and a long-term
memory of higher order ``M_l ∈ R^{C×N×D_m}`` (``C`` segments). At a step ``t`` the perceived tokens ``X`` write
into ``M_w`` through a competitive (top-k) attention, the new ``M_w`` is merged into ``M_l`` by an outer-product
association, and the inference module reads ``M_w`` (dense content addressing, "MHC") and ``M_l`` (sparse,
top-k content addressing, "MHSC"), corrects the long-term read by the working-memory read (eq. 11) and mixes
the two (eq. 12: ``U^t = α U_w^t + (1-α) U_wl^t``).

Sources. The full paper text was not available here (the stored copies hold its abstract and summaries, which
give the shapes of ``M_w`` and ``M_l`` and eq. 12). Equation numbers 11 and 12 are the paper's, as the official
README cites them; everything else (the top-k mask on the softmax weights, the association
``Σ_d M_l[c,n,d] M_w[n,f]``, the LSTM-like gates, the mean over segments before the long-term read) follows the
official code, github.com/zengxyyu/PMI-TR, ``transformer_utilities/sw_ltm.py`` (``SW_LTM.multihead_attention``,
``forward_step``, ``create_gates``), and is cited as such.

Shapes: tokens and slots on axis 1, heads on axis 2 (``[B, T, H, D]``, the library's layout). Everything is
one step of ``O(T·N·H·D + C·N·D²)``: there is no recurrence over tokens to chunk (the step is the layer; the
official model carries the memory from one layer to the next), so each function here is its own reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from attnjax.checks import check_positive, check_qkv, check_scalar, describe


class PMIState(NamedTuple):
    """The PMI memory between steps (layers).

    Attributes:
      working: ``M_w [B, N, D_m]``, the working memory (``N`` slots).
      long_term: ``M_l [B, C, N, D_m]``, the long-term memory (``C`` segments of ``N`` slots).
    """

    working: jax.Array
    long_term: jax.Array


def competitive_weights(logits: jax.Array, topk: int) -> jax.Array:
    """Competitive write weights: a softmax over the last axis, of which only the ``topk`` largest are kept.

    ``w = softmax(s) ⊙ 1[rank(s) < k]`` along the last axis (the candidates, e.g. the input tokens for a memory
    slot): the candidates compete first through the softmax, then only the ``k`` strongest write, with their
    softmax weights unchanged (not renormalized, so a row sums to at most 1; exactly 1 when ``k`` reaches the
    number of candidates, which gives the plain softmax). Ties go to the lower index. Official code
    ``SW_LTM.multihead_attention`` (``torch.topk`` mask on the softmax scores). The mask is piecewise constant,
    so the gradient flows through the kept weights (and, through the softmax's normalizer, to every logit).

    Args:
      logits: ``[..., S]`` floating-point scores.
      topk: ``k``, a positive int.
    Returns:
      ``[..., S]`` weights in float32 (float64 for float64 logits).
    """
    check_positive(topk=topk)
    if not hasattr(logits, "ndim") or logits.ndim < 1 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be a floating-point array [..., S], got {describe(logits)}")
    p = jax.nn.softmax(logits.astype(_accumulator(logits)), axis=-1)
    S = p.shape[-1]
    if topk >= S:
        return p
    _, index = jax.lax.top_k(p, topk)
    keep = jnp.any(index[..., None] == jnp.arange(S), axis=-2)
    return jnp.where(keep, p, 0.0)


def competitive_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, topk: int,
                          scale: Optional[float] = None) -> jax.Array:
    """Attention with a competitive (top-k) softmax over the keys: the PMI write and long-term read.

    ``out[b, t, h] = Σ_s w[b, h, t, s] v[b, s, h]`` with ``w = competitive_weights(scale · q·k, topk)`` over
    ``s``. As the working-memory write, the queries are the ``N`` memory slots and the keys/values the ``T``
    perceived tokens (each slot takes the ``k`` tokens that win its softmax); as the long-term read ("MHSC"),
    the queries are the tokens and the keys/values the ``N`` slots of the long-term memory. Official code
    ``SW_LTM.multihead_attention`` with ``use_topk``, which uses ``scale = 1``.

    Args:
      q: ``[B, T, Hq, Dk]``; k: ``[B, S, Hk, Dk]``; v: ``[B, S, Hk, Dv]``; ``Hq % Hk == 0`` (query head ``h``
        reads key head ``h // (Hq // Hk)``).
      topk: ``k``, how many keys each query keeps (all when ``k >= S``).
      scale: logit scale, default ``1/sqrt(Dk)``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype (weights and accumulation in at least float32).
    """
    check_qkv(q, k, v)
    check_positive(topk=topk)
    scale = _check_scale(scale, q.shape[-1])
    B, T, Hq, Dk = q.shape
    Hk = k.shape[2]
    acc = _accumulator(q)
    qg = q.astype(acc).reshape(B, T, Hk, Hq // Hk, Dk)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(acc)) * scale
    w = competitive_weights(logits, topk)
    out = jnp.einsum("bkgts,bske->btkge", w, v.astype(acc))
    return out.reshape(B, T, Hq, v.shape[-1]).astype(q.dtype)


def long_term_association(long_term: jax.Array, working: jax.Array) -> jax.Array:
    """The outer-product association of the working memory into the long-term memory.

    ``A[b, c, n, f] = (Σ_d M_l[b, c, n, d]) · M_w[b, n, f]``: for each slot ``n`` the outer product of the
    segment vector ``(M_l 1)[:, n] ∈ R^C`` with the slot ``M_w[n] ∈ R^{D_m}``, a ``C×D_m`` block, which raises
    the working memory to the long-term memory's order. The update is ``M_l^t = LN(M_l^{t-1} + A)``
    (official code ``SW_LTM.forward_step``: ``einsum('bmnd,bnf->bmnf', Mr, next_memory)`` then
    ``attended_memory_layernorm3``); the layer norm has parameters and lives in the module.

    Args:
      long_term: ``M_l [B, C, N, D_m]``.
      working: ``M_w [B, N, D_m]``, the written (pre-gate) working memory.
    Returns:
      ``[B, C, N, D_m]`` in at least float32.
    """
    _check_memories(long_term, working)
    acc = _accumulator(long_term)
    return jnp.einsum("bcnd,bnf->bcnf", long_term.astype(acc), working.astype(acc))


def long_term_summary(long_term: jax.Array) -> jax.Array:
    """The long-term memory as the read sees it: ``M̄_l = (1/C) Σ_c M_l[c]``, ``[B, N, D_m]`` in at least float32.

    The inference module reads the long-term memory through its segment mean (official code
    ``SW_LTM.forward_step``: ``torch.mean(Mr_new, dim=1)`` before the top-k read); since the key and value
    projections are affine, this equals averaging the per-segment keys and values.
    """
    _check_long_term(long_term)
    return jnp.mean(long_term.astype(_accumulator(long_term)), axis=1)


def working_memory_gate(candidate: jax.Array, memory: jax.Array, input_gate: jax.Array,
                        forget_gate: jax.Array) -> jax.Array:
    """The gated working-memory update ``M_w^t = i ⊙ tanh(M̃_w) + f ⊙ M_w^{t-1}``.

    ``M̃_w`` is the written memory (competitive write, residual and layer norm, MLP, layer norm); ``i`` and
    ``f`` are sigmoid gates in ``(0, 1)`` (official code ``SW_LTM.forward_step`` with ``gate_style='unit'``,
    the relational-memory gates of Santoro et al. 2018).

    Args:
      candidate, memory, input_gate, forget_gate: ``[B, N, D_m]`` each.
    Returns:
      ``[B, N, D_m]`` in at least float32.
    """
    shapes = {name: getattr(a, "shape", None) for name, a in
              (("candidate", candidate), ("memory", memory), ("input_gate", input_gate), ("forget_gate", forget_gate))}
    if len(set(shapes.values())) != 1 or len(shapes["memory"] or ()) != 3:
        raise ValueError(f"candidate, memory, input_gate and forget_gate must share one shape [batch, slots, "
                         f"features], got {shapes}")
    f32 = lambda a: a.astype(_accumulator(memory))  # noqa: E731
    return f32(input_gate) * jnp.tanh(f32(candidate)) + f32(forget_gate) * f32(memory)


def integrate(u_working: jax.Array, u_corrected: jax.Array, alpha: float) -> jax.Array:
    """Eq. 12, the current understanding ``U^t = α U_w^t + (1 - α) U_wl^t``.

    ``U_w`` is the working-memory read and ``U_wl`` the long-term read corrected by it (eq. 11). The official
    code fixes ``α = 0.7``.

    Args:
      u_working, u_corrected: ``[B, T, D]`` each.
      alpha: ``α`` in ``[0, 1]``.
    Returns:
      ``[B, T, D]`` in the inputs' common dtype.
    """
    check_scalar("alpha", alpha)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if getattr(u_working, "shape", None) != getattr(u_corrected, "shape", None):
        raise ValueError(f"u_working and u_corrected must share one shape, got {describe(u_working)} and "
                         f"{describe(u_corrected)}")
    return alpha * u_working + (1.0 - alpha) * u_corrected


def _accumulator(x: jax.Array) -> jnp.dtype:
    """The dtype the PMI operations compute in for input ``x``: float32, or float64 for float64 input."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _check_long_term(long_term: jax.Array) -> None:
    if not hasattr(long_term, "ndim") or long_term.ndim != 4 or not jnp.issubdtype(long_term.dtype, jnp.floating):
        raise ValueError(f"long_term must be a floating-point array [batch, segments, slots, features], got "
                         f"{describe(long_term)}")


def _check_memories(long_term: jax.Array, working: jax.Array) -> None:
    _check_long_term(long_term)
    B, _, N, D = long_term.shape
    if not hasattr(working, "ndim") or working.shape != (B, N, D):
        raise ValueError(f"working must have shape [batch, slots, features] = {[B, N, D]} to match long_term "
                         f"{list(long_term.shape)}, got {describe(working)}")


def _check_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    check_scalar("scale", scale)
    if not float(scale) > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return float(scale)


__all__ = ["PMIState", "competitive_weights", "competitive_attention", "long_term_association",
           "long_term_summary", "working_memory_gate", "integrate"]
