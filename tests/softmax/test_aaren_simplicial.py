"""Aaren (attention as an RNN) and 2-simplicial attention: fast paths against their references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge
from hypothesis import given, settings
from hypothesis import strategies as st

import attnjax as aj
from attnjax import masks
from attnjax.nn.aaren import Aaren
from attnjax.nn.simplicial import SimplicialAttention
from attnjax.softmax.aaren import (AarenState, aaren_combine, aaren_init_state, aaren_recurrent, aaren_reference,
                                   aaren_scan, aaren_step)
from attnjax.softmax.simplicial import Simplicial, simplicial_attention_reference, simplicial_attention_windowed
from experiments.lib.measure import compile_fn, memory_of
from experiments.lib.workload import grad_fn
from tests.helpers import TOLERANCE, assert_close

AAREN_PATHS = {"scan": aaren_scan, "recurrent": aaren_recurrent}
SIMPLICIAL_ARGS = ["q", "k1", "v1", "k2", "v2"]


def normal(seed, shape, dtype=jnp.float32):
    """Standard normal inputs from numpy (no per-shape compile of jax.random in eager mode)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def forward_and_grads(fn, args, argnums):
    """``(out, lse)`` and the gradients of ``Σ out·w + Σ lse·w'`` (finite lse only), in one compile."""
    out_shape, lse_shape = jax.eval_shape(fn, *args)
    w, w_lse = normal(7, out_shape.shape), normal(8, lse_shape.shape)

    def loss(*a):
        o, l = fn(*a)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(jnp.where(jnp.isfinite(l), l, 0.0) * w_lse), (o, l)

    (_, (out, lse)), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(argnums), has_aux=True))(*args)
    return out, lse, g


def assert_paths_agree(fast, expected, args, argnums, dtype, names):
    """Forward, lse and gradients (through both) of ``fast`` against ``expected = forward_and_grads(ref, ...)``."""
    out, lse, g = forward_and_grads(fast, args, argnums)
    ref_out, ref_lse, ref_g = expected
    assert out.dtype == ref_out.dtype and lse.dtype == jnp.float32
    assert_close(out, ref_out, rtol=TOLERANCE[dtype], name="out")
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    finite = jnp.isfinite(ref_lse)
    assert_close(jnp.where(finite, lse, 0), jnp.where(finite, ref_lse, 0), name="lse")
    for a, e, n in zip(g, ref_g, names):
        assert_close(a, e, rtol=TOLERANCE[dtype], name=f"d{n}")
    return out, lse


# ----------------------------------------------------------------------------------------- Aaren

def aaren_args(dtype, Hkv, shared_query):
    """(q, k, v, sinks): q ``[H, D]`` shared by the batch or ``[B, 1, H, D]``; odd length 29; Dv = 6 != D."""
    q = normal(0, (4, 8) if shared_query else (2, 1, 4, 8), dtype)
    return q, normal(1, (2, 29, Hkv, 8), dtype), normal(2, (2, 29, Hkv, 6), dtype), jnp.array([0.5, -1.0, 2.0, 0.0])


def bind_aaren(fn, **kw):
    return lambda q, k, v, sinks: fn(q, k, v, sinks=sinks, return_lse=True, **kw)


def test_aaren_scan_recurrent_and_steps_match_reference():
    """f32, GQA, sinks, soft cap, the [H, D] query: scan and recurrent forward and grads; steps equal the scan."""
    args = aaren_args(jnp.float32, 2, True)
    kw = dict(logits_soft_cap=3.0, scale=0.7)
    expected = forward_and_grads(bind_aaren(aaren_reference, **kw), args, range(4))
    scan, _ = assert_paths_agree(bind_aaren(aaren_scan, **kw), expected, args, range(4), jnp.float32, "qkvs")
    assert_paths_agree(bind_aaren(aaren_recurrent, **kw), expected, args, range(4), jnp.float32, "qkvs")
    assert scan.shape == (2, 29, 4, 6)

    q, k, v, sinks = args
    state = aaren_init_state(2, 4, 6, sinks)
    step = jax.jit(lambda state, k_t, v_t: aaren_step(state, k_t, v_t, q, **kw))
    for t in range(k.shape[1]):
        state, o_t = step(state, k[:, t], v[:, t])
        assert_close(o_t, scan[:, t], name=f"o_{t}")
    assert state.u.shape == (2, 4, 6) and state.m.dtype == jnp.float32


def test_aaren_bf16_large_logits_do_not_overflow():
    """bf16, MQA, logits of several hundred (exp overflows without the running max): float32 state, bf16 out."""
    q, k, v, sinks = aaren_args(jnp.bfloat16, 1, False)
    ref_out, ref_lse = jax.jit(bind_aaren(aaren_reference, scale=60.0))(q, k, v, sinks)
    assert np.abs(np.asarray(ref_lse)).max() > 100
    for fn in AAREN_PATHS.values():
        out, lse = jax.jit(bind_aaren(fn, scale=60.0))(q, k, v, sinks)
        assert out.dtype == jnp.bfloat16
        assert_close(out, ref_out, rtol=TOLERANCE[jnp.bfloat16])
        assert_close(lse, ref_lse)


def test_aaren_empty_state_is_the_identity_and_reads_zero():
    a = AarenState(jnp.array([1.5, -3.0]), jnp.arange(6.0).reshape(2, 3), jnp.array([2.0, 0.5]))
    empty = jax.tree.map(lambda x: x[0], aaren_init_state(1, 2, 3))
    for combined in (aaren_combine(empty, a), aaren_combine(a, empty)):
        for x, y in zip(jax.tree.leaves(combined), jax.tree.leaves(a)):
            np.testing.assert_allclose(x, y)
    out, lse = aaren_scan(jnp.ones((2, 3)), jnp.zeros((1, 0, 2, 3)), jnp.ones((1, 0, 2, 3)), return_lse=True)
    assert out.shape == (1, 0, 2, 3) and lse.shape == (1, 0, 2)


@st.composite
def aaren_states(draw):
    """A random state of 2 heads and Dv = 3; a head is empty when its ``m`` is ``-inf``."""
    m = np.array([draw(st.one_of(st.floats(-30.0, 30.0), st.just(-np.inf))) for _ in range(2)], np.float32)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 31 - 1)))
    full = np.isfinite(m)
    w = np.where(full, rng.uniform(0.1, 5.0, 2), 0.0).astype(np.float32)
    u = (rng.normal(size=(2, 3)) * full[:, None]).astype(np.float32)
    return AarenState(jnp.asarray(m), jnp.asarray(u), jnp.asarray(w))


def meaning(s: AarenState):
    """What a state stands for, independent of its reference ``m``: ``u / w`` and ``m + log w``."""
    w = np.asarray(s.w, np.float64)
    safe = np.where(w > 0, w, 1.0)
    out = np.where(w[:, None] > 0, np.asarray(s.u, np.float64) / safe[:, None], 0.0)
    return out, np.where(w > 0, np.asarray(s.m, np.float64) + np.log(safe), -np.inf)


@settings(max_examples=40, deadline=None)
@given(aaren_states(), aaren_states(), aaren_states())
def test_aaren_combine_is_associative(a, b, c):
    left = aaren_combine(aaren_combine(a, b), c)
    right = aaren_combine(a, aaren_combine(b, c))
    np.testing.assert_array_equal(np.asarray(left.m), np.asarray(right.m))
    for x, y in zip(meaning(left), meaning(right)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_aaren_is_a_layer_not_a_mechanism():
    """The functional core takes one query per head, and ``attnjax.attention`` has no "aaren" (use the layer)."""
    q, k, v, _ = aaren_args(jnp.float32, 2, False)
    with pytest.raises(ValueError, match="one query per head"):
        aaren_scan(jnp.ones((2, 3, 4, 8)), k, v)
    with pytest.raises(ValueError, match="unknown mechanism 'aaren'"):
        aj.attention(k, k, v, mechanism="aaren")


def test_aaren_layer_implementations_agree():
    x = normal(0, (2, 7, 16))
    outputs = {impl: nnx.jit(lambda m: m(x))(Aaren(16, 4, num_kv_heads=2, implementation=impl, rngs=nnx.Rngs(0)))
               for impl in ("reference", "recurrent", "xla", "auto")}
    for impl, y in outputs.items():
        assert_close(y, outputs["reference"], name=impl)
    with pytest.raises(ValueError, match="Aaren implementation"):
        Aaren(16, 4, implementation="pallas", rngs=nnx.Rngs(0))


def value_and_grad(layer, x):
    """``((Σ y², y), grads)`` of ``y = layer(x)`` under ``nnx.jit(nnx.value_and_grad)``: one compile."""
    def loss(m):
        y = m(x)
        return jnp.sum(y ** 2), y

    return nnx.jit(nnx.value_and_grad(loss, has_aux=True))(layer)


def test_aaren_layer_decode_equals_call_under_jit_and_grad():
    layer = Aaren(16, 4, num_kv_heads=2, rngs=nnx.Rngs(0))
    x = normal(0, (2, 7, 16))
    (_, y), grads = value_and_grad(layer, x)
    assert y.shape == x.shape
    assert float(jnp.abs(grads.query[...]).max()) > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    decode = nnx.jit(lambda m, x_t, s: m.decode(x_t, s))
    state = layer.init_cache(2, x.shape[1])
    for t in range(x.shape[1]):
        y_t, state = decode(layer, x[:, t:t + 1], state)
        assert_close(y_t, y[:, t:t + 1], name=f"y_{t}")
    with pytest.raises(ValueError, match="x_t must have shape"):
        layer.decode(x, state)


# ------------------------------------------------------------------------------- 2-simplicial

def simplicial_inputs(dtype=jnp.float32, T=11, S=None, Hkv=2):
    """q ``[2, T, 4, 8]`` and two key/value sets ``[2, S, Hkv, 8]``."""
    S = T if S is None else S
    return (normal(0, (2, T, 4, 8), dtype), *(normal(i, (2, S, Hkv, 8), dtype) for i in range(1, 5)))


def test_simplicial_reference_matches_the_definition():
    """A brute-force loop over (i, j, l) in numpy, with causal windows w1 = 3, w2 = 2."""
    q, k1, v1, k2, v2 = np.random.default_rng(0).normal(size=(5, 5, 8))
    out = np.zeros_like(v1)
    for i in range(5):
        pairs = [(j, l) for j, l in itertools.product(range(5), repeat=2) if i - 3 < j <= i and i - 2 < l <= i]
        s = np.array([np.sum(q[i] * k1[j] * k2[l]) / np.sqrt(8) for j, l in pairs])
        a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        out[i] = sum(w * v1[j] * v2[l] for w, (j, l) in zip(a, pairs))
    args = [jnp.asarray(x[None, :, None], jnp.float32) for x in (q, k1, v1, k2, v2)]  # B = H = 1
    ref = jax.jit(lambda *a: simplicial_attention_reference(*a, causal=True, window1=3, window2=2))(*args)
    np.testing.assert_allclose(np.asarray(ref[0, :, 0]), out, rtol=1e-5, atol=1e-6)


SIMPLICIAL_CASES = {
    "full_T<S": dict(causal=False, S=15),
    # a [B, Hq, 1, S] key mask (a decode cache's filled slots) with windows: pairs need both keys
    "key_mask_windows": dict(causal=True, window1=5, window2=3, S=13, key_mask=jnp.asarray(
        np.random.default_rng(3).random((2, 4, 1, 13)) < 0.7)),
    "causal_T>S_mqa": dict(causal=True, S=6, Hkv=1),  # the first queries see no key: output 0, lse -inf
    "windows_T<S": dict(causal=True, window1=4, window2=7, S=14),
}


@pytest.mark.parametrize("case", sorted(SIMPLICIAL_CASES))
def test_simplicial_windowed_matches_reference(case):
    """Whole-context windows are exact; small windows equal the masked reference. Forward, lse, grads."""
    kw = dict(SIMPLICIAL_CASES[case])
    args = simplicial_inputs(S=kw.pop("S", None), Hkv=kw.pop("Hkv", 2))
    # T = 11 with block_q = 4: a partial last block
    fast = lambda *a: simplicial_attention_windowed(*a, block_q=4, return_lse=True, **kw)  # noqa: E731
    ref = lambda *a: simplicial_attention_reference(*a, return_lse=True, **kw)  # noqa: E731
    assert_paths_agree(fast, forward_and_grads(ref, args, range(5)), args, range(5), jnp.float32, SIMPLICIAL_ARGS)


def test_simplicial_bf16():
    args = simplicial_inputs(jnp.bfloat16)
    kw = dict(causal=True, window1=6, window2=3)
    out, lse = jax.jit(lambda *a: simplicial_attention_windowed(*a, block_q=8, return_lse=True, **kw))(*args)
    ref_out, ref_lse = jax.jit(lambda *a: simplicial_attention_reference(*a, return_lse=True, **kw))(*args)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert_close(out, ref_out, rtol=TOLERANCE[jnp.bfloat16])
    assert_close(lse, ref_lse)


@pytest.mark.slow
def test_simplicial_registry_entry():
    """The standard signature is the one-key-set form ``k' = k``, ``v' = v``."""
    q, k, v, _, _ = simplicial_inputs()
    config = Simplicial(window1=4, window2=2, block_q=4)
    expected = simplicial_attention_reference(q, k, v, k, v, causal=True, window1=4, window2=2)
    for impl in ("reference", "xla"):
        assert_close(aj.attention(q, k, v, mechanism=config, mask=masks.Causal(), implementation=impl), expected)
    assert_close(aj.attention(q, k, v, mechanism="simplicial_2", implementation="reference"),
                 simplicial_attention_reference(q, k, v, k, v))
    entry = {e.name: e for e in aj.registry.entries()}["simplicial_2"]
    assert entry.family == "softmax" and entry.implementations == ("reference", "xla")
    with pytest.raises(NotImplementedError, match="are causal"):
        aj.attention(q, k, v, mechanism=Simplicial(window1=4))
    keys = jnp.arange(q.shape[1]) >= 3
    for impl in ("reference", "xla"):
        assert_close(aj.attention(q, k, v, mechanism=config, mask=masks.Causal() & masks.Explicit.keys(keys[None]),
                                  implementation=impl),
                     simplicial_attention_reference(q, k, v, k, v, causal=True, window1=4, window2=2,
                                                    key_mask=keys[None, None, None]))
    with pytest.raises(NotImplementedError, match="serves mask=None, masks.Causal"):
        aj.attention(q, k, v, mechanism="simplicial_2", mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match="needs causal=True"):
        simplicial_attention_windowed(q, k, v, k, v, causal=False, window1=3)


def test_simplicial_windowed_at_1k_runs_in_bounded_memory():
    """T = 1024 with Roy et al.'s 512 x 32 windows runs; its backward keeps no [T, w1, w2] residual."""
    q, k, v = (normal(i, (1, 1024, 1, 8)) for i in range(3))

    def fn(q, k, v):
        return simplicial_attention_windowed(q, k, v, k, v, window1=512, window2=32, block_q=16)

    out = jax.jit(fn)(q, k, v)
    assert out.shape == q.shape and np.all(np.isfinite(np.asarray(out)))
    memory = memory_of(compile_fn(grad_fn(fn), q, k, v, jnp.ones(q.shape, jnp.float32)))
    residual = 1024 * 512 * 32 * 4  # one float32 [T, w1, w2] tensor: what autodiff without remat keeps
    assert memory.temp < residual / 4, memory


def test_simplicial_layer_under_jit_and_grad():
    x = normal(0, (2, 13, 16))
    layer = SimplicialAttention(16, 4, num_kv_heads=2, window1=6, window2=3, block_q=4, rngs=nnx.Rngs(0))
    (_, y), grads = value_and_grad(layer, x)
    qkv = (layer.query(x), layer.key1(x), layer.value1(x), layer.key2(x), layer.value2(x))
    reference = jax.jit(lambda *a: simplicial_attention_reference(*a, causal=True, window1=6, window2=3))
    assert_close(y, layer.out(reference(*qkv)))
    assert float(jnp.abs(grads.key2.kernel[...]).max()) > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="needs causal=True"):
        SimplicialAttention(16, 4, causal=False, window1=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="implementation must be one of"):
        SimplicialAttention(16, 4, implementation="pallas", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------ slow (opt-in)

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_aaren_long_sequence_gradients(dtype):
    """S = 257 (nine scan levels), bf16 gradients too, both paths against the reference."""
    q = normal(0, (2, 1, 4, 16), dtype)
    args = (q, normal(1, (2, 257, 2, 16), dtype), normal(2, (2, 257, 2, 16), dtype), jnp.zeros(4))
    expected = forward_and_grads(bind_aaren(aaren_reference), args, range(4))
    for path in AAREN_PATHS.values():
        assert_paths_agree(bind_aaren(path), expected, args, range(4), dtype, "qkvs")


@pytest.mark.slow
def test_simplicial_bf16_gradients():
    args = simplicial_inputs(jnp.bfloat16, T=37, Hkv=1)
    kw = dict(causal=True, window1=9, window2=4)
    fast = lambda *a: simplicial_attention_windowed(*a, block_q=8, return_lse=True, **kw)  # noqa: E731
    ref = lambda *a: simplicial_attention_reference(*a, return_lse=True, **kw)  # noqa: E731
    assert_paths_agree(fast, forward_and_grads(ref, args, range(5)), args, range(5), jnp.bfloat16, SIMPLICIAL_ARGS)


@pytest.mark.slow
def test_simplicial_windowed_1k_gradients_run():
    """T = 1024, 512 x 32 windows, 4 heads: fwd + bwd runs and gives finite gradients for all five inputs."""
    args = simplicial_inputs(T=1024)
    fn = lambda *a: simplicial_attention_windowed(*a, window1=512, window2=32, return_lse=True)  # noqa: E731
    out, lse, grads = forward_and_grads(fn, args, range(5))
    for x in (out, lse, *grads):
        assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.slow
@pytest.mark.parametrize("cls,kw", [(Aaren, {}), (SimplicialAttention, dict(window1=4, window2=2))])
def test_linen_bridge(cls, kw):
    x = normal(0, (2, 7, 16))
    model = bridge.to_linen(cls, 16, 2, **kw)
    assert "params" in model.init(jax.random.key(0), x)
    m = cls(16, 2, rngs=nnx.Rngs(0), **kw)
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    assert_close(jax.jit(model.apply)({"params": params}, x), m(x), rtol=1e-6, name="linen")
