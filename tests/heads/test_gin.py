"""attnjax.heads.gin: blocked ``A·h`` against the dense product, the top-k index search against a NumPy brute force
(exactly ``min(k, allowed)`` kept per row), the top-k product and its gradients against the dense reference, no
``[T, S]`` intermediate at long lengths, the GIN update pieces, bf16 and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.heads.gin import (gin_adjacency_reference, gin_aggregate, gin_attention_reference, gin_combine,
                               gin_head_mlp, top_k_indices)
from tests.helpers import assert_close, numpy_rng

B, T, HQ, HKV, D, DH = 2, 11, 4, 2, 8, 5


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(numpy_rng(jax.random.key(seed)).standard_normal(shape, np.float32), dtype)


def qkh(T=T, S=T, dtype=jnp.float32):
    return normal((B, T, HQ, D), 0, dtype), normal((B, S, HKV, D), 1, dtype), normal((B, S, HKV, DH), 2, dtype)


def numpy_logits(q, k, allowed):
    kr = np.repeat(np.asarray(k, np.float64), HQ // HKV, axis=2)
    s = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), kr) / math.sqrt(D)
    return np.where(allowed, s, -np.inf)


def compare(fast, reference, args, *, rtol=1e-5):
    """Outputs and the gradients of every argument, both functions in one compiled call."""
    w = jax.random.normal(jax.random.key(123), jax.eval_shape(reference, *args).shape, jnp.float32)

    def with_grads(fn, args):
        out, vjp = jax.vjp(lambda *a: fn(*a).astype(jnp.float32), *args)
        return out, vjp(w)

    (out, g), (out_ref, g_ref) = jax.jit(lambda *a: (with_grads(fast, a), with_grads(reference, a)))(*args)
    assert_close(out, out_ref, rtol=rtol, name="output")
    for name, a, e in zip("qkh", g, g_ref):
        assert_close(a, e, rtol=rtol, name=f"d{name}")
    return out


def test_blocked_product_equals_the_dense_product():
    """``A·h`` through the blocked path (GQA, odd length, a partial mask) equals ``softmax(q kᵀ/√D)·h`` written out
    in NumPy."""
    q, k, h, mask = *qkh(), masks.SlidingWindow(3, 1)
    out = compare(lambda q, k, h: gin_aggregate(q, k, h, mask=mask, implementation="xla"),
                  lambda q, k, h: gin_attention_reference(q, k, h, mask=mask), (q, k, h))
    allowed = np.ones((T, T), bool) if mask is None else np.asarray(mask.dense(T, T))[0, 0]
    s = numpy_logits(q, k, allowed)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    hr = np.repeat(np.asarray(h, np.float64), HQ // HKV, axis=2)
    assert_close(out, np.einsum("bhts,bshd->bthd", a, hr), rtol=1e-5, name="numpy")


def test_top_k_indices_against_brute_force():
    """Several query and key tiles (odd lengths, padding, T < S): the kept keys are each row's ``min(k, allowed)``
    largest logits, exactly that many, largest first (row 0 sees 5 keys, fewer than k = 6)."""
    top_k, mask = 6, masks.Causal()
    q, k, _ = qkh(T=9, S=13)
    index, kept = jax.jit(lambda q, k: top_k_indices(q, k, top_k=top_k, mask=mask, block_q=4, block_kv=5))(q, k)
    kk = top_k
    assert index.shape == kept.shape == (B, 9, HQ, kk)
    allowed = np.asarray(mask.dense(9, 13))[0, 0]
    s = numpy_logits(q, k, allowed)
    for b in range(B):
        for t in range(9):
            for hq in range(HQ):
                n = min(kk, int(allowed[t].sum()))
                expected = sorted(np.flatnonzero(allowed[t]), key=lambda j: -s[b, hq, t, j])[:n]
                assert int(kept[b, t, hq].sum()) == n and bool(kept[b, t, hq, :n].all())
                assert list(np.asarray(index[b, t, hq, :n])) == expected


def test_top_k_product_and_gradients_equal_the_dense_reference():
    q, k, h = qkh()
    mask = masks.Causal()
    compare(lambda q, k, h: gin_aggregate(q, k, h, mask=mask, top_k=3, block_q=4, block_kv=4, implementation="xla"),
            lambda q, k, h: gin_attention_reference(q, k, h, mask=mask, top_k=3), (q, k, h))
    binary, binary_ref = jax.jit(lambda q, k, h: (
        gin_aggregate(q, k, h, mask=mask, top_k=3, top_k_weights="binary", block_q=4, block_kv=4),
        gin_attention_reference(q, k, h, mask=mask, top_k=3, top_k_weights="binary")))(q, k, h)
    assert_close(binary, binary_ref, rtol=1e-5, name="binary")


def test_reference_adjacency_keeps_exactly_k_entries_per_row():
    q, k, _ = qkh()
    a, dense, binary = jax.jit(lambda q, k: (gin_adjacency_reference(q, k, mask=masks.Causal(), top_k=3),
                                             gin_adjacency_reference(q, k, mask=masks.Causal()),
                                             gin_adjacency_reference(q, k, mask=masks.Causal(), top_k=3,
                                                                     top_k_weights="binary")))(q, k)
    a, dense, binary = np.asarray(a), np.asarray(dense), np.asarray(binary)
    for row in range(T):
        assert np.all((a[:, :, row] > 0).sum(-1) == min(3, row + 1))
    kept = a > 0
    np.testing.assert_array_equal(a[kept], dense[kept])  # kept entries keep A_ij, not renormalized
    np.testing.assert_array_equal(binary, kept.astype(np.float32))
    smallest_kept = np.where(kept, dense, np.inf).min(-1)
    largest_dropped = np.where(kept | (np.tril(np.ones((T, T))) == 0), -np.inf, dense).max(-1)
    assert np.all(largest_dropped <= smallest_kept)


def test_no_t_by_s_intermediate_at_long_lengths():
    """At T = S = 1024 no array in the forward or backward jaxpr (nested scans included) holds ``B·Hq·T·S / 2``
    numbers: the top-k path tiles its search and the normalizer is the blocked attention's."""
    L = 1024
    q, k, h = (jax.ShapeDtypeStruct((1, L, 2, 8), jnp.float32) for _ in range(3))

    def loss(q, k, h):
        return jnp.sum(gin_aggregate(q, k, h, mask=masks.Causal(), top_k=8, implementation="xla"))

    def largest(jaxpr):
        sizes = [math.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")]
        for eqn in jaxpr.eqns:
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        sizes.append(largest(inner))
        return max(sizes, default=0)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, h).jaxpr
    assert 0 < largest(jaxpr) < 2 * L * L / 2


def test_gin_combine_and_head_mlp_against_numpy():
    h, agg, eps = normal((B, T, 2, DH), 3), normal((B, T, 2, DH), 4), jnp.array([0.5, -0.25])
    w1, b1, scale = normal((2, DH, 7), 5), normal((2, 7), 6), normal((2, 7), 7)
    w2, b2 = normal((2, 7, DH), 8), normal((2, DH), 9)
    z, y = jax.jit(lambda: (gin_combine(h, agg, eps), gin_head_mlp(gin_combine(h, agg, eps), w1, b1, scale, w2, b2)))()
    z_np = (1 + np.asarray(eps)[:, None]) * np.asarray(h) + np.asarray(agg)
    assert_close(z, z_np, rtol=1e-6, name="combine")
    u = np.einsum("bthd,hdf->bthf", z_np, np.asarray(w1)) + np.asarray(b1)
    u = u / np.sqrt(np.mean(u ** 2, -1, keepdims=True) + 1e-5) * np.asarray(scale)
    expected = np.einsum("bthf,hfd->bthd", u / (1 + np.exp(-u)), np.asarray(w2)) + np.asarray(b2)
    assert_close(y, expected, rtol=1e-5, name="mlp")


def test_bfloat16_is_finite_and_close():
    q, k, h = qkh(dtype=jnp.bfloat16)
    out, ref = jax.jit(lambda q, k, h: (gin_aggregate(q, k, h, mask=masks.Causal(), top_k=3),
                                        gin_attention_reference(q, k, h, mask=masks.Causal(), top_k=3)))(q, k, h)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, ref, rtol=3e-2, name="bf16")


def test_errors_name_the_argument():
    q, k, h = qkh()
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        gin_aggregate(q, k, h, top_k=0)
    with pytest.raises(ValueError, match="top_k_weights must be one of"):
        gin_aggregate(q, k, h, top_k=2, top_k_weights="renormalized")
    with pytest.raises(ValueError, match="q heads .* must be a multiple of kv heads"):
        gin_aggregate(q, normal((B, T, 3, D), 1), normal((B, T, 3, DH), 2))
    with pytest.raises(ValueError, match="k and v must agree"):
        gin_attention_reference(q, k, h[:, :5])
    with pytest.raises(TypeError, match="mask must be an attnjax.masks value"):
        top_k_indices(q, k, top_k=2, mask=np.ones((T, T), bool))
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        top_k_indices(q, k, top_k=2, block_q=0)
    with pytest.raises(ValueError, match="epsilon must be a scalar or"):
        gin_combine(h, h, jnp.zeros(3))
    with pytest.raises(ValueError, match="must have one shape"):
        gin_combine(h, h[:, :3], 0.0)
    with pytest.raises(ValueError, match="z must have shape"):
        gin_head_mlp(h, jnp.zeros((3, DH, 4)), jnp.zeros((3, 4)), jnp.ones((3, 4)), jnp.zeros((3, 4, DH)),
                     jnp.zeros((3, DH)))
