"""Kernelized attention with RPE (Luo et al. 2021): the FFT path against the dense Toeplitz reference,
the reference against eq. 10 written as loops, the registry entry with T5/ALiBi biases."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.api import attention
from attnjax.linear.feature_maps import Performer, elu_plus_one
from attnjax.linear.kernelized_rpe import (
    fast_fft_length, kernelized_rpe_attention, kernelized_rpe_attention_reference, rpe_bias_from_table,
    rule_rpe_bias, toeplitz_offsets)
from attnjax.linear.linear_attention import linear_attention
from attnjax.positional import ALiBi, T5Bias, alibi_slopes
from attnjax.testing.numerics import assert_close

PHI = Performer(num_features=12)


def _inputs(B, T, S, Hq, Hkv, D=8, Dv=5, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in
              ((B, T, Hq, D), (B, S, Hkv, D), (B, S, Hkv, Dv), (Hq, T + S - 1))]
    return [jnp.asarray(a, dtype if i < 3 else jnp.float32) for i, a in enumerate(arrays)]


@functools.partial(jax.jit, static_argnames=("fast", "causal", "chunk"))
def _outputs_and_grads(q, k, v, b, w, *, fast, causal, chunk=5):
    def loss(q, k, v, b):
        if fast:
            out = kernelized_rpe_attention(q, k, v, b, feature_map=PHI, causal=causal, feature_chunk=chunk)
        else:
            out = kernelized_rpe_attention_reference(q, k, v, b, feature_map=PHI, causal=causal)
        return jnp.sum(out * w), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, b)
    return (out,) + grads


# Lengths that are not powers of two, T != S (causal T > S: the first T − S rows see no key; causal T < S
# is in the registry test below), GQA; feature_chunk 5 does not divide the 12 features (a padded last block).
CASES = [(2, 13, 13, 4, 2, False), (1, 37, 13, 2, 1, True)]


@pytest.mark.parametrize("B,T,S,Hq,Hkv,causal", CASES)
def test_fft_matches_dense_toeplitz_reference(B, T, S, Hq, Hkv, causal):
    q, k, v, b = _inputs(B, T, S, Hq, Hkv)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, Hq, 5)), jnp.float32)
    actual = _outputs_and_grads(q, k, v, b, w, fast=True, causal=causal)
    expected = _outputs_and_grads(q, k, v, b, w, fast=False, causal=causal)
    for name, a, e in zip(("out", "dq", "dk", "dv", "drpe_bias"), actual, expected, strict=True):
        assert bool(jnp.all(jnp.isfinite(a))), name
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    if causal and T > S:
        assert float(jnp.abs(actual[0][:, :T - S]).max()) == 0.0
    assert float(jnp.abs(actual[4]).max()) > 0


def test_large_bias_is_shifted_not_overflowed():
    """``e^b`` overflows float32 for ``b = 200``; the per-head max shift cancels, so the result equals the
    one at ``b − 200``, and the dense reference (the same shift) agrees."""
    q, k, v, b = _inputs(*CASES[0][:5])
    w = jnp.zeros((2, 13, 4, 5), jnp.float32)
    shifted = _outputs_and_grads(q, k, v, b + 200.0, w, fast=True, causal=False)[0]
    plain = _outputs_and_grads(q, k, v, b, w, fast=True, causal=False)[0]
    assert bool(jnp.all(jnp.isfinite(shifted)))
    assert_close(shifted, plain, rtol=1e-5, atol=1e-5, name="b + 200")


def test_reference_is_equation_10():
    """The reference equals eq. 10 written as loops: ``z_i = Σ_j e^(b_(j−p_i)) φ(q_i)·φ(k_j) v_j / Σ_j …``,
    offsets ``key − query`` with bottom-right alignment ``p_i = i + S − T``, ``c = 0`` for ``j > p_i`` when
    causal."""
    T, S, D = 4, 6, 3
    q, k, v, b = _inputs(1, T, S, 1, 1, D=D, Dv=2, seed=3)
    for causal in (False, True):
        out = np.asarray(kernelized_rpe_attention_reference(q, k, v, b, feature_map="elu+1", qk_norm=False,
                                                            causal=causal))
        fq = np.asarray(elu_plus_one(q))[0, :, 0] / np.sqrt(D)
        fk, vv, bb = np.asarray(elu_plus_one(k))[0, :, 0], np.asarray(v)[0, :, 0], np.asarray(b)[0]
        top = bb[:S].max() if causal else bb.max()        # the shift: max over the usable offsets
        for i in range(T):
            p = i + S - T
            num, den = np.zeros(2), 0.0
            for j in range(S):
                if causal and j > p:
                    continue
                weight = np.exp(bb[(j - p) + S - 1] - top) * (fq[i] @ fk[j])
                num, den = num + weight * vv[j], den + weight
            np.testing.assert_allclose(out[0, i, 0], num / den, rtol=1e-5)


def test_zero_bias_is_normalized_linear_attention():
    """With ``b = 0``, no normalization of q/k and elu+1, the FFT path is normalized causal linear
    attention (``attnjax.linear.linear_attention``, Katharopoulos et al. 2020)."""
    q, k, v, _ = _inputs(1, 11, 11, 2, 2)
    fast = functools.partial(kernelized_rpe_attention, feature_map="elu+1", qk_norm=False, causal=True)
    actual = jax.jit(fast)(q, k, v, jnp.zeros((1, 21)))
    expected = linear_attention(q, k, v, feature_map="elu+1", causal=True, normalize=True, implementation="reference")
    assert_close(actual, expected, rtol=1e-5, atol=1e-5, name="b = 0")


def test_rule_generators_equal_the_dense_rules():
    """``rule_rpe_bias`` reads ALiBi's and T5's biases into generators whose Toeplitz expansion is the rule's
    dense ``[T, S]`` bias (offsets key − query, bottom-right alignment), for T < S and T > S."""
    table = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3)), jnp.float32)
    for rule, T, S in ((ALiBi(jnp.asarray(alibi_slopes(3))), 5, 9), (T5Bias(table, max_distance=16), 9, 5)):
        g, dense = jax.jit(lambda rule, T=T, S=S: (rule_rpe_bias(rule, 3, T, S), rule.dense(T, S)))(rule)
        r = np.arange(S)[None, :] - np.arange(T)[:, None] + T - 1
        np.testing.assert_allclose(np.asarray(g)[:, r], np.asarray(dense)[0], rtol=1e-6)


def test_table_clips_offsets():
    table = jnp.arange(3 * 5, dtype=jnp.float32).reshape(3, 5)          # k = 2: offsets −2 … 2
    g = rpe_bias_from_table(table, jnp.asarray(toeplitz_offsets(4, 3)))  # offsets −2 … 3
    np.testing.assert_array_equal(np.asarray(g)[1], [5, 6, 7, 8, 9, 9])
    causal = rpe_bias_from_table(table[:, :3], jnp.asarray([-4, -1, 0, 2]), causal=True)
    np.testing.assert_array_equal(np.asarray(causal)[0], [0, 1, 2, 2])


def test_registry_entry_with_learned_t5_bias():
    """``attention(mechanism="kernelized_rpe", bias=T5Bias(table))``: the FFT ("xla") path equals the
    reference, gradients to the T5 table included; an array bias (not Toeplitz) is refused."""
    q, k, v, _ = _inputs(1, 9, 12, 2, 1)
    table = jnp.asarray(np.random.default_rng(2).standard_normal((6, 2)), jnp.float32)

    def run(implementation):
        def loss(q, table):
            out = attention(q, k, v, mechanism="kernelized_rpe", mask=masks.Causal(), implementation=implementation,
                            bias=T5Bias(table, bidirectional=False, max_distance=8))
            return jnp.sum(out * jnp.cos(out)), out
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(q, table)

    (dq, dtable), out = run("xla")
    (dq_ref, dtable_ref), out_ref = run("reference")
    for name, a, e in (("out", out, out_ref), ("dq", dq, dq_ref), ("dtable", dtable, dtable_ref)):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    assert float(jnp.abs(dtable).max()) > 0
    with pytest.raises(NotImplementedError, match="key - query only"):
        attention(q, k, v, mechanism="kernelized_rpe", bias=jnp.zeros((1, 2, 9, 12)), implementation="xla")
    with pytest.raises(NotImplementedError, match="no mask or masks.Causal"):
        attention(q, k, v, mechanism="kernelized_rpe", mask=masks.SlidingWindow(2, 0), implementation="xla")


def test_bfloat16_is_finite():
    q, k, v, b = _inputs(1, 13, 13, 2, 2, dtype=jnp.bfloat16)
    out = jax.jit(functools.partial(kernelized_rpe_attention, feature_map=PHI, causal=True))(q, k, v, b)
    assert out.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_fast_fft_length():
    for n in (1, 2, 7, 13, 37, 49, 97, 1000, 4097, 16383):
        L = fast_fft_length(n)
        assert n <= L <= max(2 * n - 1, 1)
        m = L
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1 and not any(n <= c < L for c in range(n, L) if _smooth(c))


def _smooth(n):
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def test_errors():
    q, k, v, b = _inputs(1, 5, 7, 2, 1)
    with pytest.raises(ValueError, match=r"rpe_bias has shape \(2, 10\), expected \[H, T \+ S - 1\]"):
        kernelized_rpe_attention(q, k, v, b[:, :-1])
    with pytest.raises(ValueError, match="rpe_bias has shape"):
        kernelized_rpe_attention_reference(q, k, v, jnp.zeros((3, 11)))
    with pytest.raises(TypeError, match="rpe_bias must be a float"):
        kernelized_rpe_attention(q, k, v, jnp.zeros((2, 11), jnp.int32))
    with pytest.raises(ValueError, match="feature_chunk must be a positive int"):
        kernelized_rpe_attention(q, k, v, b, feature_chunk=0)
    with pytest.raises(ValueError, match="scale must be positive"):
        kernelized_rpe_attention(q, k, v, b, scale=-1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        kernelized_rpe_attention(q[:, :, :1], k[:, :, [0, 0]], v[:, :, [0, 0]], b[:1])
    with pytest.raises(ValueError, match=r"table must have shape \[H, 2k \+ 1 \(odd\)\]"):
        rpe_bias_from_table(jnp.zeros((2, 4)), jnp.arange(3))
    with pytest.raises(ValueError, match="n must be positive"):
        fast_fft_length(0)


@pytest.mark.slow
def test_fft_path_memory_is_linear_in_length():
    """Compiled temporary memory of forward + gradients at T = 4096 and 8192 (B = 1, H = 4, D = 64, the
    default 64 PRF features): doubling T about doubles it (a ``[T, T]`` term would quadruple it)."""
    sizes = []
    for T in (4096, 8192):
        q = jax.ShapeDtypeStruct((1, T, 4, 64), jnp.float32)
        b = jax.ShapeDtypeStruct((4, 2 * T - 1), jnp.float32)
        grad = jax.grad(lambda q, k, v, b: kernelized_rpe_attention(q, k, v, b).sum(), argnums=(0, 1, 2, 3))
        sizes.append(jax.jit(grad).lower(q, q, q, b).compile().memory_analysis().temp_size_in_bytes)
    assert 1.8 < sizes[1] / sizes[0] < 2.3, sizes
