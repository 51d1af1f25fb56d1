"""Landmark retrieval at inference (attnjax.inference.landmark_retrieval): the top-k rule and the attention."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.inference.landmark_retrieval import (landmark_retrieval_attention, landmark_scores, retrieval_mask,
                                                  retrieve_blocks)
from attnjax.sparse.landmark import landmark_attention_reference
from tests.helpers import assert_close, random_qkv

KEY = jax.random.PRNGKey(0)


def brute_force_blocks(q, k, block_size, top_k, local_blocks):
    """The rule in loops: for each (batch, query, head), rank the landmarks of the complete blocks before the
    local ones by ``q · k_L / sqrt(D)`` and keep the best ``top_k`` (as sets)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    chosen = {}
    for b in range(B):
        for t in range(T):
            p = S - T + t
            candidates = range(max(0, p // block_size - local_blocks + 1))
            for h in range(Hq):
                score = {n: q[b, t, h] @ k[b, n * block_size + block_size - 1, h // (Hq // Hkv)] / np.sqrt(D)
                         for n in candidates}
                chosen[b, t, h] = set(sorted(score, key=lambda n: -score[n])[:top_k])
    return chosen


@pytest.mark.parametrize("T, S, bs, top_k, local", [(3, 37, 4, 2, 1), (5, 29, 3, 3, 2), (1, 9, 4, 4, 1)])
def test_retrieved_blocks_follow_the_rule(T, S, bs, top_k, local):
    q, k, _ = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    ids, valid = jax.jit(functools.partial(retrieve_blocks, block_size=bs, top_k=top_k, local_blocks=local))(q, k)
    ids, valid = np.asarray(ids), np.asarray(valid)
    expected = brute_force_blocks(q, k, bs, top_k, local)
    for (b, t, h), blocks in expected.items():
        got = ids[b, t, h][valid[b, t, h]]
        assert set(got.tolist()) == blocks and len(got) == len(blocks), (b, t, h)
        p = S - T + t
        assert np.all(got * bs + bs - 1 < (p // bs - local + 1) * bs)  # never the local blocks, never the future
    scores = np.asarray(landmark_scores(q, k, block_size=bs))
    picked = np.take_along_axis(scores, ids, -1)
    assert np.all(np.where(valid[..., 1:], picked[..., :-1] >= picked[..., 1:], True))  # decreasing score


def test_attention_is_the_reference_restricted_to_the_retrieved_blocks():
    T, S, bs, top_k, local = 3, 37, 4, 2, 2
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    q = 2.0 * q

    def both(q, k, v):
        ids, valid = retrieve_blocks(q, k, block_size=bs, top_k=top_k, local_blocks=local)
        keep = retrieval_mask(ids, valid, T=T, S=S, block_size=bs, local_blocks=local)
        return (landmark_retrieval_attention(q, k, v, block_size=bs, top_k=top_k, local_blocks=local),
                landmark_attention_reference(q, k, v, block_size=bs, mask=keep),
                landmark_attention_reference(q, k, v, block_size=bs), keep.mask)

    got, restricted, full, keep = jax.jit(both)(q, k, v)
    assert_close(got, restricted, name="retrieval vs restricted reference")
    assert float(jnp.max(jnp.abs(got - full))) > 1e-3  # blocks were actually left out
    # each (query, head) keeps its top_k retrieved blocks and its local blocks, nothing else
    kept = np.pad(np.asarray(keep), ((0, 0),) * 3 + ((0, -S % bs),)).reshape(2, 4, T, -1, bs).any(-1).sum(-1)
    assert np.all(kept == top_k + local)


def test_enough_top_k_is_full_landmark_attention_and_decode_matches():
    """With every block retrieved, a decode step (one query against the cache) is the last row of the
    training-time attention."""
    S, bs = 23, 4
    q, k, v = random_qkv(KEY, B=1, T=S, Hq=2, Hkv=1, D=8)
    full = jax.jit(functools.partial(landmark_attention_reference, block_size=bs))(q, k, v)
    step = jax.jit(functools.partial(landmark_retrieval_attention, block_size=bs, top_k=S // bs))
    assert_close(step(q[:, -1:], k, v), full[:, -1:], name="last step")


def test_bf16_finite():
    q, k, v = random_qkv(KEY, B=1, T=2, S=21, Hq=2, D=8, dtype=jnp.bfloat16)
    out = jax.jit(functools.partial(landmark_retrieval_attention, block_size=4, top_k=2))(q, k, v)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_bad_input_errors():
    q, k, v = random_qkv(KEY, B=1, T=4, S=12, Hq=2, D=8)
    with pytest.raises(ValueError, match="T <= S"):
        retrieve_blocks(k, q, block_size=4, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        retrieve_blocks(q, k, block_size=4, top_k=0)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        landmark_retrieval_attention(q, k, v, block_size=1, top_k=1)
    with pytest.raises(ValueError, match="k and v must agree"):
        landmark_retrieval_attention(q, k, v[:, :5], block_size=4, top_k=1)
