"""Landmark attention (attnjax.sparse.landmark): grouped softmax, blocked path, landmark tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.sparse.landmark import (insert_landmarks, is_landmark, landmark_attention, landmark_attention_reference,
                                     landmark_attention_xla)
from tests.helpers import assert_close, random_qkv

KEY = jax.random.PRNGKey(0)


def official_grouped_softmax(att: np.ndarray, is_mem: np.ndarray) -> np.ndarray:
    """NumPy transcription of the official code (epfml/landmark-attention, lm_benchmark/models/landmark.py):
    ``CausalSelfAttention.forward``'s landmark mask block, then ``landmark_grouped_softmax`` with
    ``LandmarkGroupedSoftmaxFunction``, for one head: scores ``att [T, T]``, ``is_mem [T]`` -> weights."""
    T = att.shape[0]
    attn_mask = np.triu(np.ones((T, T), bool), 1)
    is_mem = np.broadcast_to(is_mem[None, :], (T, T))
    mem_ids = np.where(attn_mask, 0, np.cumsum(is_mem, -1) - is_mem.astype(int))
    last_section_mask = mem_ids.max(-1, keepdims=True) == mem_ids
    mask = attn_mask | (is_mem & last_section_mask)
    last_section_mask = last_section_mask & ~mask
    is_mem = is_mem & ~mask
    att = np.where(mask, -np.inf, att)
    # landmark_grouped_softmax(att, is_mem=is_mem, attn_mask=mask, last_section_mask=...)
    M = int(is_mem.sum(-1).max()) + 3  # max_mem_cnt
    last_and_rest = last_section_mask | mask
    full_access = is_mem | last_and_rest
    mem_group_idx = np.cumsum(is_mem, -1)
    resp = np.where(last_and_rest, M - 1, np.where(is_mem, M - 1, mem_group_idx))
    probs = np.zeros_like(att)
    for i in range(T):  # LandmarkGroupedSoftmaxFunction.forward, row by row
        for g in np.unique(resp[i]):
            sel = resp[i] == g
            mx = att[i, sel].max()
            e = np.exp(att[i, sel] - (0.0 if np.isinf(mx) else mx))
            denom = e.sum()
            probs[i, sel] = 0.0 if denom < 0.5 else e / denom
    group_prob = np.zeros((T, M))
    for i in range(T):
        for j in range(T):
            if is_mem[i, j]:
                group_prob[i, mem_group_idx[i, j] - 1] = probs[i, j]
        group_prob[i, M - 1] = (probs[i] * last_section_mask[i]).sum()
    factor = np.where(full_access, last_section_mask, np.take_along_axis(group_prob, resp, -1))
    return probs * factor


@pytest.mark.parametrize("T, block_size", [(13, 4), (12, 3), (7, 8)])
def test_reference_is_the_official_grouped_softmax(T, block_size):
    """The reference's weights (read off with one-hot values) equal the official code's, head by head."""
    q, k, _ = random_qkv(KEY, B=1, T=T, Hq=2, Hkv=1, D=8)
    q = 2.0 * q  # peaky rows, so a wrong group or gate shows
    v = jnp.broadcast_to(jnp.eye(T, dtype=jnp.float32)[None, :, None, :], (1, T, 1, T))
    w = np.asarray(jax.jit(functools.partial(landmark_attention_reference, block_size=block_size))(q, k, v))[0]
    for h in range(2):
        att = np.asarray(q[0, :, h]) @ np.asarray(k[0, :, 0]).T / np.sqrt(8)
        expected = official_grouped_softmax(att, is_landmark(T, block_size))
        np.testing.assert_allclose(w[:, h], expected, atol=1e-6)
        np.testing.assert_allclose(w[:, h].sum(-1), 1.0, atol=1e-6)
        assert np.all(w[:, h][:, is_landmark(T, block_size)] == 0.0)  # landmarks carry no value


def test_first_block_is_causal_softmax():
    """Before the first landmark there is nothing to gate: plain causal softmax."""
    q, k, v = random_qkv(KEY, B=2, T=7, Hq=4, Hkv=2, D=8)
    got, softmax = jax.jit(lambda q, k, v: (
        landmark_attention_reference(q, k, v, block_size=8),
        attnjax.attention(q, k, v, mask=masks.Causal(), implementation="reference")))(q, k, v)
    assert_close(got, softmax, name="out")


def out_and_grads(fn, q, k, v):
    """``fn(q, k, v)`` and the gradients of ``Σ fn(q, k, v) · w`` (fixed random ``w``), one compile."""
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape[:3] + v.shape[-1:], jnp.float32)

    def run(q, k, v):
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w)  # noqa: E731
        return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return jax.jit(run)(q, k, v)


@pytest.mark.parametrize("T, S, bs, Hq, Hkv, bq, bk", [
    (29, 29, 4, 4, 2, 8, 8),    # odd length, GQA, two landmark blocks per key tile
    (11, 27, 3, 2, 1, 4, 6),    # queries are the last T of S positions, MQA, T not a multiple of any tile
    pytest.param(21, 21, 5, 2, 2, 8, 10, marks=pytest.mark.slow),
])
def test_xla_matches_reference_forward_and_grads(T, S, bs, Hq, Hkv, bq, bk):
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=Hq, Hkv=Hkv, D=8)
    q = 1.5 * q
    out, g = out_and_grads(functools.partial(landmark_attention_xla, block_size=bs, block_q=bq, block_kv=bk), q, k, v)
    ref_out, ref_g = out_and_grads(functools.partial(landmark_attention_reference, block_size=bs), q, k, v)
    assert_close(out, ref_out, name="out")
    for a, e, n in zip(g, ref_g, "qkv"):
        assert_close(a, e, name=f"d{n}")


def test_bf16_finite_and_dtype():
    q, k, v = random_qkv(KEY, B=1, T=29, Hq=4, Hkv=2, D=8, dtype=jnp.bfloat16)
    out, g = out_and_grads(functools.partial(landmark_attention_xla, block_size=4, block_q=8, block_kv=8), q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = landmark_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), block_size=4)
    assert_close(out, ref, rtol=2e-2, name="bf16 out")
    assert all(x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in g)


def test_dispatch_and_mask_fallback():
    q, k, v = random_qkv(KEY, B=1, T=13, Hq=2, D=8)
    ref = landmark_attention_reference(q, k, v, block_size=4)
    assert_close(landmark_attention(q, k, v, block_size=4), ref, name="auto")
    keep = masks.Explicit(jnp.arange(13)[None, :] % 4 != 1)
    with pytest.raises(NotImplementedError, match="extra mask"):
        landmark_attention(q, k, v, block_size=4, mask=keep, implementation="xla")
    assert_close(landmark_attention(q, k, v, block_size=4, mask=keep),
                 landmark_attention_reference(q, k, v, block_size=4, mask=keep), name="auto falls back")


def test_bad_input_errors():
    q, k, v = random_qkv(KEY, B=1, T=9, Hq=2, D=8)
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        landmark_attention(q, k, v, block_size=1)
    with pytest.raises(ValueError, match="T <= S"):
        landmark_attention_reference(q, k[:, :5], v[:, :5], block_size=3)
    with pytest.raises(ValueError, match="multiple of block_size"):
        landmark_attention_xla(q, k, v, block_size=3, block_kv=4)
    with pytest.raises(ValueError, match="k head_dim"):
        landmark_attention(q, k[..., :4], v, block_size=3)


def test_insert_landmarks():
    tokens = jnp.arange(1, 12)[None].repeat(2, 0)  # N = 11, every 3 -> 3 landmarks, a tail of 2
    out, source = insert_landmarks(tokens, every=3, landmark_id=0)
    expected = [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 10, 11]
    np.testing.assert_array_equal(np.asarray(out), [expected, expected])
    np.testing.assert_array_equal(source, [0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10])
    np.testing.assert_array_equal(np.asarray(out[0] == 0), is_landmark(14, 4) & (np.arange(14) < 12))
    with pytest.raises(ValueError, match="int array"):
        insert_landmarks(jnp.ones((3,), jnp.float32), every=3, landmark_id=0)
