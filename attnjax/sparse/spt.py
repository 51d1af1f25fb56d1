"""SPT's sparse MHA: product-quantization codes of q and k estimate each query's top-L keys.

Gui, Yan, Yin, Yang and Cheng, "SPT: Fine-Tuning Transformer-based Language Models Efficiently with
Sparsification" (KDD 2024, arXiv:2312.10365), the sparse MHA module: "we use product quantization to
identify the large attention weights and compute attention via sparse matrix multiplication". The
paper's text (its equation numbers) was not available here; what follows is the standard PQ estimate
of an inner product plus what the authors' research code shows (a shared codebook
``[M, C, D/M]`` for q and k; ``lookup(q_codes, k_codes)`` keeps ``T/8`` keys per query from the
codes alone, then SDDMM/softmax/SpMM on those keys)::

    x = [x^1 | … | x^M]                  # D split into M sub-vectors of D/M
    code_m(x) = argmin_c ‖x^m − C_m[c]‖² # nearest codeword of subspace m
    ŝ_ij = Σ_m L_m[code_m(q_i), code_m(k_j)]
    keep(i) = top-L_j ŝ_ij ;  out_i = Σ_{j ∈ keep(i)} softmax_j(q_i·k_j/√D) v_j

with the per-subspace lookup table ``L_m[a, b] = C_m[a]·C_m[b]`` (``estimate="inner"``: ``ŝ_ij`` is
``q̂_i·k̂_j``, the inner product of the two quantized vectors) or ``L_m = I`` (``estimate="match"``:
the number of subspaces where the codes agree, the only score computable from the codes alone, as in
the authors' ``lookup``). The paper learns its codebooks during fine-tuning (the authors' code trains
them with a hard/soft assignment MSE loss); the registered, parameter-free ``Spt`` selector builds them
instead from a few Lloyd (k-means) steps on the current keys of each head, started deterministically
from evenly spaced keys (no RNG), and quantizes the queries with the same codebooks. Those codebooks
see every key: under ``Causal()`` a query never attends to a later key, but which earlier keys it
keeps depends on the later keys through the codebooks (as with Routing Transformer's k-means); the
paper's learned codebooks don't have this.

Cost: k-means ``O(iterations·S·C·D)``; encoding ``O((T+S)·C·D)``; the estimate ``O(T·S·M)`` (lookups,
chunked over queries so memory is ``O(chunk·S)``); attention on the token engine ``O(T·L·D)``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import registry
from attnjax.checks import check_positive, check_qk
from attnjax.masks import Mask
from attnjax.sparse.tokens import KeyLists, TokenSelector
from attnjax.tiling import num_tiles, pad_axis

PAPER = "Gui et al. 2024, SPT: Fine-Tuning Transformer-based Language Models Efficiently with Sparsification"
ESTIMATES = ("inner", "match")
ELEMENTS_PER_CHUNK = 2 ** 22
"""Estimated scores (over batch, heads, rows and keys) one chunk of queries holds at a time."""


def _subspaces(x: jax.Array, num_subspaces: int) -> jax.Array:
    """``[B, L, H, D]`` -> float32 ``[B, H, L, M, D/M]``."""
    B, L, H, D = x.shape
    if D % num_subspaces:
        raise ValueError(f"head dim D={D} must be a multiple of num_subspaces={num_subspaces}")
    return x.astype(jnp.float32).transpose(0, 2, 1, 3).reshape(B, H, L, num_subspaces, D // num_subspaces)


def _nearest(sub: jax.Array, codebooks: jax.Array) -> jax.Array:
    """Codes ``[B, H, L, M]``: nearest codeword (squared L2) of ``sub [B, H, L, M, d]`` in ``[B, H, M, C, d]``."""
    d2 = (jnp.sum(codebooks ** 2, -1)[:, :, None] - 2 * jnp.einsum("bhlmd,bhmcd->bhlmc", sub, codebooks))
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def kmeans_codebooks(x: jax.Array, *, num_subspaces: int, num_codewords: int, iterations: int) -> jax.Array:
    """Per-head PQ codebooks from Lloyd's k-means on ``x [B, L, H, D]``: float32 ``[B, H, M, C, D/M]``.

    Codeword ``c`` starts at the sub-vectors of token ``round(c·(L−1)/(C−1))``; each step assigns every
    sub-vector to its nearest codeword and moves each codeword to the mean of its members (a codeword
    with none stays).
    """
    check_positive(num_subspaces=num_subspaces, num_codewords=num_codewords)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    sub = lax.stop_gradient(_subspaces(x, num_subspaces))
    L = sub.shape[2]
    start = jnp.round(jnp.linspace(0, L - 1, num_codewords)).astype(jnp.int32)
    codebooks = jnp.moveaxis(sub[:, :, start], 2, 3)                                    # [B, H, M, C, d]

    def step(_, codebooks):
        onehot = jax.nn.one_hot(_nearest(sub, codebooks), num_codewords, dtype=jnp.float32)  # [B, H, L, M, C]
        sums = jnp.einsum("bhlmc,bhlmd->bhmcd", onehot, sub)
        counts = onehot.sum(2)[..., None]                                                  # [B, H, M, C, 1]
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), codebooks)

    return lax.fori_loop(0, iterations, step, codebooks)


def pq_encode(x: jax.Array, codebooks: jax.Array) -> jax.Array:
    """PQ codes of ``x [B, L, H, D]`` against ``codebooks [B, Hc, M, C, D/M]`` (head ``h`` uses codebook
    ``h // (H / Hc)``): int32 ``[B, H, L, M]``."""
    B, L, H, D = x.shape
    Hc, M = codebooks.shape[1], codebooks.shape[2]
    if codebooks.shape[0] != B or H % Hc or codebooks.shape[-1] * M != D:
        raise ValueError(f"codebooks {tuple(codebooks.shape)} don't fit x {tuple(x.shape)}: expected "
                         f"[{B}, Hc dividing {H}, M, C, {D}/M]")
    sub = _subspaces(x, M)
    return _nearest(sub, jnp.repeat(codebooks, H // Hc, axis=1))


def lookup_tables(codebooks: jax.Array, estimate: str) -> jax.Array:
    """Per-subspace tables ``[B, H, M, C, C]``: ``C_m[a]·C_m[b]`` ("inner") or the identity ("match")."""
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if estimate == "match":
        C = codebooks.shape[-2]
        return jnp.broadcast_to(jnp.eye(C, dtype=jnp.float32), codebooks.shape[:3] + (C, C))
    return jnp.einsum("bhmad,bhmcd->bhmac", codebooks, codebooks)


def pq_scores_reference(q_codes: jax.Array, k_codes: jax.Array, tables: jax.Array) -> jax.Array:
    """The estimate ``ŝ_ij = Σ_m L_m[code_m(q_i), code_m(k_j)]``, float32 ``[B, Hq, T, S]`` (dense).

    Args:
      q_codes: ``[B, Hq, T, M]``; k_codes: ``[B, Hc, S, M]``; tables: ``[B, Hc, M, C, C]`` (query head
        ``h`` reads codes and table ``h // (Hq / Hc)``).
    """
    G = q_codes.shape[1] // k_codes.shape[1]
    tables = jnp.repeat(tables, G, axis=1)
    k_codes = jnp.repeat(k_codes, G, axis=1)
    rows = jnp.take_along_axis(tables[:, :, None], q_codes[..., None, None], axis=-2)[..., 0, :]  # [B,H,T,M,C]
    onehot = jax.nn.one_hot(k_codes, tables.shape[-1], dtype=jnp.float32)                         # [B,H,S,M,C]
    return jnp.einsum("bhtmc,bhsmc->bhts", rows, onehot)


def pq_top_lists(q_codes: jax.Array, k_codes: jax.Array, tables: jax.Array, top_l: int, *,
                 mask: Optional[Mask] = None) -> KeyLists:
    """Each query's ``top_l`` keys by the PQ estimate, among the keys ``mask`` allows; chunked over queries.

    Same arguments as ``pq_scores_reference``. Slots past the allowed keys are ``-1``; ties keep the
    lower key position. Returns ``KeyLists [B, Hq, T, min(top_l, S)]``.
    """
    check_positive(top_l=top_l)
    B, Hq, T, M = q_codes.shape
    S = k_codes.shape[2]
    top_l = min(top_l, S)
    chunk = max(1, min(T, ELEMENTS_PER_CHUNK // max(1, B * Hq * S)))
    n = num_tiles(T, chunk)
    padded = pad_axis(q_codes, 2, chunk)

    def one(c):
        rows = c * chunk + jnp.arange(chunk)
        s = pq_scores_reference(lax.dynamic_slice_in_dim(padded, c * chunk, chunk, axis=2), k_codes, tables)
        if mask is not None:
            s = jnp.where(mask.tile(jnp.minimum(rows, T - 1), jnp.arange(S), T, S), s, -jnp.inf)
        values, ids = lax.top_k(s, top_l)
        return jnp.where(jnp.isfinite(values), ids, -1).astype(jnp.int32)

    ids = lax.map(one, jnp.arange(n))                                                   # [n, B, H, chunk, L]
    return KeyLists(jnp.moveaxis(ids, 0, 2).reshape(B, Hq, n * chunk, top_l)[:, :, :T])


def spt_select(q: jax.Array, k: jax.Array, *, top_l: int, num_subspaces: int, num_codewords: int,
               iterations: int, estimate: str = "inner", mask: Optional[Mask] = None) -> KeyLists:
    """SPT's selection with codebooks from k-means on the keys: codes for q and k, estimate, top-L.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; ``D % num_subspaces == 0``.
      top_l: keys per query; num_subspaces: ``M``; num_codewords: ``C``; iterations: Lloyd steps.
      estimate: "inner" (PQ inner-product estimate) or "match" (agreeing codes).
      mask: keys it rules out are never listed.
    Returns:
      ``KeyLists [B, Hq, T, min(top_l, S)]``, not differentiated.
    """
    check_qk(q, k, where="spt_select")
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    codebooks = kmeans_codebooks(k, num_subspaces=num_subspaces, num_codewords=num_codewords, iterations=iterations)
    tables = lookup_tables(codebooks, estimate)
    return pq_top_lists(pq_encode(q, codebooks), pq_encode(k, codebooks), tables, top_l, mask=mask)


def pq_quantizer_loss(x: jax.Array, codebooks: jax.Array) -> jax.Array:
    """The authors' codebook-training loss for shared codebooks ``[M, C, D/M]`` on ``x [B, L, H, D]``.

    As their ``PQBase(mode='train')``: with ``d_c`` the distance of a sub-vector to codeword ``c``, the
    hard codeword ``z_q`` (nearest) and the soft codeword ``z_w = Σ_c softmax_c(−log d_c) C[c]``,
    ``loss = MSE(z_w, z_q) + MSE(z, z_q)`` (mean over sub-vector elements; both terms differentiate
    the codebooks, the second also ``x``). Their code measures ``d`` in L1 (``torch.cdist(p=1)``);
    here it is the L2 distance, the metric ``pq_encode`` assigns codes with. A float32 scalar.
    """
    M, C, d = codebooks.shape
    sub = _subspaces(x, M)                                                              # [B, H, L, M, d]
    cb = codebooks.astype(jnp.float32)
    dist = jnp.sqrt(jnp.maximum(jnp.sum((sub[..., None, :] - cb) ** 2, -1), 1e-10))     # [B, H, L, M, C]
    codes = jnp.argmin(dist, -1)                                                        # [B, H, L, M]
    z_q = cb[jnp.arange(M), codes]                                                      # [B, H, L, M, d]
    weights = jax.nn.softmax(-jnp.log(jnp.maximum(dist, 1e-5)), -1)
    z_w = jnp.einsum("bhlmc,mcd->bhlmd", weights, cb)
    return jnp.mean((z_w - z_q) ** 2) + jnp.mean((sub - z_q) ** 2)


@registry.register
@dataclasses.dataclass(frozen=True)
class Spt(TokenSelector):
    """SPT's PQ-estimated top-L keys per query, with per-head codebooks from k-means on the keys.

    ``attnjax.attention(q, k, v, mechanism=Spt(top_l=256))`` runs softmax attention on each query's
    ``top_l`` keys by the PQ estimate (``spt_select``), on the token engine's key lists.

    Args:
      top_l: keys per query (the authors' code keeps ``T/8``).
      num_subspaces: ``M`` sub-vectors per head vector (must divide D).
      num_codewords: ``C`` codewords per subspace.
      iterations: Lloyd steps for the codebooks.
      estimate: "inner" or "match" (module docstring).
    """

    name: ClassVar[str] = "spt"
    paper: ClassVar[str] = PAPER
    top_l: int = 16
    num_subspaces: int = 4
    num_codewords: int = 16
    iterations: int = 4
    estimate: str = "inner"

    def __post_init__(self):
        check_positive(top_l=self.top_l, num_subspaces=self.num_subspaces, num_codewords=self.num_codewords)
        if self.estimate not in ESTIMATES:
            raise ValueError(f"Spt estimate must be one of {ESTIMATES}, got {self.estimate!r}")
        if self.iterations < 0:
            raise ValueError(f"Spt iterations must be >= 0, got {self.iterations}")

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> KeyLists:
        """``spt_select`` with this config."""
        return spt_select(q, k, top_l=self.top_l, num_subspaces=self.num_subspaces,
                          num_codewords=self.num_codewords, iterations=self.iterations, estimate=self.estimate,
                          mask=mask)


__all__ = ["ESTIMATES", "PAPER", "Spt", "kmeans_codebooks", "lookup_tables", "pq_encode", "pq_quantizer_loss",
           "pq_scores_reference", "pq_top_lists", "spt_select"]
