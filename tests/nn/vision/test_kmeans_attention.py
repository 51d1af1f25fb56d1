"""KMaXMaskHead and KMeansCrossAttention against plain references of kMaX-DeepLab's k-means cross-attention
(Yu et al. 2022, sec. 3.2): the mask logits, the argmax assignment and the unnormalized center update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.kmeans_attention import KMaXMaskHead, KMeansCrossAttention, kmax_example
from attnjax.testing.modules import check_module_against_reference, parameter_count


def head_reference(p, pixels, centers):
    e = pixels @ p["pixel_embedding"]["kernel"] + p["pixel_embedding"]["bias"]
    e = e / jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))
    return jnp.einsum("bne,bke->bnk", e, centers @ p["center_embedding"]["kernel"],
                      precision=jax.lax.Precision.HIGHEST)


def kmeans_reference(p, pixels, centers, logits):
    """C + W_o LN(A V): A the one-hot of the argmax over clusters, the sum (not the mean) of each cluster's values."""
    a = jax.nn.one_hot(jnp.argmax(logits, axis=-1), centers.shape[1])            # [B, N, K]
    summed = jnp.einsum("bnk,bnd->bkd", a, pixels @ p["value"]["kernel"], precision=jax.lax.Precision.HIGHEST)
    mu = summed.mean(-1, keepdims=True)
    var = ((summed - mu) ** 2).mean(-1, keepdims=True)
    normed = (summed - mu) / jnp.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
    return centers + normed @ p["out"]["kernel"]


def test_mask_head_equals_the_normalized_embedding_product():
    pixels, centers, _ = kmax_example(jax.random.key(0))
    check_module_against_reference(KMaXMaskHead(16, 8, embed_dim=8, rngs=nnx.Rngs(0)), head_reference,
                                   pixels, centers)


def test_kmeans_cross_attention_equals_the_reference():
    """Forward and every gradient; the logits' gradient is zero on both sides (the argmax)."""
    pixels, centers, logits = kmax_example(jax.random.key(1))
    check_module_against_reference(KMeansCrossAttention(16, 8, value_dim=12, rngs=nnx.Rngs(0)), kmeans_reference,
                                   pixels, centers, logits)


def test_head_logits_drive_the_assignment_end_to_end():
    """The two modules composed: centers updated with the head's logits equal the reference on those logits;
    bf16 stays finite."""
    pixels, centers, _ = kmax_example(jax.random.key(2))
    head, xattn = KMaXMaskHead(16, 8, rngs=nnx.Rngs(0)), KMeansCrossAttention(16, 8, rngs=nnx.Rngs(1))
    run = nnx.jit(lambda m, *a: m(*a))
    logits = run(head, pixels, centers)
    out = run(xattn, pixels, centers, logits)
    from_params = jax.jit(kmeans_reference)(nnx.to_pure_dict(nnx.state(xattn, nnx.Param)), pixels, centers, logits)
    np.testing.assert_allclose(np.asarray(out), np.asarray(from_params), rtol=1e-5, atol=1e-5)
    low = run(xattn, *(a.astype(jnp.bfloat16) for a in (pixels, centers, logits)))
    assert low.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(low, np.float32)))


def test_parameter_counts():
    def count(cls, *args, **kwargs):
        return parameter_count(nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0))))

    assert count(KMaXMaskHead, 256, 256) == 256 * 128 + 128 + 256 * 128
    assert count(KMeansCrossAttention, 256, 128, value_dim=64) == 256 * 64 + 2 * 64 + 64 * 128
    assert count(KMeansCrossAttention, 16, 8) == 16 * 8 + 2 * 8 + 8 * 8


def test_bad_inputs_name_the_argument():
    pixels, centers, logits = kmax_example(jax.random.key(0))
    xattn = KMeansCrossAttention(16, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"pixels must have shape \[batch, seq, 16\]"):
        xattn(pixels[..., :4], centers, logits)
    with pytest.raises(ValueError, match="centers must have the batch of pixels"):
        xattn(pixels, centers[:1], logits)
    with pytest.raises(ValueError, match=r"logits must have shape \[batch, pixels, clusters\] = \[2, 30, 4\]"):
        xattn(pixels, centers, logits[..., :3])
    with pytest.raises(TypeError, match="centers must be a floating-point array"):
        KMaXMaskHead(16, 8, rngs=nnx.Rngs(0))(pixels, centers.astype(jnp.int32))
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        KMaXMaskHead(16, 8, embed_dim=0, rngs=nnx.Rngs(0))
