"""k-means cross-attention (kMaX-DeepLab, Yu et al. 2022, sec. 3.2) against a NumPy loop: the argmax assignment
and the unnormalized center update, forward and gradients, on a 5×7 pixel grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.kmeans_attention import (kmeans_assignment, kmeans_cross_attention,
                                             kmeans_cross_attention_reference, kmeans_update)
from tests.helpers import assert_close, assert_grads_close

B, H, W, HEADS, K, D, DV = 2, 5, 7, 2, 4, 8, 6


def inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = ((B, K, HEADS, D), (B, H, W, HEADS, D), (B, H, W, HEADS, DV), (B, K, HEADS, DV))
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)


def numpy_assignment(q, k):
    """The cluster of every pixel by explicit loops: argmax_c Σ_d q[b, c, h, d] k[b, n, h, d] (float64)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64).reshape(B, H * W, HEADS, -1)
    out = np.zeros((B, H * W, HEADS), np.int64)
    for b in range(B):
        for n in range(H * W):
            for h in range(HEADS):
                scores = [float(np.dot(q[b, c, h], k[b, n, h])) for c in range(K)]
                out[b, n, h] = int(np.argmax(scores))
    return out


def numpy_kmeans(q, k, v, centers):
    """C + A V by loops: each pixel's value added to the center of its cluster."""
    a = numpy_assignment(q, k)
    v = np.asarray(v, np.float64).reshape(B, H * W, HEADS, -1)
    out = np.array(centers, np.float64)
    for b in range(B):
        for n in range(H * W):
            for h in range(HEADS):
                out[b, a[b, n, h], h] += v[b, n, h]
    return out


def test_assignment_equals_a_brute_force_argmax_over_clusters():
    q, k, _, _ = inputs()
    got = jax.jit(kmeans_assignment)(q, k)
    assert got.dtype == jnp.int32 and got.shape == (B, H * W, HEADS)
    np.testing.assert_array_equal(np.asarray(got), numpy_assignment(q, k))
    flat = k.reshape(B, H * W, HEADS, D)
    np.testing.assert_array_equal(np.asarray(kmeans_assignment(q, flat)), np.asarray(got))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_forward_equals_the_numpy_center_update(implementation):
    q, k, v, c = inputs(1)
    expected = numpy_kmeans(q, k, v, c)
    fn = jax.jit(lambda *a: kmeans_cross_attention(*a[:3], centers=a[3], implementation=implementation))
    assert_close(fn(q, k, v, c), expected, name=implementation)
    assert_close(kmeans_cross_attention_reference(q, k, v, centers=c), expected, name="reference op")
    update = jax.jit(lambda *a: kmeans_cross_attention(*a, implementation=implementation))(q, k, v)
    assert_close(update, expected - np.asarray(c), name="update without centers")


def test_update_is_a_sum_not_a_mean_and_empty_clusters_get_zero():
    """Every pixel in cluster 0: cluster 0 gets the sum of all values, the other clusters nothing."""
    v = jnp.arange(B * 6 * 1 * 3, dtype=jnp.float32).reshape(B, 6, 1, 3)
    assignment = jnp.zeros((B, 6, 1), jnp.int32)
    for implementation in ("xla", "reference"):
        out = np.asarray(jax.jit(lambda a, v: kmeans_update(a, v, 3, implementation=implementation))(assignment, v))
        np.testing.assert_allclose(out[:, 0, 0], np.asarray(v).sum(axis=1)[:, 0])
        np.testing.assert_array_equal(out[:, 1:], 0.0)


def test_gradients_flow_to_values_and_centers_only():
    """The argmax is piecewise constant: q and k get zero gradient; v and centers get those of C + A V with the
    assignment held fixed (built here from the NumPy loop)."""
    q, k, v, c = inputs(2)
    onehot = jnp.asarray(np.eye(K)[numpy_assignment(q, k)], jnp.float32)  # [B, N, heads, K]

    def fixed(q, k, v, c):
        return c + jnp.einsum("bnhk,bnhd->bkhd", onehot, v.reshape(B, H * W, HEADS, DV),
                              precision=jax.lax.Precision.HIGHEST)

    for implementation in ("xla", "reference"):
        def op(q, k, v, c):
            return kmeans_cross_attention(q, k, v, centers=c, implementation=implementation)

        assert_grads_close(op, fixed, (q, k, v, c), argnums=(2, 3), names=["v", "centers"])
        gq, gk = jax.jit(jax.grad(lambda q, k: jnp.sum(op(q, k, v, c) ** 2), argnums=(0, 1)))(q, k)
        assert not np.any(np.asarray(gq)) and not np.any(np.asarray(gk))


def test_bf16_is_finite_and_keeps_the_dtype():
    q, k, v, c = inputs(3, jnp.bfloat16)
    out = jax.jit(lambda *a: kmeans_cross_attention(*a[:3], centers=a[3]))(q, k, v, c)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, numpy_kmeans(q, k, v, c), rtol=2e-2, name="bf16")


def test_bad_inputs_name_the_argument():
    q, k, v, c = inputs()
    with pytest.raises(ValueError, match=r"q must have shape \[batch, clusters, heads, dim\]"):
        kmeans_cross_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k must have shape \[2, pixels, 2, 8\]"):
        kmeans_cross_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v must share k's"):
        kmeans_cross_attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="centers must have shape"):
        kmeans_cross_attention(q, k, v, centers=c[:, :3])
    with pytest.raises(TypeError, match="must share one dtype"):
        kmeans_cross_attention(q, k, v.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="assignment must be an integer array"):
        kmeans_update(jnp.zeros((B, 35, HEADS)), v, K)
    with pytest.raises(ValueError, match="num_clusters must be a positive int"):
        kmeans_update(jnp.zeros((B, 35, HEADS), jnp.int32), v, 0)
    with pytest.raises(NotImplementedError, match="no 'pallas' implementation"):
        kmeans_cross_attention(q, k, v, implementation="pallas")
    with pytest.raises(ValueError, match="unknown implementation"):
        kmeans_cross_attention(q, k, v, implementation="fast")
