"""Core Context Aware attention, CCA-Attention (catalog B12).

Chen et al. 2024/2025, "Core Context Aware Transformers for Long Context Language Modeling"
(arXiv:2412.12465); public code ``chenyaofo/CCA-Attention`` (``codebase/core/cca_attn.py``,
``cca_pooling.py``, the Triton kernel ``cca.py``).

Two parts, fused in one softmax (Sec. 3):

- **Globality-pooling attention**: the sequence is cut into groups of ``g`` tokens. Group ``c``
  (tokens ``cg … cg+g-1``) is merged into one *core token* weighted by importance, the attention of
  the group's last query to the group's keys::

      w_{c,t} = softmax_t(s · q_{cg+g-1} · k_{cg+t}),   k̃_c = Σ_t w_{c,t} k_{cg+t},   ṽ_c = Σ_t w_{c,t} v_{cg+t}

  (the paper merges the hidden states of the group and projects them; with linear projections that
  equals weighting the keys and values, as ``fast_calculate_fusion_weights`` / ``_weight_pooling`` do).
- **Locality-preserved attention**: the query's recent tokens, exactly.
- **Fusion**: query ``i`` uses the core tokens of the groups that end at least ``w`` tokens before it,
  ``c < ⌊(i + 1 − w) / g⌋``, and the tokens from the first position those groups leave out up to
  itself, ``n_i = g·max(⌊(i + 1 − w)/g⌋, 0) ≤ j ≤ i`` (a window of ``w`` to ``w + g − 1`` tokens),
  all in one softmax::

      out_i = softmax([s·q_i·k̃_c]_{c < n_i/g} ‖ [s·q_i·k_j]_{n_i ≤ j ≤ i}) · [ṽ_c ‖ v_j]

  Every earlier token reaches the query, either itself or through its group's core token, and no
  later token does (causal). The rule is the public code's ``generate_mask``; its Triton kernel's
  window (``(i+1) % g + w`` tokens) is the same rule when ``g`` divides ``w``.

GQA: as the public code (``repeat_kv`` before pooling), the importance weights, and so the core
tokens, are per query head. Causal only (``mask=masks.Causal()``): the core tokens are defined for
the autoregressive setting. Self-attention only (``T == S``): the importance uses the queries at the
key positions. The importance uses the same logit scale ``s`` as the attention (``1/√D`` by default,
as in the public code).

Paths: ``core_context_attention_reference`` writes out the ``T × T`` matrix of the fused attention
(``core_context_matrix``); ``core_context_attention_xla`` runs query tiles of ``block_q`` over a key
band of ``block_q + w + g − 2`` tokens plus the ``T/g`` core tokens: ``O(T·(w + g + T/g)·D)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.checks import check_qkv
from attnjax.masks import Causal, Mask
from attnjax.tiling import num_tiles, pad_axis

_NEG = -jnp.inf


class CoreContextAccess(NamedTuple):
    """What each query may use (NumPy bools): ``tokens [T, T]`` (exact keys) and ``cores [T, T // g]``."""

    tokens: np.ndarray
    cores: np.ndarray


def _check_sizes(group_size, window) -> None:
    for name, x in (("group_size", group_size), ("window", window)):
        if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")


def window_start(i, group_size: int, window: int):
    """``n_i = g·max(⌊(i + 1 − w)/g⌋, 0)``: the first key query ``i`` sees exactly (works on ints and arrays)."""
    return group_size * np.maximum((np.asarray(i) + 1 - window) // group_size, 0)


def core_context_access(T: int, *, group_size: int, window: int) -> CoreContextAccess:
    """The keys and core tokens each query uses (module docstring), as bool arrays."""
    _check_sizes(group_size, window)
    i = np.arange(T)[:, None]
    start = window_start(i, group_size, window)
    j = np.arange(T)[None, :]
    c = np.arange(T // group_size)[None, :]
    return CoreContextAccess(tokens=(j >= start) & (j <= i), cores=c < start // group_size)


def _check(q, k, v, mask, group_size, window) -> None:
    check_qkv(q, k, v)
    _check_sizes(group_size, window)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"core context attention is self-attention (the importance uses the queries at the key "
                         f"positions): q and k must have one length, got q {q.shape}, k {k.shape}")
    if not isinstance(mask, Causal):
        raise NotImplementedError(f"core context attention is causal: it needs mask=masks.Causal(), got {mask!r}")


def core_tokens(q: jax.Array, k: jax.Array, v: jax.Array, *, group_size: int, scale: Optional[float] = None):
    """Globality pooling: one importance-weighted core key and value per complete group of ``g`` tokens.

    ``w_{c,t} = softmax_t(s·q_{cg+g−1}·k_{cg+t})``, ``k̃_c = Σ_t w_{c,t} k_{cg+t}``,
    ``ṽ_c = Σ_t w_{c,t} v_{cg+t}``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``; group_size: ``g``.
    Returns:
      float32 ``k̃ [B, T//g, Hkv, G, D]`` and ``ṽ [B, T//g, Hkv, G, Dv]`` (``G = Hq // Hkv``: per query head).
    """
    B, T, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G, n = Hq // Hkv, T // group_size
    s = D ** -0.5 if scale is None else scale
    last = q[:, group_size - 1:n * group_size:group_size].astype(jnp.float32).reshape(B, n, Hkv, G, D)
    kg = k[:, :n * group_size].astype(jnp.float32).reshape(B, n, group_size, Hkv, D)
    vg = v[:, :n * group_size].astype(jnp.float32).reshape(B, n, group_size, Hkv, Dv)
    w = jax.nn.softmax(s * jnp.einsum("bchgd,bcthd->bchgt", last, kg), axis=-1)
    return jnp.einsum("bchgt,bcthd->bchgd", w, kg), jnp.einsum("bchgt,bcthe->bchge", w, vg)


def _fuse(token_logits, token_ok, core_logits, core_ok):
    """One softmax over exact keys and core tokens: probabilities of each part and the lse."""
    logits = jnp.concatenate([jnp.where(token_ok, token_logits, _NEG), jnp.where(core_ok, core_logits, _NEG)], -1)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    total = e.sum(-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    n = token_logits.shape[-1]
    return p[..., :n], p[..., n:], jnp.log(total[..., 0]) + m[..., 0]


def core_context_matrix(q: jax.Array, k: jax.Array, *, group_size: int, window: int, scale: Optional[float] = None):
    """The fused attention matrix written out: ``P[i, j] = p_tok(i, j) + Σ_c p_core(i, c) w_{c, j}`` (float32
    ``[B, Hq, T, T]``; each row sums to 1). q ``[B, T, Hq, D]``, k ``[B, T, Hkv, D]``; causal (module docstring)."""
    check_qkv(q, k, k)
    _check_sizes(group_size, window)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G, n = Hq // Hkv, T // group_size
    s = D ** -0.5 if scale is None else scale
    acc = core_context_access(T, group_size=group_size, window=window)
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    kf = k.astype(jnp.float32)
    # Importance of each group's tokens, as a [n, T] matrix (row c nonzero on group c only).
    last = qg[:, group_size - 1:n * group_size:group_size]
    member = jnp.asarray(np.arange(T)[None, :] // group_size == np.arange(n)[:, None])
    w = jnp.where(member, s * jnp.einsum("bchgd,bjhd->bhgcj", last, kf), _NEG)
    w = jnp.where(member, jax.nn.softmax(w, axis=-1), 0.0)
    k_core = jnp.einsum("bhgcj,bjhd->bhgcd", w, kf)
    p_tok, p_core, _ = _fuse(s * jnp.einsum("bihgd,bjhd->bhgij", qg, kf), jnp.asarray(acc.tokens),
                             s * jnp.einsum("bihgd,bhgcd->bhgic", qg, k_core), jnp.asarray(acc.cores))
    return (p_tok + jnp.einsum("bhgic,bhgcj->bhgij", p_core, w)).reshape(B, Hq, T, T)


def core_context_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, group_size: int, window: int,
                                     mask: Optional[Mask] = None, scale: Optional[float] = None,
                                     return_lse: bool = False):
    """CCA-Attention from the dense masks of ``core_context_access`` (module docstring), O(T²) memory.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]``.
      group_size: ``g``, tokens per core token; window: ``w``, the least number of recent tokens kept exactly.
      mask: ``masks.Causal()`` (required); scale: default ``1/√D``; return_lse: also the fused log-normalizer.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse [B, T, Hq] float32)``.
    """
    _check(q, k, v, mask, group_size, window)
    B, T, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = Hq // Hkv
    s = D ** -0.5 if scale is None else scale
    acc = core_context_access(T, group_size=group_size, window=window)
    k_core, v_core = core_tokens(q, k, v, group_size=group_size, scale=s)
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    p_tok, p_core, lse = _fuse(s * jnp.einsum("bihgd,bjhd->bhgij", qg, kf), jnp.asarray(acc.tokens),
                               s * jnp.einsum("bihgd,bchgd->bhgic", qg, k_core), jnp.asarray(acc.cores))
    out = jnp.einsum("bhgij,bjhe->bihge", p_tok, vf) + jnp.einsum("bhgic,bchge->bihge", p_core, v_core)
    out = out.reshape(B, T, Hq, Dv).astype(q.dtype)
    return (out, lse.transpose(0, 3, 1, 2).reshape(B, T, Hq)) if return_lse else out


def core_context_attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, group_size: int, window: int,
                               block_q: int = 128, mask: Optional[Mask] = None, scale: Optional[float] = None,
                               return_lse: bool = False):
    """CCA-Attention by query tiles (module docstring): each tile of ``block_q`` queries reads a band of
    ``block_q + w + g − 2`` keys ending at its last query, and the ``T/g`` core tokens; one fused softmax.
    Cost ``O(T·(w + g + block_q + T/g)·D)``; each tile is rematerialized in the backward pass, so memory is
    ``O(T·D + block_q·(w + g + T/g))`` beyond the inputs. Arguments and returns as the reference."""
    _check(q, k, v, mask, group_size, window)
    B, T, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = Hq // Hkv
    s = D ** -0.5 if scale is None else scale
    n = T // group_size
    k_core, v_core = core_tokens(q, k, v, group_size=group_size, scale=s)
    nq = num_tiles(T, block_q)
    band = block_q + window + group_size - 2
    lead = window + group_size - 2
    qt = pad_axis(q.astype(jnp.float32), 1, block_q).reshape(B, nq, block_q, Hkv, G, D).transpose(1, 0, 2, 3, 4, 5)
    kp = jnp.pad(pad_axis(k.astype(jnp.float32), 1, block_q), ((0, 0), (lead, 0), (0, 0), (0, 0)))
    vp = jnp.pad(pad_axis(v.astype(jnp.float32), 1, block_q), ((0, 0), (lead, 0), (0, 0), (0, 0)))
    cores = jnp.arange(n)

    @jax.checkpoint
    def tile(args):
        b, qi = args
        i = b * block_q + jnp.arange(block_q)
        j = b * block_q - lead + jnp.arange(band)
        kb = lax.dynamic_slice_in_dim(kp, b * block_q, band, axis=1)
        vb = lax.dynamic_slice_in_dim(vp, b * block_q, band, axis=1)
        start = group_size * jnp.maximum((i + 1 - window) // group_size, 0)
        token_ok = (j[None, :] >= start[:, None]) & (j[None, :] <= i[:, None]) & (j[None, :] >= 0)
        core_ok = cores[None, :] < (start // group_size)[:, None]
        p_tok, p_core, lse = _fuse(s * jnp.einsum("bihgd,bjhd->bhgij", qi, kb), token_ok,
                                   s * jnp.einsum("bihgd,bchgd->bhgic", qi, k_core), core_ok)
        out = jnp.einsum("bhgij,bjhe->bihge", p_tok, vb) + jnp.einsum("bhgic,bchge->bihge", p_core, v_core)
        return out, lse.transpose(0, 3, 1, 2)

    out, lse = lax.map(tile, (jnp.arange(nq), qt))
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(B, nq * block_q, Hq, Dv)[:, :T].astype(q.dtype)
    lse = lse.transpose(1, 0, 2, 3, 4).reshape(B, nq * block_q, Hq)[:, :T]
    return (out, lse) if return_lse else out


@registry.register
@dataclasses.dataclass(frozen=True)
class CoreContext:
    """CCA-Attention (Chen et al. 2024, arXiv:2412.12465): importance-weighted core tokens of past groups and the
    recent tokens exactly, in one softmax; causal, parameter-free given q, k, v.

    Attributes:
      group_size: ``g``, tokens merged into one core token (public code default 16).
      window: ``w``, the least number of recent tokens kept exactly (public code default 1024).
      block_q: query tile of the xla path.
    """

    group_size: int = 16
    window: int = 1024
    block_q: int = 128

    name: ClassVar[str] = "core_context"
    family: ClassVar[str] = "sparse"
    paper: ClassVar[str] = "Chen et al. 2024, Core Context Aware Transformers for Long Context Language Modeling"
    supports: ClassVar[frozenset] = frozenset({"mask", "gqa", "return_lse"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def __post_init__(self):
        _check_sizes(self.group_size, self.window)
        if not isinstance(self.block_q, int) or isinstance(self.block_q, bool) or self.block_q < 1:
            raise ValueError(f"block_q must be a positive int, got {self.block_q!r}")

    def implementations(self):
        kw = dict(group_size=self.group_size, window=self.window)
        return {"reference": functools.partial(core_context_attention_reference, **kw),
                "xla": functools.partial(core_context_attention_xla, block_q=self.block_q, **kw)}


__all__ = [
    "CoreContext", "CoreContextAccess", "core_context_access", "core_context_attention_reference",
    "core_context_attention_xla", "core_context_matrix", "core_tokens", "window_start",
]
