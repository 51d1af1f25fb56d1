"""Sparsifiner (Wei et al. 2023): the predictor's equations and the top-k rule against NumPy loops, the
token-engine path against the dense reference (forward and gradients), the distillation losses, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.sparse.sparsifiner import (attention_budget, connectivity_lists, connectivity_scores,
                                        dense_attention_probabilities, distillation_loss, mhsa_flops,
                                        sparsifiner_attention)
from tests.helpers import assert_close, random_qkv

B, T, HQ, HKV, D, C, R, KEEP = 2, 13, 4, 2, 8, 4, 3, 5


def predictor_weights(seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((D, C), (C,), (D, C), (C,), (T, R), (T, R))
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def test_connectivity_scores_follow_the_equations():
    """NumPy loops over (b, h): softmax(Q_r (W_downᵀ K_r)ᵀ · H^-1/2) W_upᵀ (|W_up| thresholded at inference)."""
    q, k, _ = random_qkv(jax.random.PRNGKey(0), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    w = predictor_weights()
    wq, bq, wk, bk, wd, wu = (np.asarray(x) for x in w)
    for training, threshold in ((True, 0.0), (False, 0.5)):
        got = np.asarray(connectivity_scores(q, k, *w, training=training, basis_threshold=threshold))
        basis = wu if training else np.where(np.abs(wu) > threshold, np.abs(wu), 0.0)
        for b in range(B):
            for h in range(HQ):
                qr = np.asarray(q)[b, :, h] @ wq + bq
                kd = wd.T @ (np.asarray(k)[b, :, h // (HQ // HKV)] @ wk + bk)
                s = qr @ kd.T * HQ ** -0.5
                a = np.exp(s - s.max(-1, keepdims=True))
                np.testing.assert_allclose(got[b, h], (a / a.sum(-1, keepdims=True)) @ basis.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask", [None, masks.Causal()])
def test_top_k_lists_match_brute_force_and_respect_the_mask(mask):
    scores = jnp.asarray(np.random.default_rng(1).standard_normal((B, HQ, T, T)), jnp.float32)
    ids = np.asarray(connectivity_lists(scores, KEEP, mask=mask).indices)
    s = np.asarray(scores)
    for b in range(B):
        for h in range(HQ):
            for i in range(T):
                allowed = list(range(T)) if mask is None else list(range(i + 1))
                want = sorted(allowed, key=lambda j: -s[b, h, i, j])[:KEEP]
                row = ids[b, h, i]
                assert set(row[row >= 0].tolist()) == set(want), (b, h, i)
                assert (row < 0).sum() == KEEP - len(want)


def test_xla_matches_reference_forward_and_gradients():
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    scores = connectivity_scores(q, k, *predictor_weights(3))
    mask = masks.Causal()

    def loss(impl, q, k, v):
        out = sparsifiner_attention(q, k, v, scores, keep=KEEP, mask=mask, implementation=impl)
        return (out * jnp.arange(out.size).reshape(out.shape) / out.size).sum(), out

    (_, ref), g_ref = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)(
        "reference", q, k, v)
    (_, fast), g_fast = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)(
        "xla", q, k, v)
    assert_close(fast, ref, name="out")
    for name, a, e in zip("qkv", g_fast, g_ref):
        assert_close(a, e, atol=1e-4, name=f"d{name}")
    bf16 = sparsifiner_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), scores, keep=KEEP, mask=mask,
                                 implementation="xla")
    assert bf16.dtype == jnp.bfloat16 and bool(jnp.isfinite(bf16.astype(jnp.float32)).all())


def test_distillation_losses_match_their_formulas():
    rng = np.random.default_rng(4)
    approx = rng.standard_normal((B, HQ, T, T)).astype(np.float32)
    q, k, _ = random_qkv(jax.random.PRNGKey(5), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    target = np.asarray(dense_attention_probabilities(q, k, mask=masks.Causal()))
    np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(target[0, 0], 1) == 0)
    np.testing.assert_allclose(float(distillation_loss(jnp.asarray(approx), jnp.asarray(target))),
                               ((approx - target) ** 2).sum(), rtol=1e-5)
    log_q = approx - np.log(np.exp(approx).sum(-1, keepdims=True))
    pos = target > 0
    kl = (target[pos] * (np.log(target[pos]) - log_q[pos])).sum() / B
    np.testing.assert_allclose(float(distillation_loss(jnp.asarray(approx), jnp.asarray(target), criterion="kl")), kl,
                               rtol=1e-4)


def test_flops_count_and_bad_inputs():
    dense, sparse = mhsa_flops(197, 64, 6, keep=attention_budget(0.25, 197), reduced_c=32, reduced_n=24)
    assert dense == 2 * 6 * 197 ** 2 * 64
    assert sparse == 2 * 6 * 197 * 64 * 32 + 2 * 6 * 32 * 197 * 24 + 6 * 197 * 24 * 197 + 2 * 6 * 197 * 50 * 64
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    with pytest.raises(ValueError, match=r"scores must be \[B, Hq, T, N\] = \(2, 4, 13, 13\)"):
        sparsifiner_attention(q, k, v, jnp.zeros((B, HKV, T, T)), keep=KEEP)
    with pytest.raises(ValueError, match="w_down and w_up must be"):
        connectivity_scores(q, k, *predictor_weights()[:4], jnp.zeros((T - 1, R)), jnp.zeros((T - 1, R)))
    with pytest.raises(ValueError, match="criterion must be one of"):
        distillation_loss(jnp.zeros((1, 1, 2, 2)), jnp.zeros((1, 1, 2, 2)), criterion="l1")
    with pytest.raises(ValueError, match="keep_rate"):
        attention_budget(0.0, 10)
    with pytest.raises(ValueError, match="keep"):
        connectivity_lists(jnp.zeros((1, 1, 2, 2)), 0)
