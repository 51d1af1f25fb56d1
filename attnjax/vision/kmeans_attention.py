"""k-means cross-attention: cluster centers gather the pixels assigned to them by a cluster-wise argmax.

kMaX-DeepLab (Yu et al., "k-means Mask Transformer", ECCV 2022, sec. 3.2) reads the cross-attention of a mask
transformer as a clustering step. With ``K`` object queries (cluster centers) ``C`` and ``N = H·W`` pixel
features, standard cross-attention normalizes each query's logits over the pixels,

    Ĉ = C + softmax_pixels(Q^c (K^p)ᵀ) V^p,

while k-means cross-attention takes, for every pixel, the argmax over the clusters (the k-means assignment
step, a hard one-hot assignment) and then sums the values of each cluster's pixels (the center-update step):

    A = one_hot(argmax_clusters(Q^c (K^p)ᵀ))   [K, N], one 1 per pixel column,
    Ĉ = C + A V^p.

The update is the plain sum over the cluster's pixels, not their mean, as in the official code (google-research/
deeplab2, ``model/layers/dual_path_transformer.py``, ``kmeans_update_memory_step``: ``einsum('blm,bld->bmd')`` of
the one-hot and the values, then a BatchNorm); there is no division by the cluster size.

Gradients. The argmax is piecewise constant: the one-hot assignment has zero derivative, and the official code
wraps it in ``tf.stop_gradient``. Gradients flow to ``V^p`` (through the sum) and to ``C`` (through the
residual) only; ``Q^c`` and ``K^p`` get none from ``Ĉ``. kMaX-DeepLab trains them through the mask prediction,
whose logits are the same ``Q^c (K^p)ᵀ`` and which is supervised at every decoder layer (deep supervision).

* ``kmeans_assignment``: the argmax, ``int32 [B, N, heads]``.
* ``kmeans_update``: ``Σ_{n: a(n)=k} v_n`` for every cluster ``k``, by a scatter-add (``"xla"``) or a one-hot
  matmul (``"reference"``).
* ``kmeans_cross_attention`` / ``kmeans_cross_attention_reference``: the whole step.

Layout: cluster queries ``q [B, K, heads, D]``, pixel keys ``k [B, N, heads, D]`` or image-like
``[B, H, W, heads, D]`` (flattened row-major, ``n = y·W + x``), pixel values ``v`` like ``k`` with its own ``Dv``,
centers ``[B, K, heads, Dv]``. The paper uses a single head (``heads = 1``); with more heads each head assigns
its own pixels. A positive logit scale cannot change an argmax, so there is no ``scale`` argument.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.checks import describe
from attnjax.dispatch import dispatch


def flatten_pixels(name: str, x: jax.Array) -> jax.Array:
    """``[B, N, heads, D]`` from ``[B, N, heads, D]`` or image-like ``[B, H, W, heads, D]`` (row-major)."""
    ndim = getattr(x, "ndim", None)
    if ndim == 5:
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])
    if ndim != 4:
        raise ValueError(f"{name} must have shape [batch, pixels, heads, dim] or [batch, height, width, heads, dim], "
                         f"got {describe(x)}")
    return x


def check_kmeans_inputs(q: jax.Array, k: jax.Array, v: jax.Array,
                        centers: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(k, v)`` flattened to ``[B, N, heads, ·]``, after checking shapes and dtypes; ValueError/TypeError naming
    the argument otherwise."""
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"q must have shape [batch, clusters, heads, dim], got {describe(q)}")
    k, v = flatten_pixels("k", k), flatten_pixels("v", v)
    arrays = (("q", q), ("k", k), ("v", v)) + ((("centers", centers),) if centers is not None else ())
    for name, x in arrays:
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {describe(x)}")
    if len({x.dtype for _, x in arrays}) != 1:
        raise TypeError(f"q, k, v (and centers) must share one dtype, got {[str(x.dtype) for _, x in arrays]}")
    B, K, heads, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (heads, D):
        raise ValueError(f"k must have shape [{B}, pixels, {heads}, {D}] for q of shape {list(q.shape)}, "
                         f"got {list(k.shape)} (after flattening the pixels)")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must share k's [batch, pixels, heads] = {list(k.shape[:3])}, got {list(v.shape)}")
    if centers is not None and centers.shape != (B, K, heads, v.shape[3]):
        raise ValueError(f"centers must have shape [batch, clusters, heads, Dv] = {[B, K, heads, v.shape[3]]}, "
                         f"got {describe(centers)}")
    return k, v


def kmeans_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """The cluster-pixel affinities ``Q^c (K^p)ᵀ`` as ``float32 [B, N, heads, K]`` (pixels first, clusters last)."""
    return jnp.einsum("bkhd,bnhd->bnhk", q, flatten_pixels("k", k), preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)


def kmeans_assignment(q: jax.Array, k: jax.Array) -> jax.Array:
    """The k-means assignment step: each pixel's cluster ``argmax_k q_k·k_n`` (kMaX-DeepLab sec. 3.2).

    Args:
      q: ``[B, K, heads, D]`` cluster queries; k: ``[B, N, heads, D]`` or ``[B, H, W, heads, D]`` pixel keys.

    Returns:
      ``int32 [B, N, heads]`` in ``[0, K)``; ties go to the lowest cluster index (as ``tf.argmax``). Memory:
      the logits, ``B·N·heads·K`` floats (the mask logits kMaX-DeepLab predicts anyway), never ``[N, N]``.
    """
    return jnp.argmax(kmeans_logits(q, k), axis=-1).astype(jnp.int32)


def check_assignment(assignment: jax.Array, v: jax.Array, num_clusters: int) -> None:
    """ValueError/TypeError naming the argument unless ``assignment`` is an int ``[B, N, heads]`` matching ``v``."""
    if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters <= 0:
        raise ValueError(f"num_clusters must be a positive int, got {describe(num_clusters)}")
    if not jnp.issubdtype(getattr(assignment, "dtype", jnp.float32), jnp.integer):
        raise TypeError(f"assignment must be an integer array [batch, pixels, heads], got {describe(assignment)}")
    if assignment.shape != v.shape[:3]:
        raise ValueError(f"assignment must have shape [batch, pixels, heads] = {list(v.shape[:3])} for v of shape "
                         f"{list(v.shape)}, got {list(assignment.shape)}")


def kmeans_update_reference(assignment: jax.Array, v: jax.Array, num_clusters: int) -> jax.Array:
    """``A V``: the one-hot assignment ``A [B, heads, K, N]`` times the values (the paper's form, dense)."""
    onehot = jax.nn.one_hot(assignment, num_clusters, dtype=jnp.float32)  # [B, N, heads, K]
    out = jnp.einsum("bnhk,bnhd->bkhd", onehot, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(v.dtype)


def kmeans_update_xla(assignment: jax.Array, v: jax.Array, num_clusters: int) -> jax.Array:
    """``Σ_{n: a(n)=k} v_n`` by one scatter-add over ``B·heads·K`` segments: ``O(N·Dv)`` work, no one-hot."""
    B, N, heads, Dv = v.shape
    segment = assignment + num_clusters * (jnp.arange(B)[:, None, None] * heads + jnp.arange(heads)[None, None, :])
    out = jax.ops.segment_sum(v.astype(jnp.float32).reshape(B * N * heads, Dv), segment.reshape(-1),
                              num_segments=B * heads * num_clusters)
    return out.reshape(B, heads, num_clusters, Dv).transpose(0, 2, 1, 3).astype(v.dtype)


_UPDATE_PATHS = {"reference": kmeans_update_reference, "xla": kmeans_update_xla}


def kmeans_update(assignment: jax.Array, v: jax.Array, num_clusters: int, *,
                  implementation: str = "auto") -> jax.Array:
    """The k-means center-update step without normalization: ``U_k = Σ_{n: a(n)=k} v_n`` (kMaX-DeepLab sec. 3.2).

    Args:
      assignment: ``int [B, N, heads]``, each pixel's cluster (``kmeans_assignment``, or an argmax of any logits).
      v: ``[B, N, heads, Dv]`` or ``[B, H, W, heads, Dv]`` pixel values.
      num_clusters: ``K``.
      implementation: "xla" (a scatter-add; memory ``O(B·N·heads·Dv)``), "reference" (a one-hot ``[N, K]``
        matmul per batch and head) or "auto" (xla).

    Returns:
      ``[B, K, heads, Dv]`` in v's dtype (accumulated in float32); an empty cluster gets zeros. The gradient
      flows to ``v`` only.
    """
    v = flatten_pixels("v", v)
    check_assignment(assignment, v, num_clusters)
    return dispatch(_UPDATE_PATHS, implementation, assignment, v, num_clusters, what="k-means update")


def kmeans_cross_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                     centers: Optional[jax.Array] = None) -> jax.Array:
    """kMaX-DeepLab's k-means cross-attention written plainly (sec. 3.2): the dense logits ``Q^c (K^p)ᵀ``, a
    one-hot of their argmax over the clusters, ``Ĉ = C + A V^p``. Shapes as ``kmeans_cross_attention``."""
    k, v = check_kmeans_inputs(q, k, v, centers)
    logits = jnp.einsum("bkhd,bnhd->bhkn", q.astype(jnp.float32), k.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=2), q.shape[1], axis=2, dtype=jnp.float32)  # [B, h, K, N]
    out = jnp.einsum("bhkn,bnhd->bkhd", onehot, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if centers is not None:
        out = out + centers.astype(jnp.float32)
    return out.astype(v.dtype)


def kmeans_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, centers: Optional[jax.Array] = None,
                           implementation: str = "auto") -> jax.Array:
    """k-means cross-attention (Yu et al., kMaX-DeepLab, ECCV 2022, sec. 3.2).

    ``Ĉ = C + argmax_clusters(Q^c (K^p)ᵀ) V^p``: every pixel is assigned to the cluster whose query scores it
    highest (a hard one-hot over the ``K`` clusters, replacing the softmax over the pixels of standard
    cross-attention), and each cluster adds up the values of its pixels, without dividing by their number.

    Args:
      q: ``[B, K, heads, D]`` cluster queries ``Q^c``.
      k: ``[B, N, heads, D]`` or ``[B, H, W, heads, D]`` pixel keys ``K^p``.
      v: pixel values ``V^p``, ``[B, N, heads, Dv]`` or ``[B, H, W, heads, Dv]``.
      centers: ``[B, K, heads, Dv]``, the residual ``C``; None returns the update ``A V^p`` alone.
      implementation: "xla" (argmax, then a scatter-add of the values: memory ``B·N·heads·K`` floats of logits,
        no one-hot and never ``[N, N]``), "reference" (the dense one-hot matmul) or "auto" (xla).

    Returns:
      ``[B, K, heads, Dv]`` in the inputs' dtype. Gradients reach ``v`` and ``centers`` only (see the module
      docstring); ``q`` and ``k`` get zeros.
    """
    k, v = check_kmeans_inputs(q, k, v, centers)
    out = kmeans_update(kmeans_assignment(q, k), v, q.shape[1], implementation=implementation)
    return out if centers is None else (out.astype(jnp.float32) + centers.astype(jnp.float32)).astype(v.dtype)


__all__ = ["kmeans_logits", "kmeans_assignment", "kmeans_update", "kmeans_update_reference", "kmeans_update_xla",
           "kmeans_cross_attention", "kmeans_cross_attention_reference", "flatten_pixels"]
