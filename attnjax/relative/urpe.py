"""Universal RPE-based attention (URPE): a post-softmax Toeplitz weight on any relative-bias softmax.

Luo, Li, Zheng, Liu, Wang, He, "Your Transformer May Not be as Powerful as You Expect" (NeurIPS 2022),
§4 (URPE-based attention)::

    Attn(X) = (softmax(X W_Q (X W_K)ᵀ / √d + B) ⊙ C) X W_V,    C_ij = c_(i−j)

``B`` is the usual relative position bias inside the softmax (T5's buckets, Shaw et al., ...: any
``attnjax`` bias, an array or a ``Bias`` rule such as ``attnjax.positional.T5Bias``) and ``C`` a learnable
Toeplitz matrix, one per head, multiplied into the attention weights AFTER the softmax: the rows of
``softmax(·) ⊙ C`` no longer sum to one, which is what lets the positions in ``C`` reach the output (the
paper's sufficient condition for universal approximation; the softmax alone always gives a right
stochastic matrix). ``C`` is stored as a table ``c [num_offsets, H]`` of one value per offset and head.

Choices, following the official code (github.com/lsj2408/URPE, ``fairseq/modules/multihead_attention.py``:
``attn_weights = softmax(attn_weights + rel_pos_bias) * ur_rel_pos_bias``, then dropout and ``· V``;
``transformer_sentence_encoder.py``: ``ur_rp_bias = nn.Embedding(num_offsets, num_attention_heads)``):

- ``C`` is per head (a column per query head; a single column shares it).
- One entry per offset, as the official scripts' ``--ur-attn-unique`` table (one entry for each of the
  ``2n − 1`` offsets of ``n = max_seq_len`` tokens). Here the table covers ``|i − j| ≤ R`` and offsets
  beyond share the end entries (clipped, as Shaw et al.'s relative embeddings), so any length runs.
  Bidirectional: ``c [2R + 1, H]``, ``C_ij = c[R + clip(i − j, −R, R)]`` (the official code indexes the
  same table by ``j − i``, i.e. in the reverse order). Causal (``bidirectional=False``, our addition for
  decoder layers: the paper's experiments are encoders): ``c [R + 1, H]``, ``C_ij = c[clip(i − j, 0, R)]``;
  keys after the query (masked in causal attention) share the entry of offset 0.
- Positions: query row ``i`` sits at ``i + S − T`` (the library's bottom-right alignment) or at
  ``query_offset + i`` (a decode step in a partly filled cache); key column ``j`` at ``j``.
- Masked keys get weight 0 (the official code zeroes ``C`` at padding); a row with no key outputs 0.
- Initialization (in ``attnjax.nn.positional.urpe``): ``c = 1`` (the official ``--constant-init-ur-attn``,
  used by all its scripts), which starts as plain softmax attention.

Paths: ``urpe_attention_reference`` (dense ``[B, H, T, S]``) and ``urpe_attention`` (blocked,
FlashAttention-2 style with a custom VJP, O(T·tile) memory). Registry entry ``URPE(c=...)`` for
``attnjax.attention(q, k, v, mechanism=URPE(c=c))``.
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
from attnjax.blocked.scores import (ScoreSpec, allowed, dense_operands, raw_logits, score_spec, soft_cap,
                                    to_groups)
from attnjax.blocked.tiles import (add_bias_grad, add_slice, bias_grad_init, finish_grads, kv_tiles,
                                   logits_with_bias_pullback, q_tiles, row_tiles, switch_key_tile, untile)
from attnjax.blocked.weights import SOFTMAX, backward_stat
from attnjax.checks import check_options, check_qkv
from attnjax.masks import Mask, block_schedule, query_positions
from attnjax.meshes import vary_like
from attnjax.tiling import num_tiles


def toeplitz_index(q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int, num_offsets: int, *, bidirectional: bool,
                   query_offset: Optional[jax.Array] = None) -> jax.Array:
    """Row of the table ``c`` that weights each (query row, key column) pair: int32 ``[tq, tk]``.

    Offset ``δ = pos_q − pos_k`` (``pos_q = i + S − T``, or ``query_offset + i``; ``pos_k = j``).
    Bidirectional (``num_offsets = 2R + 1``): ``R + clip(δ, −R, R)``; causal (``num_offsets = R + 1``):
    ``clip(δ, 0, R)``.
    """
    rows = query_positions(q_idx, T, S) if query_offset is None else q_idx + query_offset
    offset = rows[:, None] - kv_idx[None, :]
    if bidirectional:
        radius = (num_offsets - 1) // 2
        return (jnp.clip(offset, -radius, radius) + radius).astype(jnp.int32)
    return jnp.clip(offset, 0, num_offsets - 1).astype(jnp.int32)


def toeplitz_tile(c: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int, *, bidirectional: bool,
                  query_offset: Optional[jax.Array] = None) -> jax.Array:
    """The tile ``C[:, q_idx, kv_idx]`` of the Toeplitz weight, float32 ``[1, Hc, tq, tk]``: a gather of the
    table ``c [num_offsets, Hc]`` by ``toeplitz_index`` (never the ``[T, S]`` matrix beyond the tile)."""
    index = toeplitz_index(q_idx, kv_idx, T, S, c.shape[0], bidirectional=bidirectional, query_offset=query_offset)
    values = jnp.take(jnp.asarray(c, jnp.float32), index, axis=0)  # [tq, tk, Hc]
    return jnp.moveaxis(values, -1, 0)[None]


def toeplitz_dense(c: jax.Array, T: int, S: int, *, bidirectional: bool,
                   query_offset: Optional[jax.Array] = None) -> jax.Array:
    """The whole Toeplitz weight ``C [1, Hc, T, S]`` (float32), for references and inspection."""
    return toeplitz_tile(c, jnp.arange(T), jnp.arange(S), T, S, bidirectional=bidirectional,
                         query_offset=query_offset)


def check_table(c, num_heads: int, *, bidirectional: bool) -> None:
    """``ValueError``/``TypeError`` naming ``c`` unless it is a float ``[num_offsets, num_heads or 1]`` table
    (``num_offsets`` odd, ``2R + 1``, when bidirectional)."""
    shape = jnp.shape(c)
    if len(shape) != 2 or shape[1] not in (1, num_heads) or shape[0] < 1:
        raise ValueError(f"URPE table c has shape {shape}, expected (num_offsets, {num_heads}) or (num_offsets, 1)")
    if bidirectional and shape[0] % 2 == 0:
        raise ValueError(f"URPE table c has {shape[0]} offsets; a bidirectional table needs an odd number 2R + 1 "
                         "(offsets -R..R)")
    if not jnp.issubdtype(jnp.result_type(c), jnp.floating):
        raise TypeError(f"URPE table c must be a float array, got {jnp.result_type(c)}")


def _check(q, k, v, c, mask, bias, scale, logits_soft_cap, bidirectional):
    check_qkv(q, k, v)
    check_options(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=None,
                  dropout_rate=0.0, rng=None)
    check_table(c, q.shape[2], bidirectional=bidirectional)


def urpe_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, c: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
    bidirectional: bool = True, query_offset: Optional[jax.Array] = None,
):
    """Dense URPE attention, ``out = (softmax(scale·q·kᵀ + B) ⊙ C) · v`` (Luo et al. 2022, §4), float32.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` with ``Hq % Hkv == 0``.
      c: ``[num_offsets, Hq or 1]`` float table of the Toeplitz weight (see the module docstring).
      mask: an ``attnjax.masks`` value; bias: the RPE ``B``, an array broadcastable to ``[B, Hq, T, S]``
        or a ``Bias`` rule (e.g. ``attnjax.positional.T5Bias``). scale: default ``1/sqrt(D)``.
      logits_soft_cap: ``cap`` in ``cap·tanh(s/cap)`` applied to the logits before the softmax.
      return_lse: also return the softmax's float32 log-sum-exp ``[B, T, Hq]`` (``-inf`` on empty rows).
      bidirectional: the table's layout (``2R + 1`` offsets, or ``R + 1`` causal offsets).
      query_offset: ``None`` (bottom-right alignment) or an int scalar, the position of query row 0.
    Returns:
      ``out [B, T, Hq, Dv]`` in q's dtype (and ``lse``). A row with no allowed key is 0.
    """
    _check(q, k, v, c, mask, bias, scale, logits_soft_cap, bidirectional)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale, logits_soft_cap)
    qg, kt, vt, q_idx, kv_idx = dense_operands(q, k, v)
    s = soft_cap(raw_logits(qg, kt, q_idx, kv_idx, as_bias(bias), spec), logits_soft_cap)
    s = jnp.where(allowed(mask, q_idx, kv_idx, spec), s, -jnp.inf)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    e = jnp.exp(s - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    weights = p * to_groups(toeplitz_dense(c, T, S, bidirectional=bidirectional, query_offset=query_offset), Hkv)
    out = jnp.einsum("bhgqk,bhkd->bhgqd", weights, vt.astype(jnp.float32))
    out = out.reshape(B, Hq, T, -1).transpose(0, 2, 1, 3).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(total > 0, row_max + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)[..., 0]
    return out, lse.reshape(B, Hq, T).transpose(0, 2, 1)


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: ScoreSpec
    block_q: int
    block_kv: int
    bidirectional: bool


def urpe_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, c: jax.Array, *, mask: Optional[Mask] = None, bias=None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
    bidirectional: bool = True, query_offset: Optional[jax.Array] = None, block_q: int = 512, block_kv: int = 512,
):
    """Blocked URPE attention: arguments and results as ``urpe_attention_reference``.

    Per query tile, an online softmax over the key tiles keeps the usual running max ``m_i`` and
    normalizer ``l_i = Σ_j exp(s_ij − m_i)`` unchanged, while the numerator accumulates
    ``Σ_j exp(s_ij − m_i)·C_ij·v_j``; ``out_i`` is their ratio. The ``C`` tile is gathered from ``c`` by
    the tile's offsets. Backward (custom VJP, FlashAttention-2 style: tiles recomputed from the saved
    log-sum-exp): with ``P`` the softmax, ``W = P ⊙ C`` and ``dW = dO·Vᵀ``,
    ``dV = Wᵀ·dO``, ``dC = dW ⊙ P`` (summed into ``c`` by offset), ``dP = dW ⊙ C`` and
    ``dS = P ⊙ (dP − δ + dlse)`` with ``δ_i = Σ_j P_ij dP_ij = dO_i·out_i`` (as in FlashAttention, since
    ``out = W·V``); ``dS`` gives ``dQ``, ``dK`` and a learnable bias's gradient (an array, or a rule's
    table such as ``T5Bias``).

    Cost: the FLOPs of FlashAttention-2 plus one gather of ``c`` per tile; memory O(T·tile): float32
    accumulators ``[B, Hq, block_q, Dv]`` and ``[B, Hq, block_q, block_kv]`` logit/weight tiles, the
    backward's float32 ``dK``, ``dV`` ``[B, Hkv, S, D]`` and ``dc`` (the table's size); never ``[T, S]``.
    Empty tiles of the mask's block summary are skipped (causal: about half).

    Args (beyond the reference's):
      block_q, block_kv: tile sizes (clipped to T and S); T and S need not be multiples.
    """
    _check(q, k, v, c, mask, bias, scale, logits_soft_cap, bidirectional)
    spec = score_spec(q, k, scale, logits_soft_cap)
    st = _Static(spec, min(block_q, q.shape[1]), min(block_kv, k.shape[1]), bidirectional)
    c = vary_like(jnp.asarray(c), q, k, v)  # under shard_map, autodiff sums c's cotangent over the axes
    offset = None if query_offset is None else jnp.asarray(query_offset, jnp.int32)
    out, lse = _urpe(q, k, v, c, as_bias(bias), mask, offset, st)
    return (out, lse) if return_lse else out


def _c_tile(c, q_idx, kv_idx, offset, st: _Static):
    """The ``C`` tile grouped by KV head: ``[1, Hkv|1, G|1, tq, tk]``."""
    tile = toeplitz_tile(c, q_idx, kv_idx, st.spec.T, st.spec.S, bidirectional=st.bidirectional, query_offset=offset)
    return to_groups(tile, st.spec.num_kv_heads)


def _logits(qi, kj, q_idx, kv_idx, bias, st: _Static):
    return soft_cap(raw_logits(qi, kj, q_idx, kv_idx, bias, st.spec), st.spec.logits_soft_cap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _urpe(q, k, v, c, bias, mask, offset, st):
    return _forward(q, k, v, c, bias, mask, offset, st)


def _forward(q, k, v, c, bias: Optional[Bias], mask, offset, st: _Static):
    B, T, Hq, _ = q.shape
    Hkv, G = st.spec.num_kv_heads, Hq // st.spec.num_kv_heads
    bq, bk = st.block_q, st.block_kv
    codes, lo, hi = block_schedule(mask, st.spec.T, st.spec.S, bq, bk)
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)

    def q_tile(args):
        i, qi = args
        q_idx = i * bq + jnp.arange(bq)
        m0 = jnp.full((B, Hkv, G, bq), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((B, Hkv, G, bq), jnp.float32)
        acc0 = jnp.zeros((B, Hkv, G, bq, v.shape[-1]), jnp.float32)
        m0, l0, acc0 = vary_like((m0, l0, acc0), q, k, v, c, bias, mask, offset)

        def visit(j, carry, apply_mask):
            m, l, acc = carry
            kv_idx = j * bk + jnp.arange(bk)
            kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            s = _logits(qi, kj, q_idx, kv_idx, bias, st)
            if apply_mask:
                s = jnp.where(allowed(mask, q_idx, kv_idx, st.spec), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            w = p * _c_tile(c, q_idx, kv_idx, offset, st)  # the normalizer sums p; only the numerator sees C
            wv = jnp.einsum("bhgqk,bhkd->bhgqd", w.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + wv

        def body(j, carry):
            branches = [lambda cr: cr, lambda cr: visit(j, cr, True), lambda cr: visit(j, cr, False)]
            return lax.switch(codes[i, j], branches, carry)

        m, l, acc = lax.fori_loop(lo[i], hi[i], body, (m0, l0, acc0))
        safe_l = jnp.where(l > 0, l, 1.0)
        out = jnp.where(l[..., None] > 0, acc / safe_l[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = lax.map(q_tile, (jnp.arange(num_tiles(T, bq)), q_tiles(q, bq, Hkv)))
    return untile(out, T), untile(lse, T)


def _urpe_fwd(q, k, v, c, bias, mask, offset, st):
    out, lse = _forward(q, k, v, c, bias, mask, offset, st)
    return (out, lse), (q, k, v, c, bias, mask, offset, out, lse)


def _urpe_bwd(st: _Static, residuals, cotangents):
    q, k, v, c, bias, mask, offset, out, lse = residuals
    d_out, d_lse = cotangents
    B, T, Hq, D = q.shape
    Hkv, Dv = st.spec.num_kv_heads, v.shape[-1]
    G = Hq // Hkv
    array_bias = isinstance(bias, ArrayBias)
    bq, bk = st.block_q, st.block_kv
    codes, lo, hi = block_schedule(mask, st.spec.T, st.spec.S, bq, bk)
    kt, vt = kv_tiles(k, bk), kv_tiles(v, bk)
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    stat = backward_stat(SOFTMAX, lse)  # empty rows: +inf, so every recomputed weight is 0

    def q_tile(carry, xs):
        dk, dv, dc, dbias = carry
        i, qi, doi, stat_i, delta_i, dlse_i = xs
        q_idx = i * bq + jnp.arange(bq)
        stat_i = jnp.where(q_idx < T, stat_i, jnp.inf)  # padded query rows: weight 0

        def visit(j, small, apply_mask):
            dqi, dc, rule_dbias = small
            kv_idx = j * bk + jnp.arange(bk)
            kj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=2)
            vj = lax.dynamic_slice_in_dim(vt, j * bk, bk, axis=2)
            raw, pullback = logits_with_bias_pullback(qi, kj, q_idx, kv_idx, bias, st.spec, rule_dbias)
            s = soft_cap(raw, st.spec.logits_soft_cap)
            p = jnp.exp(s - stat_i[..., None])
            if apply_mask:
                p = jnp.where(allowed(mask, q_idx, kv_idx, st.spec), p, 0.0)
            ct, pull_c = jax.vjp(lambda table: _c_tile(table, q_idx, kv_idx, offset, st), c)
            dw = jnp.einsum("bhgqd,bhkd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
            dvj = jnp.einsum("bhgqk,bhgqd->bhkd", (p * ct).astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dct = dw * p
            (dc_tile,) = pull_c(dct.sum(axis=tuple(a for a in range(5) if ct.shape[a] == 1), keepdims=True))
            ds = p * (dw * ct - delta_i[..., None] + dlse_i[..., None])
            if st.spec.logits_soft_cap is not None:
                ds = ds * (1.0 - jnp.square(s / st.spec.logits_soft_cap))
            if array_bias:
                ds_bias, dq_bias = ds, 0.0
            else:
                ds_bias = None
                rule_dbias, dq_bias = add_bias_grad(rule_dbias, ds, bias, pullback, q_idx, kv_idx)
            ds = (ds * st.spec.scale).astype(qi.dtype)
            dqi = dqi + dq_bias + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kj, preferred_element_type=jnp.float32)
            dkj = jnp.einsum("bhgqk,bhgqd->bhkd", ds, qi, preferred_element_type=jnp.float32)
            return (dqi, dc + dc_tile, rule_dbias), (dkj, dvj, ds_bias)

        tile_zeros = vary_like((jnp.zeros((B, Hkv, bk, D), jnp.float32), jnp.zeros((B, Hkv, bk, Dv), jnp.float32),
                                jnp.zeros((B, Hkv, G, bq, bk), jnp.float32) if array_bias else None),
                               residuals, cotangents)

        def body(j, inner):
            dqi, dk, dv, dc, dbias = inner
            (dqi, dc, rule_dbias), (dkj, dvj, ds_bias) = switch_key_tile(
                codes[i, j], lambda cr, apply_mask: visit(j, cr, apply_mask),
                (dqi, dc, None if array_bias else dbias), tile_zeros)
            dk, dv = add_slice(dk, dkj, j * bk), add_slice(dv, dvj, j * bk)
            if array_bias:
                dbias, _ = add_bias_grad(dbias, ds_bias, bias, None, q_idx, j * bk + jnp.arange(bk))
            else:
                dbias = rule_dbias
            return dqi, dk, dv, dc, dbias

        dq0 = vary_like(jnp.zeros(qi.shape, jnp.float32), residuals, cotangents)
        dqi, dk, dv, dc, dbias = lax.fori_loop(lo[i], hi[i], body, (dq0, dk, dv, dc, dbias))
        return (dk, dv, dc, dbias), dqi

    xs = (jnp.arange(num_tiles(T, bq)), q_tiles(q, bq, Hkv), q_tiles(d_out, bq, Hkv), row_tiles(stat, bq, Hkv),
          row_tiles(delta, bq, Hkv), row_tiles(d_lse.astype(jnp.float32), bq, Hkv))
    carry0 = (jnp.zeros(kt.shape, jnp.float32), jnp.zeros(vt.shape, jnp.float32), jnp.zeros(c.shape, jnp.float32),
              bias_grad_init(bias, T, bq, st.spec.S, bk))
    (dk, dv, dc, dbias), dq = lax.scan(q_tile, vary_like(carry0, residuals, cotangents), xs)
    dq, dk, dv, d_bias = finish_grads(dq, dk, dv, dbias, q, k, v, bias)
    return dq, dk, dv, dc.astype(c.dtype), d_bias, None, None


_urpe.defvjp(_urpe_fwd, _urpe_bwd)


@registry.register
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class URPE:
    """URPE attention (Luo et al. 2022, §4): ``(softmax(scale·q·kᵀ + B) ⊙ C) · v``, ``C_ij = c_(i−j)``.

    ``attnjax.attention(q, k, v, mechanism=URPE(c=c), bias=T5Bias(...))``: ``bias`` is the RPE ``B``;
    ``c`` a pytree leaf, so ``jax.grad`` reaches it through either path.

    Attributes:
      c: ``[num_offsets, Hq or 1]`` float table (see ``attnjax.relative.urpe``); ``None`` is ``C = 1``,
        the paper's constant initialization (plain softmax attention).
      bidirectional: the table's layout: ``2R + 1`` offsets ``−R..R``, or ``R + 1`` causal offsets.
      block_q, block_kv: tile sizes of the ``xla`` path.
    """

    c: Optional[jax.Array] = None
    bidirectional: bool = dataclasses.field(default=True, metadata=dict(static=True))
    block_q: int = dataclasses.field(default=512, metadata=dict(static=True))
    block_kv: int = dataclasses.field(default=512, metadata=dict(static=True))

    name: ClassVar[str] = "urpe"
    family: ClassVar[str] = "relative"
    paper: ClassVar[str] = "Luo et al. 2022 (Your Transformer May Not be as Powerful as You Expect; URPE)"
    supports: ClassVar[frozenset] = frozenset({"mask", "bias", "logits_soft_cap", "return_lse", "gqa", "cross"})
    decodes: ClassVar[bool] = True
    sequence_parallel: ClassVar[tuple] = ()

    def implementations(self):
        c = jnp.ones((1, 1), jnp.float32) if self.c is None else self.c
        return {
            "reference": functools.partial(urpe_attention_reference, c=c, bidirectional=self.bidirectional),
            "xla": functools.partial(urpe_attention, c=c, bidirectional=self.bidirectional, block_q=self.block_q,
                                     block_kv=self.block_kv),
        }


__all__ = ["URPE", "urpe_attention_reference", "urpe_attention", "toeplitz_index", "toeplitz_tile", "toeplitz_dense",
           "check_table"]
