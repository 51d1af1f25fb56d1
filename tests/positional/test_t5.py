"""T5's relative position bias: bucketing against the published definition, tiles, paths and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.blocked import flash_attention_xla
from attnjax.positional.t5 import T5Bias, t5_relative_buckets
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.softmax.stick_breaking import stick_breaking_attention_reference, stick_breaking_attention_xla
from tests.helpers import assert_close


def published_bucket(relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """Mesh TensorFlow's ``_relative_position_bucket`` for one offset, in float32 as published."""
    ret, n = 0, -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    ratio = np.log(np.float32(n) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    return ret + min(int(max_exact + np.float32(ratio * np.float32(num_buckets - max_exact))), num_buckets - 1)


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", [(True, 32, 128), (False, 32, 128), (True, 8, 20)])
def test_buckets_match_the_published_definition(bidirectional, num_buckets, max_distance):
    offsets = np.arange(-400, 401)
    got = np.asarray(t5_relative_buckets(jnp.asarray(offsets), bidirectional=bidirectional, num_buckets=num_buckets,
                                         max_distance=max_distance))
    want = np.array([published_bucket(int(r), bidirectional, num_buckets, max_distance) for r in offsets])
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() == num_buckets - 1


def test_bucket_arguments_are_checked():
    with pytest.raises(ValueError, match="num_buckets"):
        t5_relative_buckets(jnp.arange(3), bidirectional=True, num_buckets=2)
    with pytest.raises(ValueError, match="max_distance"):
        t5_relative_buckets(jnp.arange(3), bidirectional=False, num_buckets=32, max_distance=16)


def test_tile_equals_the_dense_form_and_is_bottom_right_aligned():
    table = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    bias = T5Bias(table, bidirectional=True, max_distance=30)
    T, S = 7, 12
    dense = np.asarray(bias.dense(T, S))
    for i in range(T):
        for j in range(S):
            b = published_bucket(j - (i + S - T), True, 16, 30)
            np.testing.assert_allclose(dense[0, :, i, j], table[b])
    assert_close(bias.tile(jnp.arange(2, 5), jnp.arange(3, 9), T, S), bias.dense(T, S)[:, :, 2:5, 3:9])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_tiles_beyond_max_distance_take_the_constant_branch_and_match_the_dense_form(bidirectional):
    table = jax.random.normal(jax.random.PRNGKey(3), (16, 2))
    bias = T5Bias(table, bidirectional=bidirectional, max_distance=10)
    dense = bias.dense(64, 64)
    tile = jax.jit(bias.tile, static_argnums=(2, 3))
    for rows, cols in [(range(40, 48), range(0, 8)), (range(0, 8), range(40, 48)), (range(8, 16), range(0, 8))]:
        rows, cols = jnp.asarray(list(rows)), jnp.asarray(list(cols))
        assert_close(tile(rows, cols, 64, 64), dense[:, :, rows][:, :, :, cols])
    far = np.asarray(tile(jnp.arange(40, 48), jnp.arange(0, 8), 64, 64))
    assert np.all(far == far[:, :, :1, :1])


def test_bad_tables_are_refused():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"T5Bias table has shape \(16, 3\)"):
        aj.attention(q, q, q, bias=T5Bias(jnp.zeros((16, 3))))
    with pytest.raises(TypeError, match="float"):
        aj.attention(q, q, q, bias=T5Bias(jnp.zeros((16, 2), jnp.int32)))


def _inputs(T, S, Hq, Hkv, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(ks[0], (2, T, Hq, 8), dtype)
    k = jax.random.normal(ks[1], (2, S, Hkv, 8), dtype)
    v = jax.random.normal(ks[2], (2, S, Hkv, 8), dtype)
    return q, k, v, jax.random.normal(ks[3], (16, Hq))


def _grads(fn, q, k, v, table, bidirectional, mask):
    def loss(q, k, v, table):
        out = fn(q, k, v, bias=T5Bias(table, bidirectional=bidirectional, max_distance=10), mask=mask)
        return jnp.sum(out * jnp.cos(out))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, table)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_blocked_xla_path_equals_the_reference_with_table_gradients(bidirectional):
    q, k, v, table = _inputs(19, 27, 4, 2)
    mask = None if bidirectional else aj.masks.Causal()
    want = _grads(softmax_attention_reference, q, k, v, table, bidirectional, mask)
    got = _grads(lambda *a, **kw: flash_attention_xla(*a, block_q=8, block_kv=8, **kw), q, k, v, table,
                 bidirectional, mask)
    assert_close(got[0], want[0], rtol=1e-4)
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, atol=2e-5, rtol=2e-5)
    assert float(jnp.abs(want[1][3]).max()) > 0


def test_stick_breaking_blocked_path_returns_the_table_gradient():
    q, k, v, table = _inputs(13, 13, 2, 2)
    want = _grads(stick_breaking_attention_reference, q, k, v, table, False, aj.masks.Causal())
    got = _grads(lambda *a, **kw: stick_breaking_attention_xla(*a, block_q=8, block_kv=8, **kw), q, k, v, table,
                 False, aj.masks.Causal())
    for g, w in zip(got[1], want[1]):
        assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_bf16_is_finite_through_the_api():
    q, k, v, table = _inputs(9, 9, 2, 2, jnp.bfloat16)
    out = jax.jit(lambda q, k, v, t: aj.attention(q, k, v, bias=T5Bias(t.astype(jnp.bfloat16), bidirectional=False),
                                                  mask=aj.masks.Causal(), implementation="xla"))(q, k, v, table)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_query_offset_places_a_decode_step_in_a_partly_filled_cache():
    table = jax.random.normal(jax.random.PRNGKey(2), (16, 2))
    parallel = T5Bias(table, bidirectional=False, max_distance=24).dense(6, 6)
    for length in range(6):
        step = T5Bias(table, bidirectional=False, max_distance=24, query_offset=jnp.asarray(length)).dense(1, 10)
        assert_close(step[:, :, 0, : length + 1], parallel[:, :, length, : length + 1])
