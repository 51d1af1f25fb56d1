"""Stick-breaking attention: config, dense reference, blocked XLA path, registry entry.

Tan, Yang, Courville, Panda, Shen, "Scaling Stick-Breaking Attention: An Efficient Implementation
and In-depth Study" (ICLR 2025, arXiv:2410.17980); introduced in Shen et al., "ModuleFormer:
Learning Modular Large Language Models From Uncurated Data" (2023).

Each query breaks a unit stick, walking from the nearest earlier token back to the first: token
``j`` takes the fraction ``β_ij = σ(z_ij)`` of what the tokens between it and the query left over,

    z_ij = scale·q_i·k_j + b_ij            (b: optional bias; an optional logit soft cap after it)
    A_ij = β_ij · ∏_{j<k<i} (1 − β_ik)     for keys j < i
    log A_ij = −softplus(−z_ij) − Σ_{j<k<i} softplus(z_ik)

There is no softmax and no position encoding: the recency order does it. Conventions, as in the
paper's released code (``stickbreaking-attention``, ``attend_current=False``):

- **The diagonal is excluded.** The stick is shared among strictly earlier keys (``j < i``);
  query ``i``'s own key never gets a break point.
- **The remainder goes to the current token** (where the mask allows it; a row whose mask
  allows no key, its own included, outputs 0 as in every other mechanism). A row's weights are ``≥ 0`` and sum to
  ``Σ_j A_ij = 1 − ∏_{k<i} (1 − β_ik) ≤ 1``. The leftover stick ``r_i = 1 − Σ_j A_ij =
  exp(−Σ_{k<i} softplus(z_ik))`` is given to the query's own value:
  ``out_i = Σ_{j<i} A_ij v_j + r_i v_i``. So the first token outputs its own value (``r_0 = 1``),
  and a head that breaks no stick passes each token's value through. Pass
  ``return_remainder=True`` to get ``r`` ``[B, T, Hq]`` (float32) as well.

Masks: the mask must imply causality: ``Causal()``, ``SlidingWindow(left, 0)``,
``ChunkedCausal(c)``, or any of them ``&``-combined with other masks (``Causal() &
Segments(ids)`` gives per-sequence stick-breaking on packed batches). Keys the mask removes take
no part in the stick (no weight, no break). Anything else raises ``NotImplementedError``. With
``T < S`` the queries are the last ``T`` positions (bottom-right, as everywhere in attnjax; a
prefill or decode step against a cache), and ``v_i`` is the value at the query's own position
``i + S − T``; ``T > S`` raises ``ValueError``.

Fast path (``stick_breaking_attention_xla``): for each query tile, walk the key tiles from the
diagonal back to the first, carrying the running sum ``c`` of ``softplus(z)`` of the keys already
passed. Inside a tile ``C_ij = c_i + Σ_{k≥j in tile} softplus(z_ik)`` (a reverse cumsum) and
``A_ij = exp(z_ij − C_ij)`` (since ``log σ(z) = z − softplus(z)``); after the last tile
``r_i = exp(−c_i)``. Memory O(T·tile), float32 accumulation.

Backward (custom VJP, derived from ``A_ij = exp(z_ij − C_ij)``): with ``dA_ij = dO_i·v_j`` and
``dc_i`` the cotangent of ``c_i``,
``∂A_ij/∂z_im = A_ij(δ_jm − σ(z_im)[m ≥ j])`` and ``∂c_i/∂z_im = σ(z_im)``, so

    dz_im = A_im dA_im − σ(z_im) (Σ_{j≤m} A_ij dA_ij − dc_i)
          = A_im dA_im − σ(z_im) (δ_i − dc_i − Σ_{j>m} A_ij dA_ij),   δ_i = dO_i·o_i

(``o_i = Σ_j A_ij v_j``): the same right-to-left walk, carrying ``c`` and the running sum of
``A⊙dA``; then ``dQ = scale·dZ K``, ``dK = scale·dZᵀ Q``, ``dV = Aᵀ dO`` (the remainder term
``r_i v_i`` is differentiated by XLA outside the custom VJP).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import registry
from attnjax.bias import ArrayBias, Bias, as_bias
from attnjax.masks import Mask, block_schedule
from attnjax.blocked.tiles import (add_bias_grad, add_slice, bias_grad_init, finish_grads, kv_tiles,
                                   logits_with_bias_pullback, q_tiles, row_tiles, switch_key_tile, untile)
from attnjax.blocked.scores import ScoreSpec, allowed, raw_logits, score_spec, soft_cap, to_groups
from attnjax.meshes import vary_like
from attnjax.tiling import num_tiles
from pallas_kernels.stick_breaking.ops import stick_breaking_attention_pallas
from pallas_kernels.stick_breaking.tiles import (backward_tile, check_request, forward_tile, strict_codes,
                                                 own_key_allowed, strictly_earlier, with_remainder)

# ----------------------------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------------------------


def stick_breaking_weights(
    q: jax.Array, k: jax.Array, *, mask: Mask, bias=None, scale: Optional[float] = None,
    logits_soft_cap: Optional[float] = None,
) -> tuple[jax.Array, jax.Array]:
    """The dense stick-breaking weights and the un-allocated remainder, in float32.

    ``log A_ij = −softplus(−z_ij) − Σ_{j<k<i} softplus(z_ik)`` over the keys the mask allows with
    key position < query position (Tan et al. 2024, the log-space form); ``A = 0``
    elsewhere; ``r_i = 1 − Σ_j A_ij`` where the mask allows query ``i`` its own position, else 0.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; mask, bias, scale, logits_soft_cap: as in
        ``stick_breaking_attention_reference``.
    Returns:
      ``A [B, Hq, T, S]`` and ``r [B, T, Hq]``.
    """
    check_request(q, k, mask=mask, sinks=None, dropout_rate=0.0, return_lse=False)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale, logits_soft_cap)
    q_idx, kv_idx = jnp.arange(T), jnp.arange(S)
    qg = to_groups(q.transpose(0, 2, 1, 3), Hkv)
    z = soft_cap(raw_logits(qg, k.transpose(0, 2, 1, 3), q_idx, kv_idx, as_bias(bias), spec), logits_soft_cap)
    ok = allowed(mask, q_idx, kv_idx, spec) & strictly_earlier(q_idx, kv_idx, T, S)
    sp = jnp.where(ok, jax.nn.softplus(z), 0.0)
    later = jnp.cumsum(sp[..., ::-1], axis=-1)[..., ::-1] - sp  # Σ_{j<k} softplus(z_ik), ok keys only
    a = jnp.where(ok, jnp.exp(-jax.nn.softplus(-z) - later), 0.0)
    a = jnp.broadcast_to(a, (B, Hkv, Hq // Hkv, T, S)).reshape(B, Hq, T, S)
    return a, jnp.where(own_key_allowed(mask, T, S), (1.0 - a.sum(-1)).transpose(0, 2, 1), 0.0)


def stick_breaking_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, sinks=None,
    dropout_rate: float = 0.0, rng=None, return_lse: bool = False, return_remainder: bool = False,
):
    """Naive stick-breaking attention: the dense ``[B, H, T, S]`` weights in float32.

    ``out_i = Σ_{j<i} A_ij v_j + (1 − Σ_j A_ij) v_i`` (the remainder goes to the current token;
    module docstring; Tan et al. 2024).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``, ``Hq % Hkv == 0``, T ≤ S.
      mask: a mask implying causality (``masks.Causal()``, optionally ``&`` another mask).
      bias: array broadcastable to ``[B, Hq, T, S]`` or a ``Bias``, added to the logits.
      scale: logit scale, default ``1/sqrt(D)``. logits_soft_cap: ``cap·tanh(z/cap)``.
      sinks, dropout_rate, rng, return_lse: accepted for the ``attnjax.attention`` signature;
        anything but the defaults raises NotImplementedError.
      return_remainder: also return ``r [B, T, Hq]`` float32.
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype, and ``r`` if asked.
    """
    check_request(q, k, mask=mask, sinks=sinks, dropout_rate=dropout_rate, return_lse=return_lse)
    B, T, Hq, _ = q.shape
    a, r = stick_breaking_weights(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap)
    Hkv = k.shape[2]
    a = a.reshape(B, Hkv, Hq // Hkv, T, -1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", a, v.astype(jnp.float32)).reshape(B, T, Hq, -1)
    S = k.shape[1]
    own = jnp.repeat(v[:, S - T:].astype(jnp.float32), Hq // Hkv, axis=2)
    out = (o + r[..., None] * own).astype(q.dtype)
    return (out, r) if return_remainder else out


# ----------------------------------------------------------------------------------------------
# Blocked XLA path.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: ScoreSpec
    block_q: int
    block_kv: int


def stick_breaking_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, sinks=None,
    dropout_rate: float = 0.0, rng=None, return_lse: bool = False, return_remainder: bool = False,
    block_q: int = 256, block_kv: int = 256,
):
    """Blocked stick-breaking attention with a custom VJP (same arguments and results as the
    reference; module docstring for the algorithm). Memory O(T·tile); key tiles the mask's block
    summary marks empty are skipped (a causal mask does about half the tile products).

    Args:
      as ``stick_breaking_attention_reference``; block_q, block_kv: tile sizes (clipped to T, S).
    Gradients flow to q, k, v and a learnable bias (an array or a rule's table; ALiBi slopes are constants).
    """
    check_request(q, k, mask=mask, sinks=sinks, dropout_rate=dropout_rate, return_lse=return_lse)
    spec = score_spec(q, k, scale, logits_soft_cap)
    st = _Static(spec, block_q=min(block_q, spec.T), block_kv=min(block_kv, spec.S))
    o, row_softplus = _stick_breaking(q, k, v, as_bias(bias), mask, st)
    out, r = with_remainder(o, row_softplus, v, mask, q.dtype)
    return (out, r) if return_remainder else out


def _schedule(mask, st: _Static):
    codes, lo, hi = block_schedule(mask, st.spec.T, st.spec.S, st.block_q, st.block_kv)
    return strict_codes(codes, st.spec.T, st.spec.S, st.block_q, st.block_kv), lo, hi


def _tile(qi, kt, vt, q_idx, j, bias, mask, apply_mask: bool, st: _Static, dbias=None):
    """Key tile ``j``: its keys, values, capped logits, the allowed pairs (or None), and the bias pullback
    for the backward (``logits_with_bias_pullback``; None unless ``dbias`` or a bias that reads queries)."""
    bk = st.block_kv
    kv_idx = j * bk + jnp.arange(bk)
    kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
    vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
    raw, pullback = logits_with_bias_pullback(qi, kj, q_idx, kv_idx, bias, st.spec, dbias)
    z = soft_cap(raw, st.spec.logits_soft_cap)
    ok = None
    if apply_mask:
        ok = allowed(mask, q_idx, kv_idx, st.spec) & strictly_earlier(q_idx, kv_idx, st.spec.T, st.spec.S)
    return kj, vj, z, ok, pullback



def _walk_left(codes, lo, hi, i, visit, carry):
    """Visit key tiles ``hi[i]-1, …, lo[i]`` (right to left), skipping EMPTY ones."""
    def body(t, c):
        j = hi[i] - 1 - t
        branches = [lambda c_: c_, lambda c_: visit(j, c_, True), lambda c_: visit(j, c_, False)]
        return lax.switch(codes[i, j], branches, c)
    return lax.fori_loop(0, hi[i] - lo[i], body, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _stick_breaking(q, k, v, bias, mask, st):
    return _forward(q, k, v, bias, mask, st)


def _forward(q, k, v, bias: Optional[Bias], mask, st: _Static):
    """``o [B, T, Hq, Dv]`` float32 (without the remainder) and ``Σ_k softplus(z_ik)`` ``[B, T, Hq]``."""
    B, T, Hq, _ = q.shape
    Hkv, G = st.spec.num_kv_heads, Hq // st.spec.num_kv_heads
    bq, bk = st.block_q, st.block_kv
    codes, lo, hi = _schedule(mask, st)
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)

    def q_tile(args):
        i, qi = args
        q_idx = i * bq + jnp.arange(bq)

        def visit(j, carry, apply_mask):
            c, acc = carry
            _, vj, z, ok, _ = _tile(qi, kt, vt, q_idx, j, bias, mask, apply_mask, st)
            a, c = forward_tile(z, c, ok)
            acc = acc + jnp.einsum("bhgqk,bhkd->bhgqd", a.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return c, acc

        c0 = jnp.zeros((B, Hkv, G, bq, 1), jnp.float32)
        acc0 = jnp.zeros((B, Hkv, G, bq, v.shape[-1]), jnp.float32)
        c, acc = _walk_left(codes, lo, hi, i, visit, vary_like((c0, acc0), q, k, v, bias, mask))
        return acc, c[..., 0]

    o, c = lax.map(q_tile, (jnp.arange(num_tiles(T, bq)), q_tiles(q, bq, Hkv)))
    return untile(o, T), untile(c, T)


def _fwd(q, k, v, bias, mask, st):
    o, c = _forward(q, k, v, bias, mask, st)
    return (o, c), (q, k, v, bias, mask, o)


def _bwd(st: _Static, residuals, cotangents):
    q, k, v, bias, mask, o = residuals
    d_o, d_c = cotangents
    B, T, Hq, _ = q.shape
    Hkv, G = st.spec.num_kv_heads, Hq // st.spec.num_kv_heads
    bq, bk = st.block_q, st.block_kv
    codes, lo, hi = _schedule(mask, st)
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)
    # dz = A⊙dA − σ(z)⊙(δ − dc − Σ_{j>m} A⊙dA), δ_i = dO_i·o_i (module docstring).
    dterm = jnp.einsum("bthd,bthd->bth", d_o, o) - d_c
    dbias0 = bias_grad_init(bias, T, bq, st.spec.S, bk)
    array_bias = isinstance(bias, ArrayBias)
    D, Dv = q.shape[-1], v.shape[-1]

    def q_tile(carry, xs):
        dk, dv, dbias = carry
        i, qi, doi, dterm_i = xs
        q_idx = i * bq + jnp.arange(bq)

        def visit(j, small, apply_mask):
            c, s, dqi, rule_dbias = small
            kv_idx = j * bk + jnp.arange(bk)
            kj, vj, z, ok, pullback = _tile(qi, kt, vt, q_idx, j, bias, mask, apply_mask, st, rule_dbias)
            da = jnp.einsum("bhgqd,bhkd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            a, dz, c, s = backward_tile(z, da, c, s, dterm_i[..., None], ok)
            if st.spec.logits_soft_cap is not None:
                dz = dz * (1.0 - jnp.square(z / st.spec.logits_soft_cap))
            if array_bias:
                dz_bias, dq_bias = dz, 0.0
            else:
                dz_bias = None
                rule_dbias, dq_bias = add_bias_grad(rule_dbias, dz, bias, pullback, q_idx, kv_idx)
            dz = (dz * st.spec.scale).astype(qi.dtype)
            dqi = dqi + dq_bias + jnp.einsum("bhgqk,bhkd->bhgqd", dz, kj, preferred_element_type=jnp.float32)
            dkj = jnp.einsum("bhgqk,bhgqd->bhkd", dz, qi, preferred_element_type=jnp.float32)
            dvj = jnp.einsum("bhgqk,bhgqd->bhkd", a.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            return (c, s, dqi, rule_dbias), (dkj, dvj, dz_bias)

        tile_zeros = vary_like((jnp.zeros((B, Hkv, bk, D), jnp.float32), jnp.zeros((B, Hkv, bk, Dv), jnp.float32),
                                jnp.zeros((B, Hkv, G, bq, bk), jnp.float32) if array_bias else None),
                               residuals, cotangents)

        def body(t, inner):  # key tiles right to left, as the forward's ``_walk_left``
            small, dk, dv, dbias = inner
            j = hi[i] - 1 - t
            small, (dkj, dvj, dz_bias) = switch_key_tile(
                codes[i, j], lambda c, apply_mask: visit(j, c, apply_mask), (*small, None if array_bias else dbias),
                tile_zeros)
            dk, dv = add_slice(dk, dkj, j * bk), add_slice(dv, dvj, j * bk)
            if array_bias:
                dbias, _ = add_bias_grad(dbias, dz_bias, bias, None, q_idx, j * bk + jnp.arange(bk))
            else:
                dbias = small[3]
            return small[:3], dk, dv, dbias

        zeros_row = jnp.zeros((B, Hkv, G, bq, 1), jnp.float32)
        small0 = vary_like((zeros_row, zeros_row, jnp.zeros(qi.shape, jnp.float32)), residuals, cotangents)
        (_, _, dqi), dk, dv, dbias = lax.fori_loop(0, hi[i] - lo[i], body, (small0, dk, dv, dbias))
        return (dk, dv, dbias), dqi

    xs = (jnp.arange(num_tiles(T, bq)), q_tiles(q, bq, Hkv), q_tiles(d_o.astype(q.dtype), bq, Hkv),
          row_tiles(dterm, bq, Hkv))
    carry0 = vary_like((jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32), dbias0),
                       residuals, cotangents)
    (dk, dv, dbias), dq = lax.scan(q_tile, carry0, xs)
    dq, dk, dv, d_bias = finish_grads(dq, dk, dv, dbias, q, k, v, bias)
    return dq, dk, dv, d_bias, None


_stick_breaking.defvjp(_fwd, _bwd)


# ----------------------------------------------------------------------------------------------
# Registry entry.
# ----------------------------------------------------------------------------------------------


@registry.register
@dataclasses.dataclass(frozen=True)
class StickBreaking:
    """Stick-breaking attention (causal only; the remainder goes to the current token).

    ``block_q``/``block_kv`` set the tiles of the ``xla`` path; the Pallas kernels pick their own
    per backend (``pallas_kernels.stick_breaking``).
    """

    block_q: int = 256
    block_kv: int = 256

    name: ClassVar[str] = "stick_breaking"
    family: ClassVar[str] = "softmax"
    paper: ClassVar[str] = "Tan et al. 2024 (Scaling Stick-Breaking Attention); Shen et al. 2023 (ModuleFormer)"
    supports: ClassVar[frozenset] = frozenset({"mask", "bias", "logits_soft_cap", "gqa", "cross"})
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ()

    def implementations(self):
        return {
            "reference": stick_breaking_attention_reference,
            "xla": functools.partial(stick_breaking_attention_xla, block_q=self.block_q, block_kv=self.block_kv),
            "pallas": stick_breaking_attention_pallas,
        }

