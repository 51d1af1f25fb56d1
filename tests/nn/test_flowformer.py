"""FlowAttention (Flowformer) against a plain reference of the official layer, decode == parallel, parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.flowformer import FlowAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close


def tokens(shape=(2, 9, 16), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def flowformer_reference(p, x, heads, causal, eps=1e-6):
    """The official ``Flow_Attention`` / ``Flow_Attention_Causal`` forward (thuml/Flowformer), dropout off."""
    def project(name, h):
        return jnp.einsum("btc,chd->bhtd", h, p[name]["kernel"], precision="highest") + p[name]["bias"][:, None]

    q, k, v = jax.nn.sigmoid(project("query", x)), jax.nn.sigmoid(project("key", x)), project("value", x)
    if causal:
        n = jnp.arange(1.0, x.shape[1] + 1)
        sink_in = n / jnp.einsum("bhld,bhld->bhl", q + eps, k.cumsum(2) + eps)
        source_out = n / jnp.einsum("bhld,bhld->bhl", k + eps, q.cumsum(2) + eps)
        sink = jnp.einsum("bhld,bhld->bhl", q + eps, (k * source_out[..., None]).cumsum(2) + eps) / n
        source = jnp.einsum("bhld,bhld->bhl", k + eps, (q * sink_in[..., None]).cumsum(2) + eps) / n
        source = jnp.exp(jnp.clip(source, -1.0, 1.0))
        competition = source / source.cumsum(-1) * n
        kv = jnp.cumsum(jnp.einsum("bhld,bhlm->bhldm", k, v * competition[..., None]), 2)
        o = jnp.einsum("bhld,bhldm->bhlm", q * (sink_in / n)[..., None], kv) * jax.nn.sigmoid(sink)[..., None]
    else:
        sink_in = 1 / jnp.einsum("bhld,bhd->bhl", q + eps, k.sum(2) + eps)
        source_out = 1 / jnp.einsum("bhld,bhd->bhl", k + eps, q.sum(2) + eps)
        sink = jnp.einsum("bhld,bhd->bhl", q + eps, (k * source_out[..., None]).sum(2) + eps)
        source = jnp.clip(jnp.einsum("bhld,bhd->bhl", k + eps, (q * sink_in[..., None]).sum(2) + eps), -1.0, 1.0)
        competition = jax.nn.softmax(source, -1) * x.shape[1]
        kv = jnp.einsum("bhld,bhlm->bhdm", k, v * competition[..., None])
        o = jnp.einsum("bhld,bhdm->bhlm", q * sink_in[..., None], kv) * jax.nn.sigmoid(sink)[..., None]
    return jnp.einsum("bhtd,hdc->btc", o, p["out"]["kernel"], precision="highest") + p["out"]["bias"]


def test_causal_flow_attention_equals_the_official_layer_forward_and_gradients():
    model = FlowAttention(16, 2, causal=True, chunk_size=4, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: flowformer_reference(p, x, 2, True), tokens(), rtol=1e-4)


def test_non_causal_flow_attention_equals_the_official_layer():
    model = FlowAttention(16, 2, rngs=nnx.Rngs(0))
    x = tokens((2, 7, 16), seed=2)
    expected = jax.jit(lambda p, x: flowformer_reference(p, x, 2, False))(parameters(model), x)
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), expected, rtol=1e-5, name="non-causal")


def test_causal_mask_makes_the_layer_causal_and_decode_equals_it():
    model = FlowAttention(16, 2, chunk_size=4, rngs=nnx.Rngs(0))
    x = tokens((2, 6, 16), seed=1)
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(model, x)
    step, cache, steps = nnx.jit(lambda m, x_t, c: m.decode(x_t, c)), model.init_cache(2, 6), []
    for t in range(6):
        y_t, cache = step(model, x[:, t:t + 1], cache)
        steps.append(y_t)
    assert_close(jnp.concatenate(steps, axis=1), y, rtol=2e-5, name="decode")
    with pytest.raises(NotImplementedError, match=r"FlowAttention takes mask=None or masks.Causal\(\) only"):
        model(x, mask=masks.SlidingWindow(2, 0))


@pytest.mark.parametrize("d_model, heads, head_dim, use_bias", [(16, 2, None, True), (24, 3, 4, False)])
def test_parameter_count(d_model, heads, head_dim, use_bias):
    model = nnx.eval_shape(lambda: FlowAttention(d_model, heads, head_dim=head_dim, use_bias=use_bias,
                                                 rngs=nnx.Rngs(0)))
    inner = heads * (head_dim or d_model // heads)
    assert parameter_count(model) == 4 * d_model * inner + use_bias * (3 * inner + d_model)
