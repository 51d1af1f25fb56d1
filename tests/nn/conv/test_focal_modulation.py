"""Focal modulation against a plain reference of Yang et al. 2022 (Focal Modulation Networks, sec. 3), written as
the official FocalModulation computes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import FocalModulation
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from attnjax.vision.focal_modulation import focal_kernel_sizes


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def gelu(x):
    """The exact GELU ``x Φ(x)`` of ``torch.nn.GELU``."""
    return 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))


def linear(x, layer):
    return jnp.einsum("bhwc,cd->bhwd", x, layer["kernel"], precision="highest") + layer["bias"]


def modulator_reference(p, x, normalize=False):
    """[q, Z0, gates] = f(x); Z^l = GELU(DWConv_l(Z^{l-1})) with padding k//2 and no bias; Z^{L+1} = GELU(mean Z^L);
    Z_out = sum_l gate_l * Z^l (divided by L+1 if normalized); modulator = h(Z_out)."""
    c = x.shape[-1]
    levels = len(p.get("focal_layers", {}))  # no focal_layers entry when L = 0
    z = linear(x, p["f"])
    q, context, gates = z[..., :c], z[..., c:2 * c], z[..., 2 * c:]
    assert gates.shape[-1] == levels + 1
    out = 0
    for level in range(levels):
        kernel = p["focal_layers"][level]["kernel"]
        pad = kernel.shape[0] // 2
        context = gelu(conv2d(context, kernel, padding=[(pad, pad)] * 2, groups=c))
        out = out + context * gates[..., level, None]
    out = out + gelu(context.mean(axis=(1, 2), keepdims=True)) * gates[..., levels, None]
    if normalize:
        out = out / (levels + 1)
    return q, linear(out, p["h"])


def focal_reference(p, x, normalize=False):
    """y = proj(q ⊙ modulator)."""
    q, modulator = modulator_reference(p, x, normalize)
    return linear(q * modulator, p["proj"])


def test_focal_modulation_equals_the_paper_formula_forward_and_gradients():
    check_module_against_reference(FocalModulation(16, rngs=nnx.Rngs(0)), focal_reference, image())


@pytest.mark.parametrize("kwargs", [dict(focal_level=3, focal_window=1, focal_factor=4, normalize_modulator=True),
                                    dict(focal_level=0)])
def test_other_configurations_and_the_modulator(kwargs):
    """Three levels of kernels 1, 5, 9 with the normalized modulator; no depthwise level (L = 0: global only).
    The modulator is the one the paper visualizes."""
    model = FocalModulation(16, **kwargs, rngs=nnx.Rngs(1))
    normalize = kwargs.get("normalize_modulator", False)
    x = image(seed=1)
    m, y = nnx.jit(lambda m, x: (m.modulator(x), m(x)))(model, x)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    m_ref, y_ref = jax.jit(lambda p, x: (modulator_reference(p, x, normalize)[1],
                                         focal_reference(p, x, normalize)))(p, x)
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


def test_global_level_makes_every_output_depend_on_every_pixel():
    """Z^{L+1} = GELU(mean Z^L) reaches the whole image: a change at one corner moves the opposite corner, which
    the 3x3 and 5x5 levels alone (reach 3) do not."""
    model = FocalModulation(16, rngs=nnx.Rngs(2))
    x = image((1, 5, 7, 16), seed=2)
    y, y_changed = nnx.jit(lambda m, x: m(x))(model, jnp.concatenate([x, x.at[0, 0, 0].add(1.0)]))
    assert np.all(np.asarray(y[4, 6] != y_changed[4, 6]))


@pytest.mark.parametrize("level, window, factor, expected", [(2, 3, 2, (3, 5)), (3, 3, 2, (3, 5, 7)),
                                                            (0, 3, 2, ()), (4, 1, 2, (1, 3, 5, 7))])
def test_kernel_sizes_grow_by_the_focal_factor(level, window, factor, expected):
    assert focal_kernel_sizes(level, window, factor) == expected


@pytest.mark.parametrize("level, sizes", [(2, (3, 5)), (3, (3, 5, 7))])
def test_parameter_count(level, sizes):
    """The official FocalModulation(dim, focal_window=3, focal_level=L): f Linear(C, 2C+L+1), L depthwise convs
    without bias, h Conv2d(C, C, 1), proj Linear(C, C). 40803 for C=96, L=2 (FocalNet-T's first stage)."""
    c = 96
    model = nnx.eval_shape(lambda: FocalModulation(c, focal_level=level, rngs=nnx.Rngs(0)))
    expected = c * (2 * c + level + 1) + 2 * c + level + 1 + c * sum(k * k for k in sizes) + 2 * (c * c + c)
    assert parameter_count(model) == expected
    assert level != 2 or expected == 40803


def test_bf16_is_finite_and_keeps_its_dtype():
    x = 10 * image(dtype=jnp.bfloat16)
    y = nnx.jit(lambda m, x: m(x))(FocalModulation(16, rngs=nnx.Rngs(0)), x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    model = nnx.eval_shape(lambda: FocalModulation(16, rngs=nnx.Rngs(0)))  # the checks run before any math
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 5, 7\]"):
        model(np.zeros((2, 5, 7), np.float32))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        model.modulator(np.ones((2, 5, 7, 16), np.int32))
    with pytest.raises(ValueError, match=r"focal_window=4, focal_factor=2 give even kernel sizes \[4, 6\]"):
        FocalModulation(16, focal_window=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="focal_level must be a non-negative int, got -1"):
        FocalModulation(16, focal_level=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="focal_factor must be a positive int, got 0"):
        focal_kernel_sizes(2, 3, 0)
