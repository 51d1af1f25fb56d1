"""LongHeads (catalog B16): every head attends to a few chunks it picks, so it stays within its trained length.

Lu et al. 2024, "LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
arXiv:2402.10685, §3 (chunk representation, chunk selection, attention over the selected chunks);
public code ``LuLuLuyi/LongHeads``, ``modeling_longheads/modeling_llama.py``
(``LlamaAttention.forward``). The formulas below are written from the public code: the paper's
full text (and so its equation numbers) was not at hand when this was written, only its abstract. Training-free: the keys are cut into chunks of ``w`` tokens
(``block_kv``; the code's ``window_size``) and each head of each query attends only to ``top_k``
chunks (the code's ``atten_length / window_size``), so it never sees more than ``top_k · w``
tokens, the length it was trained on, while different heads cover different parts of a long context.

1. **Chunk representation** (one vector per chunk and query head): a *summary query* ``u_n`` of
   chunk ``n``, then attention pooling of the chunk's keys with it (the code's ``chunk_features_key``)::

       c_n = Σ_{j ∈ n} softmax_j(u_n · k_j / √D) k_j

   ``representation="attention"`` is the public code: ``u_n = mean_{t ∈ n} Σ_{j ∈ n}
   softmax_j(q_t · k_j / √D) v_j``, the mean output of non-causal attention inside the chunk
   (``chunk_features_value``; needs ``Dv == D``). ``representation="query"`` (default) uses the
   chunk's mean query ``u_n = mean_{t ∈ n} q_t`` instead: the same pooling without the values,
   so that ``select(q, k)`` works from q and k alone, as every block selector's does.
   Either way a chunk's representation depends on its own tokens only (and on the queries at
   those positions: self-attention, ``T == S``); under ``Causal()`` a query only scores chunks
   wholly in its past.
2. **Chunk selection** (the code's ``global_qk``): relevance ``r_tn = q_t · c_n``; the first
   chunk (attention sink) and the ``local_chunks`` chunks ending at the query's own one are always
   kept (the code keeps the current chunk and the one before it, ``local_chunks=2``; summaries of
   the paper speak of "the first and the last chunk"), the others compete, and the ``top_k`` in all are
   kept. Chunks the mask rules out (future ones under ``Causal()``) never compete.
3. **Attention** over the selected chunks' tokens (causal inside the own chunk).

``granularity="token"`` is that rule per query token, as the public code. ``"block"`` (default)
scores per query block instead (``r_in = q̄_i · c_n``, the mean relevance over the block's
queries) and keeps ``top_k`` chunks per query block: exactly ``top_k`` tiles per block on the
block engine. Token granularity runs on the engine as the union of each query tile's choices plus
a per-row fine mask (``attnjax.sparse.moba.TokenBlocks``), like per-token MoBA.

Deviations from the public code: positions are not remapped (the code re-applies RoPE to the
gathered chunks as if they were contiguous, positions ``< top_k · w``; here q and k arrive with
their positions already encoded, so position handling is the caller's); a query sees its own
token (the code's prefill slices its own chunk to the tokens *before* the query); the rule applies
from the first token on (the code attends densely up to ``begin_selective_length``, which is what
the top-k gives anyway while fewer than ``top_k`` chunks exist).

Paths: ``longheads_reference`` (dense softmax under the chunk mask), the registered ``LongHeads``
selector on the block engine (``reference``/``xla``/``pallas``), and ``longheads_decode``: one
query token against a KV cache and the cached chunk representations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import registry
from attnjax.blocked.lists import BlockSparse, allowed_blocks
from attnjax.checks import check_positive, check_qkv
from attnjax.masks import Explicit, Mask
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse.engine import PATHS, BlockSelector, fits_top_k
from attnjax.sparse.moba import (TokenBlocks, block_means, row_allowed_blocks, routed_attention,
                                 top_blocks_per_token, union_lists)
from attnjax.sparse.seer import select_topk
from attnjax.sparse.static import block_distance
from attnjax.tiling import num_tiles, pad_axis

LONGHEADS_PAPER = "Lu et al. 2024, LongHeads: Multi-Head Attention is Secretly a Long Context Processor"
REPRESENTATIONS = ("query", "attention")
GRANULARITIES = ("block", "token")


# ----------------------------------------------------------------------------- chunk representations

def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """``[B, L, H, E]`` -> float32 ``[B, n, chunk, H, E]`` (zero-padded)."""
    x = pad_axis(x.astype(jnp.float32), 1, chunk)
    return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])


def chunk_representations(q: jax.Array, k: jax.Array, v: Optional[jax.Array] = None, *, chunk: int,
                          representation: str = "query") -> jax.Array:
    """LongHeads chunk representations ``c_n = Σ_{j∈n} softmax_j(u_n·k_j/√D) k_j``: float32 ``[B, n, Hq, D]``.

    Args:
      q: ``[B, L, Hq, D]`` and k ``[B, L, Hkv, D]`` at the same positions (self-attention);
        v ``[B, L, Hkv, D]`` for ``representation="attention"``.
      chunk: tokens per chunk ``w``; the last chunk may be short (its valid tokens count).
      representation: "query" (``u_n`` = the chunk's mean query) or "attention" (the public code:
        ``u_n`` = the mean output of non-causal attention inside the chunk).
    A chunk's representation depends only on its own tokens, so a decoder computes each one once,
    when the chunk is complete. No gradient flows through it.
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"LongHeads chunk representations need the queries at the key positions (T == S), got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    if representation == "attention" and v is None:
        raise ValueError("representation='attention' needs v (the public code's summary query is the mean "
                         "output of attention inside each chunk)")
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, L, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    n = num_tiles(L, chunk)
    valid = jnp.asarray((np.arange(n * chunk) < L).reshape(n, chunk))
    kc = _chunks(k, chunk)  # [B, n, w, Hkv, D]
    scale = 1.0 / math.sqrt(D)
    if representation == "query":
        u = block_means(q, chunk).reshape(B, n, Hkv, G, D)
    else:
        if v.shape[-1] != D:
            raise ValueError(f"representation='attention' needs v with the head dim of q ({D}), got v "
                             f"{tuple(v.shape)}")
        vc = _chunks(lax.stop_gradient(v), chunk)
        qc = _chunks(q, chunk).reshape(B, n, chunk, Hkv, G, D)
        s = jnp.einsum("bntkgd,bnjkd->bnkgtj", qc, kc) * scale
        p = jax.nn.softmax(jnp.where(valid[None, :, None, None, None, :], s, -jnp.inf), axis=-1)
        out = jnp.einsum("bnkgtj,bnjkd->bnkgtd", p, vc)
        u = jnp.where(valid[None, :, None, None, :, None], out, 0.0).sum(-2) / valid.sum(-1)[None, :, None, None,
                                                                                            None]
    s = jnp.einsum("bnkgd,bnjkd->bnkgj", u, kc) * scale
    w = jax.nn.softmax(jnp.where(valid[None, :, None, None, :], s, -jnp.inf), axis=-1)
    return jnp.einsum("bnkgj,bnjkd->bnkgd", w, kc).reshape(B, n, Hq, D)


def chunk_relevance(q: jax.Array, reps: jax.Array) -> jax.Array:
    """``r[b, h, t, n] = q[b, t, h] · c[b, n, h]`` (float32 ``[B, Hq, T, n]``, unscaled as in the public code)."""
    return jnp.einsum("bthd,bnhd->bhtn", lax.stop_gradient(q).astype(jnp.float32), reps)


def forced_chunks(positions, num_chunks: int, chunk: int, local_chunks: int):
    """Bool ``[len(positions), num_chunks]``: the chunks always kept for queries at ``positions`` (int
    ``[P]``, NumPy or jax): the first chunk and the ``local_chunks`` chunks ending at the query's own one."""
    xp = np if isinstance(positions, np.ndarray) else jnp
    own = positions[:, None] // chunk
    n = xp.arange(num_chunks)[None, :]
    return (n == 0) | ((n <= own) & (n > own - local_chunks))


# ----------------------------------------------------------------------------- reference

def longheads_mask(q: jax.Array, k: jax.Array, v: Optional[jax.Array] = None, *, chunk: int = 64, top_k: int = 8,
                   local_chunks: int = 2, representation: str = "query", granularity: str = "token",
                   block_q: Optional[int] = None, mask: Optional[Mask] = None) -> jax.Array:
    """LongHeads' selection as a dense token mask, bool ``[B, Hq, T, S]``, written plainly (§3).

    For each query row ``t`` (``granularity="token"``) or query block ``i`` of ``block_q`` rows
    (``"block"``): relevance ``q·c_n`` (block: mean over the block's rows), the allowed chunks are
    those where ``mask`` allows some (row, key) pair, the forced ones (first chunk, ``local_chunks``
    ending at the own chunk; for a block, at each of its own chunks) come first, then the most
    relevant others, ``max(top_k, forced)`` in all; a row sees the keys of its chunks that ``mask`` allows.
    """
    B, T, Hq, _ = q.shape
    S = k.shape[1]
    nk = num_tiles(S, chunk)
    reps = chunk_representations(q, k, v, chunk=chunk, representation=representation)
    rel = chunk_relevance(q, reps)  # [B, Hq, T, nk]
    allowed_pairs = jnp.ones((1, 1, T, S), bool) if mask is None else jnp.broadcast_to(mask.dense(T, S),
                                                                                        (B, Hq, T, S))
    allowed = pad_axis(allowed_pairs, 3, chunk).reshape(*allowed_pairs.shape[:3], nk, chunk).any(-1)
    forced = forced_chunks(np.arange(T) + (S - T), nk, chunk, local_chunks)
    if granularity == "block":
        bq = block_q or chunk
        nq = num_tiles(T, bq)
        rows = np.arange(T) // bq
        member = (rows[None, :] == np.arange(nq)[:, None]).astype(np.float32)  # [nq, T]
        rel = jnp.einsum("it,bhtn->bhin", member, rel) / member.sum(-1)[:, None]
        allowed = jnp.einsum("it,bhtn->bhin", member, allowed.astype(jnp.float32)) > 0
        forced = (np.asarray(member)[:, :, None] * forced[None]).max(1) > 0
    keep = max(top_k, int(forced.sum(-1).max(initial=0)))
    key = jnp.where(forced & allowed, jnp.inf, jnp.where(allowed, rel, -jnp.inf))
    rank = jnp.argsort(jnp.argsort(-key, axis=-1, stable=True), axis=-1)  # 0 = best, ties to the lower id
    chosen = (rank < keep) & (key > -jnp.inf)
    if granularity == "block":
        chosen = chosen[:, :, np.arange(T) // (block_q or chunk)]
    return jnp.repeat(chosen, chunk, axis=-1)[..., :S] & allowed_pairs


def longheads_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk: int = 64, top_k: int = 8,
                        local_chunks: int = 2, representation: str = "query", granularity: str = "token",
                        block_q: Optional[int] = None, mask: Optional[Mask] = None, scale: Optional[float] = None,
                        return_lse: bool = False):
    """LongHeads attention, dense reference: softmax attention under ``longheads_mask`` (O(T·S)).

    q ``[B, T, Hq, D]``, k ``[B, T, Hkv, D]``, v ``[B, T, Hkv, Dv]`` -> ``[B, T, Hq, Dv]`` (and the
    float32 lse ``[B, T, Hq]``). Arguments as ``longheads_mask``; the selection carries no gradient.
    """
    check_qkv(q, k, v)
    chosen = longheads_mask(q, k, v, chunk=chunk, top_k=top_k, local_chunks=local_chunks,
                            representation=representation, granularity=granularity, block_q=block_q, mask=mask)
    return softmax_attention_reference(q, k, v, mask=Explicit(chosen), scale=scale, return_lse=return_lse)


# ----------------------------------------------------------------------------- the selector

@registry.register
@dataclasses.dataclass(frozen=True)
class LongHeads(BlockSelector):
    """LongHeads chunk selection (Lu et al. 2024) for the block-sparse engine; see the module docstring.

    Chunks are the engine's key tiles (``block_kv``). Per query head: the chunk representations
    (``chunk_representations``), relevance ``q · c_n``, the first chunk and the ``local_chunks``
    chunks ending at the own chunk forced in, the best others up to ``top_k`` chunks, so each head
    attends to at most ``top_k · block_kv`` tokens.

    - ``granularity="block"``: one choice per query block (mean relevance over its rows); dynamic
      lists with ``K = min(nk, max(top_k, forced chunks per block))``, no fine mask (Pallas works).
    - ``granularity="token"``: one choice per query row (the public code's rule); union lists per
      query tile plus a ``TokenBlocks`` fine mask (xla and reference; Pallas raises NotImplementedError).

    Self-attention only (the representations use the queries at the key positions). The selector
    computes ``1/√D``-scaled representations whatever ``scale`` the call passes.

    Attributes:
      block_q, block_kv: tile sizes; ``block_kv`` is the chunk size ``w`` (default 64).
      top_k: chunks per query (block), forced ones included (the code's ``atten_length / window_size``).
      local_chunks: chunks ending at the own one that are always kept (2, as the public code).
      representation: "query" or "attention" (``chunk_representations``).
      granularity: "block" or "token".
    """

    name: ClassVar[str] = "longheads"
    paper: ClassVar[str] = LONGHEADS_PAPER
    supports: ClassVar[frozenset] = BlockSelector.supports - {"cross"}

    block_q: int = 64
    block_kv: int = 64
    top_k: int = 8
    local_chunks: int = 2
    representation: str = "query"
    granularity: str = "block"

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv, top_k=self.top_k,
                       local_chunks=self.local_chunks)
        if self.top_k < self.local_chunks + 1:
            raise ValueError(f"LongHeads.top_k ({self.top_k}) must be at least local_chunks + 1 "
                             f"({self.local_chunks + 1}): the first and the local chunks are always kept")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"LongHeads.representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"LongHeads.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

    def representations(self, q: jax.Array, k: jax.Array, v: Optional[jax.Array] = None) -> jax.Array:
        """``chunk_representations`` with this config: float32 ``[B, nk, Hq, D]``."""
        if q.shape[1] != k.shape[1]:
            raise NotImplementedError(f"LongHeads is self-attention only (its chunk representations use the "
                                      f"queries at the key positions), got T={q.shape[1]}, S={k.shape[1]}")
        return chunk_representations(q, k, v, chunk=self.block_kv, representation=self.representation)

    def token_blocks(self, q: jax.Array, k: jax.Array, v: Optional[jax.Array] = None, *,
                     mask: Optional[Mask] = None) -> TokenBlocks:
        """The chunks of every query row: ``TokenBlocks`` with ids ``[B, Hq, T, min(top_k, nk)]``."""
        T, S = q.shape[1], k.shape[1]
        nk = num_tiles(S, self.block_kv)
        forced = forced_chunks(np.arange(T) + (S - T), nk, self.block_kv, self.local_chunks)
        ids = top_blocks_per_token(chunk_relevance(q, self.representations(q, k, v)), forced, row_allowed_blocks(mask, T, S, self.block_kv),
                                   min(self.top_k, nk))
        return TokenBlocks(ids, self.block_kv)

    def forced_blocks(self, T: int, S: int) -> np.ndarray:
        """Bool ``[nq, nk]``: the chunks always kept per query block (first, and ``local_chunks`` ending at each own one)."""
        dist = block_distance(T, S, self.block_q, self.block_kv)
        return ((dist >= 0) & (dist < self.local_chunks)) | (np.arange(dist.shape[1]) == 0)[None, :]

    def list_length(self, T: int, S: int) -> int:
        """``K = min(nk, max(top_k, forced chunks per query block))`` (block granularity)."""
        return min(num_tiles(S, self.block_kv), max(self.top_k, int(self.forced_blocks(T, S).sum(-1).max(initial=0))))

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
               v: Optional[jax.Array] = None) -> BlockSparse:
        """The block lists (token granularity: each query tile's union). ``v`` is needed for
        ``representation="attention"``."""
        T, S = q.shape[1], k.shape[1]
        if self.granularity == "token":
            return union_lists(self.token_blocks(q, k, v, mask=mask), T, S, self.block_q)
        gate = chunk_relevance(block_means(q, self.block_q), self.representations(q, k, v))  # mean of q_t·c_n
        ok = allowed_blocks(mask, T, S, self.block_q, self.block_kv)
        return select_topk(jnp.where(self.forced_blocks(T, S), jnp.inf, gate), self.list_length(T, S), ok,
                           block_q=self.block_q, block_kv=self.block_kv)

    def route(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[Mask] = None):
        """``(lists, fine mask or None)`` for ``attnjax.sparse.moba.routed_attention``."""
        if self.granularity == "token":
            chosen = self.token_blocks(q, k, v, mask=mask)
            return union_lists(chosen, q.shape[1], k.shape[1], self.block_q), chosen
        return self.select(q, k, mask=mask, v=v), None

    def implementations(self):
        return {name: functools.partial(routed_attention, self, name) for name in PATHS}

    def selects_every_block(self, T: int, S: int, num_heads: int, mask: Optional[Mask] = None) -> bool:
        """True when no query row (block) allows more chunks than it keeps (e.g. ``top_k · block_kv ≥ S``)."""
        if self.granularity == "token":
            return fits_top_k(self.top_k, mask, T, S, 1, self.block_kv)
        return fits_top_k(self.list_length(T, S), mask, T, S, self.block_q, self.block_kv)


# ----------------------------------------------------------------------------- decode

def longheads_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, chunk_reps: jax.Array,
                     length: Union[int, jax.Array], *, chunk: int = 64, top_k: int = 8, local_chunks: int = 2,
                     scale: Optional[float] = None) -> jax.Array:
    """One LongHeads decoding step: the newest query against a KV cache (the public code's decode branch).

    The query at position ``p = length - 1`` keeps the first chunk, the ``local_chunks`` chunks
    ending at its own (partly filled) one, and the chunks ``n`` with the highest ``q · c_n`` among
    the other earlier ones, ``top_k`` in all; it attends to the cached keys of those chunks up to
    ``p``. Equals the last row of ``longheads_reference(..., granularity="token", mask=Causal())``
    on the first ``length`` tokens. Cost per step: ``O(nc·D)`` to score the ``nc`` cached chunks
    and ``O(top_k·chunk·D)`` to attend, whatever the context length.

    Args:
      q: ``[B, 1, Hq, D]``, the newest token's query (its key and value already written at ``p``).
      k_cache: ``[B, L, Hkv, D]``; v_cache ``[B, L, Hkv, Dv]``; slots ``≥ length`` are ignored.
      chunk_reps: float ``[B, ≥ ceil(L / chunk), Hq, D]``: ``chunk_representations`` of each
        completed chunk (the rows of the own chunk and later ones are never read for scoring).
      length: tokens in the cache, including the newest: an int or int ``[B]``.
      chunk, top_k, local_chunks: as ``LongHeads`` (``chunk`` = its ``block_kv``).
      scale: logit scale, default ``1/√D``.
    Returns:
      ``[B, 1, Hq, Dv]`` in q's dtype.
    """
    B, one, Hq, D = q.shape
    L, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    if one != 1:
        raise ValueError(f"longheads_decode takes one query token, q [B, 1, Hq, D]; got q {tuple(q.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[0] != B or k_cache.shape[-1] != D or Hq % Hkv:
        raise ValueError(f"longheads_decode: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                         f"be [B={B}, L, Hkv, ·] with D={D} and Hq={Hq} a multiple of Hkv")
    nc = num_tiles(L, chunk)
    if chunk_reps.ndim != 4 or chunk_reps.shape[0] != B or chunk_reps.shape[1] < nc or chunk_reps.shape[2:] != (Hq, D):
        raise ValueError(f"longheads_decode: chunk_reps has shape {tuple(chunk_reps.shape)}, expected "
                         f"[{B}, >= {nc}, {Hq}, {D}] (one representation per cached chunk and query head)")
    G = Hq // Hkv
    pos = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (B,)) - 1
    rel = jnp.einsum("bhd,bnhd->bhn", q[:, 0].astype(jnp.float32), chunk_reps[:, :nc].astype(jnp.float32))
    starts = jnp.arange(nc) * chunk
    allowed = starts[None, None, :] <= pos[:, None, None]
    forced = forced_chunks(pos, nc, chunk, local_chunks)[:, None, :]
    ids = top_blocks_per_token(rel[:, :, None], forced[:, :, None], allowed[:, :, None], min(top_k, nc))[:, :, 0]
    kc, vc = pad_axis(k_cache, 1, chunk), pad_axis(v_cache, 1, chunk)
    kc = kc.reshape(B, nc, chunk, Hkv, D)
    vc = vc.reshape(B, nc, chunk, Hkv, Dv)
    safe = jnp.maximum(ids, 0)  # [B, Hq, K]
    b_idx = jnp.arange(B)[:, None, None]
    h_idx = (jnp.arange(Hq) // G)[None, :, None]
    keys = kc[b_idx, safe, :, h_idx]  # [B, Hq, K, chunk, D]
    values = vc[b_idx, safe, :, h_idx]
    key_pos = safe[..., None] * chunk + jnp.arange(chunk)
    valid = (ids[..., None] >= 0) & (key_pos <= pos[:, None, None, None])
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = jnp.einsum("bhd,bhkwd->bhkw", q[:, 0], keys, preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid, s, -jnp.inf).reshape(B, Hq, -1)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bhn,bhnd->bhd", p, values.reshape(B, Hq, -1, Dv).astype(jnp.float32))
    return out[:, None].astype(q.dtype)


__all__ = ["LongHeads", "chunk_representations", "chunk_relevance", "forced_chunks", "longheads_decode",
           "longheads_mask", "longheads_reference"]
