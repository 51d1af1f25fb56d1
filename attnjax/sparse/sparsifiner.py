"""Sparsifiner: a low-rank connectivity predictor picks each query's top-k keys (Wei et al. 2023).

Wei, Duke, Jiang, Aarabi, Taylor and Shkurti, "Sparsifiner: Learning Sparse Instance-Dependent
Attention for Efficient Vision Transformers", CVPR 2023 (the connectivity mask predictor, Fig. 2; the
paper's text beyond its abstract and Fig. 2 was not available here, so no equation numbers are cited);
official code lim142857/Sparsifiner (``src/models/sparsifiner.py`` ``MaskPredictor``, ``src/losses.py``).
The equations below follow the official code. Per head, for ``N`` key tokens::

    Q_r = Q W_q + b_q,   K_r = K W_k + b_k                  # channel reduction D -> c (shared by heads)
    K_down = W_downᵀ K_r                                     # token reduction N -> n_down, W_down [N, n_down]
    A_down = softmax(Q_r K_downᵀ · scale)                    # [T, n_down] low-rank attention (Linformer-like)
    A_approx = A_down W_upᵀ                                  # [T, N] connectivity scores, W_up [N, n_down]
    M_i = top-k_j A_approx[i, j]                             # the binarized connectivity mask
    out_i = Σ_{j ∈ M_i} softmax_j(q_i·k_j / √D) v_j          # attention only on the mask

``scale`` defaults to the official ``num_heads ** -0.5`` (``qk_scale or self.num_heads ** -0.5``). At
inference the official basis is the sparse ``|W_up|`` (``nn.Threshold(BASIS_THRESHOLD, 0)`` applied to
``W_up.abs()``); while the predictor is trained by attention reconstruction it is ``W_up`` itself
(``connectivity_scores(training=...)``). The predictor is distilled from dense attention
(``distillation_loss``): the official attention-reconstruction loss ``MSE(A_approx, A_dense)`` with
``reduction='sum'`` (or the KL option ``KL(A_dense ‖ softmax(A_approx))`` with ``batchmean``). The
mask carries no gradient (official ``attn_mask.detach_()``). The official CLS-token row (always
dense) and token pruning are ViT specifics left out: every query gets ``k`` keys.

Cost (per head): predictor ``O(T·D·c + N·c·n_down + T·n_down·c + T·n_down·N)``; the last term is the
dense up-projection (the paper uses a sparse ``W_up`` and sparse ``A_down``); attention on the token
engine ``O(T·k·D)``. ``mhsa_flops`` counts both for the paper's FLOPs claim.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.checks import check_positive, check_qkv
from attnjax.masks import Mask
from attnjax.sparse.tokens import KeyLists, token_sparse_attention

PAPER = "Wei et al. 2023, Sparsifiner (CVPR 2023)"
CRITERIA = ("mse", "kl")


def connectivity_scores(q: jax.Array, k: jax.Array, w_q: jax.Array, b_q: Optional[jax.Array], w_k: jax.Array,
                        b_k: Optional[jax.Array], w_down: jax.Array, w_up: jax.Array, *,
                        scale: Optional[float] = None, training: bool = False,
                        basis_threshold: float = 0.0) -> jax.Array:
    """The predictor's approximate attention ``A_approx = softmax(Q_r (W_downᵀ K_r)ᵀ·scale) W_upᵀ``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, N, Hkv, D]`` (query head ``h`` reads key head ``h // G``).
      w_q, w_k: ``[D, c]``; b_q, b_k: ``[c]`` or None (the channel reductions, shared by all heads).
      w_down, w_up: ``[N, n_down]`` (token down-projection and up-projection basis).
      scale: default ``Hq ** -0.5`` (official).
      training: use ``W_up`` as is (attention reconstruction); else the sparse basis
        ``|W_up|·[|W_up| > basis_threshold]`` (official inference path).
    Returns:
      float32 ``[B, Hq, T, N]``.
    """
    B, T, Hq, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    if w_down.shape[0] != N or w_up.shape != w_down.shape:
        raise ValueError(f"w_down and w_up must be [N={N}, n_down] for k {tuple(k.shape)}, got "
                         f"{tuple(w_down.shape)} and {tuple(w_up.shape)}")
    if w_q.shape[0] != D or w_k.shape != w_q.shape:
        raise ValueError(f"w_q and w_k must be [D={D}, c], got {tuple(w_q.shape)} and {tuple(w_k.shape)}")
    scale = Hq ** -0.5 if scale is None else scale
    f32 = jnp.float32
    q_r = q.astype(f32) @ w_q.astype(f32) + (0.0 if b_q is None else b_q.astype(f32))
    k_r = k.astype(f32) @ w_k.astype(f32) + (0.0 if b_k is None else b_k.astype(f32))
    k_down = jnp.einsum("bnhc,nr->bhrc", k_r, w_down.astype(f32))                       # [B, Hkv, n_down, c]
    logits = jnp.einsum("bthgc,bhrc->bhgtr", q_r.reshape(B, T, Hkv, Hq // Hkv, -1), k_down) * scale
    a_down = jax.nn.softmax(logits, axis=-1).reshape(B, Hq, T, -1)
    basis = w_up.astype(f32)
    if not training:
        basis = jnp.abs(basis)
        basis = jnp.where(basis > basis_threshold, basis, 0.0)
    return jnp.einsum("bhtr,nr->bhtn", a_down, basis)


def connectivity_lists(scores: jax.Array, keep: int, *, mask: Optional[Mask] = None) -> KeyLists:
    """The binarized connectivity mask as key lists: each query's ``keep`` highest-scoring keys.

    Args:
      scores: ``[B, H, T, N]`` (``connectivity_scores``); not differentiated.
      keep: keys per query (official ``attn_budget = ceil(attn_keep_rate · N)``), at most ``N``.
      mask: optional ``attnjax.masks`` value; keys it rules out are never listed (slots ``-1`` when a
        query has fewer than ``keep`` allowed keys).
    Returns:
      ``KeyLists [B, H, T, keep]``.
    """
    check_positive(keep=keep)
    T, N = scores.shape[-2:]
    s = lax.stop_gradient(scores.astype(jnp.float32))
    if mask is not None:
        s = jnp.where(mask.dense(T, N), s, -jnp.inf)
    values, ids = lax.top_k(s, min(keep, N))
    return KeyLists(jnp.where(jnp.isfinite(values), ids, -1).astype(jnp.int32))


def sparsifiner_attention(q: jax.Array, k: jax.Array, v: jax.Array, scores: jax.Array, *, keep: int,
                          mask: Optional[Mask] = None, scale: Optional[float] = None, return_lse: bool = False,
                          implementation: str = "auto"):
    """Attention of each query on its top-``keep`` keys by ``scores`` (the connectivity mask).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, N, Hkv, D]``; v: ``[B, N, Hkv, Dv]``.
      scores: ``[B, Hq, T, N]`` connectivity scores (``connectivity_scores``).
      keep, mask: as ``connectivity_lists``; mask is also applied in the attention.
      scale: attention logit scale, default ``1/sqrt(D)``.
      implementation: the token engine's path, "reference" (dense under the mask), "xla" (the key
        lists on the block-sparse engine or gathered, ``attnjax.sparse.tokens.choose_key_path``) or "auto".
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse)``.
    """
    check_qkv(q, k, v)
    want = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    if scores.shape != want:
        raise ValueError(f"scores must be [B, Hq, T, N] = {want} for q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"got {tuple(scores.shape)}")
    lists = connectivity_lists(scores, keep, mask=mask)
    return token_sparse_attention(q, k, v, lists, mask=mask, scale=scale, return_lse=return_lse,
                                  implementation=implementation)


def dense_attention_probabilities(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                                  scale: Optional[float] = None) -> jax.Array:
    """The teacher: ``softmax_j(q_i·k_j·scale)`` under ``mask``, float32 ``[B, Hq, T, N]`` (rows with no key: 0)."""
    B, T, Hq, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = jnp.einsum("bthgd,bnhd->bhgtn", q.astype(jnp.float32).reshape(B, T, Hkv, Hq // Hkv, D),
                   k.astype(jnp.float32)).reshape(B, Hq, T, N) * scale
    if mask is not None:
        ok = mask.dense(T, N)
        s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


def distillation_loss(approx: jax.Array, target: jax.Array, *, criterion: str = "mse") -> jax.Array:
    """The predictor's distillation from dense attention (official ``ATTN_RECON`` loss), a float32 scalar.

    ``"mse"``: ``Σ (A_approx − A_dense)²`` (``F.mse_loss(..., reduction='sum')``); ``"kl"``:
    ``Σ A_dense (log A_dense − log_softmax(A_approx)) / B`` (``F.kl_div(..., reduction='batchmean')``).
    ``target`` (``dense_attention_probabilities``) is not differentiated.

    Args:
      approx: ``[B, H, T, N]`` (``connectivity_scores(training=True)``); target: same shape.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if approx.shape != target.shape:
        raise ValueError(f"approx {tuple(approx.shape)} and target {tuple(target.shape)} must have one shape")
    target = lax.stop_gradient(target.astype(jnp.float32))
    approx = approx.astype(jnp.float32)
    if criterion == "mse":
        return jnp.sum((approx - target) ** 2)
    positive = target > 0
    log_t = jnp.log(jnp.where(positive, target, 1.0))
    return jnp.sum(jnp.where(positive, target * (log_t - jax.nn.log_softmax(approx, -1)), 0.0)) / approx.shape[0]


def mhsa_flops(num_tokens: int, head_dim: int, num_heads: int, *, keep: int, reduced_c: int, reduced_n: int,
               basis_density: float = 1.0) -> tuple[float, float]:
    """Multiply-adds of one MHSA's attention part, ``(dense, sparsifiner)`` (qkv/out projections excluded).

    Dense: ``Q Kᵀ`` and ``A V``, ``2·H·N²·D``. Sparsifiner: the predictor (channel reductions
    ``2·H·N·D·c``, token reduction ``H·c·N·n_down``, low-rank attention ``H·N·n_down·c``, up-projection
    ``H·N·n_down·N·basis_density``, where ``basis_density`` is the share of nonzeros of the thresholded
    ``W_up``, 1 for a dense basis) plus the sparse ``Q Kᵀ`` and ``A V`` on ``keep`` keys, ``2·H·N·keep·D``.
    """
    n, d, h = num_tokens, head_dim, num_heads
    dense = 2 * h * n * n * d
    predictor = (2 * h * n * d * reduced_c + h * reduced_c * n * reduced_n + h * n * reduced_n * reduced_c
                 + h * n * reduced_n * n * basis_density)
    return float(dense), float(predictor + 2 * h * n * keep * d)


def attention_budget(keep_rate: float, num_tokens: int) -> int:
    """``ceil(keep_rate · N)`` keys per query (official ``attn_budget``)."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return math.ceil(keep_rate * num_tokens)


__all__ = ["CRITERIA", "PAPER", "attention_budget", "connectivity_lists", "connectivity_scores",
           "dense_attention_probabilities", "distillation_loss", "mhsa_flops", "sparsifiner_attention"]
