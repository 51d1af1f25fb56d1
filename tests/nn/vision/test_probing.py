"""AttentiveProbe against a plain reference of efficient probing (Psomas et al. 2025, Fig. 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.probing import AttentiveProbe
from attnjax.testing.modules import check_module_against_reference, parameter_count


def probe_reference(p, x, valid=None):
    """y_j = Σ_n softmax_n(q_j·x_n/√D) (x_n W_v)[block j], blocks of D'/M columns."""
    q, w = p["queries"], p["value"]["kernel"]
    B, N, D = x.shape
    M = q.shape[0]
    s = jnp.einsum("md,bnd->bmn", q, x, precision=jax.lax.Precision.HIGHEST) / np.sqrt(D)
    if valid is not None:
        s = jnp.where(valid[:, None, :], s, -1e30)
    a = jax.nn.softmax(s, axis=-1)
    v = (x @ w).reshape(B, N, M, -1)
    return jnp.einsum("bmn,bnmc->bmc", a, v, precision=jax.lax.Precision.HIGHEST).reshape(B, -1)


def test_probe_equals_the_reference():
    """d_out = 2: an 8-wide output in 4 blocks of 2, forward and the gradients of x, the queries and W_v."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    check_module_against_reference(AttentiveProbe(16, num_queries=4, d_out=2, rngs=nnx.Rngs(0)), probe_reference, x)


def test_padding_tokens_are_ignored_and_maps_are_distributions():
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    valid = jnp.arange(9)[None, :] < jnp.array([[9], [5]])
    probe = AttentiveProbe(16, num_queries=4, rngs=nnx.Rngs(0))
    call = nnx.jit(lambda m, x, v: (m(x, v), m.attention(x, v)))
    y, maps = call(probe, x, valid)
    y_ref = jax.jit(probe_reference)(nnx.to_pure_dict(nnx.state(probe, nnx.Param)), x, valid)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
    changed = x.at[1, 5:].set(100.0)
    np.testing.assert_allclose(np.asarray(call(probe, changed, valid)[0])[1], np.asarray(y)[1], rtol=1e-6)
    maps = np.asarray(maps)
    assert maps.shape == (2, 4, 9)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-6)
    assert np.all(maps[1, :, 5:] == 0)


def test_parameter_count_and_output_width():
    """M·D + D·D/d_out: the official EP head on ViT-B (D = 768, M = 32) has 32·768 + 768² parameters."""
    def count(*args, **kwargs):
        return parameter_count(nnx.eval_shape(lambda: AttentiveProbe(*args, **kwargs, rngs=nnx.Rngs(0))))

    assert count(768, num_queries=32) == 32 * 768 + 768 * 768
    assert count(48, num_queries=4, d_out=3) == 4 * 48 + 48 * 16
    probe = AttentiveProbe(16, num_queries=4, d_out=2, rngs=nnx.Rngs(0))
    y = jax.eval_shape(probe, jax.ShapeDtypeStruct((3, 5, 16), jnp.bfloat16))
    assert y.shape == (3, 8) and y.dtype == jnp.bfloat16


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="multiple of num_queries: dim=16, d_out=1, num_queries=5"):
        AttentiveProbe(16, num_queries=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_out must be a positive int"):
        AttentiveProbe(16, d_out=0, rngs=nnx.Rngs(0))
    probe = AttentiveProbe(16, num_queries=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        probe(jnp.ones((2, 5, 8)))
    with pytest.raises(ValueError, match="valid must be a bool array"):
        probe(jnp.ones((2, 5, 16)), jnp.ones((2, 4), bool))
