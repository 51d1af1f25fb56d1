"""Agent attention (Han et al. 2024): the aggregation-first path against the dense two-softmax product, the
agent tokens against explicit pooling loops, and the decomposed agent bias against PyTorch's bilinear resize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.agent import (agent_attention, agent_attention_reference, agent_position_bias, agent_tokens,
                                  bilinear_resize_matrix)
from tests.helpers import assert_close, assert_grads_close


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def pooling_bins(size, out):
    """torch.nn.AdaptiveAvgPool bins: [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(int(np.floor(i * size / out)), int(np.ceil((i + 1) * size / out))) for i in range(out)]


@pytest.mark.parametrize("pool", [(2, 2), (3, 7)])
def test_agent_tokens_average_the_adaptive_pooling_bins(pool):
    """A 5x7 query map pooled to 2x2 and to 3x7 (rows in overlapping bins)."""
    q = normal((2, 5, 7, 2, 3), 0)
    agents = np.asarray(agent_tokens(q, pool))
    assert agents.shape == (2, pool[0] * pool[1], 2, 3)
    qn = np.asarray(q)
    for i, (r0, r1) in enumerate(pooling_bins(5, pool[0])):
        for j, (c0, c1) in enumerate(pooling_bins(7, pool[1])):
            np.testing.assert_allclose(agents[:, i * pool[1] + j], qn[:, r0:r1, c0:c1].mean(axis=(1, 2)),
                                       rtol=1e-5, atol=1e-6)


def test_bilinear_resize_matrix_is_pytorchs_half_pixel_interpolation():
    np.testing.assert_allclose(bilinear_resize_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(bilinear_resize_matrix(7, 7), np.eye(7))
    x = np.random.default_rng(0).normal(size=7).astype(np.float32)
    for size in (1, 5, 12):  # jax.image.resize without antialiasing samples at the same half-pixel centres
        expected = jax.image.resize(jnp.asarray(x), (size,), "linear", antialias=False)
        np.testing.assert_allclose(bilinear_resize_matrix(7, size) @ x, expected, rtol=1e-5, atol=1e-6)


def test_agent_position_bias_is_resized_table_plus_row_and_column_terms():
    table, rows, cols = normal((2, 3, 7, 7), 0), normal((2, 3, 5), 1), normal((2, 3, 4), 2)
    bias = np.asarray(agent_position_bias(table, rows, cols))
    assert bias.shape == (2, 3, 20)
    resized = np.asarray(jax.image.resize(table, (2, 3, 5, 4), "linear", antialias=False))
    for y in range(5):
        for x in range(4):
            np.testing.assert_allclose(bias[:, :, y * 4 + x], resized[:, :, y, x] + rows[:, :, y] + cols[:, :, x],
                                       rtol=1e-5, atol=1e-5)


def two_softmax_product(q, k, v, agents, b1, b2):
    """O = softmax(Q A^T / sqrt(d) + B2) softmax(A K^T / sqrt(d) + B1) V per head, K/V heads shared by query groups."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    d = q.shape[-1]
    p1 = jax.nn.softmax(jnp.einsum("bnhd,bshd->bhns", agents, k, precision="highest") / np.sqrt(d) + b1, axis=-1)
    p2 = jax.nn.softmax(jnp.einsum("bthd,bnhd->bhtn", q, agents, precision="highest") / np.sqrt(d) + b2, axis=-1)
    return jnp.einsum("bhtn,bhns,bshd->bthd", p2, p1, v, precision="highest")


def test_agent_attention_equals_the_dense_product_forward_and_gradients():
    """A 5x7 map (T = S = 35), 4 query heads over 2 K/V heads, 4 agents pooled from the queries, Dv != D, learned
    biases; gradients to q, k, v, the agents and both biases."""
    q = normal((2, 5, 7, 4, 8), 0)
    k, v = normal((2, 35, 2, 8), 1), normal((2, 35, 2, 6), 2)
    agents = agent_tokens(q, 2)
    b1 = agent_position_bias(normal((4, 4, 7, 7), 3), normal((4, 4, 5), 4), normal((4, 4, 7), 5))
    b2 = jnp.swapaxes(agent_position_bias(normal((4, 4, 7, 7), 6), normal((4, 4, 5), 7), normal((4, 4, 7), 8)), 1, 2)
    args = (q.reshape(2, 35, 4, 8), k, v, agents, b1, b2)

    def fast(q, k, v, a, b1, b2):
        return agent_attention(q, k, v, a, agent_bias=b1, query_bias=b2)

    def reference(q, k, v, a, b1, b2):
        return agent_attention_reference(q, k, v, a, agent_bias=b1, query_bias=b2)

    out = jax.jit(fast)(*args)
    assert out.shape == (2, 35, 4, 6)
    expected = jax.jit(two_softmax_product)(*args)
    assert_close(out, expected, rtol=1e-5, name="agent attention")
    assert_close(jax.jit(reference)(*args), expected, rtol=1e-5, name="reference")
    assert_grads_close(fast, reference, args, argnums=range(6), rtol=1e-5,
                       names=["q", "k", "v", "agents", "agent_bias", "query_bias"])


def test_cross_attention_without_biases_and_a_scale():
    """T = 9 queries over S = 13 keys with 3 agents and no bias; an explicit scale reaches both softmaxes."""
    q, agents = normal((1, 9, 2, 4), 0), normal((1, 3, 2, 4), 3)
    k, v = normal((1, 13, 2, 4), 1), normal((1, 13, 2, 4), 2)
    scaled, expected, unscaled = jax.jit(lambda *a: (agent_attention(*a, scale=0.3),
                                                     agent_attention_reference(*a, scale=0.3),
                                                     agent_attention(*a)))(q, k, v, agents)
    assert_close(scaled, expected, rtol=1e-5, name="scale")
    assert not np.allclose(scaled, unscaled, atol=1e-3)


def test_bf16_is_finite():
    q, k, v = (normal((1, 35, 2, 8), i, jnp.bfloat16) * 10 for i in range(3))
    agents = agent_tokens(q.reshape(1, 5, 7, 2, 8), 2)
    out = jax.jit(agent_attention)(q, k, v, agents)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    q, agents = jnp.ones((1, 9, 2, 4)), jnp.ones((1, 3, 2, 4))
    with pytest.raises(ValueError, match=r"agents must have shape \[B, n, Hq, D\] = \[1, n ≥ 1, 2, 4\]"):
        agent_attention(q, q, q, agents[:, :, :1])
    with pytest.raises(ValueError, match=r"agents must have shape"):
        agent_attention(q, q, q, agents[:, :0])
    with pytest.raises(TypeError, match="agents must have q's dtype"):
        agent_attention(q, q, q, agents.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"agent_bias has shape \(2, 3, 8\), expected one broadcastable to "
                                         r"\[B, H, T, S\] = \[1, 2, 3, 9\]"):
        agent_attention(q, q, q, agents, agent_bias=jnp.ones((2, 3, 8)))
    with pytest.raises(ValueError, match=r"query_bias has shape \(2, 3, 9\)"):
        agent_attention_reference(q, q, q, agents, query_bias=jnp.ones((2, 3, 9)))
    with pytest.raises(TypeError, match="query_bias must be an array"):
        agent_attention(q, q, q, agents, query_bias=1.0)
    with pytest.raises(ValueError, match=r"q must have rank 4"):
        agent_attention(q[0], q, q, agents)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\]"):
        agent_tokens(q, 2)
    with pytest.raises(ValueError, match="pool must be a positive int or a pair"):
        agent_tokens(jnp.ones((1, 3, 3, 2, 4)), 0)
    with pytest.raises(ValueError, match=r"rows must have shape \[2, 3, size\]"):
        agent_position_bias(jnp.ones((2, 3, 7, 7)), jnp.ones((2, 4, 5)), jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match=r"table must have shape \[heads, agents, th, tw\]"):
        agent_position_bias(jnp.ones((2, 3, 7)), jnp.ones((2, 3, 5)), jnp.ones((2, 3, 5)))
