"""attnjax.heads.union_of_experts: the routing rules against NumPy loops, SMHA against a per-expert NumPy loop,
and the routed (gather per expert) path against the masked reference, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.heads.union_of_experts import (dispatch_indices, sample_routing, selective_attention,
                                            selective_attention_reference, token_routing)
from tests.helpers import assert_close, numpy_rng

B, T, E, D, DM = 2, 7, 4, 3, 8


def softmax(z):
    z = np.where(np.isfinite(z), z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def numpy_token_routing(logits, k, capacity=None, allowed=None):
    """Brute force: per token the k most probable allowed experts (ties: lower index), then per expert the
    first ``capacity`` of its tokens in position order; gates are the probabilities of the kept pairs."""
    Bn, Tn, En = logits.shape
    z = logits if allowed is None else np.where(allowed[:, None, :], logits, -np.inf)
    p = softmax(z)
    selected = np.zeros((Bn, Tn, En), bool)
    for b in range(Bn):
        count = np.zeros(En, int)
        for t in range(Tn):
            for e in sorted(range(En), key=lambda e: (-p[b, t, e], e))[:k]:
                if (allowed is None or allowed[b, e]) and (capacity is None or count[e] < capacity):
                    selected[b, t, e] = True
                    count[e] += 1
    return selected, np.where(selected, p, 0.0)


def numpy_smha(x, w_q, w_k, w_v, w_o, selected, gates, causal):
    """SMHA by its definition: each expert attends only among its own tokens, outputs go back gated."""
    y = np.zeros(x.shape, np.float64)
    for b in range(x.shape[0]):
        for e in range(w_q.shape[1]):
            idx = np.flatnonzero(selected[b, :, e])
            if not idx.size:
                continue
            q, k, v = (x[b, idx] @ w[:, e] for w in (w_q, w_k, w_v))
            s = q @ k.T / np.sqrt(q.shape[-1])
            if causal:
                s = np.where(idx[None, :] <= idx[:, None], s, -np.inf)
            y[b, idx] += gates[b, idx, e, None] * (softmax(s) @ v @ w_o[e])
    return y


def problem(seed, T=T):
    rng = numpy_rng(jax.random.key(seed))
    shapes = ((B, T, DM), (DM, E, D), (DM, E, D), (DM, E, D), (E, D, DM), (B, T, E))
    return tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)


@pytest.mark.parametrize("k, capacity, restrict", [(2, None, False), (2, 3, False), (2, 4, True)])
def test_token_routing_equals_a_numpy_loop(k, capacity, restrict):
    logits = numpy_rng(jax.random.key(k + (capacity or 0))).standard_normal((B, 9, E)).astype(np.float32)
    logits[0, 0] = [1.0, 1.0, 1.0, 0.0]                                     # a tie: the lower indices win
    allowed = np.array([[True, False, True, True], [False, True, True, False]]) if restrict else None
    route = jax.jit(lambda z, a: token_routing(z, k, capacity=capacity, allowed=a))
    selected, gates = route(jnp.asarray(logits), None if allowed is None else jnp.asarray(allowed))
    sel_np, gates_np = numpy_token_routing(logits, k, capacity, allowed)
    np.testing.assert_array_equal(np.asarray(selected), sel_np)
    assert_close(gates, gates_np, rtol=1e-6, name="gates")
    if capacity is not None:
        assert np.asarray(selected).sum(axis=1).max() <= capacity


def test_sample_routing_keeps_the_top_experts_of_each_sample():
    logits = np.array([[0.1, 2.0, -1.0, 0.5], [1.0, 1.0, 0.0, 3.0]], np.float32)
    allowed, gates = sample_routing(jnp.asarray(logits), 2)
    np.testing.assert_array_equal(np.asarray(allowed), [[False, True, False, True], [True, False, False, True]])
    assert_close(gates, np.where(np.asarray(allowed), softmax(logits), 0.0), rtol=1e-6, name="gates")


@pytest.mark.parametrize("causal, capacity, restrict", [(True, 3, False), (False, None, True)])
def test_routed_path_equals_reference_and_numpy_forward_and_backward(causal, capacity, restrict):
    x, w_q, w_k, w_v, w_o, logits = problem(1)
    allowed = jnp.asarray([[True, False, True, True], [True, True, True, False]]) if restrict else None

    def routed(x, w_q, w_k, w_v, w_o, logits):
        selected, gates = token_routing(logits, 2, capacity=capacity, allowed=allowed)
        return selective_attention(x, w_q, w_k, w_v, w_o, selected, gates, causal=causal, capacity=capacity)

    def reference(x, w_q, w_k, w_v, w_o, logits):
        selected, gates = token_routing(logits, 2, capacity=capacity, allowed=allowed)
        return selective_attention_reference(x, w_q, w_k, w_v, w_o, selected, gates, causal=causal)

    args = tuple(jnp.asarray(a) for a in (x, w_q, w_k, w_v, w_o, logits))
    w = jax.random.normal(jax.random.key(3), (B, T, DM))

    def output_and_grads(fn):
        def both(*a):
            y, pullback = jax.vjp(fn, *a)
            return y, pullback(w)
        return jax.jit(both)(*args)

    (y, g), (y_ref, g_ref) = output_and_grads(routed), output_and_grads(reference)
    selected, gates = numpy_token_routing(logits, 2, capacity, None if allowed is None else np.asarray(allowed))
    assert_close(y_ref, numpy_smha(x, w_q, w_k, w_v, w_o, selected, gates, causal), rtol=1e-5, name="numpy")
    assert_close(y, y_ref, rtol=1e-5, name="y")
    for name, a, e in zip(["x", "w_q", "w_k", "w_v", "w_o", "logits"], g, g_ref):
        assert_close(a, e, rtol=1e-5, name=f"d{name}")
    assert np.mean(np.abs(np.asarray(g[5])) > 1e-4) > 0.5, "the router's logits get gradients"


def test_all_heads_with_unit_gates_is_multi_head_attention():
    """The equivalent decomposition: every token to every expert, unit gates, gives plain causal MHA."""
    x, w_q, w_k, w_v, w_o, _ = problem(2)
    ones = jnp.ones((B, T, E))
    q, k, v = (np.einsum("btd,dek->betk", x, w) for w in (w_q, w_k, w_v))
    s = np.where(np.tril(np.ones((T, T), bool)), q @ np.swapaxes(k, -1, -2) / np.sqrt(D), -np.inf)
    mha = np.einsum("betk,ekm->btm", softmax(s) @ v, w_o)
    run = jax.jit(lambda *a: (selective_attention(*a, ones > 0, ones),
                              selective_attention_reference(*a, ones > 0, ones)))
    for y in run(x, w_q, w_k, w_v, w_o):
        assert_close(y, mha, rtol=1e-5, name="mha")


def test_dispatch_indices_list_each_experts_tokens_in_order():
    selected = np.zeros((1, 6, 2), bool)
    selected[0, [0, 2, 3, 5], 0] = True
    selected[0, [4], 1] = True
    index, valid = dispatch_indices(jnp.asarray(selected), 3)
    np.testing.assert_array_equal(np.asarray(index), [[[0, 2, 3], [4, 0, 0]]])
    np.testing.assert_array_equal(np.asarray(valid), [[[True, True, True], [True, False, False]]])


def test_bfloat16_is_finite_and_close():
    x, w_q, w_k, w_v, w_o, logits = problem(4)
    selected, gates = token_routing(jnp.asarray(logits), 2, capacity=4)
    run = jax.jit(lambda *a: selective_attention(*a, selected, gates, capacity=4))
    y = run(*(jnp.asarray(a, jnp.bfloat16) for a in (x, w_q, w_k, w_v, w_o)))
    assert y.dtype == jnp.bfloat16
    expected = numpy_smha(x, w_q, w_k, w_v, w_o, np.asarray(selected), np.asarray(gates), causal=True)
    assert_close(y, expected, rtol=3e-2, name="bf16")


def test_errors_name_the_argument():
    x, w_q, w_k, w_v, w_o, logits = problem(5)
    selected, gates = token_routing(jnp.asarray(logits), 2)
    with pytest.raises(ValueError, match=r"w_o must have shape \[E, D, d\]"):
        selective_attention(x, w_q, w_k, w_v, w_o[:, :2], selected, gates)
    with pytest.raises(ValueError, match="w_k must have w_q's shape"):
        selective_attention_reference(x, w_q, w_k[:, :3], w_v, w_o, selected, gates)
    with pytest.raises(ValueError, match=r"gates must have shape \[B, T, E\]"):
        selective_attention(x, w_q, w_k, w_v, w_o, selected, gates[:, :3])
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        selective_attention(x, w_q, w_k, w_v, w_o, selected, gates, capacity=0)
    with pytest.raises(ValueError, match="top_k must be at most the number of experts"):
        token_routing(jnp.asarray(logits), 5)
    with pytest.raises(ValueError, match=r"allowed must have shape \[B, E\]"):
        token_routing(jnp.asarray(logits), 2, allowed=jnp.ones((B, 3), bool))
