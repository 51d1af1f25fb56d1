"""HyperAttention: sortLSH against a NumPy brute force, the estimator against a dense formula (forward and
gradients), the causal recursion against exact attention, and the spectral error bound (Eq. 2) on inputs where
the paper's assumptions hold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.analysis import hyperattention_kappa
from attnjax.softmax import softmax_attention_reference
from attnjax.sparse.hyper import Hyper, gray_rank, lsh_projections, sample_keys, sortlsh_buckets
from tests.helpers import assert_close, random_qkv

B, T, HQ, HKV, D = 1, 37, 4, 2, 8
SMALL = dict(num_projs=3, block_size=8, min_seq_len=0, block_q=8, block_kv=8)
run = jax.jit(lambda cfg, mask, q, k, v: attnjax.attention(q, k, v, mechanism=cfg, mask=mask, implementation="xla"),
              static_argnums=(0, 1))


def numpy_buckets(x, proj, block, num_blocks):
    """Algorithm 1 by hand: sign bits, the code's index in the listed Gray sequence, stable sort, blocks."""
    r = proj.shape[1]
    gray = [i ^ (i >> 1) for i in range(2 ** r)]
    Bx, L, Hx, _ = x.shape
    out = np.zeros((Bx, Hx, L), np.int64)
    for b in range(Bx):
        for h in range(Hx):
            codes = [sum(int(bit) << i for i, bit in enumerate(np.asarray(x[b, t, h]) @ np.asarray(proj) > 0))
                     for t in range(L)]
            order = sorted(range(L), key=lambda t: (gray.index(codes[t]), t))
            for rank, t in enumerate(order):
                out[b, h, t] = min(rank // block, num_blocks - 1)
    return out


def test_gray_rank_orders_codes_so_neighbours_differ_in_one_bit():
    codes = np.arange(16)
    ranks = np.asarray(gray_rank(jnp.asarray(codes), 4))
    by_rank = codes[np.argsort(ranks)]
    assert sorted(ranks) == list(range(16))
    assert all(bin(a ^ b).count("1") == 1 for a, b in zip(by_rank[:-1], by_rank[1:]))


@pytest.mark.parametrize("T_q,S", [(37, 37), (13, 29)])
def test_sortlsh_buckets_match_the_brute_force_rule(T_q, S):
    q, k, _ = random_qkv(jax.random.PRNGKey(0), B=2, T=T_q, S=S, Hq=HQ, Hkv=HKV, D=D)
    buckets = sortlsh_buckets(q, k, num_projs=3, block_size=8, seed=5)
    proj = lsh_projections(5, D, 3)
    nb = -(-S // 8)
    np.testing.assert_array_equal(np.asarray(buckets.kv_ids), numpy_buckets(k, proj, 8, nb))
    np.testing.assert_array_equal(np.asarray(buckets.q_ids), numpy_buckets(q, proj, -(-T_q * 8 // S), nb))


def dense_estimator(cfg, q, k, v):
    """HyperAttention's non-causal estimate as one dense formula: weights ``W = M^H + (S/m)·N`` with ``N_ij`` the
    number of times key ``j`` was sampled outside query ``i``'s block; ``out = (W∘A)V / (W∘A)1``."""
    S, G = k.shape[1], q.shape[2] // k.shape[2]
    sel = cfg.buckets(q, k)
    heavy = sel.dense(q.shape[1], S)
    idx = sample_keys(jax.random.PRNGKey(cfg.seed), q.shape[0], q.shape[2], S, cfg.sample_size)
    counts = jax.nn.one_hot(idx, S).sum(-2)[:, :, None, :]
    w = heavy + (S / cfg.sample_size) * counts * ~heavy
    kr, vr = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(q.shape[-1])
    a = w * jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum("bhts,bshe->bthe", a / a.sum(-1, keepdims=True), vr)


def test_sortlsh_part_is_dense_softmax_under_its_blocks():
    q, k, v = random_qkv(jax.random.PRNGKey(1), B=B, T=T, S=T, Hq=HQ, Hkv=HKV, D=D)
    cfg = Hyper(sample_size=0, **SMALL)
    proj = lsh_projections(cfg.seed, D, 3)
    nb = -(-T // 8)
    allowed = (numpy_buckets(q, proj, 8, nb)[..., :, None]
               == np.repeat(numpy_buckets(k, proj, 8, nb), HQ // HKV, axis=1)[..., None, :])
    want = softmax_attention_reference(q, k, v, mask=masks.Explicit(jnp.asarray(allowed)))
    assert_close(run(cfg, None, q, k, v), want, name="sortLSH part")


def value_and_grads(f, q, k, v):
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    return jax.jit(jax.value_and_grad(lambda q, k, v: (f(q, k, v) * w).sum(), argnums=(0, 1, 2)))(q, k, v)


def assert_same(got, want):
    assert_close(got[0], want[0], name="loss")
    for name, a, b in zip("qkv", got[1], want[1]):
        assert bool(jnp.isfinite(a).all()) and float(jnp.abs(a).max()) > 0
        assert_close(a, b, atol=1e-5, name=f"d{name}")


def test_estimator_and_its_gradients_equal_the_dense_formula():
    """The xla path, non-causal, against ``dense_estimator`` (forward and gradients: they flow through the
    sortLSH blocks and the samples)."""
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=B, T=T, S=T, Hq=HQ, Hkv=HKV, D=D)
    cfg = Hyper(sample_size=16, **SMALL)
    assert_same(value_and_grads(lambda *a: attnjax.attention(*a, mechanism=cfg, implementation="xla"), q, k, v),
                value_and_grads(lambda *a: dense_estimator(cfg, *a), q, k, v))


@pytest.mark.slow
def test_reference_is_the_estimator_and_causal_paths_agree():
    """The reference against ``dense_estimator``; causal (two recursion levels with sampling), xla against
    reference, forward and gradients."""
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=B, T=T, S=T, Hq=HQ, Hkv=HKV, D=D)
    cfg = Hyper(sample_size=16, **SMALL)
    assert_same(value_and_grads(lambda *a: attnjax.attention(*a, mechanism=cfg, implementation="reference"), q, k,
                                v), value_and_grads(lambda *a: dense_estimator(cfg, *a), q, k, v))
    causal = Hyper(num_projs=3, block_size=4, sample_size=6, min_seq_len=8, block_q=8, block_kv=8)
    paths = [value_and_grads(lambda *a: attnjax.attention(*a, mechanism=causal, mask=masks.Causal(),
                                                          implementation=impl), q, k, v)
             for impl in ("xla", "reference")]
    assert_same(*paths)


RECURSIVE = Hyper(min_seq_len=8, block_size=64, sample_size=4, block_q=8, block_kv=8)


def exact_causal(q, k, v):
    return softmax_attention_reference(q, k, v, mask=masks.Causal())


def test_causal_recursion_is_exact_when_its_parts_are():
    """``min_seq_len ≥ T``: exact causal attention. ``min_seq_len < T`` with one sortLSH block covering every key
    (``block_size ≥ T``, so no sampling): every part of Algorithm 4 is exact, so the recursion (two levels, odd
    lengths) must give exact causal attention, forward and gradients."""
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=B, T=T, S=T, Hq=HQ, Hkv=HKV, D=D)
    assert_close(run(Hyper(min_seq_len=T, sample_size=4, block_size=4), masks.Causal(), q, k, v),
                 exact_causal(q, k, v), name="min_seq_len >= T")
    got = value_and_grads(lambda *a: attnjax.attention(*a, mechanism=RECURSIVE, mask=masks.Causal(),
                                                       implementation="xla"), q, k, v)
    assert_same(got, value_and_grads(exact_causal, q, k, v))


@pytest.mark.slow
def test_causal_recursion_with_more_keys_than_queries():
    """``T < S`` (bottom-right): the keys every query sees join as one more non-causal part."""
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=B, T=T, S=T, Hq=HQ, Hkv=HKV, D=D)
    assert_close(run(RECURSIVE, masks.Causal(), q[:, 12:], k, v), exact_causal(q[:, 12:], k, v), name="T < S")


def planted_inputs(seed, T=512, D=16, sigma=0.5, c=6.0, planted=8):
    """Shared q = k (as in the paper's LSH setting): small entries (bounded logits, ``κ ≈ 1.4``) plus ``planted``
    tokens of norm ``c`` along orthogonal directions, whose self-logit ``c²/√D`` dominates their row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, T, 1, D)) * sigma
    pos = rng.choice(T, planted, replace=False)
    x[0, pos, 0] = c * np.linalg.qr(rng.standard_normal((D, D)))[0][:, :planted].T
    return jnp.asarray(x, jnp.float32), jnp.asarray(rng.standard_normal((1, T, 1, D)), jnp.float32), pos


@pytest.mark.slow
def test_spectral_error_bound_where_the_assumptions_hold():
    """Eq. 2: ``‖Att − Ãtt‖_op ≤ ε ‖D⁻¹A‖_op ‖V‖_op`` with ε = 0.25 at ``m = 256`` (T = 512, b = 64) on three
    fixed seeds, the error falls with ``m`` like ``1/√m`` (Theorem 1's sampling term), and the planted large
    entries, found by sortLSH, are exact (their rows' error stays below 0.05)."""
    errors = {32: [], 256: []}
    for seed in range(3):
        x, v, pos = planted_inputs(seed)
        exact = softmax_attention_reference(x, x, v, return_lse=False)[0, :, 0]
        p = jax.nn.softmax(x[0, :, 0] @ x[0, :, 0].T / 4.0, axis=-1)
        norm = np.linalg.norm(np.asarray(p), 2) * np.linalg.norm(np.asarray(v[0, :, 0]), 2)
        cfg = Hyper(block_size=64, sample_size=256, min_seq_len=0)
        heavy = cfg.heavy_mask(x, x)
        assert float(hyperattention_kappa(x, x, heavy=heavy)[0, 0]) < 1.6, "small κ: the assumption holds"
        assert bool(cfg.buckets(x, x).dense(512, 512)[0, 0, pos, pos].all()), "sortLSH finds the planted entries"
        for m in errors:
            out = run(Hyper(block_size=64, sample_size=m, min_seq_len=0), None, x, x, v)[0, :, 0]
            errors[m].append(float(np.linalg.norm(np.asarray(out - exact), 2) / norm))
            if m == 256:
                assert float(jnp.abs(out - exact)[pos].max()) < 0.05
    assert max(errors[256]) < 0.25, errors
    assert np.mean(errors[256]) < 0.55 * np.mean(errors[32]), errors


def test_bad_requests_raise():
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=B, T=13, S=9, Hq=HQ, Hkv=HKV, D=D)
    with pytest.raises(NotImplementedError, match="T <= S"):
        attnjax.attention(q, k, v, mechanism=Hyper(), mask=masks.Causal(), implementation="xla")
    with pytest.raises(NotImplementedError, match="mask=None or masks.Causal"):
        attnjax.attention(q, k, v, mechanism=Hyper(), mask=masks.SlidingWindow(3, 0), implementation="xla")
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        Hyper(block_size=0)
    with pytest.raises(ValueError, match="sample_size must be an int >= 0"):
        Hyper(sample_size=-1)
    with pytest.raises(ValueError, match="num_projs must be at most 30"):
        Hyper(num_projs=31)
