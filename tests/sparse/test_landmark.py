"""Landmark attention (attnjax.sparse.landmark): grouped softmax, blocked path, landmark tokens."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.blocked.lists import to_block_mask
from attnjax.sparse.landmark import (Landmark, insert_landmarks, is_landmark, landmark_attention,
                                     landmark_attention_reference, landmark_attention_xla)
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


@pytest.mark.parametrize("T, block_size", [(13, 4), pytest.param(12, 3, marks=pytest.mark.slow)])
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
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert all(x.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in g)


def test_dispatch_and_mask_fallback():
    q, k, v = random_qkv(KEY, B=1, T=13, Hq=2, D=8)
    keep = masks.Explicit(jnp.arange(13)[None, :] % 4 != 1)
    with pytest.raises(NotImplementedError, match="extra mask"):
        landmark_attention(q, k, v, block_size=4, mask=keep, implementation="xla")
    auto, masked_auto, masked_ref = jax.jit(lambda q, k, v: (
        landmark_attention(q, k, v, block_size=4) - landmark_attention_reference(q, k, v, block_size=4),
        landmark_attention(q, k, v, block_size=4, mask=keep),
        landmark_attention_reference(q, k, v, block_size=4, mask=keep)))(q, k, v)
    assert float(jnp.max(jnp.abs(auto))) < 1e-5
    assert_close(masked_auto, masked_ref, name="auto falls back to the reference")


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


def brute_force_selection(q, k, T, S, bq, bk, top_k, causal):
    """The selector's rule in loops: own key blocks forced; the other allowed blocks ranked by the max over the
    query block's rows of each row's softmax over those blocks' landmark logits (last key of the block)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, _, Hq, D = q.shape
    G = Hq // k.shape[2]
    nq, nk = -(-T // bq), -(-S // bk)
    chosen = np.zeros((B, Hq, nq, nk), bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(nq):
                rows = range(i * bq, min((i + 1) * bq, T))
                first, last = rows[0] + S - T, rows[-1] + S - T
                own = [n for n in range(nk) if n * bk <= last and first < (n + 1) * bk]
                allowed = [n for n in range(nk) if not causal or n * bk <= last]
                others = [n for n in allowed if n not in own]
                score = dict.fromkeys(others, 0.0)
                for t in rows:
                    logit = np.array([q[b, t, h] @ k[b, min(n * bk + bk - 1, S - 1), h // G] for n in others])
                    p = np.exp(logit / np.sqrt(D) - (logit / np.sqrt(D)).max()) if others else logit
                    for n, pn in zip(others, p / p.sum() if others else p):
                        score[n] = max(score[n], pn)
                K = min(nk, max(top_k, len(own)))
                keep = own + sorted(others, key=lambda n: -score[n])[:max(0, K - len(own))]
                chosen[b, h, i, keep] = True
    return chosen


@pytest.mark.parametrize("T, S, bq, bk, top_k, causal", [
    pytest.param(45, 45, 8, 8, 3, True, marks=pytest.mark.slow),  # odd length, short last block
    (21, 44, 8, 6, 4, True),      # T < S, odd, block_q != block_kv (two own key blocks per query block)
    (29, 29, 8, 8, 2, False),     # no mask: every block competes
])
def test_selector_follows_the_rule_and_is_causal(T, S, bq, bk, top_k, causal):
    q, k, _ = random_qkv(KEY, B=1, T=T, S=S, Hq=4, Hkv=2, D=8)
    sel = Landmark(block_q=bq, block_kv=bk, top_k=top_k)
    mask = masks.Causal() if causal else None
    chosen = np.asarray(to_block_mask(jax.jit(lambda q, k: sel.select(q, k, mask=mask))(q, k)))
    np.testing.assert_array_equal(chosen, brute_force_selection(q, k, T, S, bq, bk, top_k, causal))
    if causal:  # never a key block that starts after the query block's last position
        last = np.minimum((np.arange(chosen.shape[2]) + 1) * bq, T) - 1 + S - T
        assert not np.any(chosen & (np.arange(chosen.shape[3])[None, :] * bk > last[:, None]))


def test_selector_runs_in_attention_as_the_engine_on_its_lists():
    q, k, v = random_qkv(KEY, B=1, T=37, Hq=4, Hkv=2, D=8)
    sel = Landmark(block_q=8, block_kv=8, top_k=2)

    def both(q, k, v):
        blocks = sel.select(q, k, mask=masks.Causal())
        return (attnjax.attention(q, k, v, mechanism=sel, mask=masks.Causal(), implementation="xla"),
                attnjax.sparse.block_sparse_attention_reference(q, k, v, blocks, mask=masks.Causal()))

    got, expected = jax.jit(both)(q, k, v)
    assert_close(got, expected, name="selected attention")
    assert "landmark" in [e.name for e in attnjax.registry.entries()]
