"""attnjax.nn.echo: EchoAttentionStack and EchoAttention against plain layers that store the anchor's map and
reuse it explicitly, parameter counts, the cache layout and decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.echo import EchoAttention, EchoAttentionStack, EchoCache
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close

D_MODEL, HEADS, KV_HEADS, LAYERS = 16, 4, 2, 3


def stored_map(q, k, causal):
    """The anchor's softmax map [B, H, T, S], stored (K repeated for GQA)."""
    k = jnp.repeat(k, HEADS // KV_HEADS, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


def reuse(p, layer, h, probabilities):
    """W_O^l · A_e · (h W_V^l): one layer applying the stored map to its own values."""
    v = jnp.repeat(jnp.einsum("btd,dhk->bthk", h, layer["value"]["kernel"]), HEADS // KV_HEADS, axis=2)
    return jnp.einsum("bhts,bshk,hkd->btd", probabilities, v, layer["out"]["kernel"])


def plain_stack(p, x, causal=True):
    """EchoAtt's shared attention by hand: layer 0 computes its map from its q, k; every layer reuses that stored
    map with its own values, residually: h_{l+1} = h_l + W_O^l A_0 (h_l W_V^l)."""
    q = jnp.einsum("btd,dhk->bthk", x, p["query"]["kernel"])
    k = jnp.einsum("btd,dhk->bthk", x, p["key"]["kernel"])
    a = stored_map(q, k, causal)
    h = x
    for l in range(LAYERS):
        h = h + reuse(p, p["layers"][l], h, a)
    return h


def make(**kw):
    return EchoAttentionStack(D_MODEL, HEADS, **{"num_layers": LAYERS, "num_kv_heads": KV_HEADS, "block_q": 4,
                                                 "block_kv": 4, "rngs": nnx.Rngs(0), **kw})


def inputs(seed=0, T=7):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, T, D_MODEL)), jnp.float32)


def test_stack_equals_explicitly_reusing_the_stored_map():
    """The stored-map path, forward and every gradient; the tile paths' gradients equal it in
    tests/heads/test_echo.py."""
    check_module_against_reference(make(implementation="reference"), plain_stack, inputs(),
                                   call_kwargs={"mask": masks.Causal()})


def test_tile_paths_of_the_stack_forward():
    """The default path (followers with the anchor's lse) and ``use_lse=False`` (online softmax), forward."""
    default, online, x = make(), make(use_lse=False), inputs(4, T=6)
    y, y_online = nnx.jit(lambda a, b, x: (a(x, mask=masks.Causal()), b(x, mask=masks.Causal())))(default, online, x)
    expected = jax.jit(plain_stack)(parameters(default), x)
    assert_close(y, expected, name="y")
    assert_close(y_online, expected, name="y online")


def test_follower_layer_equals_the_stored_map_times_its_values():
    """Forward (the same value and output projections get their gradients checked inside the stack above)."""
    layer = EchoAttention(D_MODEL, HEADS, num_kv_heads=KV_HEADS, block_q=4, block_kv=4, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(2)
    x, q, k = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 6, D_MODEL), (2, 6, HEADS, 4),
                                                                       (2, 6, KV_HEADS, 4)))
    y = nnx.jit(lambda m, x, q, k: m(x, q, k))(layer, x, q, k)
    expected = jax.jit(lambda p, x, q, k: reuse(p, p, x, stored_map(q, k, causal=False)))(parameters(layer), x, q, k)
    assert_close(y, expected, name="y")


def test_parameter_count_and_cache_layout():
    m = nnx.eval_shape(lambda: make(num_layers=4))
    D = D_MODEL // HEADS
    qk = D_MODEL * HEADS * D + D_MODEL * KV_HEADS * D  # the anchor's q and k, once
    per_layer = D_MODEL * KV_HEADS * D + HEADS * D * D_MODEL  # every layer's v and o
    assert parameter_count(m) == qk + 4 * per_layer
    cache = make().init_cache(2, 10)
    assert isinstance(cache, EchoCache) and cache.k.shape == (2, 10, KV_HEADS, D)
    assert cache.v.shape == (LAYERS, 2, 10, KV_HEADS, D)  # L + 1 cached arrays instead of 2L


def test_decode_equals_parallel_with_the_stored_map_path():
    layer, x = make(implementation="reference"), inputs(3, T=5)
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x)
    step = nnx.jit(lambda m, x_t, c: m.decode(x_t, c))
    cache, steps = layer.init_cache(2, 6), []
    for t in range(x.shape[1]):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        steps.append(y_t)
    assert_close(jnp.concatenate(steps, axis=1), y, atol=2e-5, name="decode")
    assert int(cache.length) == 5


def test_errors():
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        make(num_layers=0)
    with pytest.raises(ValueError, match="implementation must be one of"):
        make(implementation="pallas")
    with pytest.raises(NotImplementedError, match="mask=None or masks.Causal"):
        make()(inputs(), mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match="num_heads .* must be a multiple of num_kv_heads"):
        EchoAttention(D_MODEL, HEADS, num_kv_heads=3, rngs=nnx.Rngs(0))
