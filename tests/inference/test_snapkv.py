"""SnapKV (Li et al. 2024): the selection against a brute-force NumPy loop over the rule, the compressed cache
against full-cache attention and decoding (everything kept) and against attention masked to the kept positions
(a partial selection, where the decoded positions must continue from the prompt length), and errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import masks
from attnjax.inference import (SnapKVCache, snapkv_compress, snapkv_decode, snapkv_prefill, snapkv_scores,
                               snapkv_select)
from attnjax.nn.attention import KVCache, MultiHeadAttention
from attnjax.nn.based import SlidingWindowAttention
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.positional import RoPE
from tests.helpers import assert_close, numpy_rng

B, S, HQ, D, D_MODEL, WINDOW, NEW = 2, 13, 4, 8, 16, 4, 3


def brute_force(q, k, window, keep, pool_kernel, pooling):
    """The rule, loop by loop in float64: dense causal softmax of each window query over all keys, summed over
    the window, averaged over a KV head's query heads, zero-padded pooling, top-``keep`` (ties: earlier), sorted."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, T, hq, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    group, prefix, half = hq // hkv, length - window, pool_kernel // 2
    pooled = np.zeros((batch, hkv, prefix))
    chosen = np.zeros((batch, hkv, keep), np.int64)
    for b in range(batch):
        for hk in range(hkv):
            votes = np.zeros(prefix)
            for g in range(group):
                for i in range(window):
                    position = length - window + i
                    row = q[b, T - window + i, hk * group + g]
                    logits = np.array([row @ k[b, j, hk] / math.sqrt(d) if j <= position else -np.inf
                                       for j in range(length)])
                    weights = np.exp(logits - logits.max())
                    votes += (weights / weights.sum())[:prefix] / group
            padded = np.concatenate([np.zeros(half), votes, np.zeros(half)])
            for j in range(prefix):
                span = padded[j:j + pool_kernel]
                pooled[b, hk, j] = span.sum() / pool_kernel if pooling == "avg" else span.max()
            ranked = sorted(range(prefix), key=lambda j: (-pooled[b, hk, j], j))
            chosen[b, hk] = sorted(ranked[:keep])
    return pooled, chosen


@pytest.mark.parametrize("pooling,pool_kernel,hkv", [("avg", 7, 2), ("max", 3, 2), ("avg", 1, 4), ("max", 5, 1)])
def test_selection_matches_brute_force(pooling, pool_kernel, hkv):
    rng = numpy_rng(jax.random.PRNGKey(hkv + pool_kernel))
    q = jnp.asarray(rng.standard_normal((B, S, HQ, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, hkv, D)), jnp.float32)
    keep = 5
    pooled, chosen = brute_force(q, k, WINDOW, keep, pool_kernel, pooling)
    scores = snapkv_scores(q, k, window=WINDOW, pool_kernel=pool_kernel, pooling=pooling)
    assert scores.shape == (B, hkv, S - WINDOW) and scores.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(scores), pooled, rtol=1e-5, atol=1e-6)
    picked = snapkv_select(q, k, window=WINDOW, keep=keep, pool_kernel=pool_kernel, pooling=pooling)
    assert picked.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(picked), chosen)
    # only the window's queries are read: passing just those selects the same positions
    only_window = snapkv_select(q[:, -WINDOW:], k, window=WINDOW, keep=keep, pool_kernel=pool_kernel, pooling=pooling)
    np.testing.assert_array_equal(np.asarray(only_window), chosen)


def test_selection_edge_sizes_and_bf16():
    rng = numpy_rng(jax.random.PRNGKey(7))
    q = jnp.asarray(rng.standard_normal((1, 9, 2, 4)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, 9, 1, 4)), jnp.bfloat16)
    every = snapkv_select(q, k, window=3, keep=6)
    np.testing.assert_array_equal(np.asarray(every), np.arange(6)[None, None])
    assert snapkv_select(q, k, window=9, keep=0).shape == (1, 1, 0)
    some = np.asarray(snapkv_select(q, k, window=3, keep=4, pooling="max"))
    assert some.shape == (1, 1, 4) and np.all(np.diff(some) > 0) and some.min() >= 0 and some.max() < 6
    _, chosen = brute_force(q.astype(jnp.float32), k.astype(jnp.float32), 3, 4, 7, "avg")
    np.testing.assert_array_equal(np.asarray(snapkv_select(q, k, window=3, keep=4)), chosen)


@functools.lru_cache(maxsize=None)
def layer_and_prompt():
    layer = MultiHeadAttention(D_MODEL, HQ, num_kv_heads=2, rope=RoPE(base=100.0), rngs=nnx.Rngs(0))
    x = jnp.asarray(numpy_rng(jax.random.PRNGKey(1)).standard_normal((B, S + NEW, D_MODEL)), jnp.float32)
    return layer, x


def rotated_qkv(layer, x):
    positions = jnp.arange(x.shape[1])
    return layer.rope(layer.query(x), positions), layer.rope(layer.key(x), positions), layer.value(x)


@nnx.jit
def full_decode(layer, x_t, cache):
    return layer.decode(x_t, cache)


@nnx.jit
def compressed_decode(layer, x_t, cache):
    return snapkv_decode(layer, x_t, cache)


def test_everything_kept_equals_the_full_cache():
    """keep = S − window: the compressed cache is the full one, the window's outputs and decoding are unchanged
    (the prompt's KVCache comes from MultiHeadAttention.decode steps)."""
    layer, x = layer_and_prompt()
    prompt = x[:, :S]
    q, k, v = rotated_qkv(layer, prompt)
    cache = layer.init_cache(B, S + NEW)
    outputs = []
    for t in range(S):
        y_t, cache = full_decode(layer, x[:, t:t + 1], cache)
        outputs.append(y_t)
    y, small = snapkv_prefill(layer, prompt, window=WINDOW, keep=S - WINDOW, max_new_tokens=NEW)
    assert_close(y, jnp.concatenate(outputs, axis=1), atol=1e-5)  # the layer's causal output
    assert small.k.shape == (B, S + NEW, 2, D_MODEL // HQ) and int(small.length) == S and int(small.position) == S
    np.testing.assert_array_equal(np.asarray(small.k[:, :S]), np.asarray(k))
    q_win = q[:, -WINDOW:]
    on_window = attnjax.attention(q_win, small.k[:, :S], small.v[:, :S], mask=masks.Causal())
    np.testing.assert_array_equal(np.asarray(on_window),
                                  np.asarray(attnjax.attention(q_win, k, v, mask=masks.Causal())))
    # the same from the decode-built KVCache (max_len > S) through snapkv_compress
    indices = snapkv_select(q, k, window=WINDOW, keep=S - WINDOW)
    from_cache = snapkv_compress(cache, indices, window=WINDOW, max_new_tokens=NEW)
    assert_close(from_cache.k, small.k, atol=1e-6)
    for t in range(S, S + NEW):
        y_full, cache = full_decode(layer, x[:, t:t + 1], cache)
        y_small, small = compressed_decode(layer, x[:, t:t + 1], small)
        assert_close(y_small, y_full, atol=1e-5, name=f"step {t}")
    assert int(small.position) == S + NEW and int(small.length) == S + NEW


def test_partial_selection_equals_attention_masked_to_kept_positions():
    """keep < S − window: the cache holds each head's kept positions then the window, and decoding equals full
    attention restricted to those positions, the window and the new tokens, at RoPE positions S, S + 1, ..."""
    layer, x = layer_and_prompt()
    keep, prompt, pooling = 3, x[:, :S], "max"
    q, k, v = rotated_qkv(layer, prompt)
    indices = np.asarray(snapkv_select(q, k, window=WINDOW, keep=keep, pool_kernel=3, pooling=pooling))
    _, small = snapkv_prefill(layer, prompt, window=WINDOW, keep=keep, max_new_tokens=NEW, pool_kernel=3,
                              pooling=pooling)
    assert small.k.shape[1] == keep + WINDOW + NEW and int(small.length) == keep + WINDOW
    assert int(small.position) == S
    for b in range(B):
        for h in range(2):
            np.testing.assert_array_equal(np.asarray(small.k[b, :keep, h]), np.asarray(k[b, indices[b, h], h]))
            np.testing.assert_array_equal(np.asarray(small.v[b, :keep, h]), np.asarray(v[b, indices[b, h], h]))
    np.testing.assert_array_equal(np.asarray(small.k[:, keep:keep + WINDOW]), np.asarray(k[:, -WINDOW:]))
    ys = []
    for t in range(S, S + NEW):
        y_t, small = compressed_decode(layer, x[:, t:t + 1], small)
        ys.append(y_t)
    q_all, k_all, v_all = rotated_qkv(layer, x)
    allowed = np.zeros((B, HQ, NEW, S + NEW), bool)
    for b in range(B):
        for h in range(HQ):
            for i in range(NEW):
                allowed[b, h, i, indices[b, h // 2]] = True
                allowed[b, h, i, S - WINDOW:S + i + 1] = True
    expected = layer.out(attnjax.attention(q_all[:, S:], k_all, v_all, mask=masks.Explicit(jnp.asarray(allowed))))
    assert_close(jnp.concatenate(ys, axis=1), expected, atol=1e-5)


def test_errors_name_the_argument():
    q = jnp.zeros((1, 9, 2, 4))
    k = jnp.zeros((1, 9, 1, 4))
    with pytest.raises(ValueError, match=r"window \(10\).*S \(9\)"):
        snapkv_select(q, k, window=10, keep=0)
    with pytest.raises(ValueError, match=r"keep \(7\) must be <= S - window = 9 - 3 = 6"):
        snapkv_select(q, k, window=3, keep=7)
    with pytest.raises(ValueError, match="keep must be a non-negative int"):
        snapkv_select(q, k, window=3, keep=-1)
    with pytest.raises(ValueError, match="window must be a positive int"):
        snapkv_select(q, k, window=0, keep=1)
    with pytest.raises(ValueError, match="pool_kernel must be odd"):
        snapkv_select(q, k, window=3, keep=2, pool_kernel=4)
    with pytest.raises(ValueError, match="pooling must be 'avg' or 'max'"):
        snapkv_select(q, k, window=3, keep=2, pooling="sum")
    with pytest.raises(ValueError, match=r"q \[B, T, Hq, D\].*q \[1, 9, 2, 4\], k \[1, 9, 3, 4\]"):
        snapkv_select(q, jnp.zeros((1, 9, 3, 4)), window=3, keep=2)
    with pytest.raises(TypeError, match="q must be a floating-point array"):
        snapkv_select(jnp.zeros((1, 9, 2, 4), jnp.int32), k, window=3, keep=2)
    cache = KVCache(jnp.zeros((1, 12, 1, 4)), jnp.zeros((1, 12, 1, 4)), jnp.int32(9))
    with pytest.raises(ValueError, match=r"indices must be int \[B, Hk, keep\] = \[1, 1, keep\]"):
        snapkv_compress(cache, jnp.zeros((1, 2, 3), jnp.int32), window=3, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, cache.length - window\) = \[0, 6\)"):
        snapkv_compress(cache, jnp.asarray([[[0, 6]]], jnp.int32), window=3, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"window \(10\) must be <= the cached prompt length cache.length \(9\)"):
        snapkv_compress(cache, jnp.zeros((1, 1, 0), jnp.int32), window=10, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int"):
        snapkv_compress(cache, jnp.zeros((1, 1, 2), jnp.int32), window=3, max_new_tokens=-2)
    with pytest.raises(NotImplementedError, match="K and V head counts differ"):
        snapkv_compress(KVCache(cache.k, jnp.zeros((1, 12, 2, 4)), cache.length), jnp.zeros((1, 1, 2), jnp.int32),
                        window=3, max_new_tokens=1)
    with pytest.raises(TypeError, match="cache must be an attnjax.nn.KVCache"):
        snapkv_compress((cache.k, cache.v), jnp.zeros((1, 1, 2), jnp.int32), window=3, max_new_tokens=1)
    layer, x = layer_and_prompt()
    with pytest.raises(TypeError, match="cache must be a SnapKVCache"):
        snapkv_decode(layer, x[:, :1], layer.init_cache(B, 4))
    small = SnapKVCache(jnp.zeros((B, 4, 2, 4)), jnp.zeros((B, 4, 2, 4)), jnp.int32(0), jnp.int32(0))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 1, d_model\]"):
        snapkv_decode(layer, x[:, :2], small)
    with pytest.raises(ValueError, match=r"window \(14\) must be <= the number of queries given \(13\)"):
        snapkv_prefill(layer, x[:, :S], window=14, keep=0, max_new_tokens=1)
    t5 = functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=12)
    biased = MultiHeadAttention(D_MODEL, HQ, position_bias=t5, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="position_bias rule"):
        snapkv_prefill(biased, x[:, :S], window=4, keep=2, max_new_tokens=1)
    windowed = SlidingWindowAttention(D_MODEL, HQ, window=4, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="SlidingWindowAttention overrides __call__"):
        snapkv_decode(windowed, x[:, :1], small)
    with pytest.raises(TypeError, match="takes an attnjax.nn.MultiHeadAttention"):
        snapkv_decode(nnx.Linear(D_MODEL, D_MODEL, rngs=nnx.Rngs(0)), x[:, :1], small)
