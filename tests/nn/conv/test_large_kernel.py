"""LKA and VAN's spatial-attention sublayer against plain references of Guo et al. 2022 (Visual Attention Network,
eqs. 1-2) written with the official code's paddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import LargeKernelAttention, VANSpatialAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from attnjax.vision.large_kernel import lka_kernel_sizes


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def gelu(x):
    """The exact GELU ``x Φ(x)`` of ``torch.nn.GELU``."""
    return 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))


def lka_reference(p, x, dilation=3):
    """Eq. 1: 1x1 conv of a depthwise dilated conv of a depthwise conv of x (padding (k-1)/2 and d(k-1)/2, as
    VAN's nn.Conv2d(dim, dim, 5, padding=2, groups=dim) and (7, padding=9, dilation=3)); eq. 2: times x."""
    c = x.shape[-1]
    k0, k1 = p["conv0"]["kernel"].shape[0], p["conv_spatial"]["kernel"].shape[0]
    a = conv2d(x, p["conv0"]["kernel"], p["conv0"]["bias"], padding=[((k0 - 1) // 2,) * 2] * 2, groups=c)
    pad = dilation * (k1 - 1) // 2
    a = conv2d(a, p["conv_spatial"]["kernel"], p["conv_spatial"]["bias"], padding=[(pad, pad)] * 2,
               dilation=dilation, groups=c)
    a = jnp.einsum("bhwc,cd->bhwd", a, p["conv1"]["kernel"], precision="highest") + p["conv1"]["bias"]
    return a * x


def test_van_spatial_attention_and_its_lka_equal_the_paper_formula_forward_and_gradients():
    """proj_1 (1x1), GELU, LKA (eqs. 1-2), proj_2 (1x1), plus the shortcut (VAN's SpatialAttention). The sublayer
    calls LargeKernelAttention itself, so this checks LKA's output and every LKA parameter's gradient too."""
    def reference(p, x):
        u = gelu(jnp.einsum("bhwc,cd->bhwd", x, p["proj_1"]["kernel"], precision="highest") + p["proj_1"]["bias"])
        v = lka_reference(p["spatial_gating_unit"], u)
        return x + jnp.einsum("bhwc,cd->bhwd", v, p["proj_2"]["kernel"], precision="highest") + p["proj_2"]["bias"]

    check_module_against_reference(VANSpatialAttention(16, rngs=nnx.Rngs(1)), reference, image(seed=1))


@pytest.mark.parametrize("kernel_size, dilation, reach", [(21, 3, 11), (9, 2, 5)])
def test_attention_map_gates_the_input_and_reaches_exactly_the_decomposed_kernel(kernel_size, dilation, reach):
    """Eq. 2: LKA(x) = attention(x) ⊙ x. The (2d-1)x(2d-1) kernel and the ceil(K/d) one dilated by d reach every
    offset up to (d - 1) + d (ceil(K/d) - 1) / 2 (11 for K=21, d=3; 5 for K=9, d=2) and no further."""
    lka = LargeKernelAttention(16, kernel_size=kernel_size, dilation=dilation, rngs=nnx.Rngs(0))
    x = image((1, 3, 25, 16), seed=2)
    attention, y = nnx.jit(lambda m, x: (m.attention(x), m(x)))(lka, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(attention * x), rtol=1e-6, atol=1e-6)
    p = nnx.to_pure_dict(nnx.state(lka, nnx.Param))
    np.testing.assert_allclose(np.asarray(y), np.asarray(jax.jit(lka_reference, static_argnums=2)(p, x, dilation)),
                               rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda x: jnp.sum(lka.attention(x)[0, 1, 12])))(x)
    reached = np.flatnonzero(np.any(np.asarray(g) != 0, axis=(0, 1, 3)))
    np.testing.assert_array_equal(reached, np.arange(12 - reach, 13 + reach))


@pytest.mark.parametrize("kernel_size, dilation, expected", [(21, 3, (5, 7)), (9, 2, (3, 5)), (7, 1, (1, 7))])
def test_kernel_decomposition(kernel_size, dilation, expected):
    """Sec. "Large Kernel Attention": a KxK conv -> a (2d-1)x(2d-1) depthwise conv and a ceil(K/d) one dilated by d."""
    assert lka_kernel_sizes(kernel_size, dilation) == expected


def test_parameter_counts():
    def count(cls, **kwargs):
        return parameter_count(nnx.eval_shape(lambda: cls(c, **kwargs, rngs=nnx.Rngs(0))))

    c = 64  # official VAN: conv0 5*5*64+64, conv_spatial 7*7*64+64, conv1 64*64+64; proj_1, proj_2 64*64+64 each
    assert count(LargeKernelAttention) == 25 * c + 49 * c + c * c + 3 * c == 9024
    assert count(VANSpatialAttention) == 9024 + 2 * (c * c + c) == 17344
    assert count(LargeKernelAttention, use_bias=False) == 25 * c + 49 * c + c * c
    assert count(LargeKernelAttention, kernel_size=9, dilation=2) == 9 * c + 25 * c + c * c + 3 * c


def test_bf16_is_finite_and_keeps_its_dtype():
    x = 10 * image(dtype=jnp.bfloat16)
    y = nnx.jit(lambda m, x: m(x))(VANSpatialAttention(16, rngs=nnx.Rngs(0)), x)  # LKA inside
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    lka = nnx.eval_shape(lambda: LargeKernelAttention(16, rngs=nnx.Rngs(0)))  # the checks run before any math
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), "
                                         r"got \[2, 16, 5, 7\]"):
        lka(np.zeros((2, 16, 5, 7), np.float32))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        nnx.eval_shape(lambda: VANSpatialAttention(16, rngs=nnx.Rngs(0)))(np.ones((2, 5, 7, 16), np.int32))
    with pytest.raises(ValueError, match="kernel_size must be a positive int, got 0"):
        LargeKernelAttention(16, kernel_size=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"kernel_size=12, dilation=3 give a 4x4 dilated kernel"):
        LargeKernelAttention(16, kernel_size=12, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels must be a positive int"):
        LargeKernelAttention(0, rngs=nnx.Rngs(0))
