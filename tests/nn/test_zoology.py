"""Zoology hybrids (catalog B17): BaseConv against a plain loop, the routed sparse attention against a
NumPy brute force of its rule, causality, parameter gradients, and decode == parallel; the learned
selection (``SelectiveLookups``): attention of the selected query rows against dense attention's rows
(forward and gradients), its top-k rule by brute force, both modes against the official formula."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.zoology import (BaseConv, BaseConvBlock, RoutedSparseAttention, SelectiveLookups, ZoologyHybridBlock,
                                 ZoologySelectiveBlock)
from attnjax.sparse.selected_queries import (selected_query_attention, selected_query_attention_reference,
                                             selection_size, top_positions)
from attnjax.testing.modules import check_module_against_reference, parameters
from tests.helpers import assert_close, assert_outputs_and_grads_close, numpy_rng, random_qkv

KEY = jax.random.PRNGKey(0)


def base_conv_loop(u, w_proj, b_proj, w_conv, b_conv):
    """``y_t = (u_t W + b) ⊙ (b' + Σ_i w_i ⊙ u_{t−k+1+i}) + u_t``, one token and one tap at a time (NumPy)."""
    u, w_proj, b_proj, w_conv, b_conv = (np.asarray(a, np.float64) for a in (u, w_proj, b_proj, w_conv, b_conv))
    B, T, d = u.shape
    k = w_conv.shape[0]
    y = np.zeros_like(u)
    for t in range(T):
        conv = b_conv.copy()
        for i in range(k):
            if t - k + 1 + i >= 0:
                conv = conv + w_conv[i] * u[:, t - k + 1 + i]
        y[:, t] = (u[:, t] @ w_proj + b_proj) * conv + u[:, t]
    return y


def base_conv_taps(u, w_proj, b_proj, w_conv, b_conv):
    """The same sum written per tap with shifted copies of ``u`` (differentiable, for the gradients)."""
    k, T = w_conv.shape[0], u.shape[1]
    conv = b_conv + sum(w_conv[i] * jnp.pad(u, ((0, 0), (k - 1 - i, 0), (0, 0)))[:, :T] for i in range(k))
    return (u @ w_proj + b_proj) * conv + u


def test_base_conv_equals_the_loop_forward_and_gradients():
    """Forward against the loop; gradients of the input and of every parameter against the per-tap sum."""
    layer = BaseConv(6, kernel_size=4, rngs=nnx.Rngs(1))
    u = jnp.asarray(numpy_rng(KEY).standard_normal((2, 11, 6)), jnp.float32)
    graphdef, state = nnx.split(layer)

    def params(state):
        return (state["projection"]["kernel"][...], state["projection"]["bias"][...],
                state["conv"]["kernel"][...][:, 0, :], state["conv"]["bias"][...])

    @jax.jit
    def both(u, state):
        def fast(u, state):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(u)))

        def taps(u, state):
            return jnp.sum(jnp.sin(base_conv_taps(u, *params(state))))

        return nnx.merge(graphdef, state)(u), jax.grad(fast, (0, 1))(u, state), jax.grad(taps, (0, 1))(u, state)

    y, (gu, gs), (gu_ref, gs_ref) = both(u, state)
    assert_close(y, base_conv_loop(u, *params(state)), atol=1e-5)
    assert_close(gu, gu_ref, atol=1e-5, name="u")
    for (path, g), g_ref in zip(jax.tree_util.tree_leaves_with_path(gs), jax.tree_util.tree_leaves(gs_ref)):
        assert_close(g, g_ref, atol=1e-5, name=jax.tree_util.keystr(path))
        assert float(jnp.abs(g).max()) > 0


def routed_brute_force(q, k, v, block_kv, top_k):
    """Per query t and head h: own block, plus the top_k − 1 earlier blocks by q_t · mean(K_n); then softmax
    over the kept keys ≤ t (float64)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T, H, v.shape[-1]))
    for b, h, t in np.ndindex(B, H, T):
        kh, vh = k[b, :, h // G], v[b, :, h // G]
        own = t // block_kv
        gates = [(q[b, t, h] @ kh[n * block_kv:(n + 1) * block_kv].mean(0), n) for n in range(own)]
        kept = {own} | {n for _, n in sorted(gates, key=lambda g: (-g[0], g[1]))[:top_k - 1]}
        keys = [s for s in range(t + 1) if s // block_kv in kept]
        logits = kh[keys] @ q[b, t, h] / np.sqrt(D)
        p = np.exp(logits - logits.max())
        out[b, t, h] = p @ vh[keys] / p.sum()
    return out


def test_routed_attention_equals_the_brute_force_rule():
    """GQA (4 query heads, 2 KV heads), T = 13 (not a multiple of block_kv = 3), top_k = 2: really sparse."""
    layer = RoutedSparseAttention(8, 4, num_kv_heads=2, block_kv=3, top_k=2, rngs=nnx.Rngs(2))
    x = jnp.asarray(numpy_rng(KEY).standard_normal((2, 13, 8)), jnp.float32)
    y, q, k, v = nnx.jit(lambda m, x: (m(x, mask=masks.Causal()), m.query(x), m.key(x), m.value(x)))(layer, x)
    mixed = jnp.asarray(routed_brute_force(q, k, v, 3, 2), jnp.float32)
    dense = jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), is_causal=True)
    want, full = nnx.jit(lambda m, a, b: (m.out(a), m.out(b)))(layer, mixed, dense)
    assert_close(y, want, atol=1e-5)
    assert float(jnp.abs(full - y).max()) > 1e-2  # the routing drops keys


@pytest.fixture(scope="module")
def hybrid():
    return ZoologyHybridBlock(8, 2, block_kv=2, top_k=2, mlp_dim=12, num_kv_heads=1, rngs=nnx.Rngs(3))


@pytest.mark.slow  # the module conformance suite checks causality and decode == parallel of the registered spec
def test_hybrid_is_causal_and_decodes_like_the_parallel_call(hybrid):
    x = jnp.asarray(numpy_rng(KEY).standard_normal((2, 11, 8)), jnp.float32)
    y, y2 = nnx.jit(lambda m, x, x2: (m(x, mask=masks.Causal()), m(x2)))(hybrid, x, x.at[:, 6:].add(3.0))
    assert_close(y2[:, :6], y[:, :6], atol=1e-6)
    assert float(jnp.abs(y2[:, 6:] - y[:, 6:]).max()) > 1e-3

    step = nnx.jit(lambda m, x_t, c: m.decode(x_t, c))
    cache = hybrid.init_cache(2, 16)
    outs = []
    for t in range(11):
        y_t, cache = step(hybrid, x[:, t:t + 1], cache)
        outs.append(y_t)
    assert_close(jnp.concatenate(outs, 1), y, atol=1e-5)
    assert int(cache.attention.length) == 11


@pytest.mark.slow  # the module conformance suite takes gradients of the registered spec
def test_hybrid_gradients_reach_every_parameter(hybrid):
    x = jnp.asarray(numpy_rng(KEY).standard_normal((1, 9, 8)), jnp.float32)
    graphdef, state = nnx.split(hybrid)
    grads = jax.jit(jax.grad(lambda state: jnp.sum(nnx.merge(graphdef, state)(x) ** 2)))(state)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) >= 14
    for path, g in leaves:
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_hybrid_bf16_finite(hybrid):
    x = jnp.asarray(numpy_rng(KEY).standard_normal((1, 9, 8)), jnp.bfloat16)
    y = nnx.jit(lambda m, x: m(x))(hybrid, x)
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="mechanism"):
        RoutedSparseAttention(8, 2, mechanism="softmax", rngs=rngs)
    block = BaseConvBlock(8, rngs=rngs)
    with pytest.raises(NotImplementedError, match="Causal"):
        block(jnp.zeros((1, 4, 8)), mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match=r"\[batch, seq, 8\]"):
        block(jnp.zeros((1, 4, 6)))
    with pytest.raises(ValueError, match="mlp_dim"):
        BaseConvBlock(8, mlp_dim=-1, rngs=rngs)
    with pytest.raises(ValueError, match=r"\[B, 1, d_model\]"):
        block.decode(jnp.zeros((1, 2, 8)), block.init_cache(1, 4))
    with pytest.raises(ValueError, match="position_bias is not accepted"):
        SelectiveLookups(8, 2, position_bias=None, rngs=rngs)
    with pytest.raises(NotImplementedError, match="Causal"):
        SelectiveLookups(8, 2, rngs=rngs)(jnp.zeros((1, 4, 8)), mask=masks.SlidingWindow(2, 0))
    q = jnp.zeros((2, 5, 2, 4))
    with pytest.raises(ValueError, match=r"positions must be integer query rows \[batch, R\] = \[2, R\]"):
        selected_query_attention(q, q, q, jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 5\)"):
        selected_query_attention(q, q, q, jnp.full((2, 1), 5, jnp.int32))
    with pytest.raises(ValueError, match=r"count \(6\) must be <= the length"):
        top_positions(jnp.zeros((2, 5)), 6)


def test_selected_query_attention_equals_the_dense_rows_forward_and_gradients_and_bf16():
    """GQA (4 query heads, 2 KV heads), T = 13, unsorted rows with the first and the last: forward and the
    gradients of q, k, v against dense causal attention's rows (the unselected queries get no gradient); in
    bf16 finite and close. One compile."""
    q, k, v = random_qkv(KEY, B=2, T=13, Hq=4, Hkv=2, D=8)
    rows = jnp.array([[12, 0, 5, 7], [3, 4, 11, 1]], jnp.int32)
    w = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))

    def value_and_grads(fn, q, k, v):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, rows) * w), (0, 1, 2))(q, k, v)

    @jax.jit
    def both(q, k, v):
        low = selected_query_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), rows)
        return (selected_query_attention(q, k, v, rows), selected_query_attention_reference(q, k, v, rows),
                value_and_grads(selected_query_attention, q, k, v)[1],
                value_and_grads(selected_query_attention_reference, q, k, v)[1], low)

    out, want, grads, want_grads, low = both(q, k, v)
    assert_close(out, want)
    for g, g_ref, name in zip(grads, want_grads, "qkv"):
        assert_close(g, g_ref, name=f"d{name}")
    assert float(jnp.abs(grads[0]).max()) > 0 and int(jnp.sum(jnp.any(grads[0] != 0, axis=(2, 3)))) == 8
    assert low.dtype == jnp.bfloat16
    assert_close(low, want, rtol=2e-2)


@pytest.mark.slow  # the module test below runs the path at T == S; this is the bottom-right alignment
def test_selected_query_attention_bottom_right():
    """T < S: row i sits at key position i + S − T (the library's alignment)."""
    q, k, v = random_qkv(KEY, B=1, T=5, S=9, Hq=2, D=8)
    rows = jnp.array([[4, 0, 2]], jnp.int32)
    want = selected_query_attention_reference(q, k, v, rows)
    assert_close(jax.jit(selected_query_attention)(q, k, v, rows), want)
    dense = jax.nn.dot_product_attention(q, k, v, mask=jnp.tril(jnp.ones((5, 9), bool), k=4)[None, None])
    assert_close(want, dense[:, rows[0]], rtol=1e-5)


def test_top_positions_by_brute_force():
    """The ``count`` highest scores, ties to the earlier position, returned ascending; ``⌈√T⌉`` exactly."""
    scores = np.round(numpy_rng(KEY).standard_normal((3, 17)), 1).astype(np.float32)  # rounding makes ties
    scores[1, 4] = scores[1, 9] = scores[1, 12] = 9.0
    for count in (1, 3, 5, 17):
        want = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :count], axis=1)
        np.testing.assert_array_equal(top_positions(jnp.asarray(scores), count), want)
    assert top_positions(jnp.asarray(scores), 2)[1].tolist() == [4, 9]
    assert [selection_size(t) for t in (1, 2, 4, 5, 9, 10, 1000, 10 ** 12 + 1)] == [
        math.ceil(math.sqrt(t)) for t in (1, 2, 4, 5, 9, 10, 1000)] + [10 ** 6 + 1]


def selective_official(p, x, *, inference: bool):
    """The official ``SelectiveLookups.forward`` (``zoology/mixers/selective.py``) on this layer's parameters:
    dense causal attention at every position, ``s = softmax_t(score(x)) · √d / 8``; training ``y = a·s + x``;
    inference ``topk(s, ⌈√T⌉)`` then ``x.scatter_add(a·s at those tokens)`` (here a one-hot of a stable argsort)."""
    B, T, d = x.shape
    q, k, v = (jnp.einsum("btd,dhe->bthe", x, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value"))
    G = q.shape[2] // k.shape[2]
    logits = jnp.einsum("bthe,bshe->bhts", q, jnp.repeat(k, G, 2)) / np.sqrt(q.shape[-1])
    logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    context = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(logits, -1), jnp.repeat(v, G, 2))
    a = jnp.einsum("bthe,hed->btd", context, p["out"]["kernel"]) + p["out"]["bias"]
    s = jax.nn.softmax((x @ p["selecting"]["kernel"] + p["selecting"]["bias"])[..., 0], axis=1) * np.sqrt(d) / 8
    if inference:
        top = jnp.argsort(-jax.lax.stop_gradient(s), axis=1, stable=True)[:, :math.ceil(math.sqrt(T))]
        s = s * jnp.sum(jax.nn.one_hot(top, T), axis=1)
    return a * s[..., None] + x


def test_selective_lookups_inference_equals_the_official_rule_forward_and_gradients():
    """GQA, T = 11 (⌈√11⌉ = 4 tokens attend, the others pass unchanged): the output, the gradient of x and of
    every parameter (the kept tokens' weights ``s_t`` carry one to the scorer)."""
    layer = SelectiveLookups(8, 4, num_kv_heads=2, rngs=nnx.Rngs(4))
    x = jnp.asarray(numpy_rng(KEY).standard_normal((2, 11, 8)), jnp.float32)
    check_module_against_reference(layer, functools.partial(selective_official, inference=True), x,
                                   call_kwargs=dict(deterministic=True), rtol=1e-5)


@pytest.mark.slow  # training mode is MultiHeadAttention's causal call, weighted; its forward runs by default below
def test_selective_lookups_training_equals_the_official_formula_forward_and_gradients():
    layer = SelectiveLookups(8, 4, num_kv_heads=2, rngs=nnx.Rngs(4))
    x = jnp.asarray(numpy_rng(KEY).standard_normal((2, 11, 8)), jnp.float32)
    check_module_against_reference(layer, functools.partial(selective_official, inference=False), x, rtol=1e-5)


def test_selective_lookups_training_mode_and_the_switch_and_not_causal():
    """Training by default, ``model.eval()`` switches to the top-k rule; a change of the last token changes
    earlier outputs (the softmax over the sequence)."""
    layer = SelectiveLookups(8, 2, rngs=nnx.Rngs(5))
    x = jnp.asarray(numpy_rng(KEY).standard_normal((1, 9, 8)), jnp.float32)
    train, train2 = nnx.jit(lambda m, x, x2: (m(x, mask=masks.Causal()), m(x2)))(layer, x, x.at[:, -1].add(5.0))
    assert_close(train, selective_official(parameters(layer), x, inference=False), atol=1e-5)
    assert float(jnp.abs(train2[:, :-1] - train[:, :-1]).max()) > 1e-4
    assert not layer.deterministic
    layer.eval()
    assert layer.deterministic


def test_selective_lookups_do_not_decode():
    layer = SelectiveLookups(8, 2, rngs=nnx.Rngs(0))
    block = ZoologySelectiveBlock(8, 2, rngs=nnx.Rngs(0))
    for call in (lambda: layer.init_cache(1, 4), lambda: layer.decode(jnp.zeros((1, 1, 8)), None),
                 lambda: layer.prefill(jnp.zeros((1, 2, 8)), None), lambda: block.init_cache(1, 4),
                 lambda: block.decode(jnp.zeros((1, 1, 8)), None)):
        with pytest.raises(NotImplementedError, match="softmax .* over the whole sequence.*not causal"):
            call()
