"""SE, cSE, sSE, scSE against plain references of Hu et al. 2018 (eqs. 2-4) and Roy et al. 2018 (sec. 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv.squeeze_excite import ConcurrentSqueezeExcite, SpatialSqueezeExcite, SqueezeExcite
from attnjax.vision import squeeze_excite as core_se
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from tests.helpers import assert_close, assert_grads_close


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


def test_functional_cores_equal_the_references_forward_and_gradients():
    """``attnjax.vision.squeeze_excite`` on explicit weights, forward and gradients of x and every weight."""
    rng = np.random.default_rng(0)
    shapes = ((16, 4), (4,), (4, 16), (16,), (16,))
    w1, b1, w2, b2, ws = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)
    bs, x = jnp.float32(0.3), image(seed=3)
    p = {"reduce": {"kernel": w1, "bias": b1}, "expand": {"kernel": w2, "bias": b2},
         "squeeze": {"kernel": ws[None, None, :, None], "bias": bs[None]}}

    def core(w1, b1, w2, b2, ws, x):
        return core_se.concurrent_squeeze_excite(x, core_se.channel_gate(x, w1, b1, w2, b2),
                                                 core_se.spatial_gate(x, ws, bs), "max")

    def reference(w1, b1, w2, b2, ws, x):
        q = {"reduce": {"kernel": w1, "bias": b1}, "expand": {"kernel": w2, "bias": b2},
             "squeeze": {"kernel": ws[None, None, :, None], "bias": bs[None]}}
        return jnp.maximum(se_reference(q, x), sse_reference(q, x))

    args = (w1, b1, w2, b2, ws, x)
    assert_close(jax.jit(core_se.squeeze_excite)(x, w1, b1, w2, b2), se_reference(p, x), name="squeeze_excite")
    assert_close(jax.jit(core_se.spatial_squeeze_excite)(x, ws, bs), sse_reference(p, x), name="sSE")
    assert_grads_close(core, reference, args, argnums=range(6), names=["w1", "b1", "w2", "b2", "ws", "x"])
