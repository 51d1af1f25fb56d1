"""PMI memory operations (attnjax.memory.pmi) against direct loop computations of their equations, the
competition properties of the write, its differentiability (autodiff == finite differences), bf16, jit and the
error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.memory.pmi import (competitive_attention, competitive_weights, integrate, long_term_association,
                                long_term_summary, working_memory_gate)
from tests.helpers import assert_close


def normal(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def softmax_np(s):
    e = np.exp(s - s.max())
    return e / e.sum()


def competitive_weights_loop(logits, k):
    """Per row: the softmax, then every entry outside the k largest set to zero."""
    logits = np.asarray(logits, np.float64)
    out = np.zeros_like(logits)
    for index in np.ndindex(*logits.shape[:-1]):
        p = softmax_np(logits[index])
        winners = np.argsort(-p, kind="stable")[:k]
        out[index][winners] = p[winners]
    return out


def test_competitive_weights_equal_a_loop_over_rows():
    logits = normal((2, 3, 5, 11))
    for k in (1, 3, 10):
        assert_close(competitive_weights(logits, k), competitive_weights_loop(logits, k), rtol=1e-6, name=f"k={k}")


def test_the_k_strongest_candidates_win_each_row_and_keep_their_softmax_weight():
    """The competition: the candidates share one softmax (rows of the softmax sum to 1), exactly k of them write
    (the k largest), the losers get 0, and the winners keep their weight, so a row sums to at most 1."""
    logits = normal((4, 7, 13), seed=1)
    k = 4
    w = np.asarray(competitive_weights(logits, k))
    p = np.asarray(jax.nn.softmax(logits, axis=-1))
    assert np.all((w > 0).sum(-1) == k)
    kth = np.sort(p, axis=-1)[..., -k][..., None]
    np.testing.assert_array_equal(w > 0, p >= kth)
    np.testing.assert_allclose(w[w > 0], p[w > 0], rtol=1e-6)
    np.testing.assert_allclose(w.sum(-1), np.sort(p, -1)[..., -k:].sum(-1), rtol=1e-6)
    assert np.all(w.sum(-1) < 1.0)


def test_with_k_at_least_the_number_of_candidates_the_write_is_the_softmax():
    logits = normal((3, 6), seed=2)
    for k in (6, 9):
        w = competitive_weights(logits, k)
        assert_close(w, jax.nn.softmax(logits, axis=-1), rtol=1e-7, name=f"k={k}")
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)


def competitive_attention_loop(q, k, v, topk, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, Hq, _ = q.shape
    S, Hk = k.shape[1], k.shape[2]
    out = np.zeros((B, T, Hq, v.shape[-1]))
    for b, t, h in np.ndindex(B, T, Hq):
        kh = h // (Hq // Hk)
        logits = np.array([scale * q[b, t, h] @ k[b, s, kh] for s in range(S)])
        w = competitive_weights_loop(logits, topk)
        out[b, t, h] = sum(w[s] * v[b, s, kh] for s in range(S))
    return out


@pytest.mark.parametrize("T, S, Hq, Hk, topk", [(4, 9, 2, 2, 3), (9, 5, 4, 2, 2)],
                         ids=["write: slots over tokens", "read: tokens over slots, GQA"])
def test_competitive_attention_equals_a_loop_over_queries(T, S, Hq, Hk, topk):
    """Under jit, with the default scale ``1/sqrt(Dk)`` and with an explicit one."""
    q, k, v = normal((2, T, Hq, 4), 3), normal((2, S, Hk, 4), 4), normal((2, S, Hk, 3), 5)
    run = jax.jit(lambda q, k, v, scale: (competitive_attention(q, k, v, topk=topk),
                                          competitive_attention(q, k, v, topk=topk, scale=scale)), static_argnums=3)
    default, scaled = run(q, k, v, 0.5)
    assert_close(default, competitive_attention_loop(q, k, v, topk, 4 ** -0.5), rtol=1e-5, name="default scale")
    assert_close(scaled, competitive_attention_loop(q, k, v, topk, 0.5), rtol=1e-5, name="scale 0.5")


def test_competitive_attention_gradients_match_finite_differences():
    """The competitive write is differentiable: float64 gradients of q, k, v are finite, nonzero and equal
    central differences (the top-k set does not change within the step). One query keeps 3 of 5 keys."""
    with jax.enable_x64(True):
        q, k, v = (normal(s, seed, jnp.float64) for s, seed in (((1, 1, 1, 3), 6), ((1, 5, 1, 3), 7),
                                                               ((1, 5, 1, 2), 8)))
        w = normal((1, 1, 1, 2), 9, jnp.float64)

        def loss(q, k, v):
            return jnp.sum(competitive_attention(q, k, v, topk=3) * w)

        value = jax.jit(loss)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        eps = 1e-6
        for i, (arg, g) in enumerate(zip((q, k, v), grads)):
            g = np.asarray(g)
            assert np.all(np.isfinite(g)) and np.any(g != 0), i
            numeric = np.zeros(arg.shape)
            for index in np.ndindex(*arg.shape):
                args = [q, k, v]
                args[i] = arg.at[index].add(eps)
                up = float(value(*args))
                args[i] = arg.at[index].add(-eps)
                numeric[index] = (up - float(value(*args))) / (2 * eps)
            np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-9, err_msg=f"argument {i}")
        written = np.asarray(grads[2])[0, :, 0].any(-1)
        assert written.sum() == 3, "only the 3 winning keys' values are written"
        assert np.asarray(grads[1])[0, :, 0].any(-1).all(), "the losing keys still get gradients (shared softmax)"


def test_competitive_attention_in_bfloat16_is_finite_and_keeps_the_dtype():
    q, k, v = (normal(s, seed, jnp.bfloat16) for s, seed in (((2, 9, 2, 4), 1), ((2, 5, 2, 4), 2), ((2, 5, 2, 4), 3)))
    out = competitive_attention(q, k, v, topk=2)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    expected = competitive_attention(*(a.astype(jnp.float32) for a in (q, k, v)), topk=2)
    assert_close(out, expected, rtol=2e-2, name="bf16")


def test_long_term_association_is_the_outer_product_of_segment_sums_and_slots():
    """``A[c, n, :] = (Σ_d M_l[c, n, d]) M_w[n, :]``: per slot n, outer(M_l[:, n] 1, M_w[n])."""
    ltm, wm = normal((2, 3, 4, 5), 10), normal((2, 4, 5), 11)
    expected = np.zeros((2, 3, 4, 5))
    for b, n in np.ndindex(2, 4):
        expected[b, :, n, :] = np.outer(np.asarray(ltm)[b, :, n, :].sum(-1), np.asarray(wm)[b, n])
    assert_close(long_term_association(ltm, wm), expected, rtol=1e-6, name="association")


def test_long_term_summary_is_the_mean_over_segments():
    ltm = normal((2, 3, 4, 5), 12)
    expected = sum(np.asarray(ltm)[:, c] for c in range(3)) / 3
    assert_close(long_term_summary(ltm.astype(jnp.bfloat16)), expected, rtol=1e-2, name="bf16 summary")
    assert_close(long_term_summary(ltm), expected, rtol=1e-6, name="summary")


def test_working_memory_gate_and_integration_equal_their_formulas():
    m_new, m_old = normal((2, 4, 6), 13), normal((2, 4, 6), 14)
    i, f = jax.nn.sigmoid(normal((2, 4, 6), 15)), jax.nn.sigmoid(normal((2, 4, 6), 16))
    expected = np.asarray(i) * np.tanh(np.asarray(m_new)) + np.asarray(f) * np.asarray(m_old)
    assert_close(working_memory_gate(m_new, m_old, i, f), expected, rtol=1e-6, name="gate")
    u_w, u_wl = normal((2, 9, 6), 17), normal((2, 9, 6), 18)
    assert_close(integrate(u_w, u_wl, 0.7), 0.7 * np.asarray(u_w) + 0.3 * np.asarray(u_wl), rtol=1e-6, name="eq. 12")


@pytest.mark.parametrize("call, error, message", [
    (lambda: competitive_attention(normal((2, 9, 8)), normal((2, 5, 2, 4)), normal((2, 5, 2, 4)), topk=2),
     ValueError, r"q must have rank 4 \[batch, seq, heads, head_dim\], got shape \(2, 9, 8\)"),
    (lambda: competitive_attention(normal((2, 9, 2, 4)), normal((2, 5, 2, 3)), normal((2, 5, 2, 4)), topk=2),
     ValueError, r"k head_dim 3 != q head_dim 4"),
    (lambda: competitive_attention(normal((2, 9, 2, 4)), normal((2, 5, 2, 4)), normal((2, 5, 2, 4)), topk=0),
     ValueError, "topk must be a positive int, got 0"),
    (lambda: competitive_attention(normal((2, 9, 2, 4)), normal((2, 5, 2, 4)), normal((2, 5, 2, 4)), topk=2,
                                   scale=-1.0),
     ValueError, "scale must be positive, got -1.0"),
    (lambda: competitive_weights(jnp.arange(5), 2), TypeError, r"logits must be a floating-point array .* int32\[5\]"),
    (lambda: long_term_association(normal((2, 3, 4, 5)), normal((2, 3, 5))), ValueError,
     r"working must have shape \[batch, slots, features\] = \[2, 4, 5\] to match long_term \[2, 3, 4, 5\], "
     r"got a float32\[2, 3, 5\] array"),
    (lambda: long_term_summary(normal((2, 4, 5))), ValueError,
     r"long_term must be a floating-point array \[batch, segments, slots, features\], got a float32\[2, 4, 5\]"),
    (lambda: working_memory_gate(normal((2, 4, 6)), normal((2, 4, 5)), normal((2, 4, 6)), normal((2, 4, 6))),
     ValueError, r"must share one shape .*'memory': \(2, 4, 5\)"),
    (lambda: integrate(normal((2, 3)), normal((2, 3)), 1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
    (lambda: integrate(normal((2, 3)), normal((2, 4)), 0.5), ValueError,
     r"u_working and u_corrected must share one shape, got a float32\[2, 3\] array and a float32\[2, 4\] array"),
])
def test_bad_input_is_refused_naming_the_argument_and_shapes(call, error, message):
    with pytest.raises(error, match=message):
        call()
