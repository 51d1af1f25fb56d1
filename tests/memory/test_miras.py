"""Miras attentional biases and retention gates: each bias's closed-form gradient against ``jax.grad`` of its written
formula; the retention maps against their formulas; Moneta (eq. 24), Yaad (eq. 26) and Memora (eq. 27) written out
as the paper's token-by-token updates against ``deep_memory`` at chunk size 1; each variant's chunked path against
its reference (forward, state, gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.memory import (HuberBias, KLRetention, L2Bias, L2Retention, LpBias, LqRetention, MIRAS_VARIANTS,
                            as_objective, as_retention, deep_memory, miras_variant)
from tests.helpers import assert_close, numpy_rng
from tests.memory.test_deep_memory import compare_paths, inputs

FORMULAS = [
    (L2Bias(), lambda e, d: 0.5 * jnp.sum(e ** 2)),
    (LpBias(3.0), lambda e, d: jnp.sum(jnp.abs(e) ** 3)),
    (LpBias(4.0), lambda e, d: jnp.sum(e ** 4)),
    (LpBias(2.5), lambda e, d: jnp.sum(jnp.abs(e) ** 2.5)),
    (LpBias(1.5, eps=1e-3), lambda e, d: jnp.sum((e ** 2 + 1e-3) ** 0.75)),
    (HuberBias(), lambda e, d: jnp.where(jnp.sqrt(jnp.sum(e ** 2)) <= d, 0.5 * jnp.sum(e ** 2),
                                         d * jnp.sum(jnp.abs(e)) - 0.5 * d ** 2)),
]


@functools.partial(jax.jit, static_argnums=(0, 1))
def bias_and_formula(objective, formula, pred, target, delta):
    """The bias's loss and gradient, the formula's value and ``jax.grad``, and the gradient's own derivative at a
    zero error (the memory's outer gradients pass through the bias's gradient)."""
    loss = jax.vmap(lambda p, t, d: formula(p - t, d))
    expected = jax.vmap(jax.grad(lambda p, t, d: formula(p - t, d)))(pred, target, delta)
    zero = jnp.zeros(pred.shape[-1:])
    second = jax.grad(lambda p: jnp.sum(objective.grad(p, zero, jnp.ones(())) ** 2))(zero)
    return (objective.loss(pred, target, delta), loss(pred, target, delta), objective.grad(pred, target, delta),
            expected, second)


def test_bias_gradients_are_the_gradients_of_their_formulas():
    rng = numpy_rng(jax.random.PRNGKey(0))
    pred = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    delta = jnp.asarray(rng.uniform(0.5, 4.0, 16), jnp.float32)        # some rows inside δ, some beyond
    inside = np.linalg.norm(np.asarray(pred - target), axis=-1) <= np.asarray(delta)
    assert 0 < inside.sum() < 16
    for objective, formula in FORMULAS:
        loss, expected_loss, grad, expected_grad, second = bias_and_formula(objective, formula, pred, target, delta)
        assert_close(loss, expected_loss, rtol=1e-6, name=repr(objective))
        assert_close(grad, expected_grad, rtol=1e-6, name=repr(objective))
        assert bool(jnp.all(jnp.isfinite(second))), repr(objective)


def test_retention_maps():
    rng = numpy_rng(jax.random.PRNGKey(1))
    a = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    for q in (4.0, 3.0, 2.0):
        norm = np.sum(np.abs(a) ** q, axis=(-2, -1), keepdims=True) ** (1 / q)
        assert_close(LqRetention(q).weights(jnp.asarray(a)), a / norm ** (q - 2), rtol=1e-6, name=f"q={q}")
    zeros = jnp.zeros((3, 4))
    assert not bool(jnp.any(LqRetention().weights(zeros)))
    assert bool(jnp.all(jnp.isfinite(jax.grad(lambda x: jnp.sum(LqRetention().weights(x)))(zeros))))
    w = KLRetention(scale=2.0).weights(jnp.asarray(a))
    assert bool(jnp.all(w > 0))
    assert_close(jnp.sum(w, axis=-2), jnp.full((2, 3, 6), 2.0), rtol=1e-6)
    assert L2Retention().weights(a) is a


def mlp(w, x):
    return x + jax.nn.gelu(x @ w[0], approximate=False) @ w[1]


@functools.partial(jax.jit, static_argnums=0)
def grad_of(formula, w, k, v):
    """``∇_W formula(M_W(k) − v)``."""
    return jax.grad(lambda w: formula(mlp(w, k) - v))(w)


def l3(e):
    return jnp.sum(jnp.abs(e) ** 3)


def half_l2(e):
    return 0.5 * jnp.sum(e ** 2)


def l1(e):
    return jnp.sum(jnp.abs(e))


@jax.jit
def moneta_step(a, w, k, v, lr, dec):
    """Miras eq. 24 with p = 3, q = 4: ``A_t = α_t A_(t−1) − η_t ∇ℓ_p(W_(t−1))``, ``W_t = A_t / ‖A_t‖_4²``."""
    g = jax.grad(lambda w: l3(mlp(w, k) - v))(w)
    a = [(1 - dec) * ai - lr * gi for ai, gi in zip(a, g)]
    return a, [ai / jnp.sum(ai ** 4) ** 0.5 for ai in a]


def moneta_loop(k, v, lr, dec, delta, params):
    a = list(params)
    w = [ai / jnp.sum(ai ** 4) ** 0.5 for ai in a]
    for t in range(len(k)):
        a, w = moneta_step(a, w, k[t], v[t], lr[t], dec[t])
        yield w


def yaad_loop(k, v, lr, dec, delta, params):
    """Miras eq. 26: ``W_t = α_t W_(t−1) − η_t ∇ℓ2`` if ``‖M(k_t) − v_t‖ ≤ δ_t``, else ``− η_t δ_t ∇ℓ1``."""
    w = list(params)
    for t in range(len(k)):
        if np.linalg.norm(mlp(w, k[t]) - v[t]) <= delta[t]:
            g = grad_of(half_l2, w, k[t], v[t])
        else:
            g = [delta[t] * gi for gi in grad_of(l1, w, k[t], v[t])]
        w = [(1 - dec[t]) * wi - lr[t] * gi for wi, gi in zip(w, g)]
        yield w


@jax.jit
def memora_step(w, k, v, lr, dec):
    """Miras eq. 27: ``W_t = Softmax(α_t log W_(t−1) − η_t ∇ℓ2(W_(t−1)))`` per column."""
    g = jax.grad(lambda w: half_l2(mlp(w, k) - v))(w)
    return [jax.nn.softmax((1 - dec) * jnp.log(wi) - lr * gi, axis=0) for wi, gi in zip(w, g)]


def memora_loop(k, v, lr, dec, delta, params):
    w = [jax.nn.softmax(p, axis=0) for p in params]                   # W_0 = Softmax(P_0)
    for t in range(len(k)):
        w = memora_step(w, k[t], v[t], lr[t], dec[t])
        yield w


@pytest.mark.parametrize("name, loop", [("moneta", moneta_loop), ("yaad", yaad_loop), ("memora", memora_loop)])
def test_paper_update_at_chunk_size_1(name, loop):
    """Plain gradient descent (η = 0 momentum, the paper's algorithm): ``deep_memory`` at chunk size 1 is the
    paper's update written token by token, read after each token."""
    (q, k, v), (lr, _, dec), delta, params, _ = inputs(B=1, T=6, Hq=2)
    objective, retention = miras_variant(name)
    out = deep_memory(q, k, v, lr, jnp.zeros_like(lr), dec, params, objective=objective, retention=retention,
                      delta=delta if objective.needs_delta else None)
    for h in range(2):
        weights = loop(k[0, :, h], v[0, :, h], lr[0, :, h], dec[0, :, h], delta[0, :, h], [p[h] for p in params])
        expected = jnp.stack([mlp(w, q[0, t, h]) for t, w in enumerate(weights)])
        assert_close(out[0, :, h], expected, rtol=1e-5, name=f"{name} head {h}")


@pytest.mark.parametrize("name", ["moneta", "memora", pytest.param("yaad", marks=pytest.mark.slow)])
def test_variant_chunked_matches_reference(name):
    """Chunk size 4 at T = 13 (a shorter last chunk), GQA; gradients of every input (δ for Yaad). Yaad's retention
    is Titans' and its chunked forward at C = 4 is tested against decoding steps in test_deep_memory (slow here for
    the suite's time)."""
    compare_paths(4, *miras_variant(name))


def test_names_and_errors():
    assert as_objective("lp") == LpBias(3.0) and as_retention("lq") == LqRetention(4.0)
    assert as_retention("kl") == KLRetention() and as_objective("huber") == HuberBias()
    assert set(MIRAS_VARIANTS) == {"titans", "moneta", "yaad", "memora"}
    with pytest.raises(ValueError, match="LpBias.p = 1 < 2 needs eps > 0"):
        LpBias(1)
    with pytest.raises(ValueError, match="LpBias.p must be >= 1"):
        LpBias(0.5, eps=1e-3)
    with pytest.raises(TypeError, match="LpBias.p must be a real number"):
        LpBias("3")
    with pytest.raises(ValueError, match="LqRetention.q must be >= 1"):
        LqRetention(0.5)
    with pytest.raises(ValueError, match="KLRetention.scale must be > 0"):
        KLRetention(0.0)
    with pytest.raises(ValueError, match="unknown Miras variant 'titan'"):
        miras_variant("titan")
    with pytest.raises(ValueError, match="objective must be one of"):
        as_objective(functools.partial(L2Bias))
