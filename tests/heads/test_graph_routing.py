"""attnjax.heads.graph_routing: S-MoE / A-MoE probability mixing (blocked against dense and against NumPy),
top-k routing (brute force), the Switch balance loss (its formula), and the MoE feed-forward (capacity dispatch
against the dense reference and a NumPy loop that drops slots past capacity), gradients to the router."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.heads.graph_routing import (attention_mix, attention_mix_reference, expert_capacity, expert_mlp,
                                         load_balancing_loss, moe_ffn_dispatch, moe_ffn_reference, similarity_mix,
                                         similarity_mix_reference, top_k_routing)
from tests.helpers import assert_close, numpy_rng

B, T, E, F, D, HQ, HKV, DM, DFF = 2, 7, 4, 5, 8, 4, 2, 6, 10


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(numpy_rng(jax.random.key(seed)).standard_normal(shape, np.float32), dtype)


def probabilities(seed=1, T=T):
    return jax.nn.softmax(normal((B, T, E), seed), axis=-1)


def experts(seed=10):
    return (normal((E, DM, DFF), seed) * 0.5, normal((E, DFF), seed + 1) * 0.1, normal((E, DFF, DM), seed + 2) * 0.5,
            normal((E, DM), seed + 3) * 0.1)


def compare(fast, reference, args, argnums, *, rtol=1e-5, names=None):
    """``fast`` against ``reference``: outputs and the gradients (for a random cotangent) of the ``argnums``
    arguments, all in one compiled call. Returns the fast output and gradients."""
    w = jax.random.normal(jax.random.key(123), jax.eval_shape(reference, *args).shape, jnp.float32)

    def with_grads(fn, args):
        def of(*diff):
            full = list(args)
            for i, d in zip(argnums, diff):
                full[i] = d
            return fn(*full).astype(jnp.float32)
        out, vjp = jax.vjp(of, *[args[i] for i in argnums])
        return out, vjp(w)

    (out, g), (out_ref, g_ref) = jax.jit(lambda *a: (with_grads(fast, a), with_grads(reference, a)))(*args)
    assert_close(out, out_ref, rtol=rtol, name="output")
    for i, a, e in zip(argnums, g, g_ref):
        assert_close(a, e, rtol=rtol, name=f"d{names[argnums.index(i)] if names else i}")
    return out, g


def np_softmax(s, allowed):
    s = np.where(allowed, s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return np.where(allowed, e / e.sum(-1, keepdims=True), 0.0)


def test_similarity_mix_blocked_equals_dense_and_numpy():
    f, p, mask = normal((B, T, F), 0), probabilities(), masks.Causal()
    out, _ = compare(lambda f, p: similarity_mix(f, f, p, tau=0.7, mask=mask, implementation="xla"),
                     lambda f, p: similarity_mix_reference(f, f, p, tau=0.7, mask=mask), (f, p), (0, 1),
                     rtol=1e-4, names=["features", "probs"])
    allowed = np.tril(np.ones((T, T), bool))
    fn_ = np.asarray(f, np.float64)
    graph = np_softmax(np.einsum("btf,bsf->bts", fn_, fn_) / 0.7, allowed)
    assert_close(out, np.einsum("bts,bse->bte", graph, np.asarray(p, np.float64)), rtol=1e-5, name="numpy")
    assert_close(out.sum(-1), np.ones((B, T)), atol=1e-5, name="rows stay distributions")


def test_attention_mix_blocked_equals_head_averaged_dense_product():
    q, k, p, mask = normal((B, T, HQ, D), 2), normal((B, T, HKV, D), 3), probabilities(), masks.Causal()
    out, _ = compare(lambda q, k, p: attention_mix(q, k, p, mask=mask, implementation="xla"),
                     lambda q, k, p: attention_mix_reference(q, k, p, mask=mask), (q, k, p), (0, 1, 2), rtol=1e-4,
                     names=["q", "k", "probs"])
    allowed = np.tril(np.ones((T, T), bool))
    kr = np.repeat(np.asarray(k, np.float64), HQ // HKV, axis=2)
    a = np_softmax(np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), kr) / np.sqrt(D), allowed)
    assert_close(out, np.einsum("bts,bse->bte", a.mean(1), np.asarray(p, np.float64)), rtol=1e-5, name="numpy")


@pytest.mark.parametrize("top_k, renormalize", [(1, False), (2, False), (3, True)])
def test_top_k_routing_against_brute_force(top_k, renormalize):
    p = np.asarray(probabilities(T=9))
    indices, weights = top_k_routing(jnp.asarray(p), top_k, renormalize=renormalize)
    for b in range(B):
        for t in range(9):
            order = sorted(range(E), key=lambda e: (-p[b, t, e], e))[:top_k]
            assert list(np.asarray(indices[b, t])) == order
            expected = p[b, t, order] / (p[b, t, order].sum() if renormalize else 1.0)
            np.testing.assert_allclose(np.asarray(weights[b, t]), expected, rtol=1e-6)


def test_load_balancing_loss_matches_its_formula():
    p = probabilities(T=9)
    indices, _ = top_k_routing(p, 2)
    loss, grad = jax.jit(jax.value_and_grad(lambda p: load_balancing_loss(p, indices)))(p)
    fraction = np.zeros(E)
    for e in np.asarray(indices).ravel():
        fraction[e] += 1
    fraction /= indices.size
    expected = E * np.sum(fraction * np.asarray(p).reshape(-1, E).mean(0))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    uniform = jnp.full((1, E, E), 1.0 / E)
    assert abs(float(load_balancing_loss(uniform, jnp.arange(E)[None, :, None])) - 1.0) < 1e-6
    assert np.any(np.asarray(grad) != 0)


def numpy_moe(x, indices, weights, w1, b1, w2, b2, capacity):
    """Slot-major queue, each expert takes its first ``capacity`` slots; a loop over slots."""
    x, w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2))
    tokens = x.reshape(-1, x.shape[-1])
    idx = np.asarray(indices).reshape(tokens.shape[0], -1)
    gate = np.asarray(weights, np.float64).reshape(tokens.shape[0], -1)
    gelu = lambda u: 0.5 * u * (1.0 + np.vectorize(math.erf)(u / np.sqrt(2.0)))
    out, used = np.zeros_like(tokens), np.zeros(w1.shape[0], int)
    for slot in range(idx.shape[1]):
        for n in range(tokens.shape[0]):
            e = idx[n, slot]
            if used[e] < capacity:
                out[n] += gate[n, slot] * (gelu(tokens[n] @ w1[e] + b1[e]) @ w2[e] + b2[e])
            used[e] += 1
    return out.reshape(x.shape)


def test_dispatch_equals_dense_reference_and_numpy_without_drops():
    x, params, p = normal((B, T, DM), 4), experts(), probabilities()
    indices, weights = top_k_routing(p, 2)
    out, _ = compare(lambda x, w, *e: moe_ffn_dispatch(x, indices, w, *e),
                     lambda x, w, *e: moe_ffn_reference(x, indices, w, *e), (x, weights, *params), (0, 1, 2, 3, 4, 5),
                     names=["x", "weights", "w1", "b1", "w2", "b2"])
    assert_close(out, numpy_moe(x, indices, weights, *params, capacity=B * T), rtol=1e-5, name="numpy")


def test_dispatch_drops_slots_past_capacity_in_queue_order():
    x, params, p = normal((B, T, DM), 4), experts(), probabilities()
    indices, weights = top_k_routing(p, 2)
    capacity = expert_capacity(B * T, E, 2, 1.0)
    assert capacity == 7
    out, dense = jax.jit(lambda x: (moe_ffn_dispatch(x, indices, weights, *params, capacity=capacity),
                                    moe_ffn_reference(x, indices, weights, *params)))(x)
    assert_close(out, numpy_moe(x, indices, weights, *params, capacity=capacity), rtol=1e-5, name="numpy")
    assert not np.allclose(out, dense, atol=1e-3), "something is dropped"


def test_router_gets_gradients_through_the_mixed_top_k_gates():
    """End to end, logits -> S-MoE mix -> top-k -> experts: the router weight's gradient (blocked mix, dispatch)
    equals the dense pipeline's and is not zero."""
    x, params = normal((B, T, DM), 4), experts()
    w_gate = normal((DM, E), 5)

    def pipeline(mix, ffn):
        def fn(w_gate, x):
            logits = x @ w_gate
            probs = mix(logits, logits, jax.nn.softmax(logits, axis=-1), mask=masks.Causal())
            indices, weights = top_k_routing(probs, 2)
            return ffn(x, indices, weights, *params)
        return fn

    fast, dense = pipeline(similarity_mix, moe_ffn_dispatch), pipeline(similarity_mix_reference, moe_ffn_reference)
    _, (g, _) = compare(fast, dense, (w_gate, x), (0, 1), rtol=1e-4, names=["w_gate", "x"])
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


def test_bfloat16_inputs_give_finite_results():
    f, x = normal((B, T, F), 0, jnp.bfloat16), normal((B, T, DM), 4, jnp.bfloat16)
    q, k = normal((B, T, HQ, D), 2, jnp.bfloat16), normal((B, T, HKV, D), 3, jnp.bfloat16)
    p, params = probabilities(), tuple(a.astype(jnp.bfloat16) for a in experts())

    def run(f, q, k, x):
        mixed = similarity_mix(f, f, p, mask=masks.Causal())
        indices, weights = top_k_routing(mixed, 2)
        return (mixed, attention_mix(q, k, p), attention_mix_reference(q, k, p),
                moe_ffn_dispatch(x, indices, weights, *params), expert_mlp(x[:1], *(a[:1] for a in params)))

    mixed, a_mix, a_ref, y, y_expert = jax.jit(run)(f, q, k, x)
    assert mixed.dtype == jnp.float32 and np.all(np.isfinite(mixed))
    assert_close(a_mix, a_ref, rtol=2e-2, name="bf16 attention mix")
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    assert y_expert.shape == (1, T, DM) and y_expert.dtype == jnp.bfloat16


def test_expert_capacity():
    assert expert_capacity(10, 4, 2, None) == 10
    assert expert_capacity(10, 4, 2, 1.25) == 7  # ceil(1.25 * 2 * 10 / 4)
    assert expert_capacity(10, 4, 2, 100.0) == 10 and expert_capacity(3, 64, 1, 0.01) == 1


def test_errors_name_the_argument():
    f, p = normal((B, T, F), 0), probabilities()
    q, k = normal((B, T, HQ, D), 2), normal((B, T, HKV, D), 3)
    with pytest.raises(ValueError, match="tau must be positive"):
        similarity_mix(f, f, p, tau=0.0)
    with pytest.raises(ValueError, match=r"probs must have shape \[batch, seq, experts\]"):
        similarity_mix(f, f, p[:, :3])
    with pytest.raises(ValueError, match="query_features .* must agree"):
        similarity_mix(f, normal((B, T, F + 1), 0), p)
    with pytest.raises(TypeError, match="mask must be an attnjax.masks value"):
        similarity_mix_reference(f, f, p, mask=jnp.ones((T, T), bool))
    with pytest.raises(ValueError, match="Hq % Hkv"):
        attention_mix(q, normal((B, T, 3, D), 3), p)
    with pytest.raises(ValueError, match="q must have rank 4"):
        attention_mix(q[..., 0], k, p)
    with pytest.raises(ValueError, match=r"top_k \(5\) must be at most the number of experts \(4\)"):
        top_k_routing(p, 5)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        top_k_routing(p, 0)
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        expert_capacity(8, 4, 2, -1.0)
    indices, weights = top_k_routing(p, 2)
    w1, b1, w2, b2 = experts()
    with pytest.raises(ValueError, match=r"w1 must have shape \[E, d, d_ff\]"):
        moe_ffn_dispatch(normal((B, T, DM + 1), 4), indices, weights, w1, b1, w2, b2)
    with pytest.raises(ValueError, match=r"b2 must have shape"):
        moe_ffn_reference(normal((B, T, DM), 4), indices, weights, w1, b1, w2, b2[:, :2])
    with pytest.raises(ValueError, match="indices and weights"):
        moe_ffn_dispatch(normal((B, T, DM), 4), indices[:, :3], weights, w1, b1, w2, b2)
