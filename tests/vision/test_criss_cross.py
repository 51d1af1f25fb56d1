"""Criss-cross attention (CCNet sec. 3.2) against a dense masked softmax over all pixels, the mask built here
from coordinates: forward and gradients, non-square grids, single rows/columns, bf16, jit, memory, errors."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.criss_cross import (criss_cross_attention, criss_cross_attention_reference, criss_cross_mask,
                                        recurrent_criss_cross)
from tests.helpers import assert_close, assert_grads_close


def cross_mask(H, W):
    """``[T, T]`` True where the key shares the query's row or column, by explicit loops over coordinates."""
    mask = np.zeros((H * W, H * W), bool)
    for i in range(H):
        for j in range(W):
            for i2 in range(H):
                for j2 in range(W):
                    mask[i * W + j, i2 * W + j2] = i == i2 or j == j2
    return mask


def dense_reference(q, k, v, scale=None):
    """Softmax over all ``H·W`` keys with the criss-cross mask, float32, highest precision."""
    B, H, W, heads, D = q.shape
    scale = 1 / np.sqrt(D) if scale is None else scale
    qf, kf, vf = (a.astype(jnp.float32).reshape(B, H * W, heads, -1) for a in (q, k, v))
    logits = scale * jnp.einsum("bthd,bshd->bhts", qf, kf, precision="highest")
    logits = jnp.where(cross_mask(H, W), logits, -jnp.inf)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), vf, precision="highest")
    return out.reshape(B, H, W, heads, -1)


def qkv(shape=(2, 5, 7), heads=2, D=4, Dv=3, dtype=jnp.float32, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(spread * rng.standard_normal((*shape, heads, D)), dtype) for _ in range(2))
    return q, k, jnp.asarray(rng.standard_normal((*shape, heads, Dv)), dtype)


def test_mask_has_h_plus_w_minus_one_keys_per_pixel():
    mask = criss_cross_mask(5, 7)
    np.testing.assert_array_equal(mask, cross_mask(5, 7))
    assert np.all(mask.sum(axis=1) == 5 + 7 - 1)


def test_fast_path_and_reference_equal_the_dense_softmax_forward_and_gradients():
    """A 5x7 grid (non-square), two heads, Dv != D; logits of spread 3 so the softmax is far from uniform."""
    q, k, v = qkv(spread=3.0)
    for scale in (None, 1.0):
        expected = dense_reference(q, k, v, scale)
        fast = jax.jit(functools.partial(criss_cross_attention, scale=scale))
        ref = jax.jit(functools.partial(criss_cross_attention_reference, scale=scale))
        assert_close(fast(q, k, v), expected, rtol=1e-5, name=f"criss_cross_attention, scale {scale}")
        assert_close(ref(q, k, v), expected, rtol=1e-5, name=f"criss_cross_attention_reference, scale {scale}")
    assert_grads_close(criss_cross_attention, dense_reference, (q, k, v), argnums=(0, 1, 2), names=["q", "k", "v"])


@pytest.mark.parametrize("shape", [(1, 1, 6), (1, 4, 1)])
def test_single_row_or_column_is_row_or_column_attention(shape):
    """H = 1: the column holds only the pixel itself (masked, counted in the row), no NaN; W = 1 likewise."""
    q, k, v = qkv(shape, heads=1)
    out = jax.jit(criss_cross_attention)(q, k, v)
    assert_close(out, dense_reference(q, k, v), rtol=1e-5, name="grid " + "x".join(map(str, shape[1:])))
    g = jax.jit(jax.grad(lambda q: jnp.sum(criss_cross_attention(q, k, v) ** 2)))(q)
    assert np.all(np.isfinite(np.asarray(g)))


def test_own_position_is_counted_once():
    """All logits equal (q = 0): each of the H + W − 1 criss-cross pixels gets weight 1 / (H + W − 1)."""
    q, k, v = qkv((1, 5, 7), heads=1, D=4, Dv=1)
    out = jax.jit(criss_cross_attention)(jnp.zeros_like(q), k, v)
    vv = np.asarray(v)[0, :, :, 0, 0]
    expected = (vv.sum(axis=1)[:, None] + vv.sum(axis=0)[None, :] - vv) / (5 + 7 - 1)
    np.testing.assert_allclose(np.asarray(out)[0, :, :, 0, 0], expected, rtol=1e-5, atol=1e-6)


def test_bf16_is_finite_and_close_to_float32():
    q, k, v = qkv(spread=3.0)
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = jax.jit(criss_cross_attention)(qb, kb, vb)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, dense_reference(qb, kb, vb), rtol=2e-2, name="bf16")
    g = jax.jit(jax.grad(lambda q: jnp.sum(criss_cross_attention(q, kb, vb).astype(jnp.float32))))(qb)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_fast_path_never_forms_a_pixel_by_pixel_array():
    """Traced only (no compile): no intermediate of the forward or backward pass is larger than the
    ``B·heads·H·W·(H + W)`` row and column logits, far below the dense ``B·heads·(H·W)²``."""
    B, H, W, heads = 1, 12, 13, 1
    q, k, v = qkv((B, H, W), heads=heads, D=4, Dv=4)
    jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: jnp.sum(criss_cross_attention(q, k, v)), argnums=(0, 1, 2)))(
        q, k, v)

    def sizes(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                yield int(np.prod(var.aval.shape))
        for sub in jax.extend.core.subjaxprs(jx):
            yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) <= B * heads * H * W * (H + W) < B * heads * (H * W) ** 2


def test_bad_inputs_name_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\], "
                                         r"got a float32\[5, 7, 2, 4\] array"):
        criss_cross_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"q, k, v must share \[batch, height, width, heads\]"):
        criss_cross_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match=r"q, k, v must share .*q \[2, 5, 7, 2, 4\], k \[2, 5, 7, 2, 3\]"):
        criss_cross_attention(q, v, v)
    with pytest.raises(TypeError, match="v must be a floating-point array"):
        criss_cross_attention_reference(q, k, v.astype(jnp.int32))
    with pytest.raises(ValueError, match="scale must be a scalar"):
        criss_cross_attention(q, k, v, scale=jnp.ones(2))
    x = jnp.ones((1, 5, 7, 16))
    w, wv = jnp.ones((16, 2)), jnp.ones((16, 16))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, channels\]"):
        recurrent_criss_cross(x[0], w, None, w, None, wv, None, 0.5)
    with pytest.raises(ValueError, match=r"wq, wk must have shape \[C, C'\] and wv \[C, C\] with C = 16"):
        recurrent_criss_cross(x, w, None, w[:8], None, wv, None, 0.5)
    with pytest.raises(ValueError, match="recurrence must be a positive int, got 0"):
        recurrent_criss_cross(x, w, None, w, None, wv, None, 0.5, recurrence=0)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int dividing C' = 2 and C = 16, got 4"):
        recurrent_criss_cross(x, w, None, w, None, wv, None, 0.5, num_heads=4)
