"""ComplexMultiHeadAttention: the layer against a plain complex-arithmetic CMHA, decode == parallel, parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.positional.complexformer import ComplexMultiHeadAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close

D_MODEL, HEADS, KV_HEADS = 16, 4, 2


def layer(**kw):
    return ComplexMultiHeadAttention(D_MODEL, HEADS, **{"num_kv_heads": KV_HEADS, "rngs": nnx.Rngs(0), **kw})


def plain_cmha(p, x, *, num_heads=HEADS, num_kv_heads=KV_HEADS, eps=1e-9, base=10000.0):
    """Causal CMHA from the parameters, in complex numbers: ``z = x[r] + i·x[r + D/2]``, score
    ``Re Σ_r |z_q|_ε |z_k|_ε exp(i(δ(arg z_q − arg z_k) + β + (m − n)ω))``, softmax, V, W_o."""
    q = jnp.einsum("btd,dhk->bthk", x, p["query"]["kernel"])
    k = jnp.einsum("btd,dhk->bthk", x, p["key"]["kernel"])
    v = jnp.einsum("btd,dhk->bthk", x, p["value"]["kernel"])
    group, T, D = num_heads // num_kv_heads, x.shape[1], q.shape[-1]
    R = D // 2
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    delta = jnp.repeat(p["delta"], group, axis=0)
    zq, zk = q[..., :R] + 1j * q[..., R:], k[..., :R] + 1j * k[..., R:]
    mag_q, mag_k = jnp.sqrt(jnp.abs(zq) ** 2 + eps), jnp.sqrt(jnp.abs(zk) ** 2 + eps)
    omega = base ** (-jnp.arange(0, D, 2) / D)
    offset = (jnp.arange(T)[:, None] - jnp.arange(T)[None, :])[:, :, None, None] * omega   # [T, S, 1, R]
    semantic = jnp.angle(zq)[:, :, None] - jnp.angle(zk)[:, None]                          # [B, T, S, H, R]
    rotation = jnp.exp(1j * (delta * semantic + p["beta"] + offset))
    s = jnp.real(jnp.sum(mag_q[:, :, None] * mag_k[:, None] * rotation, axis=-1))          # [B, T, S, H]
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool))[None, :, :, None], s, -jnp.inf)
    a = jax.nn.softmax(s, axis=2)
    return jnp.einsum("btsh,bshk,hkd->btd", a, v, p["out"]["kernel"])


def test_layer_matches_plain_complex_cmha():
    x = jax.random.normal(jax.random.key(1), (2, 9, D_MODEL))
    check_module_against_reference(layer(), plain_cmha, x,
                                   call_kwargs={"mask": masks.Causal()}, rtol=1e-4)


def test_decode_equals_parallel_step_by_step():
    m = layer()
    x = jax.random.normal(jax.random.key(2), (2, 5, D_MODEL))
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(m, x)
    step = nnx.jit(lambda m, x_t, cache: m.decode(x_t, cache))
    cache = m.init_cache(2, 10)
    outs = []
    for t in range(5):
        y_t, cache = step(m, x[:, t:t + 1], cache)
        outs.append(y_t)
    assert int(cache.length) == 5 and cache.k.shape == (2, 10, KV_HEADS, 4)
    assert_close(jnp.concatenate(outs, axis=1), y, rtol=1e-5, name="decode")


def test_parameters_follow_the_released_code():
    m = nnx.eval_shape(lambda: ComplexMultiHeadAttention(D_MODEL, HEADS, num_kv_heads=KV_HEADS, head_dim=6,
                                                         rngs=nnx.Rngs(0)))
    D, R = 6, 3
    projections = D_MODEL * D * (HEADS + 2 * KV_HEADS) + HEADS * D * D_MODEL
    assert parameter_count(m) == projections + KV_HEADS * R + HEADS * R
    assert m.delta.shape == (KV_HEADS, R) and m.beta.shape == (HEADS, R)
    p = jax.jit(lambda: parameters(ComplexMultiHeadAttention(8, 1, head_dim=256, rngs=nnx.Rngs(0))))()
    assert bool(jnp.all(p["beta"] == 0))
    assert abs(float(jnp.std(p["delta"])) * math.sqrt(128) - 1) < 0.25      # δ ~ N(0, 1/√(D/2))
    bound = math.sqrt(6 / (8 + 256))                                         # Xavier-uniform projections
    assert 0.9 * bound < float(jnp.max(jnp.abs(p["query"]["kernel"]))) <= bound


def test_positions_only_enter_as_differences():
    m, x = layer(), jax.random.normal(jax.random.key(3), (1, 9, D_MODEL))
    run = nnx.jit(lambda m, x, p: m(x, mask=masks.Causal(), positions=p))
    assert_close(run(m, x, jnp.arange(9) + 100), run(m, x, jnp.arange(9)), rtol=1e-5, name="shift")


def test_bad_arguments():
    with pytest.raises(ValueError, match="head_dim must be even"):
        ComplexMultiHeadAttention(15, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ComplexMultiHeadAttention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="scale must be positive"):
        ComplexMultiHeadAttention(16, 4, scale=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="implementation"):
        ComplexMultiHeadAttention(16, 4, implementation="cuda", rngs=nnx.Rngs(0))
    m = layer()
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        m(jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="x_t must have shape"):
        m.decode(jnp.zeros((2, 2, D_MODEL)), m.init_cache(2, 4))
    np.testing.assert_array_equal(m.init_cache(1, 3).v, np.zeros((1, 3, KV_HEADS, 4)))
