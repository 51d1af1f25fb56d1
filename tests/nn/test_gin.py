"""attnjax.nn.gin.GINAttention against a plain GIN-attention written here from the paper's equation
(outputs and every gradient), its parameter count, bf16 and errors; decode == parallel (dense with RoPE, top-k)
runs in the conformance suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.gin import GINAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import numpy_rng

B, T, D_MODEL, HEADS = 2, 7, 16, 2


def inputs(T=T):
    return jnp.asarray(numpy_rng(jax.random.key(0)).standard_normal((B, T, D_MODEL), np.float32))


def plain_gin(p, x):
    """``concat_h MLP_h((1 + ε_h)·x_h + A_h·x_h)`` with ``A_h = softmax(q_h k_hᵀ/√D)``, causal, then ``W_o``."""
    H, D = HEADS, D_MODEL // HEADS
    q = jnp.einsum("btd,dhk->bhtk", x, p["query"]["kernel"])
    k = jnp.einsum("btd,dhk->bhtk", x, p["key"]["kernel"])
    h = x.reshape(B, -1, H, D).transpose(0, 2, 1, 3)
    s = jnp.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(D)
    allowed = jnp.tril(jnp.ones((x.shape[1],) * 2, bool))
    a = jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1)
    z = (1 + p["epsilon"][None, :, None, None]) * h + jnp.einsum("bhts,bhsd->bhtd", a, h)
    u = jnp.einsum("bhtd,hdf->bhtf", z, p["w1"]) + p["b1"][None, :, None]
    u = u / jnp.sqrt(jnp.mean(u ** 2, -1, keepdims=True) + 1e-5) * p["norm_scale"][None, :, None]
    y = jnp.einsum("bhtf,hfd->bhtd", jax.nn.silu(u), p["w2"]) + p["b2"][None, :, None]
    y = y.transpose(0, 2, 1, 3).reshape(x.shape)
    return y @ p["out"]["kernel"]


def perturbed(model):
    """Nonzero ε, biases and norm scales, so that the reference is checked on all of them."""
    key = jax.random.key(5)
    for name in ("epsilon", "b1", "norm_scale", "b2"):
        param = getattr(model, name)
        key, sub = jax.random.split(key)
        param[...] = param[...] + 0.3 * jax.random.normal(sub, param.shape)
    return model


def test_matches_plain_gin_attention():
    """The module's wiring (projections, ε, per-head MLPs, output projection) on the "reference" attention (quick to
    compile); the blocked and top-k ``A·h`` are checked against the dense product in ``tests/heads/test_gin.py``, and
    the top-k module decodes in the conformance suite."""
    model = perturbed(GINAttention(D_MODEL, HEADS, out_proj=True, implementation="reference", rngs=nnx.Rngs(0)))
    check_module_against_reference(model, plain_gin, inputs(), call_kwargs={"mask": masks.Causal()}, rtol=1e-5)


def test_parameter_count():
    D, F = D_MODEL // HEADS, 2 * D_MODEL // HEADS
    per_head = 1 + D * F + F + F + F * D + D  # ε, W1, b1, RMSNorm scale, W2, b2
    expected = 2 * D_MODEL * D_MODEL + HEADS * per_head  # W_q, W_k (no value projection)
    model = GINAttention(D_MODEL, HEADS, rngs=nnx.Rngs(0))
    assert parameter_count(model) == expected
    assert parameter_count(GINAttention(D_MODEL, HEADS, out_proj=True, rngs=nnx.Rngs(0))) == expected + D_MODEL ** 2
    assert float(jnp.abs(model.epsilon[...]).max()) == 0.0  # GIN-0 initialization


def test_bfloat16_computation():
    model = GINAttention(D_MODEL, HEADS, top_k=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(model, inputs())
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_errors():
    with pytest.raises(ValueError, match="d_model .* must be a multiple of num_heads"):
        GINAttention(15, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        GINAttention(D_MODEL, HEADS, top_k=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="top_k_weights must be one of"):
        GINAttention(D_MODEL, HEADS, top_k_weights="soft", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rope must be an attnjax.positional.RoPE"):
        GINAttention(D_MODEL, HEADS, rope=10000.0, rngs=nnx.Rngs(0))
    model = GINAttention(D_MODEL, HEADS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        model(jnp.zeros((B, T, 8)))
    with pytest.raises(ValueError, match="x_t must have shape"):
        model.decode(jnp.zeros((B, 2, D_MODEL)), model.init_cache(B, 4))
