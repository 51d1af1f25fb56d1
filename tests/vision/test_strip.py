"""S2AFormer's strip self-attention core against NumPy loops and a softmax written in the test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.strip import reduced_grid, spatial_reduction, strip_attention, strip_attention_reference
from tests.helpers import assert_close, assert_grads_close


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@pytest.mark.parametrize("hw, r", [((5, 7), (2, 2)), ((6, 6), (3, 2))])
def test_spatial_reduction_is_a_strided_depthwise_sum(hw, r):
    x, kernel, bias = normal((2, *hw, 3), 0), normal((*r, 1, 3), 1), normal((3,), 2)
    y = np.asarray(jax.jit(spatial_reduction)(x, kernel, bias))
    h, w = hw[0] // r[0], hw[1] // r[1]
    assert y.shape == (2, h, w, 3) and reduced_grid(*hw, r) == (h, w)
    xn, kn = np.asarray(x), np.asarray(kernel)[:, :, 0]
    for i in range(h):
        for j in range(w):
            patch = xn[:, i * r[0]:(i + 1) * r[0], j * r[1]:(j + 1) * r[1]]
            np.testing.assert_allclose(y[:, i, j], np.einsum("brsc,rsc->bc", patch, kn) + np.asarray(bias),
                                       rtol=1e-5, atol=1e-5)


def softmax_over_reduced_keys(q, k, v):
    """Every pixel attends to every reduced token: softmax(q k / sqrt(Dk)) v per head, with NumPy-free jnp ops."""
    B, H, W, heads, D = q.shape
    qf = q.reshape(B, H * W, heads, D)
    kf, vf = k.reshape(B, -1, heads, D), v.reshape(B, -1, heads, v.shape[-1])
    logits = jnp.einsum("bthd,bshd->bhts", qf, kf, precision="highest") / np.sqrt(D)
    p = jnp.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return jnp.einsum("bhts,bshd->bthd", p, vf, precision="highest").reshape(B, H, W, heads, -1)


def test_strip_attention_equals_a_softmax_over_the_reduced_grid_forward_and_gradients():
    """5x7 queries, 2x3 reduced keys, Dk=4 != Dv=6."""
    q, k, v = normal((2, 5, 7, 2, 4), 0), normal((2, 2, 3, 2, 4), 1), normal((2, 2, 3, 2, 6), 2)
    out = jax.jit(strip_attention)(q, k, v)
    assert out.shape == (2, 5, 7, 2, 6)
    expected = jax.jit(softmax_over_reduced_keys)(q, k, v)
    assert_close(out, expected, rtol=1e-5, name="strip attention")
    assert_close(jax.jit(strip_attention_reference)(q, k, v), expected, rtol=1e-5, name="reference")
    assert_grads_close(strip_attention, softmax_over_reduced_keys, (q, k, v), argnums=(0, 1, 2), rtol=1e-5,
                       names=["q", "k", "v"])
    scaled = jax.jit(lambda *a: (strip_attention(*a, scale=0.3), strip_attention_reference(*a, scale=0.3)))(q, k, v)
    assert_close(*scaled, rtol=1e-5, name="scale")


def test_bf16_is_finite():
    q, k, v = (normal(s, i, jnp.bfloat16) * 10 for i, s in enumerate([(1, 5, 7, 2, 4), (1, 2, 3, 2, 4),
                                                                       (1, 2, 3, 2, 4)]))
    out = jax.jit(strip_attention)(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    x = jnp.ones((1, 5, 7, 3))
    with pytest.raises(ValueError, match=r"kernel must have shape \[rh, rw, 1, 3\]"):
        spatial_reduction(x, jnp.ones((2, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"bias must have shape \[3\]"):
        spatial_reduction(x, jnp.ones((2, 2, 1, 3)), jnp.ones((4,)))
    with pytest.raises(ValueError, match="must be at least as large as the 6x2 reduction"):
        spatial_reduction(x, jnp.ones((6, 2, 1, 3)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, channels\]"):
        spatial_reduction(x[0], jnp.ones((2, 2, 1, 3)))
    q, k = jnp.ones((1, 5, 7, 2, 4)), jnp.ones((1, 2, 3, 2, 4))
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\]"):
        strip_attention(q[0], k, k)
    with pytest.raises(ValueError, match=r"k \[1, 2, 3, 2, 4\], v \[1, 2, 2, 2, 4\]"):
        strip_attention(q, k, k[:, :, :2])
    with pytest.raises(ValueError, match="keys and values on the reduced grid"):
        strip_attention_reference(q, jnp.ones((1, 2, 3, 2, 3)), k)
