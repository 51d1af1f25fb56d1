"""Zoology hybrids (catalog B17): BaseConv against a plain loop, the routed sparse attention against a
NumPy brute force of its rule, causality, parameter gradients, and decode == parallel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.zoology import BaseConv, BaseConvBlock, RoutedSparseAttention, ZoologyHybridBlock
from tests.helpers import assert_close, numpy_rng

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
