"""StripSelfAttention against a plain reference of S2AFormer's SSA (depth-wise reduction of K/V, compressed Q/K)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.strip import StripSelfAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def ssa_reference(p, x, heads, dk, r):
    """x_s = DWConv_r(x); Q = x Wq + bq; K = x_s Wk; V = x_s Wv + bv; y = concat softmax(Q K / sqrt(dk)) V Wo + bo."""
    B, H, W, C = x.shape
    xs = conv2d(x, p["reduce"]["kernel"], p["reduce"]["bias"], stride=r, padding="VALID", groups=C)
    q = jnp.einsum("bhwc,cd->bhwd", x, p["query"]["kernel"], precision="highest") + p["query"]["bias"]
    k = jnp.einsum("bhwc,cd->bhwd", xs, p["key"]["kernel"], precision="highest")
    v = jnp.einsum("bhwc,cd->bhwd", xs, p["value"]["kernel"], precision="highest") + p["value"]["bias"]
    q, k, v = q.reshape(B, H * W, heads, dk), k.reshape(B, -1, heads, dk), v.reshape(B, -1, heads, C // heads)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(dk)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v, precision="highest").reshape(B, H, W, C)
    return jnp.einsum("bhwc,cd->bhwd", o, p["out"]["kernel"], precision="highest") + p["out"]["bias"]


@pytest.mark.parametrize("heads, r, qk_reduction", [(2, 2, 2), (1, 3, 4)])
def test_strip_self_attention_equals_the_formula_forward_and_gradients(heads, r, qk_reduction):
    model = StripSelfAttention(16, num_heads=heads, reduction=r, qk_reduction=qk_reduction, rngs=nnx.Rngs(0))
    dk = 16 // heads // qk_reduction
    check_module_against_reference(model, lambda p, x: ssa_reference(p, x, heads, dk, r), image(), rtol=1e-4)


@pytest.mark.parametrize("C, heads, r, qk_reduction", [(16, 2, 2, 2), (64, 4, 4, 1)])
def test_parameter_count(C, heads, r, qk_reduction):
    dk = C // heads // qk_reduction
    expected = (r * r * C + C) + (2 * C * heads * dk + heads * dk) + 2 * (C * C + C)
    assert parameter_count(StripSelfAttention(C, num_heads=heads, reduction=r, qk_reduction=qk_reduction,
                                              rngs=nnx.Rngs(0))) == expected


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
