"""Routing Transformer self-attention as a Flax NNX layer with EMA k-means centroids (core: ``attnjax.sparse.routing``).

Roy, Saffar, Vaswani, Grangier 2021, "Efficient Content-Based Sparse Attention with Routing Transformers", TACL,
Sec. 4.1; official code ``google-research/routing_transformer`` (``utils.py``: ``multihead_attention_nd`` mixes
``local_num_heads`` local heads with ``sparsity_cluster_num_heads`` routing heads; ``cluster_items`` /
``online_kmeans`` keep the centroids).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive
from attnjax.nn.attention import attention_projections
from attnjax.nn.checks import check_input, check_step, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.sparse.routing import PAPER, init_centroids, kmeans_statistics, nearest_centroid, normalize
from attnjax.sparse.routing import routing_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class RoutingCache:
    """Keys, values and routing clusters of the tokens decoded so far, for ``RoutingAttention.decode``.

    Attributes:
      k: ``[B, max_len, Hkv, D]`` keys: the local heads' as projected, the routing heads' layer-normed.
      v: ``[B, max_len, Hkv, D]`` values.
      ids: ``[B, Hkv_r, max_len]`` int32, each cached key's cluster (routing kv heads).
      length: int32 scalar, the number of filled slots (the position of the next token).
    """

    k: jax.Array
    v: jax.Array
    ids: jax.Array
    length: jax.Array


class RoutingAttention(nnx.Module):
    """Routing heads (attention within online k-means clusters) beside local heads::

        Q, K, V = x W_q, x W_k, x W_v                                  # [B, T, H, D], GQA: Hkv K/V heads
        local heads h < L:    softmax over keys within ``window`` (causal: the ``window`` before and itself)
        routing heads h ≥ L:  Q̂, K̂ = LN(Q), LN(K) (no scale); attention within routing clusters of Q̂, K̂
        y = concat_h(out_h) W_o

    The routing heads follow the official code: queries and keys are layer-normed without scale, routed to
    the nearest of ``num_clusters`` centroids per kv head (``attnjax.sparse.routing``: balanced equal windows
    or plain clusters), and attend with the normalized ``Q̂``, ``K̂`` (scale ``D^-½``). A mask applies pair by
    pair on the original positions (``Causal()``: no query sees a later key).

    **Centroids** are state (``nnx.BatchStat``), not parameters. In training mode (``use_running_average=False``;
    ``model.eval()`` sets it) each call routes with the current centroids and then updates them from the
    call's normalized queries and keys (official ``online_kmeans``): EMAs of each cluster's member count and
    member sum, ``c ← λc + (1−λ)n``, ``s ← λs + (1−λ)Σx``, and the centroid ``s / c``. Both EMAs start at 0,
    so their ratio is the exponentially weighted mean of every member so far with no bias correction needed
    (the official code starts the sums at the centroids and smooths the counts instead); a cluster that has
    never had a member keeps its initial centroid (layer-normed normals, the official initializer).
    ``commitment_loss(x)`` is the official auxiliary loss ``β·mean‖x̂ − sg(μ(x̂))‖²`` over the routing heads'
    normalized queries and keys, which trains the projections toward their centroids.

    Causality: with ``balanced=False`` a token's cluster depends on the token alone, so the causal layer is
    strictly causal. With ``balanced=True`` (the paper's equal-size clusters) the window cut depends on every
    token's routing, so which earlier keys a query sees can change with later tokens (as the official top-``w``
    does); no query ever sees a later key either way. KV-cache decoding (``init_cache``/``decode``) serves
    ``balanced=False`` (each cached key keeps its cluster, the query reads the earlier keys of its own cluster);
    balanced windows need the whole sequence, so ``decode`` refuses them. Decoding never updates the centroids.

    Example::

      layer = RoutingAttention(256, num_heads=8, num_local_heads=4, num_clusters=16, window=128, rngs=nnx.Rngs(0))
      y = layer(x, mask=masks.Causal())                               # x, y: [B, T, 256]; centroids updated
      loss = task_loss(y) + layer.commitment_loss(x)

    Parameters: the four projections of ``MultiHeadAttention`` (``attention_projections``).

    Args:
      d_model: model width.
      num_heads: query heads ``H``; num_kv_heads: K/V heads (GQA), default ``H``.
      head_dim: per-head width, default ``d_model // H``.
      num_local_heads: the first ``L`` query heads are local (a multiple of ``H // num_kv_heads``, below ``H``).
      num_clusters: centroids per routing kv head (the paper: about ``√T``).
      window: the local heads' reach (keys ``[i − window, i + window]``; causal: ``[i − window, i]``).
      balanced: equal-size routing windows (default) or plain nearest-centroid clusters.
      decay: the EMA's ``λ`` (official 0.999 / 0.99).
      commitment: ``β`` of ``commitment_loss`` (official 1e-4).
      use_running_average: inference mode: route with the centroids, never update them.
      block_q, block_kv: the token engine's tiles; implementation: its path ("auto", "xla", "reference").
      dtype, param_dtype: computation and parameter dtypes; rngs: ``params`` initializes weights and centroids.
    """

    def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, num_local_heads: int = 0, num_clusters: int = 4, window: int = 64,
                 balanced: bool = True, decay: float = 0.999, commitment: float = 1e-4,
                 use_running_average: bool = False, block_q: int = 64, block_kv: int = 64,
                 implementation: str = "auto", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        head_dim = resolve_head_dim(d_model, num_heads, head_dim)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive(num_kv_heads=num_kv_heads, num_clusters=num_clusters, window=window, block_q=block_q,
                       block_kv=block_kv)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        group = num_heads // num_kv_heads
        if not 0 <= num_local_heads < num_heads or num_local_heads % group:
            raise ValueError(f"num_local_heads must be in [0, num_heads={num_heads}) and a multiple of "
                             f"num_heads // num_kv_heads = {group}, got {num_local_heads}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.num_local_heads, self.num_clusters, self.window, self.balanced = (num_local_heads, num_clusters, window,
                                                                               balanced)
        self.decay, self.commitment, self.use_running_average = decay, commitment, use_running_average
        self.block_q, self.block_kv, self.implementation = block_q, block_kv, implementation
        self.query, self.key, self.value, self.out = attention_projections(
            d_model, num_heads, num_kv_heads, head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        routed_kv = num_kv_heads - num_local_heads // group
        self.centroids = nnx.BatchStat(init_centroids(rngs.params(), routed_kv, num_clusters, head_dim))
        self.ema_counts = nnx.BatchStat(jnp.zeros((routed_kv, num_clusters), jnp.float32))
        self.ema_sums = nnx.BatchStat(jnp.zeros((routed_kv, num_clusters, head_dim), jnp.float32))

    def _heads(self, x: jax.Array):
        """Projections split into (local, routing) heads: ``((q, k, v), (q, k, v))``."""
        q, k, v = self.query(x), self.key(x), self.value(x)
        L, Lk = self.num_local_heads, self.num_local_heads // (self.num_heads // self.num_kv_heads)
        return (q[:, :, :L], k[:, :, :Lk], v[:, :, :Lk]), (q[:, :, L:], k[:, :, Lk:], v[:, :, Lk:])

    def local_mask(self, mask: Optional[masks.Mask]) -> masks.Mask:
        """The local heads' mask: ``window`` keys either side (causal: before), combined with ``mask``."""
        if isinstance(mask, masks.Causal):
            return masks.SlidingWindow(self.window, 0)
        band = masks.SlidingWindow(self.window, self.window)
        return band if mask is None else mask & band

    def __call__(self, x: jax.Array, *, mask: Optional[masks.Mask] = None) -> jax.Array:
        """``x [B, T, d_model] -> [B, T, d_model]``; in training mode the centroids are updated after routing."""
        check_input("x", x, self.d_model)
        (ql, kl, vl), (qr, kr, vr) = self._heads(x)
        centroids = self.centroids[...]
        routed = routing_attention(normalize(qr).astype(qr.dtype), normalize(kr).astype(kr.dtype), vr, centroids,
                                   mask=mask, balanced=self.balanced, block_q=self.block_q, block_kv=self.block_kv,
                                   implementation=self.implementation)
        if self.num_local_heads:
            local = attention(ql, kl, vl, mask=self.local_mask(mask), implementation="auto")
            routed = jnp.concatenate([local.astype(routed.dtype), routed], axis=2)
        if not self.use_running_average:
            self.update_centroids(qr, kr)
        return self.out(routed).astype(x.dtype)

    def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> RoutingCache:
        """An empty ``RoutingCache``: zero keys and values ``[batch, max_len, Hkv, D]`` (``dtype``, default the
        module's ``dtype`` else ``param_dtype``), cluster ids 0, length 0. ``NotImplementedError`` when balanced."""
        check_positive(batch=batch, max_len=max_len)
        if self.balanced:
            raise NotImplementedError("RoutingAttention decodes with balanced=False only: balanced windows are cut "
                                      "from the whole sequence's routing")
        dtype = dtype or self.query.dtype or self.query.param_dtype
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        routed_kv = self.centroids.shape[0]
        return RoutingCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                            jnp.zeros((batch, routed_kv, max_len), jnp.int32), jnp.zeros((), jnp.int32))

    def decode(self, x_t: jax.Array, cache: RoutingCache) -> tuple[jax.Array, RoutingCache]:
        """One step: token ``x_t [B, 1, d_model]`` at position ``cache.length``; equal, position by position, to
        ``self(x, mask=masks.Causal())`` (``balanced=False``); the centroids are not updated."""
        if self.balanced:
            raise NotImplementedError("RoutingAttention decodes with balanced=False only")
        B, max_len = cache.k.shape[:2]
        check_step("x_t", x_t, self.d_model, B)
        (ql, kl, vl), (qr, kr, vr) = self._heads(x_t)
        centroids = self.centroids[...]
        qn, kn = normalize(qr).astype(qr.dtype), normalize(kr).astype(kr.dtype)
        q_ids, _ = nearest_centroid(qn, centroids)
        k_ids, _ = nearest_centroid(kn, centroids)
        pos = jnp.minimum(cache.length, max_len - 1)
        k = cache.k.at[:, pos].set(jnp.concatenate([kl, kn], axis=2)[:, 0].astype(cache.k.dtype))
        v = cache.v.at[:, pos].set(jnp.concatenate([vl, vr], axis=2)[:, 0].astype(cache.v.dtype))
        ids = cache.ids.at[:, :, pos].set(k_ids[:, :, 0])
        slots = jnp.arange(max_len)
        Lk = self.num_local_heads // (self.num_heads // self.num_kv_heads)
        G = qr.shape[2] // ids.shape[1]
        same = ids[:, jnp.arange(qr.shape[2]) // G, :] == q_ids                      # [B, Hr, max_len]
        seen = masks.Explicit((same & (slots <= pos))[:, :, None, :])
        routed = attention(qn, k[:, :, Lk:].astype(qn.dtype), v[:, :, Lk:].astype(vr.dtype), mask=seen,
                           implementation="auto")
        if self.num_local_heads:
            near = masks.Explicit(((slots <= pos) & (slots >= pos - self.window))[None, None, None, :])
            local = attention(ql, k[:, :, :Lk].astype(ql.dtype), v[:, :, :Lk].astype(vl.dtype), mask=near,
                              implementation="auto")
            routed = jnp.concatenate([local.astype(routed.dtype), routed], axis=2)
        return self.out(routed).astype(x_t.dtype), RoutingCache(k, v, ids, cache.length + 1)

    def update_centroids(self, q: jax.Array, k: jax.Array) -> None:
        """One EMA step from the routing heads' queries ``[B, T, Hr, D]`` and keys ``[B, T, Hkv_r, D]`` (normalized
        here): counts and sums of the members of each current centroid, then centroid = sums / counts."""
        centroids = self.centroids[...]
        cq, sq = kmeans_statistics(q, centroids)
        ck, sk = kmeans_statistics(k, centroids)
        counts = self.decay * self.ema_counts[...] + (1.0 - self.decay) * (cq + ck)
        sums = self.decay * self.ema_sums[...] + (1.0 - self.decay) * (sq + sk)
        self.ema_counts[...] = counts
        self.ema_sums[...] = sums
        self.centroids[...] = jnp.where(counts[..., None] > 0, sums / jnp.maximum(counts, 1e-30)[..., None],
                                        centroids)

    def commitment_loss(self, x: jax.Array) -> jax.Array:
        """``β·(mean‖Q̂ − sg(μ(Q̂))‖² + mean‖K̂ − sg(μ(K̂))‖²)`` over the routing heads (official ``e_loss``), a float32
        scalar whose gradient reaches the query and key projections only."""
        check_input("x", x, self.d_model)
        _, (qr, kr, _) = self._heads(x)
        centroids = jax.lax.stop_gradient(self.centroids[...])
        total = 0.0
        for h in (qr, kr):
            ids, _ = nearest_centroid(h, centroids)
            group = h.shape[2] // centroids.shape[0]
            mu = centroids[jnp.arange(h.shape[2])[None, :, None] // group, ids]          # [B, Hx, L, D]
            total = total + jnp.mean(jnp.square(normalize(h) - mu.transpose(0, 2, 1, 3)))
        return self.commitment * total


# The example runs the dense reference path: the sorted-bucket engine's summation order follows the tile layout,
# which later tokens' buckets move, so the xla path is causal only up to float rounding (the conformance causality
# check compares bitwise); tests/nn/test_routing.py checks the xla path against a plain reference.
register_module(ModuleSpec("routing", RoutingAttention,
                           dict(d_model=16, num_heads=4, num_kv_heads=2, num_local_heads=2, num_clusters=2, window=3,
                                balanced=False, use_running_average=True, implementation="reference"),
                           (1, 11, 16), kind="layer", paper=PAPER, causal=True, decodes=True))

__all__ = ["RoutingAttention", "RoutingCache"]
