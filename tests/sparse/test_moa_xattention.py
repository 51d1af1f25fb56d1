"""MoA (elastic per-head windows + profiling) and XAttention (antidiagonal scores + threshold)."""

import importlib.util
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.blocked.lists import allowed_blocks, density, to_block_mask
from attnjax.sparse.engine import DenseSelectionWarning
from attnjax.sparse.moa import MoA, attention_influence, min_loss_assignment, moa_profile, moa_spans
from attnjax.sparse.xattention import XAttention, antidiagonal_scores, cumulative_threshold_select
from tests.helpers import assert_close, assert_grads_close, random_qkv

KEY = jax.random.PRNGKey(0)
HAS_GATHER = importlib.util.find_spec("attnjax.sparse.gather") is not None


# ---------------------------------------------------------------- brute-force references (NumPy)

def antidiagonal_brute_force(q, k, block_q, block_kv, stride, mask):
    """Block scores from the dense QKᵀ, one antidiagonal and one sub-block at a time."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    nq, nk = -(-T // block_q), -(-S // block_kv)
    rows, cols = nq * block_q // stride, nk * block_kv // stride
    qp = np.zeros((B, rows * stride, Hq, D))
    kp = np.zeros((B, cols * stride, Hkv, D))
    qp[:, :T], kp[:, :S] = q, k
    dense = np.ones((1, 1, T, S), bool) if mask is None else np.asarray(mask.dense(T, S))
    out = np.zeros((B, Hq, nq, nk))
    for b, h in itertools.product(range(B), range(Hq)):
        qk = qp[b, :, h] @ kp[b, :, h // (Hq // Hkv)].T / np.sqrt(D)
        allowed_pairs = dense[min(b, dense.shape[0] - 1), min(h, dense.shape[1] - 1)]
        probs = np.zeros((rows, cols))
        for a in range(rows):
            logits = np.array([sum(qk[a * stride + stride - 1 - j, c * stride + j] for j in range(stride)) / stride
                               for c in range(cols)])
            ok = np.array([allowed_pairs[a * stride:(a + 1) * stride, c * stride:(c + 1) * stride].any()
                           for c in range(cols)])
            if ok.any():
                e = np.where(ok, np.exp(logits - logits[ok].max()), 0.0)
                probs[a] = e / e.sum()
        out[b, h] = probs.reshape(nq, block_q // stride, nk, block_kv // stride).sum(axis=(1, 3))
    return out


def threshold_brute_force(scores, threshold, allowed, forced, max_blocks):
    """Forced blocks, then the rest by descending score while the running sum is below τ·total."""
    keep = np.zeros(scores.shape, bool)
    for idx in np.ndindex(scores.shape[:-1]):
        ok, s = allowed[idx], np.where(allowed[idx], scores[idx], 0.0)
        chosen = [c for c in np.flatnonzero(forced[idx] & ok)]
        rest = sorted(np.flatnonzero(ok & ~forced[idx]), key=lambda c: (-s[c], c))
        running = s[chosen].sum()
        for c in rest:
            if running >= threshold * s.sum():
                break
            chosen.append(c)
            running += s[c]
        keep[idx + (np.array(chosen[:max_blocks], int),)] = True
    return keep


def moa_brute_force(alpha, beta, sink, T, S, block_q, block_kv):
    """Key blocks MoA's kernel visits per query block: sink blocks, then the band up to the diagonal."""
    span = int(min(max(np.floor(alpha + beta * S), 0), S))
    sink_tokens = min(sink, span)
    n_sink = -(-sink_tokens // block_kv)
    n_local = max(1, -(-(span - sink_tokens) // block_kv))
    nq, nk = -(-T // block_q), -(-S // block_kv)
    out = np.zeros((nq, nk), bool)
    for i in range(nq):
        first = i * block_q + S - T
        last = min((i + 1) * block_q, T) - 1 + S - T
        for c in range(nk):
            out[i, c] = c < n_sink or (first // block_kv - n_local < c <= last // block_kv)
    return out


# ---------------------------------------------------------------- XAttention

@pytest.mark.parametrize("T,S,Hq,Hkv,block_q,block_kv,stride,mask,chunk", [
    (37, 37, 4, 2, 8, 8, 4, masks.Causal(), None),
    (40, 53, 2, 1, 16, 8, 4, masks.Causal(), 2),
    (33, 33, 2, 2, 8, 16, 8, None, 3),
])
def test_antidiagonal_scores_match_brute_force(T, S, Hq, Hkv, block_q, block_kv, stride, mask, chunk):
    q, k, _ = random_qkv(KEY, B=2, T=T, S=S, Hq=Hq, Hkv=Hkv, D=8)
    got = antidiagonal_scores(q, k, block_q=block_q, block_kv=block_kv, stride=stride, mask=mask, query_chunk=chunk)
    expected = antidiagonal_brute_force(q, k, block_q, block_kv, stride, mask)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)


def test_antidiagonal_scores_reject_blocks_not_multiple_of_stride():
    q, k, _ = random_qkv(KEY, B=1, T=16, Hq=1, D=4)
    with pytest.raises(ValueError, match="multiple of stride"):
        antidiagonal_scores(q, k, block_q=12, block_kv=8, stride=8)
    with pytest.raises(ValueError, match="multiples of stride"):
        XAttention(block_q=8, block_kv=12, stride=8)


@pytest.mark.parametrize("threshold,max_blocks", [(0.3, None), (0.8, None), (0.95, 3)])
def test_threshold_selection_matches_numpy_loop(threshold, max_blocks):
    rng = np.random.default_rng(1)
    scores = rng.random((2, 3, 5, 7)) ** 3
    allowed = rng.random((1, 3, 5, 7)) < 0.8
    forced = np.zeros((5, 7), bool)
    forced[:, 0] = True
    forced[np.arange(5), [1, 2, 3, 4, 6]] = True
    got = cumulative_threshold_select(scores, threshold, allowed=allowed, forced=forced, max_blocks=max_blocks)
    expected = threshold_brute_force(scores, threshold, np.broadcast_to(allowed, scores.shape),
                                     np.broadcast_to(forced, scores.shape), max_blocks or 7)
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_lower_threshold_selects_a_subset():
    q, k, _ = random_qkv(KEY, B=1, T=64, Hq=2, D=8)
    scores = antidiagonal_scores(q, k, block_q=8, block_kv=8, stride=4, mask=masks.Causal())
    allowed = allowed_blocks(masks.Causal(), 64, 64, 8, 8)
    picks = [np.asarray(cumulative_threshold_select(scores, t, allowed=allowed)) for t in (0.5, 0.8, 1.0)]
    assert np.all(picks[0] <= picks[1]) and np.all(picks[1] <= picks[2])
    assert picks[0].sum() < picks[2].sum()


@pytest.mark.parametrize("T,S", [(37, 53)])
def test_threshold_one_selects_every_allowed_block(T, S):
    q, k, _ = random_qkv(KEY, B=2, T=T, S=S, Hq=2, Hkv=1, D=8)
    selector = XAttention(block_q=8, block_kv=8, stride=4, threshold=1.0)
    listed = np.asarray(to_block_mask(selector.select(q, k, mask=masks.Causal())))
    np.testing.assert_array_equal(listed, np.broadcast_to(allowed_blocks(masks.Causal(), T, S, 8, 8), listed.shape))


XATTENTION = XAttention(block_q=8, block_kv=8, stride=4, threshold=0.9)
XATTENTION_CAPPED = XAttention(block_q=16, block_kv=8, stride=8, threshold=0.5, max_blocks=2, query_chunk=1)
MOA = MoA(block_q=8, block_kv=8, alphas=(8.0, 16.0, 0.0, 40.0), betas=(0.0, 0.25, 0.5, 0.0), sink=8)


@pytest.mark.parametrize("selector,T,S", [(XATTENTION, 37, 37), (XATTENTION_CAPPED, 24, 45), (MOA, 37, 37),
                                          (MOA, 24, 45)], ids=["xattention", "xattention-capped", "moa", "moa-cross"])
def test_causal_never_lists_future_blocks(selector, T, S):
    q, k, _ = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    blocks = selector.select(q, k, mask=masks.Causal())
    listed = np.asarray(to_block_mask(blocks))
    assert not np.any(listed & ~allowed_blocks(masks.Causal(), T, S, selector.block_q, selector.block_kv))
    assert np.all(np.asarray(blocks.counts) >= 1)
    if selector.name == "xattention":
        assert blocks.max_blocks == min(selector.max_blocks or 99, -(-S // selector.block_kv))
        if selector.max_blocks is None:  # the first and the diagonal blocks are always kept
            last = (np.minimum(np.arange(1, listed.shape[2] + 1) * selector.block_q, T) - 1 + S - T) // 8
            assert listed[..., 0].all() and listed[:, :, np.arange(listed.shape[2]), last].all()


def test_xattention_runs_under_jit():
    q, k, _ = random_qkv(KEY, B=2, T=48, Hq=4, Hkv=2, D=8)
    selector = XAttention(block_q=8, block_kv=8, stride=4, threshold=0.8)

    @jax.jit
    def lists(q, k):
        blocks = selector.select(q, k, mask=masks.Causal())
        return blocks.indices, blocks.counts

    indices, counts = lists(q, k)
    eager = selector.select(q, k, mask=masks.Causal())
    assert not eager.is_static
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(eager.indices))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(eager.counts))


# ---------------------------------------------------------------- MoA

def test_moa_spans_follow_the_elastic_rule():
    np.testing.assert_array_equal(moa_spans([8, 100, -16, 0], [0.0, 0.5, 0.25, 2.0], 64), [8, 64, 0, 64])
    config = MoA(alphas=[16, 32], betas=0.25)
    assert config.alphas == (16.0, 32.0) and config.betas == (0.25,) and config.num_rules == 2
    np.testing.assert_array_equal(config.spans(128), [48, 64])
    q, k, _ = random_qkv(KEY, B=1, T=16, Hq=4, D=4)
    with pytest.raises(ValueError, match="2 per-head rules but q has 4 heads"):
        config.select(q, k)
    with pytest.raises(ValueError, match="equal lengths"):
        MoA(alphas=(1.0, 2.0, 3.0), betas=(0.0, 0.5))


@pytest.mark.parametrize("T,S,block_q,block_kv,sink", [(64, 64, 8, 8, 8), (37, 37, 8, 8, 4), (24, 61, 16, 8, 16),
                                                       (40, 40, 8, 16, 0)])
def test_moa_lists_equal_the_band(T, S, block_q, block_kv, sink):
    alphas, betas = (8.0, 16.0, 0.0, 40.0), (0.0, 0.25, 0.5, 0.0)
    config = MoA(block_q=block_q, block_kv=block_kv, alphas=alphas, betas=betas, sink=sink)
    q, k, _ = random_qkv(KEY, B=1, T=T, S=S, Hq=4, D=4)
    blocks = config.select(q, k, mask=masks.Causal())
    assert blocks.is_static and blocks.indices.shape[:2] == (1, 4)
    causal = allowed_blocks(masks.Causal(), T, S, block_q, block_kv)[0, 0]
    for h, (alpha, beta) in enumerate(zip(alphas, betas)):
        expected = moa_brute_force(alpha, beta, sink, T, S, block_q, block_kv) & causal
        np.testing.assert_array_equal(to_block_mask(blocks)[0, h], expected, err_msg=f"head {h}")
    shared = MoA(block_q=block_q, block_kv=block_kv, alphas=(16.0,), betas=(0.25,), sink=sink).select(q, k)
    assert shared.indices.shape[:2] == (1, 1)


def test_min_loss_assignment_is_exact():
    rng = np.random.default_rng(3)
    for trial in range(5):
        losses = rng.random((4, 3))
        costs = rng.integers(0, 6, (4, 3))
        budget = int(rng.integers(costs.min(1).sum(), costs.max(1).sum() + 1))
        picked = min_loss_assignment(losses, costs, budget)
        best = min((sum(losses[u, c] for u, c in enumerate(combo)), combo)
                   for combo in itertools.product(range(3), repeat=4)
                   if sum(costs[u, c] for u, c in enumerate(combo)) <= budget)
        assert sum(costs[u, c] for u, c in enumerate(picked)) <= budget
        np.testing.assert_allclose(losses[np.arange(4), picked].sum(), best[0], rtol=1e-12)
    with pytest.raises(ValueError, match="below the cheapest"):
        min_loss_assignment(np.ones((2, 2)), np.array([3, 4]), 5)


def test_attention_influence_is_the_exact_loss_change_of_masking_one_entry():
    q, k, v = random_qkv(KEY, B=1, T=6, Hq=2, Hkv=1, D=4)
    w = jax.random.normal(jax.random.PRNGKey(5), (1, 6, 2, 4))
    influence = np.asarray(attention_influence(q, k, v, w, mask=masks.Causal()))

    @jax.jit
    def loss(drop):  # per head
        keep = masks.Causal() & masks.Explicit(~drop)
        return jnp.sum(softmax_attention_reference(q, k, v, mask=keep) * w, axis=(0, 1, 3))

    base = np.asarray(loss(jnp.zeros((1, 1, 6, 6), bool)))
    for h, i, j in [(0, 3, 1), (1, 5, 5), (0, 4, 0), (1, 2, 2), (0, 0, 0)]:
        exact = np.asarray(loss(jnp.zeros((1, 1, 6, 6), bool).at[:, :, i, j].set(True)))[h] - base[h]
        np.testing.assert_allclose(influence[h, i, j], abs(exact), rtol=1e-4, atol=1e-6)
    mass = np.asarray(attention_influence(q, k, v, mask=masks.Causal()))
    np.testing.assert_allclose(mass.sum(-1), np.ones((2, 6)), rtol=1e-5)


def _local_and_global_heads(T):
    """Heads 0, 2 attend within ~4 tokens (rotating q = k); heads 1, 3 spread evenly (q = 0)."""
    rng = np.random.default_rng(T)
    angle = 0.05 * np.arange(T)
    rotating = 20.0 * np.stack([np.cos(angle), np.sin(angle)], -1)
    q = np.zeros((1, T, 4, 4), np.float32)
    k = 0.01 * rng.standard_normal((1, T, 4, 4)).astype(np.float32)
    q[0, :, 0::2, :2] = k[0, :, 0::2, :2] = rotating[:, None]
    v = rng.standard_normal((1, T, 4, 4)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def test_profile_gives_local_heads_short_spans_and_global_heads_long_ones():
    calibration = [_local_and_global_heads(64), _local_and_global_heads(32)]
    config = moa_profile(calibration, density=0.85, alphas=[0, 8, 16, 24, 32, 64], betas=[0.0, 0.25, 0.5, 1.0],
                         block_q=8, block_kv=8, sink=8)
    assert isinstance(config, MoA) and config.num_rules == 4
    visited = causal = 0
    for q, k, _ in calibration:
        N = k.shape[1]
        spans = config.spans(N)
        assert spans[0] <= 24 and spans[2] <= 24, spans
        assert spans[1] == N and spans[3] == N, spans
        visited += config.select(q, k, mask=masks.Causal()).counts.sum()
        causal += 4 * allowed_blocks(masks.Causal(), N, N, 8, 8).sum()
    assert visited / causal <= 0.85


# ---------------------------------------------------------------- through attnjax.attention

SELECTORS = [
    XAttention(block_q=8, block_kv=8, stride=4, threshold=0.7),
    MoA(block_q=8, block_kv=8, alphas=(8.0, 0.0, 16.0, 24.0), betas=(0.0, 0.25, 0.25, 0.5), sink=8),
]


@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: s.name)
@pytest.mark.parametrize("mask", [masks.Causal(), None], ids=["causal", "none"])
def test_reference_path_equals_masked_softmax(selector, mask):
    q, k, v = random_qkv(KEY, B=2, T=37, Hq=4, Hkv=2, D=8)
    out = attnjax.attention(q, k, v, mechanism=selector, mask=mask, implementation="reference")
    blocks = selector.select(q, k, mask=mask)
    dense = masks.Explicit(blocks.dense(37, 37))
    expected = softmax_attention_reference(q, k, v, mask=dense if mask is None else dense & mask)
    assert_close(out, expected)


@pytest.mark.skipif(not HAS_GATHER, reason="attnjax.sparse.gather (the engine's xla path) is not written yet")
@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: s.name)
def test_xla_path_matches_reference(selector):
    q, k, v = random_qkv(KEY, B=2, T=37, Hq=4, Hkv=2, D=8)
    out = {implementation: attnjax.attention(q, k, v, mechanism=selector, mask=masks.Causal(),
                                             implementation=implementation) for implementation in ("xla", "reference")}
    assert_close(out["xla"], out["reference"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GATHER, reason="attnjax.sparse.gather (the engine's xla path) is not written yet")
@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: s.name)
def test_xla_path_grads_match_reference(selector):
    q, k, v = random_qkv(KEY, B=1, T=37, Hq=4, Hkv=2, D=8)

    def run(implementation):
        return lambda q, k, v: attnjax.attention(q, k, v, mechanism=selector, mask=masks.Causal(),
                                                 implementation=implementation)

    assert_grads_close(run("xla"), run("reference"), (q, k, v), argnums=(0, 1, 2), names="qkv")


def test_default_configs_run_on_odd_lengths_under_jit():
    q, k, v = random_qkv(KEY, B=2, T=37, Hq=4, Hkv=2, D=8)

    @jax.jit
    def both(q, k, v):
        return [attnjax.attention(q, k, v, mechanism=name, mask=masks.Causal(), implementation="reference")
                for name in ("moa", "xattention")]

    expected = softmax_attention_reference(q, k, v, mask=masks.Causal())
    with pytest.warns(DenseSelectionWarning) as record:  # one block at the default size 64: every selector keeps it
        outs = both(q, k, v)
    assert {str(w.message).split("'")[1] for w in record} == {"moa", "xattention"}
    for out in outs:
        assert_close(out, expected)


# ---------------------------------------------------------------- measurements (opt-in)

@pytest.mark.slow
def test_xattention_density_falls_with_threshold_at_4k():
    q, k, _ = random_qkv(KEY, B=1, T=4096, Hq=2, D=64)
    densities = [float(density(XAttention(threshold=t).select(q, k, mask=masks.Causal()))) for t in (0.5, 0.9, 1.0)]
    assert densities[0] < densities[1] <= densities[2]
