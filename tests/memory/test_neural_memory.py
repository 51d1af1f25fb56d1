"""Titans' linear neural memory: the chunk-parallel path against the token recurrence (forward, states, gradients of
every input), a plain NumPy loop of the definition, decoding steps, sequence splits, GQA, bf16, jit and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.memory import (NeuralMemoryState, neural_memory, neural_memory_init_state, neural_memory_reference,
                            neural_memory_step)
from attnjax.memory.neural_memory import segment_products
from tests.helpers import assert_close

B, T, HQ, H, DK, DV = 2, 37, 4, 2, 8, 6


@functools.lru_cache(maxsize=None)
def _inputs(seed: int = 0, T: int = T):
    """q, k, v, lr, momentum, decay, initial_state, initial_momentum; gates hit exactly 0 and 1 at some tokens."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    g = lambda: rng.uniform(0.0, 1.0, (B, T, H)).astype(np.float32)  # noqa: E731
    lr, eta, alpha = 0.5 * g(), g(), 0.3 * g()
    eta[:, 3], eta[:, 7], eta[0, 20] = 0.0, 1.0, 0.0
    alpha[:, 5], alpha[:, 9], alpha[1, 24] = 1.0, 0.0, 1.0
    lr[:, 11] = 0.0
    return (f(B, T, HQ, DK), 0.4 * f(B, T, H, DK), f(B, T, H, DV), jnp.asarray(lr), jnp.asarray(eta),
            jnp.asarray(alpha), 0.1 * f(B, H, DK, DV), 0.1 * f(B, H, DK, DV))


def _call(implementation, chunk_size):
    """The memory as a function of all eight inputs, returning ``(out, state)``."""
    def fn(q, k, v, lr, eta, alpha, s0, u0):
        return neural_memory(q, k, v, lr, eta, alpha, chunk_size=chunk_size, initial_state=s0, initial_momentum=u0,
                             return_state=True, implementation=implementation)
    return fn


@functools.lru_cache(maxsize=None)
def _jitted(implementation, chunk_size):
    """``jax.jit(_call(...))``, one per path and chunk size, so that tests share compiled programs."""
    return jax.jit(_call(implementation, chunk_size))


def _numpy_memory(q, k, v, lr, eta, alpha, s0, u0, chunk_size):
    """The definition in plain loops: per (b, h, t), ``S_base`` reset at chunk starts, ``U ← ηU − θ kᵀ(k S_base − v)``,
    ``S ← (1 − α) S + U``, ``o = q S`` (query head ``h`` reads memory ``h // (Hq // H)``)."""
    q, k, v, lr, eta, alpha, s0, u0 = (np.asarray(a, np.float64) for a in (q, k, v, lr, eta, alpha, s0, u0))
    b_, t_, hq, _ = q.shape
    h_ = k.shape[2]
    out = np.zeros((b_, t_, hq, v.shape[-1]))
    for b in range(b_):
        for h in range(h_):
            s, u, base = s0[b, h].copy(), u0[b, h].copy(), s0[b, h].copy()
            for t in range(t_):
                if t % chunk_size == 0:
                    base = s.copy()
                grad = np.outer(k[b, t, h], k[b, t, h] @ base - v[b, t, h])
                u = eta[b, t, h] * u - lr[b, t, h] * grad
                s = (1.0 - alpha[b, t, h]) * s + u
                for g in range(hq // h_):
                    out[b, t, h * (hq // h_) + g] = q[b, t, h * (hq // h_) + g] @ s
    return out


@pytest.mark.parametrize("chunk_size", [1, 8])
def test_reference_matches_numpy_loops(chunk_size):
    args = _inputs()
    out = neural_memory_reference(*args[:6], chunk_size=chunk_size, initial_state=args[6], initial_momentum=args[7])
    want = _numpy_memory(*args, chunk_size)
    assert_close(out, want, rtol=1e-5, name="out")
    if chunk_size > 1:   # gradients at the chunk's base (Section 3.2) are a different model from C = 1
        assert np.max(np.abs(want - _numpy_memory(*args, 1))) > 1e-2


@pytest.mark.parametrize("chunk_size", [1, 8, pytest.param(16, marks=pytest.mark.slow)])
def test_chunked_matches_reference(chunk_size):
    """Output, final state (memory, momentum, chunk base, position) and the gradients of q, k, v, lr, momentum,
    decay, initial_state and initial_momentum through the output and the final memory and momentum, each path's
    from one compile. (C = 16 runs the same code as C = 8, a shorter last chunk at T = 37; slow.)"""
    args = _inputs()
    w = jax.random.normal(jax.random.PRNGKey(1), (B, T, HQ, DV))

    def outputs_and_grads(implementation):
        def value(*a):
            out, state = _call(implementation, chunk_size)(*a)
            return jnp.sum(out * w) + jnp.sum(state.memory ** 2) + jnp.sum(jnp.sin(state.momentum)), (out, state)
        return jax.jit(jax.value_and_grad(value, argnums=tuple(range(8)), has_aux=True))(*args)

    (_, (out, state)), got = outputs_and_grads("xla")
    (_, (ref, ref_state)), want = outputs_and_grads("reference")
    assert out.shape == (B, T, HQ, DV) and out.dtype == jnp.float32
    assert_close(out, ref, name="out")
    for name in ("memory", "momentum", "base"):
        assert getattr(state, name).shape == (B, H, DK, DV)
        assert_close(getattr(state, name), getattr(ref_state, name), name=name)
    assert int(state.position) == int(ref_state.position) == T
    names = ("q", "k", "v", "lr", "momentum", "decay", "initial_state", "initial_momentum")
    for g, r, name in zip(got, want, names):
        assert float(jnp.linalg.norm(r)) > 0, name
        assert_close(g, r, name=f"d{name}")


def test_split_sequence_with_carried_state():
    """Two calls carrying (memory, momentum) equal one call when the split is at a chunk boundary; token steps after
    a prefill equal one call from any split (the state keeps the chunk base and position)."""
    args = _inputs()
    fn = _jitted("xla", 8)
    whole, whole_state = fn(*args)
    cut = 16
    first, state = fn(*(a[:, :cut] for a in args[:6]), args[6], args[7])
    second, end = fn(*(a[:, cut:] for a in args[:6]), state.memory, state.momentum)
    assert_close(jnp.concatenate([first, second], axis=1), whole, name="out")
    assert_close(end.memory, whole_state.memory, name="memory")
    assert_close(end.momentum, whole_state.momentum, name="momentum")

    cut = 13
    prefill, state = fn(*(a[:, :cut] for a in args[:6]), args[6], args[7])
    step = jax.jit(functools.partial(neural_memory_step, chunk_size=8))
    outs = [prefill]
    for t in range(cut, T):
        o, state = step(*(a[:, t] for a in args[:6]), state)
        outs.append(o[:, None])
    assert_close(jnp.concatenate(outs, axis=1), whole, name="prefill + steps")
    for name in ("memory", "momentum", "base"):
        assert_close(getattr(state, name), getattr(whole_state, name), name=name)


def test_steps_from_empty_state_equal_parallel_call():
    args = _inputs()
    state = neural_memory_init_state(B, H, DK, DV)
    want, _ = _jitted("xla", 1)(*args[:6], state.memory, state.momentum)
    step = jax.jit(neural_memory_step)
    outs = []
    for t in range(T):
        o, state = step(*(a[:, t] for a in args[:6]), state)
        outs.append(o)
    assert isinstance(state, NeuralMemoryState) and int(state.position) == T
    assert_close(jnp.stack(outs, axis=1), want, name="steps")
    o, _ = neural_memory_step(*(a[:, 0] for a in args[:6]), neural_memory_init_state(B, H, DK, DV))
    assert_close(o, neural_memory_step(*(a[:, 0] for a in args[:6]))[0], name="state=None is the empty state")


def test_gqa_query_head_reads_memory_h_over_group():
    args = _inputs()
    out, _ = _jitted("xla", 8)(*args)
    G = HQ // H
    for g in range(G):
        single, _ = _jitted("xla", 8)(args[0][:, :, g::G], *args[1:])   # heads m·G + g read memory m
        assert_close(out[:, :, g::G], single, name=f"group member {g}")


def test_bf16_long_sequence_finite():
    L = 4096
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, L, 1, 4)) * 0.5, jnp.bfloat16) for _ in range(3))
    gates = [jnp.asarray(rng.uniform(lo, hi, (1, L, 1)), jnp.bfloat16) for lo, hi in ((0, 0.2), (0.5, 1.0), (0, 0.1))]
    out, state = jax.jit(lambda *a: neural_memory(*a, chunk_size=64, return_state=True))(q, k, v, *gates)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, L, 1, 4)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32)))) and state.memory.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32)))) > 0


def test_jit_one_chunk_longer_than_the_sequence():
    """chunk_size > T: one chunk, every gradient taken at S_(−1)."""
    args = _inputs()
    out = jax.jit(lambda *a: neural_memory(*a[:6], chunk_size=T + 27, initial_state=a[6], initial_momentum=a[7]))(*args)
    assert_close(out, _numpy_memory(*args, T), rtol=1e-5, name="out")


def test_segment_products_with_zero_gates():
    g = jnp.array([0.5, 0.0, 2.0, 1.0])
    want = np.zeros((4, 4))
    for i in range(4):
        for j in range(i + 1):
            want[i, j] = np.prod(np.asarray(g)[j + 1:i + 1])
    np.testing.assert_allclose(segment_products(g), want)
    grad = jax.grad(lambda x: jnp.sum(segment_products(x)))(g)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(grad[1]) == pytest.approx(1 + 2 + 2 * 1)   # d/dg1 of L10 + L20 + L30 = g1 + g1·g2 + g1·g2·g3


def test_errors_name_the_argument_and_shapes():
    q, k, v, lr, eta, alpha, s0, u0 = _inputs()
    with pytest.raises(ValueError, match=r"lr must have shape \[B, T, H\] = \(2, 37, 2\), got a float32\[2, 37\]"):
        neural_memory(q, k, v, lr[..., 0], eta, alpha)
    with pytest.raises(ValueError, match=r"decay must have shape \[B, T, H\]"):
        neural_memory(q, k, v, lr, eta, alpha[:, :, :1])
    with pytest.raises(ValueError, match=r"k head_dim 7 != q head_dim 8"):
        neural_memory(q, k[..., :7], v, lr, eta, alpha)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
        neural_memory(q, k, v, lr, eta, alpha, chunk_size=0)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of kv heads \(2\)"):
        neural_memory(q[:, :, :3], k, v, lr, eta, alpha)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, Dk, Dv\] = \(2, 2, 8, 6\)"):
        neural_memory(q, k, v, lr, eta, alpha, initial_state=s0[..., :5])
    with pytest.raises(ValueError, match=r"q and k must have the same seq length"):
        neural_memory(q[:, :5], k, v, lr, eta, alpha)
    with pytest.raises(TypeError, match=r"momentum must be a floating-point array"):
        neural_memory(q, k, v, lr, eta.astype(jnp.int32), alpha)
    with pytest.raises(ValueError, match=r"unknown implementation 'chunked'"):
        neural_memory(q, k, v, lr, eta, alpha, implementation="chunked")
    with pytest.raises(ValueError, match=r"momentum_t must have shape \[B, H\] = \(2, 2\)"):
        neural_memory_step(q[:, 0], k[:, 0], v[:, 0], lr[:, 0], eta[:, 0, :1], alpha[:, 0])
    bad = neural_memory_init_state(B, H, DK, DV + 1)
    with pytest.raises(ValueError, match=r"state.memory must have shape \[B, H, Dk, Dv\] = \(2, 2, 8, 6\)"):
        neural_memory_step(*(a[:, 0] for a in (q, k, v, lr, eta, alpha)), bad)
