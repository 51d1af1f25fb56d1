"""StripSelfAttention against a plain reference of S2AFormer's SSA (depth-wise reduction of K/V, compressed Q/K)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.strip import StripSelfAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def ssa_reference(p, x, heads, dk, r):
    """x_s = DWConv_r(x); Q = x Wq + bq; K = x_s Wk; V = x_s Wv + bv; y = concat softmax(Q K / sqrt(dk)) V Wo + bo."""
    B, H, W, C = x.shape
    xs = jax.lax.conv_general_dilated(x, p["reduce"]["kernel"], window_strides=r, padding="VALID",
                                      feature_group_count=C, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest") + p["reduce"]["bias"]
    q = jnp.einsum("bhwc,cd->bhwd", x, p["query"]["kernel"], precision="highest") + p["query"]["bias"]
    k = jnp.einsum("bhwc,cd->bhwd", xs, p["key"]["kernel"], precision="highest")
    v = jnp.einsum("bhwc,cd->bhwd", xs, p["value"]["kernel"], precision="highest") + p["value"]["bias"]
    q, k, v = q.reshape(B, H * W, heads, dk), k.reshape(B, -1, heads, dk), v.reshape(B, -1, heads, C // heads)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(dk)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v, precision="highest").reshape(B, H, W, C)
    return jnp.einsum("bhwc,cd->bhwd", o, p["out"]["kernel"], precision="highest") + p["out"]["bias"]


def test_strip_self_attention_equals_the_formula_forward_and_gradients():
    """A 5x7 map reduced by 2x3 (to 2x2, the last row and column feeding no key), d_k = 8 / 2."""
    model = StripSelfAttention(16, num_heads=2, reduction=(2, 3), qk_reduction=2, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: ssa_reference(p, x, 2, 4, (2, 3)), image(), rtol=1e-4)


@pytest.mark.parametrize("C, heads, r, qk_reduction", [(16, 2, 2, 2), (64, 4, 4, 1)])
def test_parameter_count(C, heads, r, qk_reduction):
    dk = C // heads // qk_reduction
    expected = (r * r * C + C) + (2 * C * heads * dk + heads * dk) + 2 * (C * C + C)
    assert parameter_count(nnx.eval_shape(lambda: StripSelfAttention(C, num_heads=heads, reduction=r,
                                                                     qk_reduction=qk_reduction,
                                                                     rngs=nnx.Rngs(0)))) == expected


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = StripSelfAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\)"):
        model(image((2, 5, 7, 8)))
    with pytest.raises(ValueError, match=r"channels \(16\) must be a multiple of num_heads \(3\)"):
        StripSelfAttention(16, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="qk_reduction \\(3\\) must divide the head dimension"):
        StripSelfAttention(16, num_heads=2, qk_reduction=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reduction must be a positive int or a pair"):
        StripSelfAttention(16, reduction=0, rngs=nnx.Rngs(0))
