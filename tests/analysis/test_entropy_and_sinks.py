"""Entropy and sink scores, blockwise, against NumPy computations of their definitions on dense maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, positional
from attnjax.analysis import (attention_entropy, attention_received, detect_sinks, entropy_of_map, sink_metric,
                              sink_scores, sink_scores_of_map)
from attnjax.analysis.blockwise import dense_log_probabilities
from tests.helpers import assert_close, random_qkv


def numpy_map(q, k, mask=None, scale=None, bias=None):
    """The softmax map by NumPy: ``[B, Hq, T, S]`` and the allowed pairs (GQA by repeating k)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    k = np.repeat(k, Hq // Hkv, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * (D ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    allowed = np.ones((B, Hq, T, S), bool) if mask is None else np.broadcast_to(np.asarray(mask.dense(T, S)),
                                                                                 (B, Hq, T, S))
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    z = e.sum(-1, keepdims=True)
    return np.where(z > 0, e / np.where(z > 0, z, 1), 0.0), allowed


def numpy_entropy(p):
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


CASES = [
    dict(T=37, S=37, Hq=4, Hkv=2, mask=masks.Causal()),
    dict(T=21, S=45, Hq=2, Hkv=2, mask=masks.SlidingWindow(5, 3)),
    dict(T=30, S=30, Hq=4, Hkv=1, mask=None),
    dict(T=23, S=23, Hq=2, Hkv=1, mask=masks.SlidingWindow(3, 2)),
]
"""Square maps under None, Causal and SlidingWindow take attention_received's two-forward path; the cross
case takes the query-tile scan."""


@pytest.mark.parametrize("case", CASES, ids=["causal-gqa", "window-cross", "full-mqa", "window-square"])
def test_blockwise_entropy_and_sinks_equal_numpy_definitions(case):
    q, k, _ = random_qkv(jax.random.key(0), T=case["T"], S=case["S"], Hq=case["Hq"], Hkv=case["Hkv"], D=8)
    q = 3 * q  # peaked maps: entropies away from log n
    p, allowed = numpy_map(q, k, case["mask"])
    entropy, blockwise, (mass, seen_by), scores = jax.jit(lambda q, k: (
        attention_entropy(q, k, mask=case["mask"]),
        attention_entropy(q, k, mask=case["mask"], block_q=8, implementation="blockwise"),
        attention_received(q, k, mask=case["mask"], block_q=8), sink_scores(q, k, mask=case["mask"], block_q=8)))(q, k)
    assert_close(entropy, numpy_entropy(p), rtol=1e-5, name="entropy (lse - E[s] from attention)")
    assert_close(blockwise, numpy_entropy(p), rtol=1e-5, name="entropy (blockwise)")
    assert_close(mass, p.sum(axis=2), rtol=1e-5, name="mass")
    np.testing.assert_array_equal(np.asarray(seen_by), allowed.sum(axis=2))
    alpha = np.where(allowed.sum(2) > 0, p.sum(2) / np.maximum(allowed.sum(2), 1), 0)
    assert_close(scores, alpha, rtol=1e-5, name="alpha")
    assert_close(sink_scores_of_map(p, allowed), alpha, rtol=1e-5, name="alpha of map")
    assert_close(entropy_of_map(p), numpy_entropy(p), rtol=1e-5, name="entropy of map")


def test_bias_scale_and_dense_log_probabilities():
    q, k, _ = random_qkv(jax.random.key(1), T=13, S=13, Hq=2, Hkv=2, D=8)
    alibi = positional.ALiBi(positional.alibi_slopes(2))
    bias = alibi.dense(13, 13)
    p, _ = numpy_map(q, k, masks.Causal(), scale=0.5, bias=bias)
    log_p, h = jax.jit(lambda q, k: (dense_log_probabilities(q, k, mask=masks.Causal(), bias=alibi, scale=0.5),
                                      attention_entropy(q, k, mask=masks.Causal(), bias=bias, scale=0.5, block_q=4)))(q, k)
    assert_close(jnp.exp(log_p), p, rtol=1e-5, name="map")
    assert_close(h, numpy_entropy(p), rtol=1e-5, name="entropy with array bias")


def test_rows_without_keys_have_zero_entropy_and_give_no_mass():
    q, k, _ = random_qkv(jax.random.key(2), B=1, T=6, S=6, Hq=1, Hkv=1, D=4)
    mask = masks.Explicit(jnp.arange(6)[:, None] >= jnp.arange(6)[None, :] + 2)  # rows 0, 1 see nothing
    h, (mass, _) = jax.jit(lambda q, k: (attention_entropy(q, k, mask=mask, block_q=4),
                                         attention_received(q, k, mask=mask)))(q, k)
    assert np.all(np.asarray(h[..., :3]) == 0) and np.all(np.asarray(h[..., 3:]) > 0)  # row 2 sees one key
    assert_close(mass.sum(), 4.0, name="four rows of mass 1")


def test_entropy_bounds_uniform_and_one_hot():
    q = jnp.zeros((1, 5, 1, 4))
    k = jax.random.normal(jax.random.key(3), (1, 5, 1, 4))
    h = jax.jit(lambda q, k: attention_entropy(q, k, mask=masks.Causal()))(q, k)
    assert_close(h[0, 0], np.log(np.arange(1, 6)), rtol=1e-6, name="uniform over the prefix: log n")
    assert_close(entropy_of_map(jnp.eye(4)), np.zeros(4), name="one-hot: 0")


def test_sink_metric_counts_heads_over_the_threshold_and_detects_sinks():
    scores = jnp.array([[[0.5, 0.1, 0.0], [0.4, 0.2, 0.35], [0.1, 0.0, 0.9]]])  # [B=1, H=3, S=3]
    np.testing.assert_allclose(np.asarray(sink_metric(scores)), [[2 / 3, 0.0, 2 / 3]])
    np.testing.assert_allclose(np.asarray(sink_metric([scores, 0 * scores])), [[1 / 3, 0.0, 1 / 3]])
    assert [list(p) for p in detect_sinks(scores, min_fraction=0.6)] == [[0, 2]]
    with pytest.raises(ValueError, match=r"scores must be \[B, H, S\]"):
        sink_metric(jnp.zeros((3, 4)))


def test_a_sink_token_is_found_by_the_blockwise_scores():
    """Plant a key every query attends to (a large dot product with every query): it is the only sink."""
    q, k, _ = random_qkv(jax.random.key(4), T=40, S=40, Hq=2, Hkv=2, D=8)
    u = jnp.ones(8) / jnp.sqrt(8.0)
    q, k = q + 3 * u, k.at[:, 0].set(10 * u)
    scores = jax.jit(lambda q, k: sink_scores(q, k, mask=masks.Causal(), block_q=16))(q, k)
    assert [list(p) for p in detect_sinks(scores)] == [[0], [0]]


def test_bad_inputs_name_the_argument():
    q, k, _ = random_qkv(jax.random.key(5), T=8, S=8, Hq=3, Hkv=2, D=4)
    with pytest.raises(ValueError, match=r"q \[B, T, Hq, D\] and k \[B, S, Hkv, D\]"):
        attention_entropy(q, k)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        attention_entropy(q[:, :, :2], k, block_q=0)
    with pytest.raises(TypeError, match="q must be a floating-point array"):
        attention_entropy(q.astype(jnp.int32), k)
    with pytest.raises(NotImplementedError, match="no bias or logits_soft_cap"):
        attention_entropy(q[:, :, :2], k, logits_soft_cap=5.0, implementation="attention")
    with pytest.raises(ValueError, match="implementation must be one of"):
        attention_entropy(q[:, :, :2], k, implementation="flash")


def test_bf16_and_jit():
    q, k, _ = random_qkv(jax.random.key(6), T=33, S=33, Hq=2, Hkv=1, D=8, dtype=jnp.bfloat16)
    h = jax.jit(lambda q, k: attention_entropy(q, k, mask=masks.Causal(), block_q=16))(q, k)
    assert h.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(h)))
    p, _ = numpy_map(q.astype(jnp.float32), k.astype(jnp.float32), masks.Causal())
    assert_close(h, numpy_entropy(p), rtol=2e-2, name="bf16 entropy")


def test_entropy_gradients_are_finite_under_masks_and_equal_the_dense_form():
    q, k, _ = random_qkv(jax.random.key(7), B=1, T=11, S=11, Hq=2, Hkv=1, D=4)
    mask = masks.SlidingWindow(3, 0)

    def dense(q, k):
        return entropy_of_map(jnp.exp(dense_log_probabilities(q, k, mask=mask)))

    def loss(fn):
        return lambda q, k: jnp.sum(fn(q, k) * jnp.arange(11.0))

    expected = jax.jit(jax.grad(loss(dense), argnums=(0, 1)))(q, k)
    for implementation in ("attention", "blockwise"):
        fn = jax.grad(loss(lambda q, k: attention_entropy(q, k, mask=mask, block_q=4, implementation=implementation)),
                      argnums=(0, 1))
        for g, g_ref, name in zip(jax.jit(fn)(q, k), expected, "qk"):
            assert_close(g, g_ref, rtol=1e-5, name=f"{implementation}: d{name}")
