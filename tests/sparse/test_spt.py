"""SPT (Gui et al. 2024): PQ codes, the lookup-table estimate and the top-L rule against NumPy loops; the
registered selector's token-engine path against the dense reference (forward and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.sparse.spt import (Spt, kmeans_codebooks, lookup_tables, pq_encode, pq_quantizer_loss, pq_scores_reference,
                                pq_top_lists, spt_select)
from tests.helpers import assert_close, random_qkv

B, T, HQ, HKV, D, M, C = 2, 13, 4, 2, 8, 2, 4


def codes_and_tables(estimate, seed=0):
    q, k, _ = random_qkv(jax.random.PRNGKey(seed), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    books = kmeans_codebooks(k, num_subspaces=M, num_codewords=C, iterations=2)
    return q, k, books, pq_encode(q, books), pq_encode(k, books), lookup_tables(books, estimate)


def test_codes_are_nearest_codewords_and_k_means_lowers_the_quantization_error():
    q, k, books, q_codes, k_codes, _ = codes_and_tables("inner")
    x, cb, codes = np.asarray(q), np.asarray(books), np.asarray(q_codes)
    for b in range(B):
        for h in range(HQ):
            for i in range(T):
                for m in range(M):
                    sub = x[b, i, h, m * (D // M):(m + 1) * (D // M)]
                    dist = ((cb[b, h // (HQ // HKV), m] - sub) ** 2).sum(-1)
                    assert dist[codes[b, h, i, m]] == pytest.approx(dist.min(), rel=1e-5, abs=1e-6)

    @functools.partial(jax.jit, static_argnums=0)
    def error(iterations):
        books = kmeans_codebooks(k, num_subspaces=M, num_codewords=C, iterations=iterations)
        decoded = jnp.take_along_axis(books[:, :, None], pq_encode(k, books)[..., None, None], -2)[..., 0, :]
        return ((decoded.reshape(B, HKV, T, D) - k.transpose(0, 2, 1, 3)) ** 2).sum()

    assert float(error(3)) < float(error(0))


@pytest.mark.parametrize("estimate", ["inner", "match"])
def test_lookup_estimate_matches_brute_force(estimate):
    """``inner``: the dot product of the decoded vectors q̂·k̂; ``match``: the number of equal codes."""
    _, _, books, q_codes, k_codes, tables = codes_and_tables(estimate, seed=1)
    got = np.asarray(pq_scores_reference(q_codes, k_codes, tables))
    cb, qc, kc = np.asarray(books), np.asarray(q_codes), np.asarray(k_codes)
    for b in range(B):
        for h in range(HQ):
            g = h // (HQ // HKV)
            for i in range(T):
                for j in range(S := T):
                    if estimate == "inner":
                        want = sum(cb[b, g, m, qc[b, h, i, m]] @ cb[b, g, m, kc[b, g, j, m]] for m in range(M))
                    else:
                        want = sum(qc[b, h, i, m] == kc[b, g, j, m] for m in range(M))
                    assert got[b, h, i, j] == pytest.approx(want, rel=1e-5, abs=1e-5), (b, h, i, j, S)


def test_top_l_lists_hold_the_highest_estimates_and_never_a_later_key():
    _, _, _, q_codes, k_codes, tables = codes_and_tables("inner", seed=2)
    L = 5
    ids = np.asarray(pq_top_lists(q_codes, k_codes, tables, L, mask=masks.Causal()).indices)
    s = np.asarray(pq_scores_reference(q_codes, k_codes, tables))
    for b in range(B):
        for h in range(HQ):
            for i in range(T):
                row = ids[b, h, i]
                kept = row[row >= 0]
                assert len(kept) == min(L, i + 1) and len(set(kept.tolist())) == len(kept)
                assert kept.max() <= i, "a causal list holds a later key"
                best = np.sort(s[b, h, i, :i + 1])[::-1][:L]
                np.testing.assert_allclose(np.sort(s[b, h, i, kept])[::-1], best, rtol=1e-6)


@pytest.mark.slow
def test_selector_xla_matches_reference_forward_and_gradients():
    """GQA, T < S under Causal(); bf16 and the other masks run in the registry's conformance suite."""
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=B, T=9, S=T, Hq=HQ, Hkv=HKV, D=D)
    cfg = Spt(top_l=5, num_subspaces=M, num_codewords=C, iterations=2)

    def loss(impl, q, k, v):
        out = attnjax.attention(q, k, v, mechanism=cfg, mask=masks.Causal(), implementation=impl)
        return (out * jnp.sin(jnp.arange(out.size)).reshape(out.shape)).sum(), out

    run = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (_, ref), g_ref = run("reference", q, k, v)
    (_, fast), g_fast = run("xla", q, k, v)
    assert_close(fast, ref, name="out")
    for name, a, e in zip("qkv", g_fast, g_ref):
        assert_close(a, e, atol=1e-4, name=f"d{name}")


def test_quantizer_loss_matches_the_authors_formula():
    """NumPy: hard codeword z_q (nearest), soft z_w = Σ_c softmax(−log d_c) C[c]; MSE(z_w, z_q) + MSE(z, z_q)."""
    x = np.random.default_rng(6).standard_normal((1, 5, 2, D)).astype(np.float32)
    books = np.random.default_rng(7).standard_normal((M, C, D // M)).astype(np.float32)
    sub = x.transpose(0, 2, 1, 3).reshape(1, 2, 5, M, D // M)
    dist = np.sqrt(((sub[..., None, :] - books) ** 2).sum(-1))
    z_q = books[np.arange(M), dist.argmin(-1)]
    w = np.exp(-np.log(dist)) / np.exp(-np.log(dist)).sum(-1, keepdims=True)
    z_w = np.einsum("bhlmc,mcd->bhlmd", w, books)
    want = ((z_w - z_q) ** 2).mean() + ((sub - z_q) ** 2).mean()
    assert float(jax.jit(pq_quantizer_loss)(jnp.asarray(x), jnp.asarray(books))) == pytest.approx(want, rel=1e-5)


def test_bad_configs_raise():
    q, k, _ = random_qkv(jax.random.PRNGKey(0), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    with pytest.raises(ValueError, match="must be a multiple of num_subspaces=3"):
        spt_select(q, k, top_l=4, num_subspaces=3, num_codewords=4, iterations=1)
    with pytest.raises(ValueError, match="estimate must be one of"):
        Spt(estimate="l2")
    with pytest.raises(ValueError, match="top_l"):
        Spt(top_l=0)
    with pytest.raises(ValueError, match="don't fit x"):
        pq_encode(q, jnp.zeros((B, 3, M, C, D // M)))
