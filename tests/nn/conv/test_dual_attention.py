"""DANet's PAM and CAM against dense references of Fu et al. 2019 (eqs. 1-4) and of the official code
(github.com/junfu1115/DANet, encoding/nn/da_att.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv.dual_attention import DANetChannelAttention, DANetPositionAttention
from attnjax.vision.dual_attention import channel_attention, position_attention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from tests.helpers import assert_close, assert_grads_close


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def pam_reference(p, x):
    """PAM_Module: energy = B^T C over positions, softmax over keys, out = D S^T, E = alpha out + A; the dense
    [N, N] map. The key convolution has no bias (a bias there cancels in the softmax)."""
    Bn, H, W, C = x.shape

    def conv(name):
        return conv2d(x, p[name]["kernel"], p[name].get("bias")).reshape(Bn, H * W, -1)

    attention = jax.nn.softmax(jnp.einsum("bic,bjc->bij", conv("query"), conv("key")), axis=-1)
    out = jnp.einsum("bij,bjc->bic", attention, conv("value")).reshape(x.shape)
    return p["alpha"] * out + x


def cam_reference(p, x, energy="similarity"):
    """Eq. 3-4 (softmax_d(A_c . A_d)); CAM_Module's max(energy) - energy for "max_minus"."""
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    logits = jnp.einsum("bnc,bnd->bcd", a, a)
    if energy == "max_minus":
        logits = jnp.max(logits, axis=-1, keepdims=True) - logits
    out = jnp.einsum("bcd,bnd->bnc", jax.nn.softmax(logits, axis=-1), a).reshape(x.shape)
    return p["beta"] * out + x


def test_pam_equals_the_dense_formula_forward_and_gradients():
    check_module_against_reference(DANetPositionAttention(16, alpha_init=0.7, rngs=nnx.Rngs(0)), pam_reference,
                                   image(), rtol=5e-5)


@pytest.mark.parametrize("energy", ["similarity", "max_minus"])
def test_cam_equals_the_formula_forward_and_gradients(energy):
    check_module_against_reference(DANetChannelAttention(16, beta_init=0.7, energy=energy, rngs=nnx.Rngs(0)),
                                   lambda p, x: cam_reference(p, x, energy), 0.2 * image(seed=1), rtol=5e-5)


def test_cam_official_energy_is_the_softmax_of_minus_similarity():
    x = 0.2 * image(seed=2)
    a = x.reshape(2, -1, 16)
    least_similar = jnp.einsum("bcd,bnd->bnc", jax.nn.softmax(-jnp.einsum("bnc,bnd->bcd", a, a), -1), a)
    y = DANetChannelAttention(16, beta_init=1.0, energy="max_minus", rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(y, least_similar.reshape(x.shape) + x, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y, cam_reference({"beta": 1.0}, x), atol=1e-3), "the official energy differs from eq. 3"


@pytest.mark.parametrize("cls, kwargs", [(DANetPositionAttention, {}), (DANetChannelAttention, {})])
def test_paper_initialization_is_the_identity_and_only_the_scale_learns_first(cls, kwargs):
    model, x = cls(16, **kwargs, rngs=nnx.Rngs(0)), image(seed=3)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * jnp.cos(x))))(model)
    for path, g in nnx.to_flat_state(grads):
        scale = path[-1] in ("alpha", "beta")
        assert np.any(np.asarray(g[...]) != 0) == scale, path


def intermediate_sizes(jaxpr):
    """The element count of every value a jaxpr computes, sub-jaxprs (loops, custom VJPs) included."""
    for eqn in jaxpr.eqns:
        yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from intermediate_sizes(inner)


def test_pam_never_forms_the_dense_position_map():
    """N = 64·64 positions: forward and backward hold nothing near the [N, N] map (traced only)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DANetPositionAttention(16, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, 64, 64, 16), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)), argnums=(0, 1)))(state, x)
    n = 64 * 64
    assert max(intermediate_sizes(jaxpr.jaxpr)) < n * n // 16


def test_parameter_counts():
    c, r = 512, 64
    pam = nnx.eval_shape(lambda: DANetPositionAttention(c, rngs=nnx.Rngs(0)))
    assert parameter_count(pam) == 2 * c * r + r + c * c + c + 1      # B (bias), C (none) to C/8, D (bias), alpha
    assert parameter_count(DANetChannelAttention(c, rngs=nnx.Rngs(0))) == 1
    assert parameter_count(nnx.eval_shape(lambda: DANetPositionAttention(4, rngs=nnx.Rngs(0)))) == 2 * 4 + 1 + 20 + 1


def test_bf16_is_finite_and_keeps_the_dtype():
    x = 30 * image(dtype=jnp.bfloat16)
    for model in (DANetPositionAttention(16, alpha_init=1.0, rngs=nnx.Rngs(0)),
                  DANetChannelAttention(16, beta_init=1.0, rngs=nnx.Rngs(0))):
        y = nnx.jit(lambda m, x: m(x))(model, x)
        assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    pam = nnx.eval_shape(lambda: DANetPositionAttention(16, rngs=nnx.Rngs(0)))  # the checks run before any math
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 16, 5, 7\]"):
        pam(image((2, 16, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        DANetChannelAttention(16, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match="reduction must be a positive int, got 0"):
        DANetPositionAttention(16, reduction=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="energy must be one of"):
        DANetChannelAttention(16, energy="min", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_functional_cores_equal_the_references_forward_and_gradients(implementation):
    """``attnjax.vision.dual_attention`` on explicit weights: PAM through either attention path and CAM,
    gradients of x, the 1x1 weights and alpha / beta."""
    rng = np.random.default_rng(1)
    wb, wc, wd = (jnp.asarray(rng.standard_normal(s), jnp.float32) * 0.3 for s in ((16, 2), (16, 2), (16, 16)))
    bb, bd, alpha = jnp.asarray(rng.standard_normal(2), jnp.float32), jnp.zeros(16), jnp.float32(0.7)

    def core(wb, wc, wd, alpha, x):
        pam = position_attention(x, wb, bb, wc, None, wd, bd, alpha, implementation=implementation)
        return channel_attention(pam, alpha)

    def reference(wb, wc, wd, alpha, x):
        p = {"query": {"kernel": wb[None, None], "bias": bb}, "key": {"kernel": wc[None, None]},
             "value": {"kernel": wd[None, None], "bias": bd}, "alpha": alpha}
        return cam_reference({"beta": alpha}, pam_reference(p, x))

    args = (wb, wc, wd, alpha, 0.5 * image(seed=5))
    assert_close(jax.jit(core)(*args), reference(*args), rtol=5e-5, name="output")
    assert_grads_close(core, reference, args, argnums=range(5), rtol=5e-5, names=["wb", "wc", "wd", "alpha", "x"])
