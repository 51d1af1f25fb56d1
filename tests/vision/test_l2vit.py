"""L²ViT's linear global attention: the right-product path against the quadratic reference (forward and gradients,
the normalizer's floor active on some rows only), the reference against the formula in NumPy, the local
concentration module against convolutions written in the test, bf16, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import correlate2d

from attnjax.vision.l2vit import (DENOMINATOR_FLOOR, linear_global_attention, linear_global_attention_reference,
                                  local_concentration)
from tests.helpers import assert_close, assert_grads_close


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def inputs(B=2, H=5, W=7, heads=2, D=4, Dv=6, dtype=jnp.float32):
    """Queries scaled by 0.5..8 along the rows, so ``φ(q_i)·Σ_j φ(k_j)`` falls on both sides of the floor 100."""
    rows = jnp.linspace(0.5, 8.0, H)[None, :, None, None, None]
    q = normal((B, H, W, heads, D), 0, dtype) * rows.astype(dtype)
    return q, normal((B, H, W, heads, D), 1, dtype) + 1, normal((B, H, W, heads, Dv), 2, dtype), normal((heads,), 3)


def denominators(q, k):
    B, H, W, heads, D = q.shape
    fq, fk = (np.maximum(np.asarray(a, np.float64).reshape(B, H * W, heads, D), 0) for a in (q, k))
    return np.einsum("bihc,bhc->bih", fq, fk.sum(1))


def test_fast_path_equals_the_reference_forward_and_gradients():
    """A 5x7 map, 2 heads, D = 4 != Dv = 6, a learned temperature; gradients to q, k, v and the temperature."""
    args = inputs()
    floored = denominators(*args[:2]) < DENOMINATOR_FLOOR
    assert 0.2 < floored.mean() < 0.8, "both sides of the floor are exercised"
    fast = jax.jit(linear_global_attention)(*args)
    assert fast.shape == (2, 5, 7, 2, 6)
    assert_close(fast, jax.jit(linear_global_attention_reference)(*args), rtol=1e-5, name="out")
    assert_grads_close(linear_global_attention, linear_global_attention_reference, args, argnums=range(4),
                       rtol=1e-5, names=["q", "k", "v", "temperature"])
    other = jax.jit(lambda *a: (linear_global_attention(*a[:3], denominator_floor=1.0, implementation="reference"),
                                linear_global_attention_reference(*a[:3], denominator_floor=1.0)))(*args)
    assert_close(*other, rtol=1e-5, name="floor 1, default temperature, reference path")


def test_reference_is_the_formula_per_head():
    """``O_i = τ φ(q_i)(Σ_j φ(k_j)ᵀ v_j) / max(φ(q_i)·Σ_j φ(k_j), 100)``, default ``τ = 1/√D``."""
    q, k, v, _ = inputs(B=1)
    out = np.asarray(jax.jit(linear_global_attention_reference)(q, k, v))
    den = denominators(q, k)
    for h in range(2):
        fq, fk = (np.maximum(np.asarray(a, np.float64)[0, :, :, h].reshape(35, 4), 0) for a in (q, k))
        vh = np.asarray(v, np.float64)[0, :, :, h].reshape(35, 6)
        expected = 0.5 * (fq @ (fk.T @ vh)) / np.maximum(den[0, :, h], 100.0)[:, None]
        assert_close(out[0, :, :, h].reshape(35, 6), expected, rtol=1e-6, name=f"head {h}")


def test_local_concentration_is_two_depthwise_convolutions_around_gelu_and_the_norm():
    x, C = normal((1, 5, 7, 3), 5), 3
    k1, k2 = normal((3, 3, 1, C), 6), normal((5, 5, 1, C), 7)
    b1, b2 = normal((C,), 8), normal((C,), 9)
    out = np.asarray(jax.jit(lambda *a: local_concentration(*a, norm=lambda h: 2 * h - 1))(x, k1, b1, k2, b2))
    xn = np.asarray(x, np.float64)[0]

    def dwconv(a, kernel, bias):
        return np.stack([correlate2d(a[..., c], np.asarray(kernel, np.float64)[:, :, 0, c], mode="same") + bias[c]
                         for c in range(C)], axis=-1)

    h = np.asarray(jax.nn.gelu(jnp.asarray(dwconv(xn, k1, np.asarray(b1)), jnp.float32), approximate=False))
    assert_close(out[0], dwconv(2 * np.asarray(h, np.float64) - 1, k2, np.asarray(b2)), rtol=1e-5, name="LCM")
    plain = jax.jit(lambda *a: local_concentration(*a))(x, k1, None, k2, None)
    assert plain.shape == x.shape


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    out = jax.jit(linear_global_attention)(*[a * 10 for a in inputs(B=1, dtype=jnp.bfloat16)[:3]])
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    q, k, v, _ = inputs(B=1)
    with pytest.raises(ValueError, match=r"temperature must be a scalar or have shape \[heads\] = \[2\]"):
        linear_global_attention(q, k, v, jnp.ones(3))
    with pytest.raises(ValueError, match="denominator_floor must be positive"):
        linear_global_attention_reference(q, k, v, denominator_floor=0.0)
    with pytest.raises(ValueError, match=r"v must have shape \[batch, height, width, heads, head_dim\]"):
        linear_global_attention(q, k, v[0])
    with pytest.raises(TypeError, match="k must be a floating-point array"):
        linear_global_attention(q, k.astype(jnp.int32), v)
    x = jnp.ones((1, 5, 7, 3))
    with pytest.raises(ValueError, match=r"kernel2 must have shape \[k, k, 1, 3\]"):
        local_concentration(x, jnp.ones((3, 3, 1, 3)), None, jnp.ones((3, 3, 1, 4)), None)
    with pytest.raises(ValueError, match=r"bias1 must have shape \[3\]"):
        local_concentration(x, jnp.ones((3, 3, 1, 3)), jnp.ones(2), jnp.ones((3, 3, 1, 3)), None)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, channels\]"):
        local_concentration(x[0], jnp.ones((3, 3, 1, 3)), None, jnp.ones((3, 3, 1, 3)), None)
