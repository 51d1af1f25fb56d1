"""Thought-anchor tools (Bogdan et al. 2025): the blockwise sentence map, vertical scores and receiver heads,
against NumPy computations of the definitions and a port of the authors' vertical-score code."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.analysis.anchors import (receiver_head_kurtosis, receiver_head_scores, receiver_heads,
                                      segment_ids_from_spans, sentence_attention, sentence_attention_of_map,
                                      vertical_scores)
from tests.analysis.test_entropy_and_sinks import numpy_map
from tests.helpers import assert_close, numpy_rng, random_qkv


def numpy_sentence_map(p, ids, n):
    """The mean of ``p [B, H, T, S]`` over each block (query tokens of sentence i) x (key tokens of j)."""
    B, H, T, S = p.shape
    out = np.zeros((B, H, n, n))
    for b in range(B):
        for i in range(n):
            rows = np.flatnonzero(ids[b, S - T:] == i)
            for j in range(n):
                cols = np.flatnonzero(ids[b] == j)
                if rows.size and cols.size:
                    out[b, :, i, j] = p[b][:, rows][:, :, cols].mean(axis=(-1, -2))
    return out


def reference_vertical_scores(avg_mat, proximity_ignore):
    """``get_vertical_scores`` of the authors' attn_funcs.py (score_type="mean", control_depth=False)."""
    avg_mat = avg_mat.copy()
    avg_mat[np.triu_indices_from(avg_mat, k=1)] = np.nan
    avg_mat[np.triu_indices_from(avg_mat, k=-proximity_ignore + 1)] = np.nan
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(avg_mat.shape[-1]):
            lines = avg_mat[i + proximity_ignore:, i]
            scores.append(np.nanmean(lines) if len(lines) else np.nan)
    return np.array(scores)


def numpy_kurtosis(v):
    """Fisher excess kurtosis with population moments over the non-NaN entries."""
    v = v[~np.isnan(v)]
    d = v - v.mean()
    return np.mean(d ** 4) / np.mean(d ** 2) ** 2 - 3


def test_segment_ids_from_spans():
    np.testing.assert_array_equal(segment_ids_from_spans([(0, 2), (3, 5)], 6), [0, 0, -1, 1, 1, -1])
    with pytest.raises(ValueError, match=r"spans\[1\] = \(1, 3\) overlaps an earlier span"):
        segment_ids_from_spans([(0, 2), (1, 3)], 6)
    with pytest.raises(ValueError, match=r"spans\[0\] = \(4, 9\) must satisfy 0 <= start <= end <= length = 6"):
        segment_ids_from_spans([(4, 9)], 6)


SPANS = ([(1, 6), (6, 10), (10, 17), (17, 22), (22, 29)], [(0, 4), (4, 12), (15, 21), (21, 29)])
CASES = [
    dict(T=29, Hq=4, Hkv=2, ids=np.stack([segment_ids_from_spans(s, 29) for s in SPANS]), block_q=8),
    dict(T=9, Hq=2, Hkv=1, ids=segment_ids_from_spans(SPANS[0], 29), block_q=4),
]


@pytest.mark.parametrize("case", CASES, ids=["causal-gqa-per-batch-ids", "last-queries-shared-ids"])
def test_sentence_map_blockwise_and_dense_equal_numpy(case):
    """Batch 1 of the first case has no sentence 4 (its row and column are 0) and tokens in no sentence."""
    q, k, _ = random_qkv(jax.random.key(0), B=2, T=case["T"], S=29, Hq=case["Hq"], Hkv=case["Hkv"], D=8)
    q = 3 * q
    p, _ = numpy_map(q, k, masks.Causal())
    ids = case["ids"]
    ids_of_map = ids[:, None] if ids.ndim == 2 else ids
    blockwise, of_map = jax.jit(lambda q, k, p: (
        sentence_attention(q, k, ids, 5, mask=masks.Causal(), block_q=case["block_q"]),
        sentence_attention_of_map(p, ids_of_map, 5)))(q, k, p)
    expected = numpy_sentence_map(p, np.broadcast_to(ids, (2, 29)), 5)
    assert_close(blockwise, expected, rtol=1e-5, name="sentence map")
    assert_close(of_map, expected, rtol=1e-5, name="sentence map of map")
    assert np.count_nonzero(expected) > 10


def test_vertical_scores_kurtosis_and_receiver_heads():
    rng = numpy_rng(jax.random.key(1))
    maps = np.tril(rng.random((3, 2, 4, 9, 9)) ** 4)  # [L, B, H, n, n]
    by_d = jax.jit(lambda m: [vertical_scores(m, d) for d in (0, 1, 4)])(maps)
    for d, vertical in zip((0, 1, 4), by_d):
        expected = np.stack([reference_vertical_scores(m, d) for m in maps.reshape(-1, 9, 9)]).reshape(3, 2, 4, 9)
        np.testing.assert_array_equal(np.isnan(vertical), np.isnan(expected))
        assert_close(np.nan_to_num(vertical), np.nan_to_num(expected), rtol=1e-5, name=f"vertical, d={d}")
    vertical = np.asarray(vertical)
    kurt, by_hand = jax.jit(lambda v: (receiver_head_kurtosis(v), receiver_head_kurtosis(
        jnp.array([0.0, 0.0, jnp.nan, 0.0, 1.0]))))(vertical)
    expected = np.array([numpy_kurtosis(v) for v in vertical.reshape(-1, 9)]).reshape(3, 2, 4)
    assert_close(kurt, expected, rtol=1e-4, name="kurtosis")
    assert_close(by_hand, -2 / 3, rtol=1e-6, name="kurtosis of [0, 0, 0, 1]")
    heads = receiver_heads(np.mean(expected, axis=1), top_k=5)  # kurtosis averaged over the traces: [L, H]
    flat = np.mean(expected, axis=1).ravel()
    np.testing.assert_array_equal(np.ravel_multi_index(heads.T, (3, 4)), np.argsort(-flat)[:5])
    scores = receiver_head_scores(np.moveaxis(vertical, 1, 2), heads)  # [L, H, B, n] -> [B, n]
    expected_scores = np.mean([vertical[l, :, h] for l, h in heads], axis=0)
    np.testing.assert_array_equal(np.isnan(scores), np.isnan(expected_scores))
    assert_close(np.nan_to_num(scores), np.nan_to_num(expected_scores), rtol=1e-6, name="receiver-head scores")


def test_receiver_heads_skip_nan_and_keep_order():
    kurt = np.array([[1.0, np.nan, 3.0], [2.0, 5.0, 0.0]])
    np.testing.assert_array_equal(receiver_heads(kurt, top_k=3), [[1, 1], [0, 2], [1, 0]])
    assert receiver_heads(kurt, top_k=10).shape == (5, 2)


def test_a_planted_anchor_sentence_makes_a_receiver_head():
    """Head 1's queries all point at the keys of sentence 1; head 0 attends uniformly. Head 1's vertical
    scores peak at sentence 1 and have the larger kurtosis, so it is the receiver head."""
    spans = [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (30, 35), (35, 40)]
    ids = segment_ids_from_spans(spans, 40)
    q, k, _ = random_qkv(jax.random.key(2), B=1, T=40, S=40, Hq=2, Hkv=1, D=8)
    u = np.ones(8, np.float32) / np.sqrt(8.0)

    def run(q, k):
        q = q.at[:, :, 0].set(0.0).at[:, :, 1].add(3 * u)
        k = k.at[:, 5:10].set(4 * u)
        vertical = vertical_scores(sentence_attention(q, k, ids, 8, mask=masks.Causal(), block_q=16))
        return vertical, receiver_head_kurtosis(vertical)[0]

    vertical, kurt = jax.jit(run)(q, k)
    assert int(np.nanargmax(vertical[0, 1])) == 1
    assert float(kurt[1]) > float(kurt[0])
    np.testing.assert_array_equal(receiver_heads(kurt, top_k=1), [[1]])


def test_bad_inputs_name_the_argument():
    q, k, _ = random_qkv(jax.random.key(3), B=2, T=8, S=8, Hq=2, Hkv=2, D=4)
    with pytest.raises(TypeError, match="segment_ids must be integers"):
        sentence_attention(q, k, jnp.zeros(8), 2)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[S\] or \[B, S\] = \[2, 8\].*got \[7\]"):
        sentence_attention(q, k, jnp.zeros(7, jnp.int32), 2)
    with pytest.raises(ValueError, match="num_sentences must be a positive int"):
        sentence_attention(q, k, jnp.zeros(8, jnp.int32), 0)
    with pytest.raises(ValueError, match=r"segment_ids must end in the key axis S = 3"):
        sentence_attention_of_map(jnp.eye(3), jnp.zeros(4, jnp.int32), 2)
    with pytest.raises(ValueError, match="proximity_ignore must be a non-negative int"):
        vertical_scores(jnp.eye(3), -1)
    with pytest.raises(ValueError, match=r"sentence_map must be square \[..., n, n\], got shape \[3, 4\]"):
        vertical_scores(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="heads must be a non-empty int array"):
        receiver_head_scores(jnp.ones((2, 3, 4)), np.zeros((0, 2), int))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        receiver_heads(np.ones(3), top_k=0)
