"""kMaX-DeepLab's k-means cross-attention as Flax NNX modules (functional core: ``attnjax.vision.kmeans_attention``).

``KMaXMaskHead`` computes the cluster-pixel logits ``Q^c (K^p)ᵀ`` (kMaX-DeepLab's mask logits, supervised by the
mask loss at every decoder layer); ``KMeansCrossAttention`` assigns every pixel to the cluster of its largest
logit and adds each cluster's summed pixel values to its center. They are two modules because the assignment is
an argmax: the logits reach the updated centers with zero gradient, so the projections that make them are
trained only through the mask prediction. The official code splits the layer the same way (google-research/
deeplab2, ``DualPathTransformerLayer.kmeans_assignment_step`` calls the auxiliary mask predictor, then takes the
argmax under ``tf.stop_gradient``).

Example (one k-means cross-attention step of a kMaX decoder layer)::

    head = KMaXMaskHead(pixel_dim=256, center_dim=256, rngs=nnx.Rngs(0))
    xattn = KMeansCrossAttention(pixel_dim=256, center_dim=256, rngs=nnx.Rngs(1))
    logits = head(pixels, centers)                  # [B, N, K]: deep-supervised mask logits
    centers = xattn(pixels, centers, logits)        # pixels [B, N, 256], centers [B, K, 256]

The kMaX decoder layer follows the k-means cross-attention with self-attention among the centers and an FFN
(``attnjax.nn.MultiHeadAttention`` and an MLP); those are not repeated here.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_input
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.kmeans_attention import kmeans_update

PAPER = "Yu et al. 2022 (kMaX-DeepLab: k-means Mask Transformer, ECCV)"


def check_pixels_and_centers(pixels: jax.Array, centers: jax.Array, pixel_dim: int, center_dim: int) -> None:
    """``TypeError``/``ValueError`` naming the argument unless ``pixels [B, N, Cp]`` and ``centers [B, K, D]`` fit."""
    check_input("pixels", pixels, pixel_dim)
    check_input("centers", centers, center_dim)
    if centers.shape[0] != pixels.shape[0]:
        raise ValueError(f"centers must have the batch of pixels ({pixels.shape[0]}), got {list(centers.shape)}")


class KMaXMaskHead(nnx.Module):
    """kMaX-DeepLab's cluster-pixel logits: ``S = normalize(P W_p + b_p) (C W_c)ᵀ`` (Yu et al. 2022, sec. 3.2).

    ``S[b, n, k]`` is pixel ``n``'s affinity to cluster ``k``: its argmax over ``k`` is the k-means assignment
    (``Q^c (K^p)ᵀ`` of the k-means cross-attention, transposed) and the same logits are the mask prediction. As
    the official predictor (deeplab2 ``MaXDeepLab`` head; bytedance/kmax-deeplab ``kMaXPredictor``) the pixel
    embedding is l2-normalized and the cluster embedding is not. Simplified here: the pixel head is one linear
    layer (the official one is a depthwise 5×5 convolution, two 1×1 convolutions and BatchNorms), and the
    BatchNorm on the logits is left out (a positive affine map of all logits, which keeps every argmax).

    Parameters: ``Cp·E + E`` (pixel embedding) ``+ D·E`` (cluster embedding).

    Args:
      pixel_dim: ``Cp``, the pixel features' channels; center_dim: ``D``, the cluster centers' channels.
      embed_dim: ``E``, the mask-embedding width (128 in the official code).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the two layers (flax's ``nnx.Linear`` defaults).
    """

    def __init__(self, pixel_dim: int, center_dim: int, *, embed_dim: int = 128, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(pixel_dim=pixel_dim, center_dim=center_dim, embed_dim=embed_dim)
        self.pixel_dim, self.center_dim = pixel_dim, center_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pixel_embedding = nnx.Linear(pixel_dim, embed_dim, use_bias=True, **common)
        self.center_embedding = nnx.Linear(center_dim, embed_dim, use_bias=False, **common)

    def __call__(self, pixels: jax.Array, centers: jax.Array) -> jax.Array:
        """``pixels [B, N, Cp], centers [B, K, D] -> float32 logits [B, N, K]``."""
        check_pixels_and_centers(pixels, centers, self.pixel_dim, self.center_dim)
        p = self.pixel_embedding(pixels).astype(jnp.float32)
        p = p * jax.lax.rsqrt(jnp.sum(p * p, axis=-1, keepdims=True) + 1e-12)
        c = self.center_embedding(centers).astype(jnp.float32)
        return jnp.einsum("bne,bke->bnk", p, c, precision=jax.lax.Precision.HIGHEST)


class KMeansCrossAttention(nnx.Module):
    """k-means cross-attention: ``Ĉ = C + W_o LN(A (P W_v))``, ``A = one_hot(argmax_k S)`` (Yu et al. 2022, sec. 3.2).

    Each pixel goes to the cluster of its largest logit ``S[b, n, ·]`` (``KMaXMaskHead``), each cluster sums the
    values ``P W_v`` of its pixels (no division by the cluster size, as in the paper's update), and the sum is
    normalized, projected back to the centers' width and added to them. The official code normalizes the sum
    with a BatchNorm and projects it with a 1×1 convolution followed by a zero-initialized BatchNorm; here a
    LayerNorm over the channels normalizes it (some normalization is needed: the sum grows with the cluster's
    size) and the projection is a plain linear layer. Gradients reach ``W_v``, the LayerNorm, ``W_o``, the
    pixels (through the values) and the centers (through the residual); the logits get none.

    Parameters: ``Cp·Dv`` (``W_v``) ``+ 2·Dv`` (LayerNorm) ``+ Dv·D`` (``W_o``).

    Args:
      pixel_dim: ``Cp``; center_dim: ``D``.
      value_dim: ``Dv``, the value width (default ``D``; the official code uses ``2 × 128 = 256`` with ``D = 256``).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, pixel_dim: int, center_dim: int, *, value_dim: Optional[int] = None,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        value_dim = center_dim if value_dim is None else value_dim
        check_positive(pixel_dim=pixel_dim, center_dim=center_dim, value_dim=value_dim)
        self.pixel_dim, self.center_dim = pixel_dim, center_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.value = nnx.Linear(pixel_dim, value_dim, use_bias=False, **common)
        self.norm = nnx.LayerNorm(value_dim, **common)
        self.out = nnx.Linear(value_dim, center_dim, use_bias=False, **common)

    def __call__(self, pixels: jax.Array, centers: jax.Array, logits: jax.Array) -> jax.Array:
        """``pixels [B, N, Cp], centers [B, K, D], logits [B, N, K] -> [B, K, D]``."""
        check_pixels_and_centers(pixels, centers, self.pixel_dim, self.center_dim)
        B, N, _ = pixels.shape
        K = centers.shape[1]
        if getattr(logits, "shape", None) != (B, N, K):
            raise ValueError(f"logits must have shape [batch, pixels, clusters] = {[B, N, K]}, "
                             f"got {list(getattr(logits, 'shape', []))}")
        assignment = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, :, None]   # [B, N, 1]
        update = kmeans_update(assignment, self.value(pixels)[:, :, None, :], K)[:, :, 0]
        return centers + self.out(self.norm(update)).astype(centers.dtype)


def kmax_example(key: jax.Array) -> tuple:
    """Pixels ``[2, 30, 16]`` (a 5×6 map), centers ``[2, 4, 8]`` and logits ``[2, 30, 4]`` that use every cluster."""
    kp, kc, kl = jax.random.split(key, 3)
    logits = jax.random.normal(kl, (2, 30, 4)) + 4.0 * jax.nn.one_hot(jnp.arange(30) % 4, 4)
    return jax.random.normal(kp, (2, 30, 16)), jax.random.normal(kc, (2, 4, 8)), logits


def head_example(key: jax.Array) -> tuple:
    """Pixels ``[2, 30, 16]`` and centers ``[2, 4, 8]``."""
    kp, kc = jax.random.split(key)
    return jax.random.normal(kp, (2, 30, 16)), jax.random.normal(kc, (2, 4, 8))


register_module(ModuleSpec("kmax_mask_head", KMaXMaskHead, dict(pixel_dim=16, center_dim=8, embed_dim=8),
                           head_example, kind="other", paper=PAPER))
register_module(ModuleSpec("kmeans_cross_attention", KMeansCrossAttention, dict(pixel_dim=16, center_dim=8),
                           kmax_example, kind="other", paper=PAPER))
