"""CCA and RCCA modules (CCNet sec. 3.2-3.3) against a plain reference: 1×1 convolutions, a dense softmax over
each pixel's row and column (mask from coordinates), the γ-scaled residual; recurrence reaches every pixel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.criss_cross import CrissCrossAttention, RecurrentCrissCrossAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count


call = nnx.jit(lambda model, x: model(x))


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def cca_reference(p, x, num_heads=1):
    """One criss-cross attention: ``γ·Σ_{u' in row or column of u} softmax(Q_u·K_u') V_u' + x_u``, no scaling."""
    B, H, W, C = x.shape
    i, j = np.divmod(np.arange(H * W), W)
    mask = (i[:, None] == i[None, :]) | (j[:, None] == j[None, :])
    a = x.reshape(B, H * W, C)

    def conv(layer):
        y = jnp.einsum("btc,cd->btd", a, layer["kernel"][0, 0], precision="highest")
        y = y + layer["bias"] if "bias" in layer else y
        return y.reshape(B, H * W, num_heads, -1)

    q, k, v = conv(p["query"]), conv(p["key"]), conv(p["value"])
    logits = jnp.where(mask, jnp.einsum("bthd,bshd->bhts", q, k, precision="highest"), -jnp.inf)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v, precision="highest")
    return p["gamma"] * out.reshape(B, H, W, C) + x


@pytest.mark.parametrize("num_heads, reduction", [(1, 8), (2, 4)])
def test_cca_equals_the_paper_formula_forward_and_gradients(num_heads, reduction):
    model = CrissCrossAttention(16, reduction=reduction, num_heads=num_heads, gamma_init=0.7, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: cca_reference(p, x, num_heads), image())


def test_rcca_is_the_shared_cca_applied_twice():
    model = RecurrentCrissCrossAttention(16, gamma_init=0.7, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: cca_reference(p["cca"], cca_reference(p["cca"], x)),
                                   image(seed=1))


def pixel_dependence(model, x, pixel):
    """``‖∂ y[0, pixel] / ∂ x[0, h, w]‖`` for every input pixel ``(h, w)``: ``[H, W]``."""
    g = jax.jit(jax.grad(lambda x: jnp.sum(model(x)[0, pixel[0], pixel[1]])))(x)
    return np.linalg.norm(np.asarray(g)[0], axis=-1)


def test_two_loops_reach_every_pixel_one_loop_only_the_row_and_column():
    """Sec. 3.3: after R = 1 a pixel depends only on its row and column; after R = 2 on the whole image."""
    x, pixel = image((1, 5, 7, 16), seed=2), (1, 4)
    one = pixel_dependence(RecurrentCrissCrossAttention(16, recurrence=1, gamma_init=0.7, rngs=nnx.Rngs(0)), x, pixel)
    two = pixel_dependence(RecurrentCrissCrossAttention(16, recurrence=2, gamma_init=0.7, rngs=nnx.Rngs(0)), x, pixel)
    cross = np.zeros((5, 7), bool)
    cross[pixel[0], :] = cross[:, pixel[1]] = True
    assert np.all(one[cross] > 1e-6) and np.all(one[~cross] == 0)
    assert np.all(two > 1e-6)


def test_parameter_count_and_the_paper_initialization():
    C, Cr = 16, 2                                       # C' = C / 8
    expected = 2 * C * Cr + C * C + Cr + C + 1          # Q, K, V weights; Q, V biases; γ
    assert parameter_count(CrissCrossAttention(C, rngs=nnx.Rngs(0))) == expected
    rcca = RecurrentCrissCrossAttention(C, rngs=nnx.Rngs(0))
    assert parameter_count(rcca) == expected            # the loops share one module's weights
    x = image((1, 4, 5, C))
    assert float(rcca.cca.gamma[...]) == 0.0            # γ = 0: the module starts as the identity
    np.testing.assert_array_equal(np.asarray(call(rcca, x)), np.asarray(x))


def test_bf16_is_finite():
    model = RecurrentCrissCrossAttention(16, gamma_init=0.7, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = call(model, 30 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    cca = CrissCrossAttention(16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError,
                       match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 16, 5, 7\]"):
        cca(image((2, 16, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        cca(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide the query/key channels"):
        CrissCrossAttention(16, reduction=2, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="recurrence must be a positive int, got 0"):
        RecurrentCrissCrossAttention(16, recurrence=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reduction must be a positive int, got 0"):
        CrissCrossAttention(16, reduction=0, rngs=nnx.Rngs(0))
