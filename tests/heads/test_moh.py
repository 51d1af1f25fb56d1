"""MoH (attnjax.heads.moh): routing against a NumPy loop, the balance loss against its formula, and the packed
routed-heads path against the masked all-heads reference, forward and gradients (router logits included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import attention, masks
from attnjax.heads.moh import (BALANCE_LOSS_WEIGHT, HeadRouting, moh_attention, moh_attention_reference,
                               moh_balance_loss, moh_routing)
from tests.helpers import assert_close, random_qkv


def normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_routing(routed, top_k, shared=None, balance=None, num_shared=0, official=False):
    """MoH eq. (sec. 3.2) token by token: dense gates [B, T, h] and the chosen routed heads per token."""
    routed = np.asarray(routed, np.float64)
    B, T, hr = routed.shape
    hs = num_shared if shared is None else shared.shape[-1]
    gates, chosen = np.zeros((B, T, hs + hr)), np.zeros((B, T, top_k), int)
    for b in range(B):
        for t in range(T):
            order = sorted(range(hr), key=lambda i: (-routed[b, t, i], i))[:top_k]  # ties: lower index first
            chosen[b, t] = order
            a1, a2 = softmax(np.asarray(balance[b, t], np.float64)) if hs and hr else (1.0, 1.0)
            scale = 2.0 if official and hs and hr else 1.0
            ps = np.ones(1) if shared is None else softmax(np.asarray(shared[b, t], np.float64))
            for i in range(hs):
                gates[b, t, i] = scale * a1 * ps[i] * (hs if official else 1)
            pr = softmax(routed[b, t]) if hr else routed[b, t]
            total = sum(pr[i] for i in order)
            for i in order:
                gates[b, t, hs + i] = scale * a2 * (top_k * pr[i] / total if official else pr[i])
    return gates, chosen


@pytest.mark.parametrize("hs, hr, top_k, official", [(2, 4, 2, False), (2, 4, 2, True), (1, 3, 1, False),
                                                     (0, 5, 3, True), (3, 0, 0, False)])
def test_routing_matches_a_numpy_loop(hs, hr, top_k, official):
    B, T = 2, 5
    routed = normal(0, (B, T, hr)).at[0, 0].set(0.5) if hr else None  # a tie on token (0, 0)
    shared = normal(1, (B, T, hs)) if hs > 1 else (normal(1, (B, T, 1)) if hr == 0 else None)
    balance = normal(2, (B, T, 2))
    route = jax.jit(lambda r, s, b: moh_routing(r, top_k, shared_logits=s, balance_logits=b,
                                                num_shared=min(hs, 1) if hs < 2 else None, official_scaling=official))
    r, gates = jax.jit(lambda *a: (lambda r: (r, r.gates()))(route(*a)))(routed, shared, balance)
    expected, chosen = numpy_routing(np.zeros((B, T, 0)) if routed is None else routed, top_k, shared, balance,
                                     num_shared=hs, official=official)
    assert r.num_heads == hs + hr and r.top_k == top_k and r.index.shape == (B, T, hs + top_k)
    np.testing.assert_array_equal(np.asarray(r.index[..., :hs]), np.broadcast_to(np.arange(hs), (B, T, hs)))
    np.testing.assert_array_equal(np.asarray(r.index[..., hs:]) - hs, chosen)
    assert_close(gates, expected, atol=1e-6, name="gates")
    assert_close(np.take_along_axis(np.asarray(gates), np.asarray(r.index), -1), r.weights, atol=1e-7, name="weights")
    if not official and hr and hs:  # paper: the weights of all heads sum to α₁ + α₂·(mass of the top-k) <= 1
        assert np.all(np.asarray(gates).sum(-1) <= 1 + 1e-6)


def balance_formula(routed, top_k):
    """L_b = Σ_i f_i P_i with NumPy counts: f_i the fraction of tokens selecting i, P_i the mean probability."""
    routed = np.asarray(routed, np.float64).reshape(-1, routed.shape[-1])
    f, p = np.zeros(routed.shape[-1]), softmax(routed).mean(0)
    for row in routed:
        for i in sorted(range(len(row)), key=lambda i: (-row[i], i))[:top_k]:
            f[i] += 1 / len(routed)
    return float(np.sum(f * p)), f


def test_balance_loss_matches_its_formula_and_gradient():
    routed, top_k = normal(3, (2, 7, 6)), 2
    expected, f = balance_formula(routed, top_k)

    def everything(x):
        full = moh_routing(x, top_k, shared_logits=normal(4, (2, 7, 2)), balance_logits=normal(5, (2, 7, 2)))
        grad = jax.grad(lambda x: moh_balance_loss(moh_routing(x, top_k)))(x)  # f is a count: d/dx Σ f_i P_i
        expected_grad = jax.grad(lambda x: jnp.sum(f * jnp.mean(jax.nn.softmax(x, -1).reshape(-1, 6), 0)))(x)
        spread = moh_routing(jnp.zeros((1, 6, 6)).at[0, jnp.arange(6), jnp.arange(6)].set(1.0), 1)
        shared_only = moh_routing(None, 0, shared_logits=normal(6, (1, 3, 2)))
        return (moh_balance_loss(full), moh_balance_loss(full, official_scaling=True), grad, expected_grad,
                moh_balance_loss(spread), moh_balance_loss(shared_only))

    loss, official, grad, expected_grad, spread, shared_only = jax.jit(everything)(routed)
    assert abs(float(loss) - expected) < 1e-6
    assert abs(float(official) - 6 * expected) < 1e-5
    assert abs(f.sum() - top_k) < 1e-9
    assert_close(grad, expected_grad, atol=1e-7, name="dL_b")
    assert float(jnp.abs(grad).max()) > 0
    assert abs(float(spread) - 1 / 6) < 1e-6  # k/(h - h_s) under a uniform load and probability
    assert float(shared_only) == 0.0
    assert BALANCE_LOSS_WEIGHT == 0.01


def routing_for(B, T, hs=2, hr=4, top_k=2, seed=10):
    return dict(routed=normal(seed, (B, T, hr)), shared=normal(seed + 1, (B, T, hs)),
                balance=normal(seed + 2, (B, T, 2)), top_k=top_k)


def forward_and_grads(fn, args):
    out_shape = jax.eval_shape(fn, *args)
    w = normal(99, out_shape.shape)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, g


def test_routed_path_equals_masked_reference_forward_and_gradients():
    """Causal GQA over a batch of 2, odd T, blocks of 4 (the packed rows span several tiles and (batch, KV head)
    groups): forward and the gradients of q, k, v and the three router logits, through the routing."""
    B, T = 2, 13
    q, k, v = random_qkv(jax.random.key(1), B=B, T=T, Hq=6, Hkv=3, D=8)
    rt = routing_for(B, T)

    def route(routed, shared, balance):
        return moh_routing(routed, rt["top_k"], shared_logits=shared, balance_logits=balance)

    def fast(q, k, v, routed, shared, balance):
        r = route(routed, shared, balance)
        return moh_attention(q, k, v, r.index, r.weights, mask=masks.Causal(), block_q=4, block_kv=4)

    def reference(q, k, v, routed, shared, balance):
        return moh_attention_reference(q, k, v, route(routed, shared, balance).gates(), mask=masks.Causal())

    args = (q, k, v, rt["routed"], rt["shared"], rt["balance"])
    out, g = forward_and_grads(fast, args)
    ref, g_ref = forward_and_grads(reference, args)
    assert_close(out, ref, name="out")
    gates = np.asarray(jax.jit(lambda *a: route(*a).gates())(*args[3:]))
    assert np.all(np.asarray(out)[gates == 0] == 0), "inactive heads output 0"
    for name, a, e in zip(["q", "k", "v", "routed_logits", "shared_logits", "balance_logits"], g, g_ref):
        assert_close(a, e, name=f"d{name}")
    assert float(jnp.abs(g[3]).max()) > 0 and float(jnp.abs(g[5]).max()) > 0, "the router gets gradients"


@pytest.mark.parametrize("mask", [None, masks.Causal()], ids=["bidirectional", "causal bottom-right"])
def test_routed_path_cross_lengths(mask):
    """T = 5 queries over S = 12 keys, MHA, a different number of active heads per token than above."""
    q, k, v = random_qkv(jax.random.key(6), B=1, T=5, S=12, Hq=4, D=8)
    r = moh_routing(normal(7, (1, 5, 3)), 2, num_shared=1, balance_logits=normal(8, (1, 5, 2)))
    out, ref = jax.jit(lambda q, k, v: (moh_attention(q, k, v, r.index, r.weights, mask=mask, block_q=4, block_kv=4),
                                        moh_attention_reference(q, k, v, r.gates(), mask=mask)))(q, k, v)
    assert_close(out, ref, name="out")


def test_query_positions_serve_a_kv_cache_step():
    """One query at position 6 of a 10-slot cache whose slots 7.. hold garbage: equals the causal reference on
    the first 7 keys (what decoding needs)."""
    q, k, v = random_qkv(jax.random.key(2), B=2, T=1, S=10, Hq=4, Hkv=2, D=8)
    index = jnp.asarray([[[0, 3]], [[2, 1]]], jnp.int32)
    weights = normal(3, (2, 1, 2))
    out, ref = jax.jit(lambda q, k, v, gates=HeadRouting(index, weights, jnp.zeros((2, 1, 2)), 2): (
        moh_attention(q, k, v, index, weights, mask=masks.Causal(), q_positions=jnp.asarray([6]), block_q=2,
                      block_kv=4),
        moh_attention_reference(q, k[:, :7], v[:, :7], gates.gates(), mask=masks.Causal())))(q, k, v)
    assert_close(out, ref, name="out")


def test_every_head_active_is_multi_head_attention_and_bf16_is_finite():
    q, k, v = random_qkv(jax.random.key(4), B=1, T=9, Hq=4, D=8, dtype=jnp.bfloat16)
    index = jnp.broadcast_to(jnp.asarray([3, 1, 0, 2], jnp.int32), (1, 9, 4))
    out, mha = jax.jit(lambda q, k, v: (
        moh_attention(q, k, v, index, jnp.ones((1, 9, 4), jnp.bfloat16), mask=masks.Causal(), block_q=4, block_kv=4),
        attention(q, k, v, mask=masks.Causal())))(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, mha, rtol=2e-2, name="all heads")


def test_errors_name_the_argument():
    q, k, v = random_qkv(jax.random.key(5), B=1, T=4, Hq=4, D=8)
    index, weights = jnp.zeros((1, 4, 2), jnp.int32).at[..., 1].set(1), jnp.ones((1, 4, 2))
    with pytest.raises(NotImplementedError, match="mask=None or masks.Causal"):
        moh_attention(q, k, v, index, weights, mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match="index must be an int"):
        moh_attention(q, k, v, index.astype(jnp.float32), weights)
    with pytest.raises(ValueError, match="weights must match index"):
        moh_attention(q, k, v, index, weights[..., :1])
    with pytest.raises(ValueError, match="q_positions place the queries"):
        moh_attention(q, k, v, index, weights, q_positions=jnp.arange(4))
    with pytest.raises(ValueError, match="gates must be"):
        moh_attention_reference(q, k, v, jnp.ones((1, 4, 3)))
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 3\]"):
        moh_routing(normal(0, (1, 4, 3)), 4)
    with pytest.raises(ValueError, match="balance_logits must be"):
        moh_routing(normal(0, (1, 4, 3)), 1, shared_logits=normal(1, (1, 4, 2)))
    with pytest.raises(ValueError, match="needs shared_logits"):
        moh_routing(normal(0, (1, 4, 3)), 1, num_shared=2)
