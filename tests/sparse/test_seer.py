"""SeerAttention (attnjax.sparse.seer): ground truth, AttnGate, distillation, selection, selector."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attnjax
from attnjax import masks
from attnjax.positional import RoPE
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.blocked.lists import allowed_blocks, to_block_mask
from attnjax.nn.seer_gate import AttnGate, distillation_step, gate_loss
from attnjax.sparse.engine import DenseSelectionWarning
from attnjax.sparse.seer import (Seer, attention_recall, block_max_attention, block_max_attention_reference,
                                 select_threshold, select_topk)
from tests.helpers import assert_close, numpy_rng, random_qkv

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("T, S, bq, bk, mask", [
    (37, 37, 8, 16, masks.Causal()),
    (24, 40, 8, 8, masks.SlidingWindow(9, 0)),
])
def test_block_max_attention_blocked_equals_dense(T, S, bq, bk, mask):
    q, k, _ = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=16)
    q = q * 2.0  # peakier rows, so the block maxima differ clearly
    kw = dict(block_q=bq, block_kv=bk, mask=mask)
    run = jax.jit(lambda q, k: (block_max_attention(q, k, **kw), block_max_attention_reference(q, k, **kw)))
    blocked, dense = run(q, k)
    assert blocked.shape == (2, 4, -(-T // bq), -(-S // bk))
    assert_close(blocked, dense, atol=1e-6, name="block maxima")
    np.testing.assert_allclose(np.asarray(blocked.sum(-1)), 1.0, atol=1e-5)
    off = ~np.asarray(allowed_blocks(mask, T, S, bq, bk))
    assert np.all(np.asarray(blocked)[np.broadcast_to(off, blocked.shape)] == 0.0)


def test_block_max_attention_reference_matches_numpy_definition():
    """max over (rows of the q block, columns of the kv block) of P, then row-normalized."""
    q, k, _ = random_qkv(KEY, B=1, T=12, Hq=2, Hkv=1, D=8)
    s = np.einsum("thd,shd->hts", np.asarray(q[0]), np.repeat(np.asarray(k[0]), 2, axis=1)) / np.sqrt(8)
    s = np.where(np.tril(np.ones((12, 12), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    m = p.reshape(2, 3, 4, 3, 4).max(axis=(2, 4))
    expected = m / m.sum(-1, keepdims=True)
    got = jax.jit(lambda q, k: block_max_attention_reference(q, k, block_q=4, block_kv=4, mask=masks.Causal()))(q, k)
    np.testing.assert_allclose(np.asarray(got[0]), expected, atol=1e-6)


def _gate(D=16, Hq=4, Hkv=2, block=8, seed=0, **kw):
    return AttnGate(D, Hq, num_kv_heads=Hkv, block_q=block, block_kv=block, rngs=nnx.Rngs(seed), **kw)


def _gate_numpy(gate, q, k):
    """The gate's logits from its parameters, by NumPy loops (T, S multiples of the blocks)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    bq, bk = gate.block_q, gate.block_kv
    qb = q.reshape(B, T // bq, bq, Hq, D).mean(2)
    kb = k.reshape(B, S // bk, bk, Hkv, D)
    kp = np.concatenate([kb.max(2), kb.min(2), kb.mean(2)], -1)
    wq, wk = np.asarray(gate.w_q[...]), np.asarray(gate.w_k[...])
    out = np.zeros((B, Hq, T // bq, S // bk))
    for b in range(B):
        for h in range(Hq):
            out[b, h] = (qb[b, :, h] @ wq[h]) @ (kp[b, :, h // (Hq // Hkv)] @ wk[h // (Hq // Hkv)]).T
    return out / np.sqrt(gate.gate_dim)


def test_gate_shapes_causality_and_math():
    q, k, _ = random_qkv(KEY, B=2, T=37, Hq=4, Hkv=2, D=16)
    gate, roped_gate = _gate(), _gate(rope=RoPE())

    @jax.jit
    def run(q, k):
        causal = masks.Causal()
        return gate(q, k, mask=causal), gate.logits(q[:, :32], k[:, :32]), roped_gate(q, k, mask=causal)

    probs, logits, roped = run(q, k)
    assert probs.shape == (2, 4, 5, 5) and probs.dtype == jnp.float32
    upper = np.triu(np.ones((5, 5), bool), 1)
    for p in (probs, roped):  # RoPE on the pooled features at block positions keeps the gate causal
        np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, atol=1e-5)
        assert np.all(np.asarray(p)[..., upper] == 0.0), "a future block got probability"
        assert np.all(np.asarray(p)[..., ~upper] > 0.0)
    # the math: pooled avg q · pooled (max ‖ min ‖ avg) k per head, GQA sharing W_k per KV head
    np.testing.assert_allclose(np.asarray(logits), _gate_numpy(gate, q[:, :32], k[:, :32]), rtol=1e-4, atol=1e-4)


def _structured_qk(B=2, T=64, Hq=4, Hkv=2, D=16, block=8, strength=3.0):
    """Each query block attends mostly to one earlier key block: q rows carry the direction ``u_j``
    that key block ``j`` carries (a random target ``j ≤ i`` per batch, query head, query block)."""
    rng = numpy_rng(jax.random.PRNGKey(7))
    n = T // block
    u = rng.standard_normal((B, Hkv, n, D))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    k = 0.3 * rng.standard_normal((B, T, Hkv, D)) + strength * np.repeat(u.transpose(0, 2, 1, 3), block, axis=1)
    target = np.minimum(rng.integers(0, n, (B, Hq, n)), np.arange(n))
    G = Hq // Hkv
    uq = np.stack([u[b, h // G, target[b, h]] for b in range(B) for h in range(Hq)]).reshape(B, Hq, n, D)
    q = 0.3 * rng.standard_normal((B, T, Hq, D)) + strength * np.repeat(uq.transpose(0, 2, 1, 3), block, axis=1)
    return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


def test_distillation_reduces_loss_and_raises_recall():
    q, k = _structured_qk()
    mask = masks.Causal()
    target = jax.jit(lambda q, k: block_max_attention(q, k, block_q=8, block_kv=8, mask=mask))(q, k)
    gate, untrained = _gate(), _gate()
    optimizer = nnx.Optimizer(gate, optax.adam(3e-2), wrt=nnx.Param)
    losses = [float(distillation_step(gate, optimizer, q, k, mask=mask, target=target)) for _ in range(41)]
    start, end = losses[0], losses[-1]
    assert end < 0.5 * start, (start, end)
    # gate_loss is KL(target ‖ gate): the untrained twin (same seed) gives the first loss, and 0 on its own scores
    scores = nnx.jit(lambda g, q, k: g(q, k, mask=mask))
    loss_of = nnx.jit(lambda g, t: gate_loss(g, q, k, mask=mask, target=t))
    assert float(loss_of(untrained, target)) == pytest.approx(start, rel=1e-5)
    assert abs(float(loss_of(untrained, scores(untrained, q, k)))) < 1e-6

    # attention mass kept at top-2 of 8 key blocks: trained gate ≈ oracle > untrained gate
    top2 = jax.jit(lambda s: select_topk(s, 2, allowed_blocks(mask, 64, 64, 8, 8), block_q=8, block_kv=8))
    recall = jax.jit(lambda q, k, blocks: attention_recall(q, k, blocks, mask=mask, implementation="reference"))
    oracle = top2(target)
    r_trained, r_untrained, r_oracle = (
        recall(q, k, blocks) for blocks in (top2(scores(gate, q, k)), top2(scores(untrained, q, k)), oracle))
    assert float(r_trained.mean()) > float(r_untrained.mean()) + 0.1
    assert float(r_trained.mean()) > float(r_oracle.mean()) - 0.02
    # recall = Σ P over the listed tiles, checked against the dense map
    logits = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, 2)) / 4.0
    p = jax.nn.softmax(jnp.where(mask.dense(64, 64), logits, -jnp.inf), -1)
    assert_close(r_oracle, jnp.sum(p * oracle.dense(64, 64), -1).transpose(0, 2, 1), atol=1e-5, name="recall")


def _brute_force(scores, allowed, k, tau=None):
    """Block mask of the top-k allowed blocks (or those > tau among them, the best one always)."""
    out = np.zeros(scores.shape, bool)
    allowed = np.broadcast_to(allowed, scores.shape)
    for idx in np.ndindex(scores.shape[:-1]):
        ok = np.flatnonzero(allowed[idx])
        ranked = ok[np.argsort(-scores[idx][ok], kind="stable")][:k]
        keep = ranked if tau is None else [j for r, j in enumerate(ranked) if r == 0 or scores[idx][j] > tau]
        out[idx + (np.asarray(keep, int),)] = True
    return out


@pytest.mark.parametrize("k", [2, 6])
def test_select_topk_and_threshold_match_brute_force(k):
    rng = numpy_rng(jax.random.PRNGKey(k))
    scores = rng.random((2, 3, 5, 6)).astype(np.float32)
    allowed = np.asarray(allowed_blocks(masks.Causal(), 40, 48, 8, 8))  # [1, 1, 5, 6], T != S

    @jax.jit
    def run(scores, tau):
        return (select_topk(scores, k, allowed, block_q=8, block_kv=8),
                select_threshold(scores, tau, k, allowed, block_q=8, block_kv=8))

    top, thresholded = run(scores, 0.6)
    assert not top.is_static and top.max_blocks == k and thresholded.max_blocks == k
    np.testing.assert_array_equal(np.asarray(to_block_mask(top)), _brute_force(scores, allowed, k))
    np.testing.assert_array_equal(np.asarray(to_block_mask(thresholded)), _brute_force(scores, allowed, k, 0.6))
    np.testing.assert_array_equal(np.asarray(top.counts), np.broadcast_to(np.minimum(k, allowed.sum(-1)), (2, 3, 5)))


def test_seer_oracle_attention_equals_dense_with_its_lists():
    q, k, v = random_qkv(KEY, B=2, T=37, Hq=4, Hkv=2, D=16)
    seer = Seer(block_q=8, block_kv=8, top_k=2)
    mask = masks.Causal()

    @jax.jit
    def run(q, k, v):
        out = attnjax.attention(q, k, v, mechanism=seer, mask=mask, implementation="reference")
        blocks = seer.select(q, k, mask=mask)
        expected = softmax_attention_reference(q, k, v, mask=masks.Explicit(blocks.dense(37, 37)) & mask)
        return out, expected, blocks, block_max_attention(q, k, block_q=8, block_kv=8, mask=mask)

    out, expected, blocks, truth = run(q, k, v)
    assert_close(out, expected, name="seer oracle")
    bm, upper = np.asarray(to_block_mask(blocks)), np.triu(np.ones((5, 5), bool), 1)
    assert not np.any(bm[..., upper]), "a block above the diagonal is listed"
    np.testing.assert_array_equal(np.asarray(blocks.counts), np.broadcast_to(np.minimum(2, np.arange(1, 6)), (2, 4, 5)))
    # the oracle keeps the blocks with the largest ground-truth maxima
    truth = np.asarray(truth)
    kept_min = np.where(bm, truth, np.inf).min(-1)
    dropped_max = np.where(bm | upper, -np.inf, truth).max(-1)
    assert np.all(kept_min >= dropped_max)


def test_seer_default_config_and_trained_gate_under_jit():
    q, k, v = random_qkv(KEY, B=2, T=37, Hq=4, Hkv=2, D=16)
    causal = masks.Causal()
    seer = Seer(block_q=8, block_kv=8, top_k=3, threshold=0.3, gate=_gate())

    @jax.jit
    def run(q, k, v):
        out = attnjax.attention(q, k, v, mechanism="seer", mask=causal, implementation="reference")
        return out, softmax_attention_reference(q, k, v, mask=causal), seer.select(q, k, mask=causal)

    with pytest.warns(DenseSelectionWarning, match="mechanism 'seer' selects every block at T=37"):
        out, dense, blocks = run(q, k, v)
    assert_close(out, dense, name="default = dense at T < 64")
    assert blocks.indices.shape == (2, 4, 5, 3) and not blocks.is_static
    assert np.all(np.asarray(blocks.counts) >= 1)
    with pytest.raises(ValueError, match="differ from the gate"):
        Seer(block_q=16, block_kv=16, gate=_gate())


def test_seer_xla_matches_reference():
    q, k, v = random_qkv(KEY, B=1, T=24, Hq=4, Hkv=2, D=16)
    seer = Seer(block_q=8, block_kv=8, top_k=2)
    run = jax.jit(lambda q, k, v: [attnjax.attention(q, k, v, mechanism=seer, mask=masks.Causal(), implementation=impl)
                                   for impl in ("xla", "reference")])
    xla, reference = run(q, k, v)
    assert_close(xla, reference, name="seer xla")
