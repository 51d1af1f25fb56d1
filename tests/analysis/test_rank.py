"""Numerical rank, ARank, KV-buffer rank, stable rank and HyperAttention's α and κ against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.analysis.rank import (arank, arank_of_maps, hyperattention_alpha, hyperattention_alpha_of_map,
                                   hyperattention_kappa, kv_state, kv_state_rank, numerical_rank,
                                   squared_column_norms, stable_rank, stable_rank_of_map)
from attnjax.linear.feature_maps import taylor
from tests.analysis.test_entropy_and_sinks import numpy_map
from tests.helpers import assert_close, numpy_rng, random_qkv


def test_numerical_rank_matches_numpy_on_low_rank_matrices():
    rng = numpy_rng(jax.random.key(0))
    ranks = [0, 1, 3, 6]
    x = np.stack([rng.standard_normal((7, r)) @ rng.standard_normal((r, 9)) for r in ranks]).astype(np.float32)
    got, loose = jax.jit(lambda x: (numerical_rank(x), numerical_rank(x, rtol=0.5)))(x)
    np.testing.assert_array_equal(np.asarray(got), ranks)
    np.testing.assert_array_equal(np.asarray(got), [np.linalg.matrix_rank(m) for m in x])
    sv = np.linalg.svd(x, compute_uv=False)
    np.testing.assert_array_equal(np.asarray(loose), np.sum(sv > 0.5 * sv[:, :1], axis=-1))


def numpy_arank(p, drop_diagonal=True):
    """The official ``compute_attention_rank``: each head's map with its diagonal zeroed (query row ``t`` at
    key ``t + S − T``), ``matrix_rank`` in float32, averaged over heads."""
    T, S = p.shape[-2:]
    own = (np.arange(T)[:, None] + S - T) == np.arange(S)[None, :]
    p = np.where(own, 0.0, p) if drop_diagonal else p
    return np.array([[np.linalg.matrix_rank(m.astype(np.float32)) for m in b] for b in p]).mean(-1)


def test_arank_stable_rank_and_alpha_of_a_causal_layer():
    q, k, _ = random_qkv(jax.random.key(1), T=13, S=13, Hq=4, Hkv=2, D=4)
    q = 3 * q
    ar, ar_kept, ar_uniform, ar_uniform_kept, srank, alpha, norms = jax.jit(lambda q, k: (
        arank(q, k, mask=masks.Causal()), arank(q, k, mask=masks.Causal(), drop_diagonal=False),
        arank(0 * q, k, mask=masks.Causal()), arank(0 * q, k, mask=masks.Causal(), drop_diagonal=False),
        stable_rank(q, k, mask=masks.Causal()),
        hyperattention_alpha(q, k, mask=masks.Causal(), block_q=4),
        squared_column_norms(q, k, mask=masks.Causal(), block_q=5)))(q, k)
    p, _ = numpy_map(q, k, masks.Causal())
    assert_close(ar, numpy_arank(p), atol=1e-6, name="ARank: mean rank over heads, diagonal zeroed")
    assert_close(ar_kept, numpy_arank(p, drop_diagonal=False), atol=1e-6, name="ARank with the diagonal")
    # q = 0: row t is 1/(t+1) on keys 0..t; without the diagonal, rows 1.. are multiples of e_0 + .. + e_{t-1}
    # (linearly independent, row 0 is zero): rank T - 1.
    assert_close(ar_uniform, np.full(2, 12.0), atol=1e-6, name="uniform causal map without its diagonal")
    assert_close(ar_uniform_kept, np.full(2, 13.0), atol=1e-6, name="uniform causal map")
    sv = np.linalg.svd(p, compute_uv=False)
    assert_close(srank, (sv ** 2).sum(-1) / sv[..., 0] ** 2, rtol=1e-5, name="stable rank")
    assert np.all((np.asarray(srank) >= 1) & (np.asarray(srank) <= 13))
    assert_close(norms, (p ** 2).sum(axis=2), rtol=1e-5, name="squared column norms")
    assert_close(alpha, 13 * (p ** 2).sum(axis=2).max(-1), rtol=1e-5, name="alpha = n max_j |P e_j|^2")
    of_maps = jax.jit(lambda p: (arank_of_maps(p), stable_rank_of_map(p), hyperattention_alpha_of_map(p)))
    for got, want in zip(of_maps(p.astype(np.float32)), (ar, srank, alpha)):
        assert_close(got, want, rtol=1e-5, name="dense form")


def numpy_kappa(q, k, allowed, heavy, scale=None):
    """``max_i r_i / min_j r_j`` with ``r_i = Σ_j A_ij (1 − M^H_ij)``, ``A = exp(scale q kᵀ)`` masked, over the
    rows that see a key (float64, shifted by the global max logit)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    a = np.where(allowed, np.exp(s - s.max()), 0.0)
    r = np.where(heavy, 0.0, a).sum(-1)
    sees = allowed.any(-1)
    top = np.where(sees, r, -np.inf).max(-1)
    bottom = np.where(sees, r, np.inf).min(-1)
    with np.errstate(divide="ignore"):
        return top / bottom


def test_kappa_is_the_ratio_of_light_row_sums():
    q, k, _ = random_qkv(jax.random.key(5), T=11, S=14, Hq=4, Hkv=2, D=4)
    q = 2 * q
    heavy_pairs = np.array(jax.random.uniform(jax.random.key(6), (2, 1, 11, 14)) < 0.2)
    heavy_pairs[0, 0, 3, :] = True  # a row whose every key is heavy: zero light sum, kappa = inf
    heavy = masks.Explicit(jnp.asarray(heavy_pairs))
    window = masks.SlidingWindow(6, 0)
    plain, light, scaled = jax.jit(lambda q, k: (
        hyperattention_kappa(q, k, mask=window, block_q=4), hyperattention_kappa(q, k, heavy=heavy, block_q=3),
        hyperattention_kappa(q, k, mask=window, scale=0.3, block_q=11)))(q, k)
    allowed = np.broadcast_to(np.asarray(window.dense(11, 14)), (2, 4, 11, 14))
    everything = np.ones((2, 4, 11, 14), bool)
    nothing = np.zeros((2, 4, 11, 14), bool)
    assert_close(plain, numpy_kappa(q, k, allowed, nothing), rtol=1e-4, name="kappa: max/min row sum of A")
    want_light = numpy_kappa(q, k, everything, np.broadcast_to(heavy_pairs, (2, 4, 11, 14)))
    assert np.all(np.isinf(want_light[0])) and np.all(np.isinf(np.asarray(light)[0]))
    assert_close(light[1], want_light[1], rtol=1e-4, name="kappa after removing heavy entries")
    assert_close(scaled, numpy_kappa(q, k, allowed, nothing, scale=0.3), rtol=1e-4, name="kappa at scale 0.3")
    assert np.all(np.asarray(plain) >= 1)
    uniform = jax.jit(lambda k: hyperattention_kappa(jnp.zeros((1, 5, 1, 4)), k))(k[:1, :, :1])
    assert_close(uniform, np.ones((1, 1)), rtol=1e-6, name="equal row sums: kappa = 1")


def test_alpha_is_one_for_uniform_attention_and_n_squared_for_a_single_key():
    q, k, _ = random_qkv(jax.random.key(2), B=1, T=10, S=10, Hq=1, Hkv=1, D=4)
    u = jnp.ones(4) / 2.0
    uniform, fewer_queries, peaked = jax.jit(lambda q, k: (
        hyperattention_alpha(0 * q, k, block_q=3), hyperattention_alpha(0 * q[:, :6], k, block_q=4),
        hyperattention_alpha(0 * q + 20 * u, k.at[:, 3].set(20 * u), block_q=3)))(q, k)
    assert_close(uniform, np.ones((1, 1)), rtol=1e-6, name="uniform")
    assert_close(fewer_queries, np.full((1, 1), 10 * 6 / 100), rtol=1e-6, name="T=6 uniform rows over n=S=10 keys")
    assert_close(peaked, np.full((1, 1), 100.0), rtol=1e-4, name="every query on key 3")


def test_kv_state_and_its_rank():
    rng = numpy_rng(jax.random.key(3))
    k = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 2, 6)).astype(np.float32)
    state, rank_identity, rank_elu, state_taylor = jax.jit(lambda k, v: (
        kv_state(k, v, feature_map="elu+1"), kv_state_rank(k, v), kv_state_rank(k, v, feature_map="elu+1"),
        kv_state(k, v, feature_map="taylor")))(k, v)
    elu = np.where(k > 0, k + 1, np.exp(k))
    assert_close(state, np.einsum("bshd,bshe->bhde", elu, v), rtol=1e-5, name="sum_j phi(k_j) v_j^T")
    np.testing.assert_array_equal(np.asarray(rank_identity), np.full((2, 2), 5))  # S = 5 < min(D, Dv)
    np.testing.assert_array_equal(np.asarray(rank_elu), np.full((2, 2), 5))
    expected_taylor = np.einsum("bshd,bshe->bhde", np.asarray(taylor(jnp.asarray(k) * 8 ** -0.25)), v)
    assert_close(state_taylor, expected_taylor, rtol=1e-5, name="softmax-kernel map sees sqrt(scale) k")
    low = jax.jit(kv_state_rank)(np.repeat(k[:, :1], 5, axis=1), v)
    np.testing.assert_array_equal(np.asarray(low), np.ones((2, 2)))  # one distinct key: rank 1


def test_bad_inputs_name_the_arguments():
    with pytest.raises(ValueError, match=r"matrices must be a float array of matrices \[..., m, n\]"):
        numerical_rank(jnp.ones(3))
    with pytest.raises(ValueError, match="rtol must be a scalar"):
        numerical_rank(jnp.ones((2, 2)), rtol=jnp.ones(2))
    with pytest.raises(ValueError, match=r"maps must be \[..., H, T, S\]"):
        arank_of_maps(jnp.ones((3, 3)))
    q, k, v = random_qkv(jax.random.key(4), T=6, Hq=2, D=4)
    with pytest.raises(TypeError, match="heavy must be an attnjax.masks value"):
        hyperattention_kappa(q, k, heavy=jnp.ones((6, 6), bool))
    with pytest.raises(ValueError, match=r"k \[B, S, Hkv, D\] and v \[B, S, Hkv, Dv\] must share"):
        kv_state(k, v[:, :3])
    with pytest.raises(ValueError, match="unknown feature_map"):
        kv_state(k, v, feature_map="cosine")
