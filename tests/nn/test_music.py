"""Music Transformer's relative attention layer: output and gradients against the paper's formula written out
here, decode == parallel, parameter count, packed sequences, and refused configurations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.positional.music import RelativeAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import assert_close


def music_reference(p, x, *, num_kv_heads, causal, max_distance):
    """Huang et al. 2018, eq. 3: ``softmax((Q·Kᵀ + S_rel)/√D)·V`` per head, with
    ``S_rel[i, j] = q_i·E[clip(j − i)]`` gathered pair by pair (Shaw et al. §3.2's clipping); causal: offsets
    ``−k … 0``, future keys masked."""
    q = jnp.einsum("btd,dhe->bthe", x, p["query"]["kernel"])
    k = jnp.einsum("btd,dhe->bthe", x, p["key"]["kernel"])
    v = jnp.einsum("btd,dhe->bthe", x, p["value"]["kernel"])
    if "bias" in p["query"]:
        q, k, v = q + p["query"]["bias"], k + p["key"]["bias"], v + p["value"]["bias"]
    H, D = q.shape[2], q.shape[3]
    k, v = jnp.repeat(k, H // num_kv_heads, axis=2), jnp.repeat(v, H // num_kv_heads, axis=2)
    table = p["relative_embeddings"]
    table = jnp.broadcast_to(table[:, None], (table.shape[0], H, D)) if table.ndim == 2 else table
    T = x.shape[1]
    offsets = np.arange(T)[None, :] - np.arange(T)[:, None]  # j − i
    rows = np.clip(offsets, -max_distance, 0 if causal else max_distance) + max_distance
    s_rel = jnp.einsum("bihd,ijhd->bhij", q, table[rows])
    logits = (jnp.einsum("bihd,bjhd->bhij", q, k) + s_rel) / np.sqrt(D)
    if causal:
        logits = jnp.where(offsets <= 0, logits, -jnp.inf)
    out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, axis=-1), v)
    y = jnp.einsum("bihd,hde->bie", out, p["out"]["kernel"])
    return y + p["out"]["bias"] if "bias" in p["out"] else y


def normal(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_layer_equals_the_papers_formula_with_gradients(causal):
    # causal: per-head tables, GQA, k = 3 < T (clipped); bidirectional: one shared table, biases, k = 4.
    kwargs = (dict(num_kv_heads=2, max_distance=3) if causal else
              dict(max_distance=4, share_embeddings=True, qkv_bias=True, out_bias=True))
    layer = RelativeAttention(16, 4, causal=causal, implementation="xla", rngs=nnx.Rngs(0), **kwargs)
    x = normal((2, 9, 16))

    def reference(p, x):
        return music_reference(p, x, num_kv_heads=kwargs.get("num_kv_heads", 4), causal=causal,
                               max_distance=kwargs["max_distance"])

    check_module_against_reference(layer, reference, x, rtol=2e-5, atol=2e-5,
                                   call_kwargs={"mask": masks.Causal()} if causal else None)


def test_parameter_count_and_embedding_shapes():
    d, H, Hkv, D, k = 16, 4, 2, 8, 5
    layer = RelativeAttention(d, H, num_kv_heads=Hkv, head_dim=D, max_distance=k, rngs=nnx.Rngs(0))
    assert layer.relative_embeddings.shape == (k + 1, H, D)
    assert parameter_count(layer) == d * H * D + 2 * d * Hkv * D + H * D * d + (k + 1) * H * D
    shared = RelativeAttention(d, H, max_distance=k, causal=False, share_embeddings=True, qkv_bias=True,
                               out_bias=True, rngs=nnx.Rngs(0))
    D = d // H
    assert shared.relative_embeddings.shape == (2 * k + 1, D)
    assert parameter_count(shared) == 4 * (d * H * D) + 3 * H * D + d + (2 * k + 1) * D
    assert RelativeAttention(d, H, rngs=nnx.Rngs(0)).relative_embeddings.shape == (2048, H, D)  # the paper's L


def test_decode_equals_the_parallel_call_and_mask_none_is_causal():
    layer = RelativeAttention(16, 4, num_kv_heads=2, max_distance=3, rngs=nnx.Rngs(1))
    x = normal((2, 7, 16), 1)
    parallel = nnx.jit(lambda m, x: (m(x), m(x, mask=masks.Causal())))
    y_none, y = parallel(layer, x)
    assert_close(y_none, y, atol=0, rtol=0, name="mask=None")
    step = nnx.jit(lambda m, x_t, c: m.decode(x_t, c))
    cache, outs = layer.init_cache(2, 10), []
    for t in range(x.shape[1]):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        outs.append(y_t)
    assert int(cache.length) == 7 and cache.k.shape == (2, 10, 2, 4)
    assert_close(jnp.concatenate(outs, axis=1), y, atol=2e-5, rtol=2e-5, name="decode")


def test_packed_sequences_match_separate_calls():
    """Relative positions don't depend on where a segment starts: ``Causal() & Segments`` over a packed
    batch gives each segment's own output."""
    layer = RelativeAttention(16, 2, max_distance=3, rngs=nnx.Rngs(2))
    a, b = normal((1, 5, 16), 3), normal((1, 4, 16), 4)
    ids = masks.Segments(jnp.array([[0] * 5 + [1] * 4]))
    call = nnx.jit(lambda m, x, mask: m(x, mask=mask))
    packed = call(layer, jnp.concatenate([a, b], axis=1), ids)
    assert_close(packed, jnp.concatenate([call(layer, a, None), call(layer, b, None)], axis=1), rtol=1e-5)


def test_refused_configurations():
    with pytest.raises(NotImplementedError, match="implementation must be one of"):
        RelativeAttention(16, 4, implementation="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        RelativeAttention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_distance must be a positive int"):
        RelativeAttention(16, 4, max_distance=0, rngs=nnx.Rngs(0))
    bidirectional = RelativeAttention(16, 4, max_distance=2, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="no decode"):
        bidirectional.init_cache(1, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        bidirectional(jnp.zeros((1, 4, 8)))
