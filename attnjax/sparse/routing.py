"""Routing Transformer attention: queries and keys routed to their nearest k-means centroid.

Roy, Saffar, Vaswani, Grangier 2021, "Efficient Content-Based Sparse Attention with Routing Transformers",
TACL; official code ``google-research/routing_transformer`` (``utils.py``: ``clustered_local_attention_helper``,
``cluster_items``, ``online_kmeans``, ``gather_cluster_attention_items``).

The rule (Sec. 4.1): queries and keys are layer-normalized without scale (official ``layer_norm(q,
scaling=False)``), each goes to the centroid ``μ_c`` with the largest ``x·μ_c`` (official ``nearest_neighbor``;
on layer-normed ``x`` this is the nearest centroid of equal-norm centroids), and query ``i`` attends to key
``j`` iff both went to the same cluster (Sec. 4.1: ``X_i' = Σ_{j: μ(K_j) = μ(Q_i), j ≤ i} A_ij V_j`` when causal).

**Balanced clusters.** The official code makes every cluster the same size ``w`` by letting each cluster take
its ``w`` tokens with the largest ``x·μ_c`` (``tf.math.top_k`` over the sequence per cluster): a token can
fall in several clusters (its outputs are averaged) or in none (its output is 0). That is not a partition,
so it does not fit ``Buckets``. Here (``balanced=True``) the tokens are sorted by (nearest cluster, ``−x·μ``
of that cluster, position) and the sorted order is cut into windows of ``w = ⌈L / C⌉``: every token is in
exactly one window and every window (but the last) has ``w`` tokens, the ``w`` nearest members of a cluster
stay together (the official top-``w``), a cluster's farthest members spill into the next window and a small
cluster is topped up with the nearest members of the next one. Query window ``i`` meets key window ``i``.
``balanced=False`` is the plain partition by nearest centroid (clusters of any size).

**Causal.** The engine applies ``Causal()`` on original positions, so no query ever sees a later key. With
``balanced=True`` the window cut depends on every token's routing (as the official top-``w`` does, over the
whole sequence in training), so which *earlier* keys a query sees can change with later tokens; with
``balanced=False`` a token's cluster depends on the token alone, and the layer is strictly causal.

**Centroids.** ``attnjax.nn.RoutingAttention`` keeps them as state updated by an exponential moving
average (Sec. 4.1: ``μ ← λμ + (1−λ)/2 Σ_{μ(Q_i)=μ} Q_i + (1−λ)/2 Σ_{μ(K_j)=μ} K_j``; the module follows the
official code, a VQ-style EMA of counts and sums whose ratio is the new centroid). The registered, parameter-free
``Routing`` selector must work on ``q, k, v`` alone: it starts from centroids drawn from a fixed seed
(layer-normed normals, the official initializer) and runs ``kmeans_steps`` Lloyd steps on the current
normalized queries and keys, so a call is deterministic.

Mixing with local attention (the paper's local heads) is per head, in ``attnjax.nn.RoutingAttention``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import registry
from attnjax.checks import check_positive, check_qk
from attnjax.masks import Mask
from attnjax.sparse.tokens import Buckets, TokenSelector, token_sparse_attention

PAPER = ("Roy et al. 2021, Efficient Content-Based Sparse Attention with Routing Transformers (TACL); "
         "official google-research/routing_transformer")

EPSILON = 1e-6
"""``ε`` of the scale-free layer norm applied to queries and keys before routing."""


def normalize(x: jax.Array) -> jax.Array:
    """Layer norm over the last axis without scale or shift, in float32: ``(x − mean) / sqrt(var + ε)``
    (official ``layer_norm(x, scaling=False)``)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + EPSILON)


def init_centroids(key: jax.Array, num_heads: int, num_clusters: int, head_dim: int) -> jax.Array:
    """Initial centroids ``[H, C, D]`` float32: layer-normed standard normals (official ``cluster_items``)."""
    check_positive(num_heads=num_heads, num_clusters=num_clusters, head_dim=head_dim)
    return normalize(jax.random.normal(key, (num_heads, num_clusters, head_dim), jnp.float32))


def _check_centroids(x: jax.Array, centroids: jax.Array, name: str) -> None:
    if centroids.ndim != 3 or centroids.shape[-1] != x.shape[-1] or x.shape[2] % centroids.shape[0]:
        raise ValueError(f"centroids must be [H, C, D] with {name} heads ({x.shape[2]}) a multiple of H and "
                         f"D = {x.shape[-1]}, got centroids {list(centroids.shape)}, {name} {list(x.shape)}")


def similarities(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """``x·μ_c`` of layer-normed ``x [B, L, Hx, D]`` to the centroids ``[H, C, D]`` of its head group, ``[B, Hx,
    L, C]`` float32 (head ``h`` uses centroid head ``h // (Hx // H)``, GQA)."""
    B, L, Hx, D = x.shape
    H, C = centroids.shape[:2]
    xg = normalize(x).reshape(B, L, H, Hx // H, D)
    s = jnp.einsum("blhgd,hcd->bhglc", xg, centroids.astype(jnp.float32))
    return s.reshape(B, Hx, L, C)


def nearest_centroid(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each token's cluster ``argmax_c x·μ_c`` and that similarity: ``(ids [B, Hx, L] int32, score [B, Hx, L])``
    for ``x [B, L, Hx, D]`` (layer-normed here) and centroids ``[H, C, D]``."""
    s = similarities(x, centroids)
    ids = jnp.argmax(s, axis=-1).astype(jnp.int32)
    return ids, jnp.take_along_axis(s, ids[..., None], -1)[..., 0]


def kmeans_statistics(x: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Counts ``[H, C]`` and sums ``[H, C, D]`` of the layer-normed tokens ``x [B, L, Hx, D]`` assigned to each
    centroid (over batch, positions and the heads of a group): the statistics of a k-means / EMA update
    (official ``online_kmeans``: ``count``, ``dw``)."""
    _check_centroids(x, centroids, "x")
    H, C = centroids.shape[:2]
    ids, _ = nearest_centroid(x, centroids)
    B, Hx, L = ids.shape
    hot = jax.nn.one_hot(ids, C, dtype=jnp.float32).reshape(B, H, Hx // H, L, C)
    xg = normalize(x).reshape(B, L, H, Hx // H, -1)
    counts = hot.sum(axis=(0, 2, 3))
    sums = jnp.einsum("bhglc,blhgd->hcd", hot, xg)
    return lax.stop_gradient(counts), lax.stop_gradient(sums)


def kmeans_step(xs: tuple[jax.Array, ...], centroids: jax.Array) -> jax.Array:
    """One Lloyd step: each centroid moves to the mean of the layer-normed tokens of ``xs`` (e.g. ``(q, k)``,
    each ``[B, L, Hx, D]``) nearest to it; a centroid with no token stays."""
    counts = sums = 0.0
    for x in xs:
        c, s = kmeans_statistics(x, centroids)
        counts, sums = counts + c, sums + s
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    return jnp.where(counts[..., None] > 0, means, centroids.astype(jnp.float32))


def balanced_windows(ids: jax.Array, score: jax.Array, num_clusters: int) -> jax.Array:
    """Equal windows of the order (cluster, −score, position): window ``rank // ⌈L / C⌉`` per token, ``[B, H, L]``
    int32, for ``ids``/``score`` ``[B, H, L]`` (see the module docstring)."""
    L = ids.shape[-1]
    width = -(-L // num_clusters)
    order = jnp.lexsort((jnp.broadcast_to(jnp.arange(L), ids.shape), -score, ids), axis=-1)
    rank = jnp.argsort(order, axis=-1)
    return (rank // width).astype(jnp.int32)


def routing_buckets(q: jax.Array, k: jax.Array, centroids: jax.Array, *, balanced: bool = True) -> Buckets:
    """The routing partition of queries ``[B, T, Hq, D]`` and keys ``[B, S, Hkv, D]`` for centroids ``[Hkv, C,
    D]``: nearest centroid (``balanced=False``) or its equal-window version (``balanced=True``)."""
    check_qk(q, k)
    _check_centroids(k, centroids, "k")
    if centroids.shape[0] != k.shape[2]:
        raise ValueError(f"centroids must have one head per kv head ({k.shape[2]}), got {list(centroids.shape)}")
    C = centroids.shape[1]
    (q_ids, q_score), (k_ids, k_score) = nearest_centroid(q, centroids), nearest_centroid(k, centroids)
    if balanced:
        q_ids, k_ids = balanced_windows(q_ids, q_score, C), balanced_windows(k_ids, k_score, C)
    return Buckets(q_ids, k_ids, C)


def routing_attention(q: jax.Array, k: jax.Array, v: jax.Array, centroids: jax.Array, *, mask: Optional[Mask] = None,
                      balanced: bool = True, scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                      return_lse: bool = False, block_q: int = 64, block_kv: int = 64, implementation: str = "auto"):
    """Routing attention (Roy et al. 2021, Sec. 4.1): softmax attention within the routing clusters.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``.
      centroids: ``[Hkv, C, D]`` (query head ``h`` routes on kv head ``h // (Hq // Hkv)``'s centroids).
      mask: e.g. ``masks.Causal()``, applied on original positions (a query never sees a later key).
      balanced: equal windows (see the module docstring) or the plain nearest-centroid partition.
      scale, logits_soft_cap, return_lse, block_q, block_kv, implementation: as ``token_sparse_attention``
        ("reference": dense softmax under the routing mask; "xla": sorted buckets, ``O(Σ n_q·n_k)``).
    Returns:
      ``[B, T, Hq, Dv]`` (and the lse ``[B, T, Hq]``); a query whose cluster holds no allowed key gets 0.
    """
    selection = routing_buckets(q, k, centroids, balanced=balanced)
    return token_sparse_attention(q, k, v, selection, mask=mask, scale=scale, logits_soft_cap=logits_soft_cap,
                                  return_lse=return_lse, block_q=block_q, block_kv=block_kv,
                                  implementation=implementation)


@registry.register
@dataclasses.dataclass(frozen=True)
class Routing(TokenSelector):
    """Routing Transformer clusters as a parameter-free registered selector (Roy et al. 2021, Sec. 4.1).

    Centroids ``[Hkv, C, D]`` come from ``seed`` (``init_centroids``), then ``kmeans_steps`` Lloyd steps on the
    call's layer-normed queries and keys (``kmeans_step``); queries and keys are then routed as in
    ``routing_buckets``. A trained model keeps EMA centroids instead: ``attnjax.nn.RoutingAttention``.

    Attributes:
      num_clusters: ``C``; ``None`` (default) takes ``⌈√S⌉``, the paper's choice (Sec. 4.1: ``O(T^1.5·D)`` work).
      kmeans_steps: Lloyd steps on the current queries and keys (0: the seeded centroids as they are).
      seed: the centroids' seed, so that a call is deterministic.
      balanced: equal windows (default, the paper's balanced clusters) or plain nearest-centroid clusters.
      block_q, block_kv: the sorted-bucket engine's tiles.
    """

    num_clusters: Optional[int] = None
    kmeans_steps: int = 1
    seed: int = 0
    balanced: bool = True
    block_q: int = 64
    block_kv: int = 64
    name: ClassVar[str] = "routing"
    paper: ClassVar[str] = PAPER

    def __post_init__(self):
        check_positive(block_q=self.block_q, block_kv=self.block_kv)
        if self.num_clusters is not None:
            check_positive(num_clusters=self.num_clusters)
        if not isinstance(self.kmeans_steps, int) or self.kmeans_steps < 0:
            raise ValueError(f"kmeans_steps must be an int >= 0, got {self.kmeans_steps!r}")

    def centroids(self, q: jax.Array, k: jax.Array) -> jax.Array:
        """The centroids ``[Hkv, C, D]`` this config routes ``q``, ``k`` with (seeded, then Lloyd steps)."""
        check_qk(q, k)
        C = self.num_clusters or math.isqrt(k.shape[1] - 1) + 1
        centroids = init_centroids(jax.random.PRNGKey(self.seed), k.shape[2], C, k.shape[3])
        for _ in range(self.kmeans_steps):
            centroids = kmeans_step((lax.stop_gradient(q), lax.stop_gradient(k)), centroids)
        return centroids

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> Buckets:
        """The routing partition of this call's queries and keys; each batch row runs its own k-means steps, so a
        row's routing never depends on the other rows (a batch split over devices gives the same result)."""
        def one(q_row, k_row):
            q_row, k_row = q_row[None], k_row[None]
            buckets = routing_buckets(q_row, k_row, self.centroids(q_row, k_row), balanced=self.balanced)
            return buckets.q_ids[0], buckets.kv_ids[0]

        q_ids, kv_ids = jax.vmap(one)(q, k)
        C = self.num_clusters or math.isqrt(k.shape[1] - 1) + 1
        return Buckets(q_ids, kv_ids, C)


__all__ = ["PAPER", "Routing", "balanced_windows", "init_centroids", "kmeans_statistics", "kmeans_step",
           "nearest_centroid", "normalize", "routing_attention", "routing_buckets", "similarities"]
