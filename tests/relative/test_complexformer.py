"""ComplexFormer CMHA: the dense reference against complex arithmetic, the per-token fast path against the
reference (forward and gradients of q, k, v, δ, β), RoPE as a special case, relative positions, errors."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from attnjax import masks
from attnjax.positional import RoPE
from attnjax.relative.complexformer import (cmha_attention, cmha_attention_reference, cmha_frequencies,
                                            cmha_transform, euler_transform)
from attnjax.softmax.softmax import softmax_attention_reference
from tests.helpers import assert_close


def _inputs(T, S, Hq, Hkv, D=8, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (2, T, Hq, D), dtype)
    k = jax.random.normal(ks[1], (2, S, Hkv, D), dtype)
    v = jax.random.normal(ks[2], (2, S, Hkv, D), dtype)
    return q, k, v, jax.random.normal(ks[3], (Hkv, D // 2)), jax.random.normal(ks[4], (Hq, D // 2))


def complex_numpy_cmha(q, k, v, delta, bias, q_pos, kv_pos, causal, eps=1e-9, base=10000.0):
    """Loop over heads and pairs in complex128: ``Re Σ_r ρ^q ρ^k exp(i(δ·AS + β + (m − n)ω))``, softmax, V."""
    q, k, v, delta, bias = (np.asarray(a, np.float64) for a in (q, k, v, delta, bias))
    B, T, Hq, D = q.shape
    S, Hkv, R = k.shape[1], k.shape[2], D // 2
    omega = base ** (-np.arange(0, D, 2) / D)
    qc, kc = q[..., :R] + 1j * q[..., R:], k[..., :R] + 1j * k[..., R:]
    out = np.zeros((B, T, Hq, v.shape[-1]))
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            s = np.full((T, S), -np.inf)
            for m in range(T):
                for n in range(S):
                    if causal and kv_pos[n] > q_pos[m]:
                        continue
                    zq, zk = qc[b, m, h], kc[b, n, g]
                    rho_q, rho_k = np.sqrt(np.abs(zq) ** 2 + eps), np.sqrt(np.abs(zk) ** 2 + eps)
                    semantic = np.angle(zq) - np.angle(zk)
                    rotation = np.exp(1j * (delta[g] * semantic + bias[h] + (q_pos[m] - kv_pos[n]) * omega))
                    s[m, n] = np.real(np.sum(rho_q * rho_k * rotation))
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, g]
    return out


@pytest.mark.parametrize("T,S,Hq,Hkv,causal", [(5, 5, 2, 1, True), (3, 6, 2, 2, False)])
def test_reference_is_the_complex_equation(T, S, Hq, Hkv, causal):
    q, k, v, delta, bias = _inputs(T, S, Hq, Hkv, D=4)
    got = jax.jit(cmha_attention_reference, static_argnames="mask")(
        q, k, v, delta, bias, mask=masks.Causal() if causal else None)
    want = complex_numpy_cmha(q, k, v, delta, bias, np.arange(T) + S - T, np.arange(S), causal)
    assert_close(got, want, rtol=1e-5, name="reference")


def test_rope_is_the_special_case_delta_one_beta_zero():
    """``δ = 1, β = 0, ε = 0``: ``ρ cos(φ + mω)`` is RoPE's rotation, so CMHA is RoPE attention (scale 1)."""
    q, k, v, _, _ = _inputs(9, 9, 2, 2)

    @jax.jit
    def both(q, k, v):
        pos = jnp.arange(9)
        want = softmax_attention_reference(RoPE()(q, pos), RoPE()(k, pos), v, mask=masks.Causal(), scale=1.0)
        return cmha_attention(q, k, v, jnp.ones((2, 4)), jnp.zeros((2, 4)), mask=masks.Causal(), eps=0.0), want

    got, want = both(q, k, v)
    assert_close(got, want, rtol=1e-5, name="rope")


def _loss(fn, mask, **kw):
    def loss(q, k, v, delta, bias):
        out = fn(q, k, v, delta, bias, mask=mask, **kw)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


@pytest.mark.parametrize("T,S,Hq,Hkv,mask", [(9, 9, 4, 2, masks.Causal()), (7, 13, 2, 1, masks.SlidingWindow(3, 0))])
def test_fast_path_matches_reference_forward_and_gradients(T, S, Hq, Hkv, mask):
    """Odd lengths, GQA/MQA, causal, cross (bottom-right positions) with a window; every input's gradient."""
    args = _inputs(T, S, Hq, Hkv)
    (y, grads) = _loss(cmha_attention, mask, implementation="xla")(*args)
    (y_ref, grads_ref) = _loss(cmha_attention_reference, mask)(*args)
    assert_close(y, y_ref, rtol=1e-5, name="loss")
    for name, g, g_ref in zip(("q", "k", "v", "delta", "bias"), grads, grads_ref):
        assert float(jnp.max(jnp.abs(g_ref))) > 0, name
        assert_close(g, g_ref, rtol=1e-4, name=f"d{name}")


def test_only_relative_positions_matter():
    """Shifting every position by a constant leaves the output unchanged; a different offset does not."""
    q, k, v, delta, bias = _inputs(9, 9, 2, 2)
    run = jax.jit(lambda qp, kp: cmha_attention(q, k, v, delta, bias, q_positions=qp, kv_positions=kp,
                                                mask=masks.Causal()))
    pos = jnp.arange(9)
    base = run(pos, pos)
    assert_close(run(pos + 37, pos + 37), base, rtol=1e-5, name="shifted")
    assert_close(run(jnp.stack([pos, pos + 5]), jnp.stack([pos, pos + 5])), base, rtol=1e-5, name="per-batch shift")
    assert float(jnp.max(jnp.abs(run(pos + 3, pos) - base))) > 1e-3


def test_per_token_transform_gives_the_score():
    """``q̃_m · k̃_n = Σ_r ρ^q ρ^k cos(δ(φ^q − φ^k) + β + (m − n)ω)`` for one pair."""
    @jax.jit
    def both(q, k, delta, bias):
        qt = cmha_transform(q, jnp.array([5]), delta, bias)
        kt = cmha_transform(k, jnp.array([2]), delta)
        (rq, pq), (rk, pk) = euler_transform(q), euler_transform(k)
        return jnp.sum(qt * kt), jnp.sum(rq * rk * jnp.cos(delta * (pq - pk) + bias + 3 * cmha_frequencies(8)))

    q, k, _, delta, bias = _inputs(1, 1, 1, 1)
    got, want = both(q, k, delta, bias)
    assert_close(got, want, rtol=1e-5, name="score")


def test_zero_vectors_have_finite_gradients():
    q, k, v, delta, bias = _inputs(5, 5, 2, 2)
    q = q.at[:, 2].set(0.0)
    k = k.at[:, :, :, jnp.array([0, 4])].set(0.0)  # component 0 of every key is 0 + 0i
    _, grads = _loss(cmha_attention, masks.Causal(), implementation="xla")(q, k, v, delta, bias)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))


def test_bf16_is_finite_and_close():
    args = _inputs(9, 9, 2, 2)
    q, k, v = (a.astype(jnp.bfloat16) for a in args[:3])
    out, want = jax.jit(lambda a, b: (cmha_attention(*a, mask=masks.Causal()),
                                      cmha_attention_reference(*b, mask=masks.Causal())))((q, k, v, *args[3:]), args)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert_close(out, want, rtol=5e-2, name="bf16")


def test_errors_name_the_argument():
    q, k, v, delta, bias = _inputs(4, 4, 2, 2)
    with pytest.raises(ValueError, match="even head_dim"):
        cmha_attention(q[..., :7], k[..., :7], v, delta, bias)
    with pytest.raises(ValueError, match=r"delta must have shape \[Hkv, D/2\] = \[2, 4\]"):
        cmha_attention(q, k, v, delta[:1], bias)
    with pytest.raises(ValueError, match=r"bias must have shape \[Hq, D/2\]"):
        cmha_attention_reference(q, k, v, delta, bias[:, :3])
    with pytest.raises(TypeError, match="delta must be a floating-point"):
        cmha_attention(q, k, v, delta.astype(jnp.int32), bias)
    with pytest.raises(ValueError, match=r"q_positions must have shape \[4\] or \[2, 4\]"):
        cmha_attention(q, k, v, delta, bias, q_positions=jnp.arange(5))
    with pytest.raises(ValueError, match="scale must be positive"):
        cmha_attention(q, k, v, delta, bias, scale=0.0)
    with pytest.raises(ValueError, match="eps must be non-negative"):
        cmha_attention_reference(q, k, v, delta, bias, eps=-1.0)
    with pytest.raises(TypeError, match="mask must be an attnjax.masks value"):
        cmha_attention_reference(q, k, v, delta, bias, mask=jnp.ones((4, 4), bool))
    with pytest.raises(ValueError, match="q heads"):
        cmha_attention(q[:, :, :1], k, v, delta, bias[:1])
