"""StreamingLLM's sink + window cache (Xiao et al. 2024, Sec. 3.2): equal to MultiHeadAttention.decode until the
cache fills, then to a NumPy reference written from the definition (dense attention over [sinks ‖ last window],
RoPE positions 0..n−1 within the cache), constant memory, jit, and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.inference import StreamingCache, init_streaming_cache, streaming_decode, streaming_reference
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.based import SlidingWindowAttention
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.positional import RoPE
from tests.helpers import assert_close, numpy_rng

B, T, D_MODEL, HQ, HKV, BASE = 2, 11, 16, 4, 2, 100.0


def numpy_rope(x, positions):
    """Rotate-half RoPE from its formula: pairs ``(x_r, x_{r+D/2})`` turn by ``pos·BASE^(−2r/D)``."""
    half = x.shape[-1] // 2
    angle = np.asarray(positions, np.float64)[:, None, None] * BASE ** (-np.arange(half) * 2.0 / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def numpy_streaming_step(q, k, v, t, num_sinks, window, rope):
    """Token ``t``'s attention over the cache ``{first num_sinks tokens} ∪ {last window tokens up to t}`` in text
    order, keys at cache positions ``0..n−1`` and the query at ``n − 1``; ``q, k, v`` the un-rotated projections
    ``[B, T, H, D]`` as float64. Returns ``[B, Hq, Dv]``."""
    kept = sorted(set(range(min(num_sinks, t + 1))) | set(range(max(0, t - window + 1), t + 1)))
    n = len(kept)
    out = np.zeros((q.shape[0], q.shape[2], v.shape[3]))
    for b in range(q.shape[0]):
        keys, query = k[b, kept], q[b, t:t + 1]
        if rope:
            keys, query = numpy_rope(keys, np.arange(n)), numpy_rope(query, [n - 1])
        for h in range(q.shape[2]):
            kv_head = h // (q.shape[2] // k.shape[2])
            logits = keys[:, kv_head] @ query[0, h] / np.sqrt(q.shape[3])
            weights = np.exp(logits - logits.max())
            out[b, h] = (weights / weights.sum()) @ v[b, kept, kv_head]
    return out


@functools.lru_cache(maxsize=None)
def setup(rope: bool):
    layer = MultiHeadAttention(D_MODEL, HQ, num_kv_heads=HKV, rope=RoPE(base=BASE) if rope else None,
                               rngs=nnx.Rngs(0))
    x = jnp.asarray(numpy_rng(jax.random.PRNGKey(3)).standard_normal((B, T, D_MODEL)), jnp.float32)
    return layer, x


@nnx.jit
def stream_step(layer, x_t, cache):
    return streaming_decode(layer, x_t, cache)


@nnx.jit
def full_step(layer, x_t, cache):
    return layer.decode(x_t, cache)


@pytest.mark.parametrize("num_sinks,window,rope", [(2, 4, True), (0, 3, False), (3, 2, True)])
def test_decode_before_and_after_the_cache_fills(num_sinks, window, rope):
    layer, x = setup(rope)
    cache = init_streaming_cache(layer, B, window=window, num_sinks=num_sinks)
    shapes = [leaf.shape for leaf in jax.tree.leaves(cache)]
    full = layer.init_cache(B, T)
    q, k, v = (np.asarray(p(x), np.float64) for p in (layer.query, layer.key, layer.value))
    streamed = []
    for t in range(T):
        y_t, cache = stream_step(layer, x[:, t:t + 1], cache)
        y_full, full = full_step(layer, x[:, t:t + 1], full)
        assert [leaf.shape for leaf in jax.tree.leaves(cache)] == shapes  # constant memory
        expected = layer.out(jnp.asarray(numpy_streaming_step(q, k, v, t, num_sinks, window, rope),
                                         jnp.float32)[:, None])
        assert_close(y_t, expected, atol=2e-5, name=f"step {t}")
        if t < num_sinks + window:
            assert_close(y_t, y_full, atol=2e-5, name=f"step {t}, before the cache fills")
        else:  # tokens were evicted
            assert not np.allclose(y_t, y_full, atol=1e-3), f"step {t} should differ from full attention"
        streamed.append(y_t)
    assert int(cache.length) == T and cache.k.shape == (B, num_sinks + window, HKV, D_MODEL // HQ)
    assert_close(jnp.concatenate(streamed, axis=1),
                 streaming_reference(layer, x, window=window, num_sinks=num_sinks), atol=2e-5)


def test_ring_buffer_keeps_unrotated_keys():
    layer, x = setup(True)
    cache = init_streaming_cache(layer, B, window=3, num_sinks=1)
    for t in range(5):
        y_t, cache = stream_step(layer, x[:, t:t + 1], cache)
    # after 5 tokens with 1 sink and a window of 3: slots hold tokens 0 | 4, 2, 3 (ring), keys before RoPE
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(layer.key(x)[:, [0, 4, 2, 3]]), rtol=1e-6, atol=1e-6)
    assert cache.window == 3 and isinstance(cache, StreamingCache) and int(cache.length) == 5
    low = init_streaming_cache(layer, B, window=3, num_sinks=1, dtype=jnp.bfloat16)
    for t in range(5):
        y_low, low = stream_step(layer, x[:, t:t + 1], low)
    assert low.k.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y_low)))
    assert_close(y_low, y_t, rtol=3e-2)


def test_errors_and_refusals():
    layer, x = setup(True)
    with pytest.raises(ValueError, match="num_sinks must be a non-negative int"):
        init_streaming_cache(layer, B, window=4, num_sinks=-1)
    with pytest.raises(ValueError, match="window must be a positive int"):
        init_streaming_cache(layer, B, window=0)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        init_streaming_cache(layer, 0, window=4)
    cache = init_streaming_cache(layer, B, window=4)
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 1, d_model\]"):
        streaming_decode(layer, x[:, :2], cache)
    with pytest.raises(TypeError, match="cache must be a StreamingCache"):
        streaming_decode(layer, x[:, :1], layer.init_cache(B, 4))
    t5 = functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=12)
    biased = MultiHeadAttention(D_MODEL, HQ, position_bias=t5, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="supports RoPE or no positional scheme; the layer has a "
                                                  "position_bias rule"):
        init_streaming_cache(biased, B, window=4)
    with pytest.raises(NotImplementedError, match="position_bias rule"):
        streaming_reference(biased, x, window=4)
    windowed = SlidingWindowAttention(D_MODEL, HQ, window=4, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="overrides __call__"):
        streaming_decode(windowed, x[:, :1], cache)
    with pytest.raises(TypeError, match="takes an attnjax.nn.MultiHeadAttention"):
        init_streaming_cache(nnx.Linear(D_MODEL, D_MODEL, rngs=nnx.Rngs(0)), B, window=4)
