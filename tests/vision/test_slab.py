"""SLAB's simplified linear attention: the right-product path against the quadratic reference (forward and
gradients), the reference against the formula written per head in NumPy, bf16, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import correlate2d

from attnjax.linear.linear_attention import NORMALIZER_EPS
from attnjax.vision.slab import (SLA_EPSILON, simplified_linear_attention, simplified_linear_attention_reference,
                                 value_convolution)
from tests.helpers import assert_close, assert_grads_close


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def inputs(B=2, H=5, W=7, heads=2, D=4, Dv=6, k=3, dtype=jnp.float32):
    q, key, v = normal((B, H, W, heads, D), 0, dtype), normal((B, H, W, heads, D), 1, dtype), normal(
        (B, H, W, heads, Dv), 2, dtype)
    return q, key, v, normal((k, k, 1, Dv), 3, dtype) / k, normal((Dv,), 4, dtype)


def test_fast_path_equals_the_reference_forward_and_gradients():
    """A 5x7 map (N = 35), 2 heads, D = 4 != Dv = 6, a 3x3 kernel; gradients to q, k, v and the convolution."""
    args = inputs()
    fast = jax.jit(simplified_linear_attention)(*args)
    assert fast.shape == (2, 5, 7, 2, 6)
    assert_close(fast, jax.jit(simplified_linear_attention_reference)(*args), rtol=1e-5, name="out")
    assert_grads_close(simplified_linear_attention, simplified_linear_attention_reference, args, argnums=range(5),
                       rtol=1e-5, names=["q", "k", "v", "dwc_kernel", "dwc_bias"])
    quadratic = jax.jit(lambda *a: simplified_linear_attention(*a, implementation="reference"))(*args)
    assert_close(quadratic, fast, rtol=1e-5, name="linear_attention reference path")


def test_reference_is_the_formula_per_head():
    """``O = A V / (A 1 + 1e-6) + DWC(V)``, ``A = ReLU(Q)ReLU(K)ᵀ``, one kernel for every head, zero padding; a
    query whose ReLU features are all zero gets ``DWC(V)`` only."""
    q, k, v, kernel, bias = (np.asarray(a, np.float64) for a in inputs(B=1, H=4, W=5, k=5))
    q[0, 1, 2, 0] = -np.abs(q[0, 1, 2, 0])
    out = np.asarray(jax.jit(simplified_linear_attention_reference)(*(jnp.asarray(a, jnp.float32)
                                                                        for a in (q, k, v, kernel, bias))))
    for h in range(2):
        fq, fk = np.maximum(q[0, :, :, h].reshape(20, -1), 0), np.maximum(k[0, :, :, h].reshape(20, -1), 0)
        vh = v[0, :, :, h].reshape(20, -1)
        a = fq @ fk.T
        attn = (a @ vh / (a.sum(1, keepdims=True) + 1e-6)).reshape(4, 5, 6)
        conv = np.stack([correlate2d(v[0, :, :, h, c], kernel[:, :, 0, c], mode="same") + bias[c]
                         for c in range(6)], axis=-1)
        assert_close(out[0, :, :, h], attn + conv, rtol=1e-6, name=f"head {h}")
        if h == 0:
            assert_close(out[0, 1, 2, 0], conv[1, 2], rtol=1e-6, name="zero features")
    assert SLA_EPSILON == NORMALIZER_EPS == 1e-6  # the fast path's normalizer is linear_attention's


def test_value_convolution_without_bias_and_bf16_is_finite():
    _, _, v, kernel, _ = inputs(B=1)
    conv = jax.jit(value_convolution)(v, kernel)
    assert_close(conv, jax.jit(value_convolution)(v, kernel, jnp.zeros(6)), rtol=1e-6, name="no bias")
    args = [10 * a for a in inputs(B=1, dtype=jnp.bfloat16)]
    out = jax.jit(simplified_linear_attention)(*args)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    q, k, v, kernel, bias = inputs(B=1)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\]"):
        simplified_linear_attention(q[0], k, v, kernel)
    with pytest.raises(ValueError, match="q, k, v must share"):
        simplified_linear_attention_reference(q, k[:, :4], v, kernel)
    with pytest.raises(ValueError, match=r"dwc_kernel must have shape \[k, k, 1, Dv=6\]"):
        simplified_linear_attention(q, k, v, kernel[..., :4])
    with pytest.raises(ValueError, match="dwc_kernel must have odd spatial sizes"):
        simplified_linear_attention(q, k, v, jnp.ones((2, 2, 1, 6)))
    with pytest.raises(ValueError, match=r"dwc_bias must have shape \[Dv\] = \[6\]"):
        simplified_linear_attention(q, k, v, kernel, bias[:3])
    with pytest.raises(TypeError, match="v must be a floating-point array"):
        simplified_linear_attention(q, k, v.astype(jnp.int32), kernel)
