"""Deep neural memory (Titans Sections 3.1-3.2): the chunk-parallel path against the token-scan reference (forward,
final state, gradients of q, k, v, the three gates, the initial weights and momentum) at chunk sizes 1, 4, 8 and an
odd length; both against a plain Python loop of ``jax.grad`` steps; decoding steps; reads; the one-layer linear
memory equals ``neural_memory``; bf16; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.memory import (DeepMemoryState, MemoryMLP, deep_memory, deep_memory_init_state, deep_memory_read,
                            deep_memory_step, init_memory_mlp, neural_memory)
from attnjax.memory.miras import LpBias, as_objective
from tests.helpers import assert_close, numpy_rng

B, T, HQ, H, D, HIDDEN = 2, 13, 4, 2, 4, 8


def inputs(B=B, T=T, Hq=HQ, H=H, D=D, hidden=HIDDEN, depth=2, dtype=jnp.float32, seed=0):
    """q, k (unit norm, as Titans normalizes keys), v, gates θ ∈ (0, 0.3), η ∈ (0, 0.9), α ∈ (0, 0.2), Huber's δ,
    initial weights ``[H, ...]`` (Glorot-scaled normals) and a small initial momentum ``[B, H, ...]``."""
    rng = numpy_rng(jax.random.PRNGKey(seed))
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    sigmoid = lambda *shape: 1 / (1 + np.exp(-normal(*shape)))  # noqa: E731
    k = normal(B, T, H, D)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    qkv = tuple(jnp.asarray(a, dtype) for a in (normal(B, T, Hq, D), k, normal(B, T, H, D)))
    gates = tuple(jnp.asarray(a) for a in (0.3 * sigmoid(B, T, H), 0.9 * sigmoid(B, T, H), 0.2 * sigmoid(B, T, H)))
    delta = jnp.asarray(0.3 + sigmoid(B, T, H))
    dims = (D, *(hidden,) * (depth - 1), D)
    params = tuple(jnp.asarray(normal(H, a, b) * np.sqrt(2 / (a + b))) for a, b in zip(dims[:-1], dims[1:]))
    momentum0 = tuple(jnp.asarray(0.01 * normal(B, *p.shape)) for p in params)
    return qkv, gates, delta, params, momentum0


def plain_mlp(w, x):
    """``M_W(x) = x + W_2 gelu(W_1 x)`` (row vectors)."""
    return x + jax.nn.gelu(x @ w[0], approximate=False) @ w[1]


@jax.jit
def plain_step(w, s, q, k, v, lr, mom, dec):
    """One token of Titans eqs. 12-15 on one head: ``g = jax.grad(½‖M_W(k) − v‖²)(W)``, ``S = η S − θ g``,
    ``W = (1 − α) W + S``, ``o = M_W(q)`` (compiled once, called in a Python loop)."""
    g = jax.grad(lambda w: 0.5 * jnp.sum((plain_mlp(w, k) - v) ** 2))(w)
    s = [mom * si - lr * gi for si, gi in zip(s, g)]
    w = [(1 - dec) * wi + si for wi, si in zip(w, s)]
    return w, s, plain_mlp(w, q)


def plain_loop(q, k, v, lr, mom, dec, params):
    """Chunk size 1 written out: a Python loop over batch rows, heads and tokens of ``plain_step``."""
    out = np.zeros((q.shape[0], q.shape[1], q.shape[2], v.shape[-1]), np.float32)
    G = q.shape[2] // k.shape[2]
    for b in range(q.shape[0]):
        for h in range(k.shape[2]):
            w = [p[h] for p in params]
            s = [jnp.zeros_like(p) for p in w]
            for t in range(q.shape[1]):
                w, s, o = plain_step(w, s, q[b, t, h * G:(h + 1) * G], k[b, t, h], v[b, t, h], lr[b, t, h],
                                     mom[b, t, h], dec[b, t, h])
                out[b, t, h * G:(h + 1) * G] = o
    return out


def test_chunk_size_1_is_the_plain_gradient_loop():
    (q, k, v), (lr, mom, dec), _, params, _ = inputs(B=1, T=7)
    expected = plain_loop(q, k, v, lr, mom, dec, params)
    assert_close(jax.jit(functools.partial(deep_memory, implementation="xla"))(q, k, v, lr, mom, dec, params), expected,
                 rtol=1e-5)


def mixed_loss(impl, C, objective="l2", retention="l2"):
    """``(q, k, v, lr, momentum, decay, params, momentum0, delta) -> (scalar, (out, state))`` mixing the output and
    the final state, for comparing gradients of every input."""
    needs_delta = as_objective(objective).needs_delta

    def loss(q, k, v, lr, mom, dec, params, momentum0, delta):
        out, state = deep_memory(q, k, v, lr, mom, dec, params, initial_momentum=momentum0, objective=objective,
                                 retention=retention, delta=delta if needs_delta else None, chunk_size=C,
                                 return_state=True, implementation=impl)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        tail = sum(jnp.sum(jnp.sin(m)) for m in state.memory + state.momentum + state.base)
        return jnp.sum(out * w) + tail, (out, state)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(9)), has_aux=True))


NAMES = ("q", "k", "v", "lr", "momentum", "decay", "params", "momentum0", "delta")


def compare_paths(C, objective="l2", retention="l2", rtol=1e-4):
    (q, k, v), gates, delta, params, momentum0 = inputs()
    args = (q, k, v, *gates, params, momentum0, delta)
    (_, (out_ref, state_ref)), g_ref = mixed_loss("reference", C, objective, retention)(*args)
    (_, (out, state)), g = mixed_loss("xla", C, objective, retention)(*args)
    assert out.shape == (B, T, HQ, D) and out.dtype == q.dtype
    assert_close(out, out_ref, rtol=rtol, name="out")
    for name in ("memory", "momentum", "base"):
        for a, e in zip(getattr(state, name), getattr(state_ref, name)):
            assert_close(a, e, rtol=rtol, name=name)
    assert int(state.position) == int(state_ref.position) == T
    for name, a, e in zip(NAMES, g, g_ref):
        for leaf_a, leaf_e in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(e)):
            assert np.abs(np.asarray(leaf_e)).max() > 0 or name == "delta", f"d{name} is zero"
            assert_close(leaf_a, leaf_e, rtol=rtol, name=f"d{name}")


@pytest.mark.parametrize("C", [pytest.param(1, marks=pytest.mark.slow), 4, pytest.param(8, marks=pytest.mark.slow)])
def test_chunked_matches_reference(C):
    """T = 13 is not a multiple of 4 or 8 (a shorter last chunk); GQA with 2 query heads per memory. (C = 8 runs
    the same code as C = 4, a padded last chunk, and C = 1 the same code with one-token chunks, whose forward the
    plain gradient loop checks above; both slow for the suite's time.)"""
    compare_paths(C)


def test_steps_and_prefill_match_parallel():
    """Token-by-token decoding from the initial state, and a parallel prefill of 8 tokens (two chunks) followed by
    steps, both reproduce one parallel call at chunk size 4 (Yaad: the Huber bias takes δ_t per step; a 3-layer
    SiLU memory)."""
    (q, k, v), (lr, mom, dec), delta, params, _ = inputs(depth=3)
    kw = dict(objective="huber", retention="l2", chunk_size=4, mlp=MemoryMLP(activation="silu"))
    parallel = jax.jit(functools.partial(deep_memory, return_state=True, **kw))
    full, final = parallel(q, k, v, lr, mom, dec, params, delta=delta)
    step = jax.jit(functools.partial(deep_memory_step, **kw))

    def run(state, start):
        outs = []
        for t in range(start, T):
            o, state = step(q[:, t], k[:, t], v[:, t], lr[:, t], mom[:, t], dec[:, t], state, delta_t=delta[:, t])
            outs.append(o)
        return jnp.stack(outs, axis=1), state

    outs, state = run(deep_memory_init_state(params, B), 0)
    assert_close(outs, full, rtol=1e-5, name="steps")
    prefill, mid = parallel(q[:, :8], k[:, :8], v[:, :8], lr[:, :8], mom[:, :8], dec[:, :8], params,
                            delta=delta[:, :8])
    rest, state2 = run(mid, 8)
    assert_close(jnp.concatenate([prefill, rest], axis=1), full, rtol=1e-5, name="prefill + steps")
    for s in (state, state2):
        for name in ("memory", "momentum", "base"):
            for a, e in zip(getattr(s, name), getattr(final, name)):
                assert_close(a, e, rtol=1e-5, name=name)
        assert int(s.position) == T


def test_frozen_memory_is_a_read():
    """With θ = 0, α = 0 and no momentum the memory never moves: the output is ``deep_memory_read``."""
    (q, k, v), (_, mom, _), _, params, _ = inputs(T=5)
    zeros = jnp.zeros_like(mom)
    out = jax.jit(functools.partial(deep_memory, chunk_size=2))(q, k, v, zeros, mom, zeros, params)
    assert_close(out, deep_memory_read(q, params), rtol=1e-6)
    state = deep_memory_init_state(params, B)
    assert_close(deep_memory_read(q, state, retention="kl"), deep_memory_read(q, params, retention="kl"), rtol=1e-6)


def test_one_linear_layer_is_the_linear_memory():
    """Depth 1 without the residual is ``o = q·S`` with ``S`` updated by ``½‖k·S − v‖²``: ``neural_memory``."""
    (q, k, v), gates, _, params, _ = inputs(depth=1)
    mlp = MemoryMLP(residual=False)
    state0 = jnp.broadcast_to(params[0], (B, *params[0].shape))
    expected = jax.jit(functools.partial(neural_memory, chunk_size=4, implementation="reference"))(
        q, k, v, *gates, initial_state=state0)
    assert_close(jax.jit(functools.partial(deep_memory, mlp=mlp, chunk_size=4))(q, k, v, *gates, params), expected,
                 rtol=1e-5)


def test_bf16_under_jit():
    (q, k, v), gates, _, params, _ = inputs(dtype=jnp.bfloat16)
    f = jax.jit(functools.partial(deep_memory, chunk_size=4, objective=LpBias(3.0), retention="lq"))
    out = f(q, k, v, *gates, params)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    ref = f(*(a.astype(jnp.float32) for a in (q, k, v)), *gates, params)
    assert_close(out, ref, rtol=3e-2, name="bf16 vs f32")


def test_init_memory_mlp():
    params = init_memory_mlp(jax.random.PRNGKey(0), 3, 4, 16, depth=3, out_dim=5)
    assert [p.shape for p in params] == [(3, 4, 16), (3, 16, 16), (3, 16, 5)]
    assert all(p.dtype == jnp.float32 for p in params)
    assert not np.allclose(params[0][0], params[0][1])


def zeros_mlp(heads, dims):
    return tuple(jnp.zeros((heads, a, b)) for a, b in zip(dims[:-1], dims[1:]))


def test_errors():
    (q, k, v), (lr, mom, dec), delta, params, _ = inputs(T=3)
    call = functools.partial(deep_memory, q, k, v, lr, mom, dec)
    with pytest.raises(ValueError, match=r"lr must have shape \[B, T, H\] = \(2, 3, 2\)"):
        deep_memory(q, k, v, lr[:, :, :1], mom, dec, params)
    with pytest.raises(ValueError, match=r"initial_state's first d_in must be Dk = 4, got 5"):
        call(zeros_mlp(H, (5, 8, 4)))
    with pytest.raises(ValueError, match=r"initial_state\[1\] d_in 6 != initial_state\[0\] d_out 8"):
        call((params[0], jnp.zeros((H, 6, D))))
    with pytest.raises(ValueError, match=r"initial_state has 3 heads, expected 2"):
        call(zeros_mlp(3, (D, 8, D)))
    with pytest.raises(ValueError, match="residual MemoryMLP needs the first d_in = last d_out"):
        deep_memory(q, k, jnp.zeros((B, 3, H, 6)), lr, mom, dec, zeros_mlp(H, (D, 8, 6)))
    with pytest.raises(TypeError, match="initial_state must be a non-empty tuple"):
        call(params[0])
    with pytest.raises(ValueError, match=r"initial_momentum must match the memory's layout"):
        call(params, initial_momentum=tuple(p[:, :2] for p in params))
    with pytest.raises(ValueError, match="needs delta, a float"):
        call(params, objective="huber")
    with pytest.raises(ValueError, match="delta is only used by the Huber objective"):
        call(params, delta=delta)
    with pytest.raises(ValueError, match="objective must be one of"):
        call(params, objective="l3")
    with pytest.raises(ValueError, match="retention must be one of"):
        call(params, retention="kl2")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        call(params, chunk_size=0)
    with pytest.raises(NotImplementedError, match="no 'pallas' implementation"):
        call(params, implementation="pallas")
    with pytest.raises(ValueError, match="MemoryMLP.activation must be one of"):
        MemoryMLP(activation="tanhh")
    with pytest.raises(TypeError, match="state must be a DeepMemoryState"):
        deep_memory_step(q[:, 0], k[:, 0], v[:, 0], lr[:, 0], mom[:, 0], dec[:, 0], params)
    state = deep_memory_init_state(params, B)
    with pytest.raises(ValueError, match=r"lr_t must have shape \[B, H\] = \(2, 2\)"):
        deep_memory_step(q[:, 0], k[:, 0], v[:, 0], lr, mom[:, 0], dec[:, 0], state)
    with pytest.raises(ValueError, match=r"state.momentum must match the memory's layout"):
        deep_memory_step(q[:, 0], k[:, 0], v[:, 0], lr[:, 0], mom[:, 0], dec[:, 0],
                         state._replace(momentum=tuple(m[:, :1] for m in state.momentum)))
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of the memory's heads \(3\)"):
        deep_memory_read(q, zeros_mlp(3, (D, 8, D)))
    assert isinstance(state, DeepMemoryState)
