"""AEM and entropy-guided regularizers against NumPy computations of their definitions, gradients against a
dense jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.analysis import attention_entropy
from attnjax.analysis.regularizers import (attention_entropy_regularizer, entropic_overload, entropy_guided_penalty,
                                           entropy_guided_regularizer, entropy_profile, entropy_profile_of_maps,
                                           mean_head_entropy, mean_head_entropy_of_map, row_entropies)
from tests.analysis.test_entropy_and_sinks import numpy_entropy, numpy_map
from tests.helpers import assert_close, numpy_rng, random_qkv


def dense_log_p(q, k, mask=None):
    """The softmax map by plain jnp (GQA by repeating k; masked logits -1e30): the gradient reference."""
    T, Hq, D = q.shape[1:]
    S, Hkv = k.shape[1:3]
    s = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, Hq // Hkv, axis=2)) * D ** -0.5
    if mask is not None:
        s = jnp.where(mask.dense(T, S), s, -1e30)
    return jax.nn.log_softmax(s, axis=-1)


def dense_entropy(q, k, mask=None):
    log_p = dense_log_p(q, k, mask)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def numpy_penalty(entropies, thresholds, max_entropy, tolerance):
    """Jha & Reagen's Algorithm 1, looping over layers and heads; ``entropies [L, B, H]``."""
    L, B, H = entropies.shape
    total = 0.0
    for l in range(L):
        layer = 0.0
        for h in range(H):
            delta = entropies[l, :, h] - thresholds[l, h] * max_entropy
            layer += np.mean(np.where(np.abs(delta) > tolerance * max_entropy, delta ** 2, 0.0))
        total += layer / H
    return total / L


def test_aem_on_pooling_logits_and_weights_equals_numpy():
    rng = numpy_rng(jax.random.key(0))
    logits = jnp.asarray(3 * rng.standard_normal((2, 3, 11)), jnp.float32)  # [B, H, N]
    valid = jnp.arange(11)[None, :] < jnp.array([[11], [6]])  # the second bag has 6 instances
    x = np.where(np.asarray(valid)[:, None], np.asarray(logits, np.float64), -np.inf)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p0 = np.asarray(jax.nn.softmax(logits[:, 0]), np.float64)

    def reference(a):
        log_p = jax.nn.log_softmax(jnp.where(valid[:, None], a, -1e30), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))

    @jax.jit
    def run(logits, weights):
        reg, g = jax.value_and_grad(lambda a: attention_entropy_regularizer(a, valid=valid))(logits)
        return (reg, g, jax.grad(reference)(logits), attention_entropy_regularizer(weights, from_logits=False),
                attention_entropy_regularizer(logits[:, 0]))

    reg, g, g_ref, from_weights, two_d = run(logits, jnp.asarray(p, jnp.float32))
    assert_close(reg, -numpy_entropy(p).mean(), rtol=1e-5, name="AEM [B, H, N] logits")
    assert_close(from_weights, -numpy_entropy(p).mean(), rtol=1e-5, name="AEM weights")
    assert_close(two_d, -numpy_entropy(p0).mean(), rtol=1e-5, name="AEM [B, N]")
    assert np.all(np.asarray(g)[1, :, 6:] == 0), "padding instances get no gradient"
    assert_close(g, g_ref, rtol=1e-5, name="dAEM/dlogits")


def test_aem_blockwise_matches_numpy_and_dense_gradients():
    mask = masks.Causal()
    q, k, _ = random_qkv(jax.random.key(1), T=13, S=13, Hq=4, Hkv=2, D=8)
    q = 2 * q
    p, _ = numpy_map(q, k, mask)

    @jax.jit
    def run(q, k):
        reg, grads = jax.value_and_grad(lambda q, k: attention_entropy_regularizer(q, k, mask=mask, block_q=4),
                                        argnums=(0, 1))(q, k)
        ref = jax.grad(lambda q, k: -jnp.mean(dense_entropy(q, k, mask)), argnums=(0, 1))(q, k)
        return reg, grads, ref, row_entropies(q, k, mask=mask, block_q=4)[0], attention_entropy(q, k, mask=mask,
                                                                                               block_q=4)

    reg, (dq, dk), (dq_ref, dk_ref), h, h_library = run(q, k)
    assert_close(reg, -numpy_entropy(p).mean(), rtol=1e-5, name="AEM from q, k")
    assert_close(dq, dq_ref, rtol=1e-4, name="dq")
    assert_close(dk, dk_ref, rtol=1e-4, name="dk")
    assert_close(h, h_library, rtol=1e-6, name="row_entropies == attention_entropy")


def test_rows_without_keys_are_left_out_and_get_no_gradient():
    q, k, _ = random_qkv(jax.random.key(2), B=1, T=6, S=6, Hq=1, Hkv=1, D=4)
    mask = masks.Explicit(jnp.arange(6)[:, None] >= jnp.arange(6)[None, :] + 2)  # rows 0, 1 see nothing
    reg, (dq, dk) = jax.jit(jax.value_and_grad(lambda q, k: attention_entropy_regularizer(q, k, mask=mask, block_q=4),
                                               argnums=(0, 1)))(q, k)
    p, _ = numpy_map(q, k, mask)
    assert_close(reg, -numpy_entropy(p)[..., 2:].mean(), rtol=1e-5, name="mean over the rows that see a key")
    assert np.all(np.isfinite(np.asarray(dq))) and np.all(np.asarray(dq)[0, :3] == 0)  # row 2 sees one key
    assert np.all(np.isfinite(np.asarray(dk)))


def test_entropy_guided_penalty_is_algorithm_1():
    rng = numpy_rng(jax.random.key(3))
    entropies = rng.uniform(0.0, 3.0, (3, 2, 4)).astype(np.float32)  # [L, B, H]
    thresholds = rng.uniform(0.2, 0.9, (3, 4)).astype(np.float32)
    max_entropy = float(np.log(20.0))
    inside = thresholds[:, None, :] * max_entropy + 0.1  # every deviation within the tolerance
    per_query = np.repeat(entropies[..., None], 5, axis=-1)  # [L, B, H, T]: the same mean over queries

    @jax.jit
    def run(e, theta):
        penalty = functools.partial(entropy_guided_penalty, max_entropy=max_entropy, tolerance=0.2)
        d_theta = jax.grad(lambda t: entropy_guided_penalty(e, t, max_entropy=max_entropy, tolerance=0.0))(theta)
        return penalty(e, theta), penalty(e, theta[0]), penalty(inside, theta), penalty(per_query, theta), d_theta

    full, shared, zero, per_query_value, d_theta = run(entropies, thresholds)
    expected = numpy_penalty(entropies, thresholds, max_entropy, 0.2)
    assert_close(full, expected, rtol=1e-6, name="L_entropy")
    assert_close(shared, numpy_penalty(entropies, np.broadcast_to(thresholds[0], (3, 4)), max_entropy, 0.2),
                 rtol=1e-6, name="L_entropy, θ shared by the layers")
    assert float(zero) == 0.0
    assert_close(per_query_value, expected, rtol=1e-6, name="per-query variant")
    delta = entropies - thresholds[:, None] * max_entropy
    assert_close(d_theta, np.mean(-2 * delta * max_entropy, axis=1) / (3 * 4), rtol=1e-5, name="dL/dθ")


def test_entropy_guided_regularizer_and_profile_match_dense_maps():
    mask = masks.Causal()
    layers = [random_qkv(jax.random.key(10 + i), T=11, S=11, Hq=2, Hkv=1, D=8)[:2] for i in range(2)]
    layers = [(3 * q, k) for q, k in layers]
    thresholds = jnp.array([[0.2, 0.8], [0.5, 0.1]])
    maps = [numpy_map(q, k, mask)[0] for q, k in layers]
    means = np.stack([np.mean(numpy_entropy(p), axis=-1) for p in maps])  # [L, B, H]

    def reference(layers):
        entropies = jnp.stack([jnp.mean(dense_entropy(q, k, mask), axis=-1) for q, k in layers])
        return entropy_guided_penalty(entropies, thresholds, max_entropy=jnp.log(11.0), tolerance=0.05)

    @jax.jit
    def run(layers, maps):
        value, grads = jax.value_and_grad(lambda layers: entropy_guided_regularizer(
            layers, thresholds, tolerance=0.05, mask=mask, block_q=4))(layers)
        return (value, grads, jax.grad(reference)(layers), entropy_profile(layers, mask=mask, block_q=4),
                entropy_profile_of_maps(maps), mean_head_entropy(*layers[0], mask=mask, block_q=4),
                mean_head_entropy_of_map(maps[0]))

    value, grads, ref, profile, profile_of_maps, e_blockwise, e_of_map = run(
        layers, [jnp.asarray(p, jnp.float32) for p in maps])
    assert_close(profile, means.mean(axis=1) / np.log(11), rtol=1e-5, name="normalized profile")
    assert_close(profile_of_maps, profile, rtol=1e-5, name="profile of maps")
    assert_close(e_of_map, means[0], rtol=1e-5, name="E of map")
    assert_close(e_blockwise, means[0], rtol=1e-5, name="E blockwise")
    assert_close(value, numpy_penalty(means, np.asarray(thresholds), np.log(11), 0.05), rtol=1e-5, name="L_entropy")
    assert value > 0
    for (dq, dk), (rq, rk) in zip(grads, ref):
        assert_close(dq, rq, rtol=1e-4, name="dq")
        assert_close(dk, rk, rtol=1e-4, name="dk")


def test_entropic_overload_counts_heads_above_three_quarters_of_the_largest_head_entropy():
    """Jha & Reagen's Fig. 2a bins: a head is overloaded in ``[¾·max, max]``, ``max`` the largest head entropy."""
    profile = np.array([[0.6, 0.5, 0.3, 0.47], [0.1, 0.2, 0.46, 0.0]], np.float32)  # max 0.6: bar at 0.45
    want = np.mean(profile >= 0.75 * profile.max(), axis=-1)
    np.testing.assert_allclose(want, [0.75, 0.25])
    np.testing.assert_allclose(np.asarray(entropic_overload(jnp.asarray(profile))), want)
    np.testing.assert_allclose(np.asarray(entropic_overload(jnp.asarray(profile * np.log(128.0)))), want,
                               err_msg="the share does not depend on the entropy's scale (nats or / log S)")
    np.testing.assert_allclose(np.asarray(entropic_overload(jnp.asarray(profile), threshold=0.3)), [1.0, 0.5])
    np.testing.assert_allclose(np.asarray(entropic_overload(jnp.asarray(profile), threshold=0.9)), [0.25, 0.0])


def test_bad_inputs_name_the_argument():
    q, k, _ = random_qkv(jax.random.key(5), T=8, S=8, Hq=2, Hkv=2, D=4)
    with pytest.raises(ValueError, match=r"attention must be float logits or weights \[B, N\]"):
        attention_entropy_regularizer(jnp.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"valid must be a bool \[B, N\] = \[2, 5\]"):
        attention_entropy_regularizer(jnp.zeros((2, 5)), valid=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="with q and k pass mask="):
        attention_entropy_regularizer(q, k, valid=jnp.ones((2, 8), bool))
    with pytest.raises(ValueError, match=r"thresholds must be \[H\] = \[4\] or \[L, H\] = \[3, 4\]"):
        entropy_guided_penalty(jnp.zeros((3, 2, 4)), jnp.zeros((3, 5)), max_entropy=1.0)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        entropy_guided_penalty(jnp.zeros((3, 2, 4)), jnp.zeros(4), max_entropy=1.0, tolerance=-0.1)
    with pytest.raises(ValueError, match=r"every layer must share B, Hq and S"):
        entropy_profile([(q, k), (q, k[:, :5])])
    with pytest.raises(ValueError, match=r"profile must be \[L, H\]"):
        entropic_overload(jnp.zeros(4))
