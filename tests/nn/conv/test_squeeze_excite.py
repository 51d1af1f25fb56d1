"""SE, cSE, sSE, scSE against plain references of Hu et al. 2018 (eqs. 2-4) and Roy et al. 2018 (sec. 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import ConcurrentSqueezeExcite, SpatialSqueezeExcite, SqueezeExcite
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def se_reference(p, x):
    """Hu et al. eq. 2 (squeeze: global average), eq. 3 (excitation: FC, ReLU, FC, sigmoid), eq. 4 (scale)."""
    z = jnp.mean(x, axis=(1, 2))
    s = jax.nn.sigmoid(jnp.einsum("bj,jc->bc", jax.nn.relu(jnp.einsum("bc,cj->bj", z, p["reduce"]["kernel"])
                                                            + p["reduce"]["bias"]), p["expand"]["kernel"])
                       + p["expand"]["bias"])
    return x * s[:, None, None, :]


def sse_reference(p, x):
    """Roy et al. sec. 2.2: a 1x1 convolution to one channel, sigmoid, times the input."""
    return x * jax.nn.sigmoid(conv2d(x, p["squeeze"]["kernel"], p["squeeze"]["bias"]))


@pytest.mark.parametrize("reduction", [4, 16])
def test_se_equals_the_paper_formula_forward_and_gradients(reduction):
    check_module_against_reference(SqueezeExcite(16, reduction=reduction, rngs=nnx.Rngs(0)), se_reference, image())


def test_sse_equals_the_paper_formula_forward_and_gradients():
    check_module_against_reference(SpatialSqueezeExcite(16, rngs=nnx.Rngs(0)), sse_reference, image())


@pytest.mark.parametrize("combine, merge", [("add", jnp.add), ("max", jnp.maximum)])
def test_scse_combines_the_two_branches(combine, merge):
    def reference(p, x):
        return merge(se_reference(p["channel"], x), sse_reference(p["spatial"], x))

    check_module_against_reference(ConcurrentSqueezeExcite(16, combine=combine, rngs=nnx.Rngs(0)), reference,
                                   image(seed=1))


@pytest.mark.parametrize("channels, reduction, use_bias, expected", [
    (64, 16, False, 2 * 64 * 64 // 16),                  # Hu et al. sec. 4: 2C²/r per block
    (64, 16, True, 2 * 64 * 4 + 4 + 64),
    (16, 32, True, 2 * 16 * 1 + 1 + 16),                 # C // r < 1: one bottleneck unit
])
def test_se_parameter_count(channels, reduction, use_bias, expected):
    assert parameter_count(SqueezeExcite(channels, reduction=reduction, use_bias=use_bias,
                                         rngs=nnx.Rngs(0))) == expected


def test_sse_and_scse_parameter_counts():
    assert parameter_count(SpatialSqueezeExcite(64, rngs=nnx.Rngs(0))) == 64 + 1
    assert parameter_count(ConcurrentSqueezeExcite(64, rngs=nnx.Rngs(0))) == (2 * 64 * 32 + 32 + 64) + 65


def test_gates_are_in_unit_interval_and_bf16_is_finite():
    se = SqueezeExcite(16, rngs=nnx.Rngs(0))
    x = 30 * image(dtype=jnp.bfloat16)
    gate = se.gate(x)
    assert gate.shape == (2, 1, 1, 16) and se(x).dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(se(x), np.float32)))
    assert np.all((np.asarray(gate, np.float32) >= 0) & (np.asarray(gate, np.float32) <= 1))
    assert SpatialSqueezeExcite(16, rngs=nnx.Rngs(0)).gate(x).shape == (2, 5, 7, 1)


def test_bad_inputs_name_the_argument():
    se = SqueezeExcite(16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 16, 5, 7\]"):
        se(image((2, 16, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        se(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match="reduction must be a positive int, got 0"):
        SqueezeExcite(16, reduction=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="combine must be one of"):
        ConcurrentSqueezeExcite(16, combine="mean", rngs=nnx.Rngs(0))
