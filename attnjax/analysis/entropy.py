"""Attention entropy per query, blockwise from q and k, or from a dense map.

``H_i = −Σ_j p_ij log p_ij`` in nats, ``p_i`` the softmax attention distribution of query ``i``
(Shannon entropy; used to study attention concentration, e.g. Zhai et al., "Stabilizing Transformer
Training by Preventing Attention Entropy Collapse", ICML 2023, eq. 2). ``0 log 0 = 0``; a query with
no allowed key has entropy 0. Bounded by ``log n_i`` for ``n_i`` allowed keys.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.api import attention
from attnjax.bias import Bias
from attnjax.checks import check_positive, check_qk
from attnjax.masks import Mask


def entropy_terms(log_p: jax.Array) -> jax.Array:
    """``−p·log p`` elementwise from ``log p`` (0 where ``p = 0``, with a zero gradient there), float32."""
    finite = jnp.isfinite(log_p)
    safe = jnp.where(finite, log_p, 0.0)
    return jnp.where(finite, -jnp.exp(safe) * safe, 0.0)


IMPLEMENTATIONS = ("auto", "attention", "blockwise")
"""Paths of ``attention_entropy``: "attention" (``H = lse − E_p[s]`` from one ``attnjax.attention`` call, no bias
or soft cap), "blockwise" (``scan_query_tiles``, any options) and "auto" (the first that serves the call)."""


def attention_entropy(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                      bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                      logits_soft_cap: Optional[float] = None, block_q: int = 128,
                      implementation: str = "auto") -> jax.Array:
    """The entropy in nats of each query's softmax attention distribution, without a ``[T, S]`` map.

    Two paths. Without a bias or soft cap the logits are ``s_ij = scale·q_i·k_j``, so
    ``H_i = lse_i − Σ_j p_ij s_ij = lse_i − scale·q_i·(Σ_j p_ij k_j)``: one ``attnjax.attention(q, k, k,
    return_lse=True)`` call in float32 (the blocked forward, which skips masked tiles; time and memory of
    one attention forward). Otherwise ``scan_query_tiles`` forms each query tile's logits against every key
    (memory ``O(B·Hq·block_q·S)``, about twice the forward's work under a causal mask).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` (GQA: ``Hq % Hkv == 0``).
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step of the blockwise path.
      implementation: one of ``IMPLEMENTATIONS``; "attention" raises ``NotImplementedError`` with a bias
        or a soft cap.

    Returns:
      ``[B, Hq, T]`` float32.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    direct = bias is None and logits_soft_cap is None
    if implementation == "attention" and not direct:
        raise NotImplementedError("attention_entropy(implementation='attention') needs logits scale·q·k: no bias "
                                  "or logits_soft_cap (use 'blockwise')")
    if implementation != "blockwise" and direct:
        check_qk(q, k)
        check_positive(block_q=block_q)
        qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
        out, lse = attention(qf, kf, kf, mask=mask, scale=scale, return_lse=True)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        expected = scale * jnp.einsum("bthd,bthd->bth", qf, out)
        return jnp.where(jnp.isfinite(lse), jnp.maximum(lse - expected, 0.0), 0.0).transpose(0, 2, 1)

    def rows(log_p, logits, q_idx, kv_idx):
        return jnp.sum(entropy_terms(log_p), axis=-1), None

    return scan_query_tiles(q, k, rows, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[0]


def entropy_of_map(probabilities: jax.Array) -> jax.Array:
    """The entropy in nats of each row of a dense attention map ``[..., T, S] -> [..., T]`` (rows summing
    to 1, or to 0 for a query that attends to nothing), e.g. the maps another library returns."""
    p = jnp.asarray(probabilities, jnp.float32)
    return jnp.sum(jnp.where(p > 0, -p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


__all__ = ["IMPLEMENTATIONS", "attention_entropy", "entropy_of_map", "entropy_terms"]
