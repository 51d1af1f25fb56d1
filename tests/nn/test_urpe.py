"""URPEAttention: the layer against a plain reference of Luo et al. 2022, §4 (with a T5 bias), decode
step by step against the parallel call, the parameter count, and bad arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.nn.positional.urpe import URPEAttention
from attnjax.positional.t5 import t5_relative_buckets
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import assert_close

T5 = functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=16)


def layer(implementation="auto", **kwargs):
    model = URPEAttention(16, 4, num_kv_heads=2, bidirectional=False, max_distance=5, position_bias=T5,
                          implementation=implementation, block_q=4, block_kv=4, rngs=nnx.Rngs(0), **kwargs)
    model.c[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(3), model.c.shape)  # away from the all-ones init
    return model


def urpe_layer(p, x, *, num_kv_heads=2, max_distance=5):
    """``W_o · concat_h (softmax(q_h k_hᵀ/√D + B_h) ⊙ C_h) v_h``, causal, ``C_h[i, j] = c[min(i − j, R), h]``."""
    q = jnp.einsum("btd,dhk->bthk", x, p["query"]["kernel"])
    k = jnp.einsum("btd,dhk->bthk", x, p["key"]["kernel"])
    v = jnp.einsum("btd,dhk->bthk", x, p["value"]["kernel"])
    H, D, T = q.shape[2], q.shape[3], x.shape[1]
    k, v = (jnp.repeat(a, H // num_kv_heads, axis=2) for a in (k, v))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    bias = p["position_bias"]["table"][t5_relative_buckets(j - i, bidirectional=False, num_buckets=8,
                                                           max_distance=16)]  # [T, T, H]
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D) + jnp.moveaxis(bias, -1, 0)
    logits = jnp.where(i >= j, logits, -jnp.inf)
    c = jnp.moveaxis(p["c"][np.clip(i - j, 0, max_distance)], -1, 0)  # [H, T, T]
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1) * c, v)
    return jnp.einsum("bthd,hdo->bto", out, p["out"]["kernel"])


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_layer_equals_the_paper_formula(implementation):
    x = jax.random.normal(jax.random.key(1), (2, 11, 16))
    check_module_against_reference(layer(implementation), urpe_layer, x, call_kwargs=dict(mask=masks.Causal()))


def test_decode_step_by_step_equals_the_parallel_call():
    model, x = layer(), jax.random.normal(jax.random.key(2), (2, 9, 16))
    parallel = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(model, x)
    step = nnx.jit(lambda m, x_t, cache: m.decode(x_t, cache))
    cache, outputs = model.init_cache(2, 12), []
    for t in range(9):
        y_t, cache = step(model, x[:, t:t + 1], cache)
        outputs.append(y_t)
    assert int(cache.length) == 9
    assert_close(jnp.concatenate(outputs, axis=1), parallel, atol=2e-5, rtol=2e-5)


def test_parameter_count_and_initialization():
    d, H, Hkv, D = 16, 4, 2, 4
    model = URPEAttention(d, H, num_kv_heads=Hkv, max_distance=128, rngs=nnx.Rngs(0))
    assert parameter_count(model) == d * H * D + 2 * d * Hkv * D + H * D * d + (2 * 128 + 1) * H
    assert bool((model.c[...] == 1).all())  # the official constant init: a fresh layer is softmax attention
    causal = URPEAttention(d, H, bidirectional=False, max_distance=7, position_bias=T5, rngs=nnx.Rngs(0))
    assert parameter_count(causal) == 4 * d * H * D + (7 + 1) * H + 8 * H


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="implementation"):
        URPEAttention(16, 4, implementation="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        URPEAttention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_distance must be a positive int"):
        URPEAttention(16, 4, max_distance=0, rngs=nnx.Rngs(0))
