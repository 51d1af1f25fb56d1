"""T5's relative bias in ``MultiHeadAttention`` (``position_bias=T5RelativeBias``), and learned absolute
position embeddings: against plain references written here, decoding, a shared table, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.positional.absolute import LearnedPositionEmbedding
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.positional.test_t5 import published_bucket

D_MODEL, HEADS, KV_HEADS, BUCKETS, MAX_DISTANCE = 16, 4, 2, 8, 12


def t5_layer(bidirectional=False, **kw):
    bias = functools.partial(T5RelativeBias, bidirectional=bidirectional, num_buckets=BUCKETS,
                             max_distance=MAX_DISTANCE, stddev=0.5)
    return MultiHeadAttention(D_MODEL, HEADS, num_kv_heads=KV_HEADS, position_bias=bias, rngs=nnx.Rngs(0), **kw)


def plain_t5_attention(params, x, bidirectional=False):
    """``softmax(q_h·k_hᵀ/√D + table[bucket(j − i), h] + causal) v_h``, the bucket from the published loop."""
    q = jnp.einsum("btd,dhk->bthk", x, params["query"]["kernel"])
    k = jnp.einsum("btd,dhk->bthk", x, params["key"]["kernel"])
    v = jnp.einsum("btd,dhk->bthk", x, params["value"]["kernel"])
    T = x.shape[1]
    buckets = np.array([[published_bucket(j - i, bidirectional, BUCKETS, MAX_DISTANCE) for j in range(T)]
                        for i in range(T)])
    allowed = np.ones((T, T), bool) if bidirectional else np.tril(np.ones((T, T), bool))
    table = params["position_bias"]["table"]
    heads = []
    for h in range(HEADS):
        s = jnp.einsum("bte,bse->bts", q[:, :, h], k[:, :, h // (HEADS // KV_HEADS)]) / np.sqrt(D_MODEL // HEADS)
        s = s + table[buckets, h]
        p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
        heads.append(jnp.einsum("bts,bse->bte", p, v[:, :, h // (HEADS // KV_HEADS)]))
    return jnp.einsum("bthe,hed->btd", jnp.stack(heads, axis=2), params["out"]["kernel"])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_layer_equals_the_plain_reference_with_table_gradients(bidirectional):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, D_MODEL))
    layer = t5_layer(bidirectional)
    check_module_against_reference(layer, functools.partial(plain_t5_attention, bidirectional=bidirectional), x,
                                   call_kwargs={} if bidirectional else {"mask": masks.Causal()})
    d_model, hd = D_MODEL, D_MODEL // HEADS
    assert parameter_count(layer) == d_model * HEADS * hd + 2 * d_model * KV_HEADS * hd + HEADS * hd * d_model + \
        BUCKETS * HEADS


def test_t5_decode_equals_the_parallel_call_past_the_exact_buckets():
    layer = t5_layer()
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 13, D_MODEL))
    want = layer(x, mask=masks.Causal())
    cache = layer.init_cache(1, 16)
    step = nnx.jit(lambda m, x_t, c: m.decode(x_t, c))
    outs = []
    for t in range(13):
        y, cache = step(layer, x[:, t:t + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, rtol=2e-5, atol=2e-6)


def test_a_shared_table_is_one_parameter_across_layers():
    first, second = t5_layer(), t5_layer()
    second.position_bias = first.position_bias
    stack = nnx.List([first, second])
    tables = [path for path, _ in nnx.to_flat_state(nnx.state(stack, nnx.Param)) if path[-2:] == ("position_bias",
                                                                                                  "table")]
    assert len(tables) == 1


def test_position_bias_needs_a_mechanism_with_bias_and_no_sequence_parallel():
    bias = functools.partial(T5RelativeBias, bidirectional=False)
    with pytest.raises(NotImplementedError, match="bias"):
        MultiHeadAttention(D_MODEL, HEADS, position_bias=bias, mechanism="linear", rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="position_bias"):
        MultiHeadAttention(D_MODEL, HEADS, position_bias=bias, sequence_parallel=("sp", "zigzag"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_distance"):
        T5RelativeBias(HEADS, num_buckets=32, max_distance=8, rngs=nnx.Rngs(0))


def test_learned_absolute_positions_add_the_table_rows():
    layer = LearnedPositionEmbedding(12, D_MODEL, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, D_MODEL))
    check_module_against_reference(layer, lambda p, x: x + p["table"][:9], x)
    positions = jnp.array([3, 1, 4, 1, 5, 9, 2, 6, 5])
    np.testing.assert_allclose(layer(x, positions), x + layer.table[...][positions])
    assert parameter_count(layer) == 12 * D_MODEL
    with pytest.raises(ValueError, match="max_len=12"):
        layer(jnp.zeros((1, 13, D_MODEL)))
    with pytest.raises(ValueError, match="positions has shape"):
        layer(x, jnp.arange(8))
