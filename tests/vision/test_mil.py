"""Attention MIL pooling (Ilse et al. 2018, eqs. 7-9) and ACMIL's top-K instance masking and diversity loss
(Zhang et al. 2024) against NumPy loops, with padded bags."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.mil import (acmil_diversity_loss, attention_mil_pooling, mil_attention_logits,
                                stochastic_topk_instance_mask, topk_instance_mask)
from tests.helpers import assert_close, assert_grads_close

B, N, C, L, M = 3, 10, 6, 5, 3
VALID = np.arange(N)[None, :] < np.array([[10], [7], [2]])   # full, padded after 7, only 2 instances


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    shapes = ((B, N, C), (C, L), (L,), (L, M), (C, L), (L,))
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes)


def numpy_logits(h, v, bv, w, u=None, bu=None):
    """Eq. 8 / eq. 9 instance by instance."""
    h, v, bv, w = (np.asarray(a, np.float64) for a in (h, v, bv, w))
    out = np.zeros((B, M, N))
    for b in range(B):
        for n in range(N):
            t = np.tanh(h[b, n] @ v + bv)
            if u is not None:
                t = t / (1 + np.exp(-(h[b, n] @ np.asarray(u, np.float64) + np.asarray(bu, np.float64))))
            out[b, :, n] = t @ w
    return out


def numpy_pool(h, logits, keep):
    """z_m = Σ_n a_{m,n} h_n, a_m the softmax of the kept logits; nothing kept -> 0."""
    h, logits = np.asarray(h, np.float64), np.asarray(logits, np.float64)
    z, a = np.zeros((B, M, C)), np.zeros((B, M, N))
    for b in range(B):
        for m in range(M):
            idx = np.flatnonzero(keep[b, m])
            if idx.size:
                e = np.exp(logits[b, m, idx] - logits[b, m, idx].max())
                a[b, m, idx] = e / e.sum()
                z[b, m] = a[b, m] @ h[b]
    return z, a


@pytest.mark.parametrize("gated", [False, True])
def test_logits_and_pooling_equal_the_instance_loops(gated):
    h, v, bv, w, u, bu = arrays()
    gate = dict(u_kernel=u, u_bias=bu) if gated else {}
    logits = jax.jit(lambda *a: mil_attention_logits(*a, **gate))(h, v, bv, w)
    expected = numpy_logits(h, v, bv, w, *((u, bu) if gated else ()))
    assert_close(logits, expected, name="logits")
    z, a = jax.jit(lambda h, s: attention_mil_pooling(h, s, valid=jnp.asarray(VALID)))(h, logits)
    z_ref, a_ref = numpy_pool(h, expected, np.broadcast_to(VALID[:, None], (B, M, N)))
    assert_close(z, z_ref, name="z")
    assert_close(a, a_ref, name="a")


def test_pooling_gradients_equal_a_plain_formula():
    h, v, bv, w, u, bu = arrays(1)
    valid = jnp.asarray(VALID)
    dropped = jnp.zeros((B, M, N), bool).at[0, 1, 3].set(True)

    def op(h, v, bv, w, u, bu):
        s = mil_attention_logits(h, v, bv, w, u_kernel=u, u_bias=bu)
        return attention_mil_pooling(h, s, valid=valid, dropped=dropped)[0]

    def plain(h, v, bv, w, u, bu):
        t = jnp.tanh(h @ v + bv) * jax.nn.sigmoid(h @ u + bu)
        s = jnp.einsum("bnl,lm->bmn", t, w, precision=jax.lax.Precision.HIGHEST)
        keep = valid[:, None, :] & ~dropped
        a = jax.nn.softmax(jnp.where(keep, s, -1e30), axis=-1) * keep
        return jnp.einsum("bmn,bnc->bmc", a, h, precision=jax.lax.Precision.HIGHEST)

    assert_grads_close(op, plain, arrays(1), argnums=range(6), names=["h", "V", "b_V", "w", "U", "b_U"])


def numpy_topk_mask(logits, noise, top_k, p, valid):
    """STKIM by hand: per row, the valid instances sorted by logit (ties: lower index first), the first
    k = min(top_k, n_valid) of them, those k ordered by their slot's noise, the first int(k·p) dropped."""
    logits, noise = np.asarray(logits), np.asarray(noise)
    out = np.zeros(logits.shape, bool)
    for b in range(logits.shape[0]):
        idx = np.flatnonzero(valid[b])
        for m in range(logits.shape[1]):
            ranked = sorted(idx, key=lambda n: (-logits[b, m, n], n))
            k = min(top_k, len(ranked))
            slots = sorted(range(k), key=lambda j: noise[b, m, j])[:int(k * p)]
            out[b, m, [ranked[j] for j in slots]] = True
    return out


@pytest.mark.parametrize("top_k, p", [(4, 0.6), (3, 0.5), (12, 0.6), (1, 1.0), (4, 0.0)])
def test_topk_mask_equals_the_brute_force_rule(top_k, p):
    rng = np.random.default_rng(top_k)
    logits = jnp.asarray(rng.standard_normal((B, M, N)), jnp.float32)
    noise = jnp.asarray(rng.random((B, M, min(top_k, N))), jnp.float32)
    got = jax.jit(lambda s, u: topk_instance_mask(s, u, top_k, p, valid=jnp.asarray(VALID)))(logits, noise)
    expected = numpy_topk_mask(logits, noise, top_k, p, VALID)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert not np.any(np.asarray(got) & ~VALID[:, None, :]), "padding is never dropped"


def test_stochastic_mask_is_a_uniform_subset_of_the_top_k():
    """Over many keys: exactly int(min(K, n_valid)·p) dropped per row, only among the top K, each top-K instance
    dropped with frequency about int(k·p)/k."""
    rng = np.random.default_rng(7)
    top_k, p, draws = 4, 0.5, 400
    logits = jnp.asarray(rng.standard_normal((B, M, N)), jnp.float32)
    valid = jnp.asarray(VALID)
    keys = jax.random.split(jax.random.key(0), draws)
    masks = np.asarray(jax.jit(jax.vmap(lambda key: stochastic_topk_instance_mask(logits, top_k, p, rng=key,
                                                                                   valid=valid)))(keys))
    n_valid = VALID.sum(1)
    counts = masks.sum(-1)                                      # [draws, B, M]
    np.testing.assert_array_equal(counts, np.broadcast_to([[int(min(top_k, n) * p)] for n in n_valid], counts.shape))
    s = np.where(VALID[:, None, :], np.asarray(logits), -np.inf)
    top = np.argsort(-s, axis=-1, kind="stable")[..., :top_k]
    in_top = np.zeros((B, M, N), bool)
    np.put_along_axis(in_top, top, True, axis=-1)
    in_top &= VALID[:, None, :]
    assert not np.any(masks & ~in_top)
    freq = masks.mean(0)[in_top]                               # int(k·p)/k = 0.5 for k = 4 and k = 2
    np.testing.assert_allclose(freq, 0.5, atol=0.1)


def test_diversity_loss_equals_the_pairwise_cosine_loop():
    rng = np.random.default_rng(3)
    a = rng.random((B, M, N))
    a[2, 1] = 0.0                                               # an empty branch has cosine 0
    expected = 0.0
    for b in range(B):
        for i in range(M):
            for j in range(i + 1, M):
                ni, nj = np.linalg.norm(a[b, i]), np.linalg.norm(a[b, j])
                expected += a[b, i] @ a[b, j] / max(ni * nj, 1e-16) / (M * (M - 1) / 2) / B
    loss = jax.jit(acmil_diversity_loss)
    assert_close(loss(jnp.asarray(a, jnp.float32)), expected, name="loss")
    assert_close(loss(jnp.full((B, M, N), 1.0 / N)), 1.0, name="identical branches")
    assert float(acmil_diversity_loss(jnp.ones((2, 1, N)))) == 0.0


def test_bad_inputs_name_the_argument():
    h, v, bv, w, u, bu = arrays()
    with pytest.raises(ValueError, match=r"h must have shape \[batch, instances, channels\]"):
        mil_attention_logits(h[0], v, bv, w)
    with pytest.raises(ValueError, match=r"v_kernel must have shape \[6, hidden\]"):
        mil_attention_logits(h, v[:4], bv, w)
    with pytest.raises(ValueError, match=r"w must have shape \[5, branches\]"):
        mil_attention_logits(h, v, bv, w[:3])
    with pytest.raises(ValueError, match=r"u_kernel must have shape \[6, 5\]"):
        mil_attention_logits(h, v, bv, w, u_kernel=u[:, :2], u_bias=bu)
    with pytest.raises(ValueError, match=r"valid must be a bool array \[batch, instances\]"):
        attention_mil_pooling(h, jnp.zeros((B, M, N)), valid=jnp.ones((B, N)))
    with pytest.raises(ValueError, match=r"logits must have shape \[3, branches, 10\]"):
        attention_mil_pooling(h, jnp.zeros((B, M, N - 1)))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        topk_instance_mask(jnp.zeros((B, M, N)), jnp.zeros((B, M, 1)), 0, 0.5)
    with pytest.raises(ValueError, match=r"mask_drop must be a number in \[0, 1\]"):
        topk_instance_mask(jnp.zeros((B, M, N)), jnp.zeros((B, M, 2)), 2, 1.5)
    with pytest.raises(ValueError, match=r"noise must have shape .* = \[3, 3, 4\]"):
        topk_instance_mask(jnp.zeros((B, M, N)), jnp.zeros((B, M, 3)), 4, 0.5)
