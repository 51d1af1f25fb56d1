"""InfiniRetri (Ye et al. 2025): the question's pooled attention scores and top-K selection against a brute-force
NumPy loop over the rule (and scipy's convolve2d, the authors' pooling), the chunk loop on a planted needle that
must survive every later chunk, on a context-free score (greedy top-K is the global top-K), with everything kept
(ids and positions exact), and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.signal import convolve2d

from attnjax.inference import (infiniretri_layer_scorer, infiniretri_read, infiniretri_scores,
                               infiniretri_select)
from attnjax.nn.attention import MultiHeadAttention
from attnjax.positional import RoPE
from tests.helpers import assert_close, numpy_rng

B, HQ, D = 2, 4, 8


def brute_force(q, k, pool_kernel, keep, weighting=False):
    """The rule in float64 loops: dense causal softmax of each question query over all S keys (question last),
    summed over heads, each question row times the square of its mass on the question columns if ``weighting``,
    summed over question tokens, all-ones window ``[j - p//2, j + (p-1)//2]`` with zeros outside the context,
    top-``keep`` (ties: earlier), sorted."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, tq, hq, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    context, group = length - tq, hq // hkv
    pooled = np.zeros((batch, context))
    chosen = np.zeros((batch, keep), np.int64)
    for b in range(batch):
        column = np.zeros(context)
        for i in range(tq):
            row = np.zeros(length)
            for h in range(hq):
                logits = np.array([q[b, i, h] @ k[b, j, h // group] / math.sqrt(d) if j <= context + i else -np.inf
                                   for j in range(length)])
                weights = np.exp(logits - logits.max())
                row += weights / weights.sum()
            column += row[:context] * (row[context:].sum() ** 2 if weighting else 1.0)
        for j in range(context):
            pooled[b, j] = sum(column[t] for t in range(j - pool_kernel // 2, j + (pool_kernel - 1) // 2 + 1)
                               if 0 <= t < context)
        ranked = sorted(range(context), key=lambda j: (-pooled[b, j], j))
        chosen[b] = sorted(ranked[:keep])
    return pooled, chosen


@pytest.mark.parametrize("tq,length,hkv,pool_kernel,weighting",
                         [(3, 13, 2, 3, False), (1, 9, 4, 1, False), (4, 17, 1, 8, False), (2, 11, 2, 5, True),
                          (3, 10, 1, 4, True)])
def test_scores_and_selection_match_brute_force(tq, length, hkv, pool_kernel, weighting):
    rng = numpy_rng(jax.random.PRNGKey(tq + length + pool_kernel))
    q = jnp.asarray(rng.standard_normal((B, tq, HQ, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, length, hkv, D)), jnp.float32)
    keep = 4
    pooled, chosen = brute_force(q, k, pool_kernel, keep, weighting)
    scores = infiniretri_scores(q, k, pool_kernel=pool_kernel, question_weighting=weighting)
    assert scores.dtype == jnp.float32 and scores.shape == (B, length - tq)
    assert_close(scores, pooled, atol=1e-5)
    selected = infiniretri_select(q, k, keep=keep, pool_kernel=pool_kernel, question_weighting=weighting)
    assert selected.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(selected), chosen)


@pytest.mark.parametrize("pool_kernel", [4, 5])
def test_pooling_is_the_authors_convolve2d_same(pool_kernel):
    """The authors' ``convolve2d(question2context, ones((1, p)), mode="same")`` summed over question rows; with
    one head and every question query seeing the same keys the rows are the softmax rows themselves."""
    rng = numpy_rng(jax.random.PRNGKey(pool_kernel))
    q = jnp.asarray(rng.standard_normal((1, 1, 1, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 12, 1, D)), jnp.float32)
    logits = np.asarray(k[0, :, 0] @ q[0, 0, 0], np.float64) / math.sqrt(D)
    weights = np.exp(logits - logits.max())
    rows = (weights / weights.sum())[None, :11]
    expected = convolve2d(rows, np.ones((1, pool_kernel)), mode="same", boundary="fill", fillvalue=0).sum(0)
    assert_close(infiniretri_scores(q, k, pool_kernel=pool_kernel)[0], expected, atol=1e-6)


def test_scores_jit_and_bf16():
    rng = numpy_rng(jax.random.PRNGKey(3))
    q = jnp.asarray(rng.standard_normal((B, 3, HQ, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, 13, 2, D)), jnp.float32)
    eager = infiniretri_scores(q, k, pool_kernel=3)
    jitted = jax.jit(infiniretri_scores, static_argnames="pool_kernel")(q, k, pool_kernel=3)
    assert_close(jitted, eager, atol=1e-6)
    low = infiniretri_scores(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), pool_kernel=3)
    assert low.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(low)))
    assert_close(low, eager, atol=0.1)


VOCAB, D_MODEL, NEEDLE, QUESTION = 16, 8, 0, 1
CHUNK_SIZES = (8, 8, 8, 8, 5)          # 37 tokens, the last chunk short
NEEDLE_AT = (3, 12)                     # one needle per sequence: chunk 0 and chunk 1


def _tiny_model(rope=None, num_kv_heads=1):
    layer = MultiHeadAttention(D_MODEL, 2, num_kv_heads=num_kv_heads, rope=rope, rngs=nnx.Rngs(0))
    rng = numpy_rng(jax.random.PRNGKey(7))
    table = 0.1 * rng.standard_normal((VOCAB, D_MODEL))
    table[QUESTION] = rng.standard_normal(D_MODEL)
    q_sum = np.asarray(layer.query(jnp.asarray(table[QUESTION], jnp.float32)), np.float64).sum(0)   # [D]
    w_k = np.asarray(layer.key.kernel[...], np.float64)                       # [d_model, Hkv, D]
    direction = w_k[:, 0, :] @ q_sum                                              # key of x: x @ w_k
    key_dot = (direction @ w_k[:, 0, :]) @ q_sum
    table[NEEDLE] = 30.0 * math.sqrt(D_MODEL // 2) * direction / key_dot          # needle·question logit ≈ 30
    table = jnp.asarray(table, jnp.float32)
    return layer, lambda ids: table[ids]


def _haystack():
    rng = numpy_rng(jax.random.PRNGKey(11))
    ids = rng.integers(2, VOCAB, size=(B, sum(CHUNK_SIZES)))
    for b, at in enumerate(NEEDLE_AT):
        ids[b, at] = NEEDLE
    ids = jnp.asarray(ids, jnp.int32)
    bounds = np.cumsum((0,) + CHUNK_SIZES)
    return ids, [ids[:, s:e] for s, e in zip(bounds[:-1], bounds[1:])]


def test_needle_is_retained_through_every_later_chunk():
    layer, embed = _tiny_model()
    scorer = infiniretri_layer_scorer(layer, embed, pool_kernel=3)
    ids, chunks = _haystack()
    question = jnp.full((B, 2), QUESTION, jnp.int32)
    for end in range(1, len(chunks) + 1):
        tokens, positions = infiniretri_read(scorer, chunks[:end], question, keep=4)
        assert tokens.shape == positions.shape == (B, 4)
        np.testing.assert_array_equal(np.asarray(tokens), np.take_along_axis(np.asarray(ids), positions, 1))
        for b, at in enumerate(NEEDLE_AT):
            read = sum(CHUNK_SIZES[:end])
            if at < read:
                assert at in np.asarray(positions[b]).tolist(), (end, b, positions[b])
            assert np.all(np.diff(np.asarray(positions[b])) > 0)


@pytest.mark.slow
def test_everything_is_retained_with_keep_at_least_the_input():
    layer, embed = _tiny_model(rope=RoPE(), num_kv_heads=2)
    scorer = infiniretri_layer_scorer(layer, embed, pool_kernel=5, question_weighting=True)
    ids, chunks = _haystack()
    question = jnp.full((B, 3), QUESTION, jnp.int32)
    for keep in (sum(CHUNK_SIZES), 50):
        tokens, positions = infiniretri_read(scorer, chunks, question, keep=keep)
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ids))
        np.testing.assert_array_equal(np.asarray(positions), np.broadcast_to(np.arange(ids.shape[1]), ids.shape))


def test_context_free_scores_give_the_global_top_k():
    """A score that ignores context makes the chunked greedy selection the global top-K (ties: earlier)."""
    ids, chunks = _haystack()
    tokens, positions = infiniretri_read(lambda context, question: context.astype(jnp.float32), chunks,
                                         jnp.zeros((B, 1), jnp.int32), keep=6)
    for b in range(B):
        row = np.asarray(ids[b])
        expected = sorted(sorted(range(len(row)), key=lambda j: (-row[j], j))[:6])
        np.testing.assert_array_equal(np.asarray(positions[b]), expected)
        np.testing.assert_array_equal(np.asarray(tokens[b]), row[expected])


def test_errors_name_the_argument():
    q = jnp.zeros((1, 3, 2, 4))
    k = jnp.zeros((1, 9, 1, 4))
    with pytest.raises(ValueError, match="Tq"):
        infiniretri_scores(q, k[:, :3])
    with pytest.raises(ValueError, match="q"):
        infiniretri_scores(q[0], k)
    with pytest.raises(ValueError, match="pool_kernel"):
        infiniretri_scores(q, k, pool_kernel=0)
    with pytest.raises(TypeError, match="pool_kernel"):
        infiniretri_scores(q, k, pool_kernel=2.0)
    with pytest.raises(TypeError, match="question_weighting"):
        infiniretri_scores(q, k, question_weighting=1)
    with pytest.raises(ValueError, match="keep"):
        infiniretri_select(q, k, keep=7)
    with pytest.raises(ValueError, match="keep"):
        infiniretri_select(q, k, keep=0)
    ids = jnp.zeros((2, 5), jnp.int32)
    score = lambda context, question: context.astype(jnp.float32)   # noqa: E731
    with pytest.raises(ValueError, match="chunks"):
        infiniretri_read(score, [], ids, keep=2)
    with pytest.raises(ValueError, match=r"chunks\[1\]"):
        infiniretri_read(score, [ids, ids[:1]], ids, keep=2)
    with pytest.raises(ValueError, match=r"chunks\[0\]"):
        infiniretri_read(score, [ids.astype(jnp.float32)], ids, keep=2)
    with pytest.raises(ValueError, match="question"):
        infiniretri_read(score, [ids], ids[0], keep=2)
    with pytest.raises(ValueError, match="keep"):
        infiniretri_read(score, [ids], ids, keep=0)
    with pytest.raises(TypeError, match="attention_scores"):
        infiniretri_read(None, [ids], ids, keep=2)
    with pytest.raises(ValueError, match="attention_scores must return"):
        infiniretri_read(lambda context, question: context[:, 1:].astype(jnp.float32), [ids], ids, keep=2)
    layer, _ = _tiny_model()
    with pytest.raises(ValueError, match="embed"):
        infiniretri_read(infiniretri_layer_scorer(layer, lambda x: jnp.zeros(x.shape + (3,))), [ids], ids, keep=2)
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        infiniretri_layer_scorer(object(), lambda x: x)
