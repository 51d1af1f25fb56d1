"""RAT (Wei et al. 2025): the chunked fast path against the per-token reference, the paper's two limits
(L = 1 is attention, L >= T is the RNN), causality, decode steps, bf16 and argument errors; every path runs
under jit (eager calls in ``test_errors_name_the_argument`` and the module tests)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import attention, masks
from attnjax.memory.rat import rat, rat_init_cache, rat_recurrence, rat_reference, rat_step
from attnjax.positional import RoPE
from experiments import bench_memory
from tests.helpers import TOLERANCE, assert_close, outputs_and_grads

B, T, HQ, HKV, D = 2, 19, 4, 2, 8


def inputs(dtype=jnp.float32, *, Dv=D, gate_width=D, seed=0, length=T):
    """q [B, T, 4, 8], k [B, T, 2, 8], v [B, T, 2, Dv], gate σ(normal) [B, T, 2, gate_width]."""
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal(shape).astype(np.float32) for shape in (
        (B, length, HQ, D), (B, length, HKV, D), (B, length, HKV, Dv), (B, length, HKV, gate_width)))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jax.nn.sigmoid(jnp.asarray(g)).astype(dtype))


@pytest.mark.parametrize("chunk_size, rope, gate_width, Dv", [
    (1, None, D, D), (4, RoPE(base=100.0), D, D), (16, None, 1, 6)],
    ids=["L1", "L4-rope", "L16-head-gate-Dv6"])
def test_fast_path_matches_reference_forward_and_grads(chunk_size, rope, gate_width, Dv):
    """T = 19 (a partial last chunk for L = 4, 16), GQA 4:2; gradients of q, k, v and the gate."""
    args = inputs(Dv=Dv, gate_width=gate_width)
    fast = functools.partial(rat, chunk_size=chunk_size, rope=rope)
    ref = functools.partial(rat_reference, chunk_size=chunk_size, rope=rope)
    (out, grads), (out_ref, grads_ref) = (outputs_and_grads(fn, args, range(4)) for fn in (fast, ref))
    assert out.shape == (B, T, HQ, Dv) and out.dtype == jnp.float32
    assert_close(out, out_ref, name="out")
    for name, a, e in zip(["q", "k", "v", "gate"], grads, grads_ref):
        assert_close(a, e, name=f"d{name}")
    if chunk_size == 1:  # the paper's limit: every token is its own chunk, softmax attention over gated tokens
        q, k, v, g = args
        expected = attention(q, (1 - g) * k, (1 - g) * v, mask=masks.Causal(), implementation="reference")
        assert_close(out, expected, name="L=1 is attention over ((1 - g)k, (1 - g)v)")


def test_chunk_covering_the_sequence_is_the_gated_rnn():
    """L >= T: one chunk, each query sees only its own state, y_t = ṽ_t = g_t ṽ_{t−1} + (1 − g_t) v_t."""
    q, k, v, g = inputs()
    state, expected = np.zeros((B, HKV, D), np.float32), []
    for t in range(T):
        state = np.asarray(g[:, t]) * state + (1 - np.asarray(g[:, t])) * np.asarray(v[:, t])
        expected.append(np.repeat(state, HQ // HKV, axis=1))
    assert_close(jax.jit(functools.partial(rat, chunk_size=32))(q, k, v, g), np.stack(expected, 1), name="L=32")
    _, vs = jax.jit(rat_recurrence, static_argnums=3)(k, v, g, T)
    assert_close(vs, np.stack([e[:, ::2] for e in expected], 1), name="rat_recurrence")


def test_causal_a_later_token_changes_nothing_before_it():
    """Perturbing token s (its q, k, v and gate) leaves outputs < s bitwise equal and changes output s."""
    q, k, v, g = inputs()
    s = 9  # inside chunk 2 of L = 4
    bumped = [x.at[:, s].add(0.5) if i < 3 else x.at[:, s].multiply(0.5) for i, x in enumerate((q, k, v, g))]
    fn = jax.jit(functools.partial(rat, chunk_size=4, rope=RoPE(base=100.0)))
    before, after = fn(q, k, v, g), fn(*bumped)
    np.testing.assert_array_equal(np.asarray(before[:, :s]), np.asarray(after[:, :s]))
    assert not np.allclose(before[:, s], after[:, s])


def test_decode_steps_equal_the_parallel_call():
    """rat_step token by token (GQA, RoPE, L = 4, T = 11, a cache with spare slots) equals rat."""
    length, L, rope = 11, 4, RoPE(base=100.0)
    q, k, v, g = inputs(length=length)
    step = jax.jit(functools.partial(rat_step, chunk_size=L, rope=rope))
    cache = rat_init_cache(B, 16, chunk_size=L, num_kv_heads=HKV, head_dim=D)
    assert cache.k.shape == (B, 4, HKV, D)
    outs = []
    for t in range(length):
        o, cache = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], cache)
        outs.append(o)
    assert int(cache.length) == length
    parallel = jax.jit(functools.partial(rat, chunk_size=L, rope=rope))(q, k, v, g)
    assert_close(jnp.concatenate(outs, 1), parallel, name="decode")


def test_bf16_inputs_are_finite_and_close_to_float32():
    """bf16 in, bf16 out (float32 states inside), within bf16 tolerance of the float32 reference."""
    args = inputs(jnp.bfloat16)
    out = jax.jit(functools.partial(rat, chunk_size=4))(*args)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
    expected = jax.jit(functools.partial(rat_reference, chunk_size=4))(*(a.astype(jnp.float32) for a in args))
    assert_close(out, expected, rtol=TOLERANCE[jnp.bfloat16], name="bf16")


def test_errors_name_the_argument():
    q, k, v, g = inputs()
    with pytest.raises(ValueError, match="gate must have shape"):
        rat(q, k, v, g[:, :, :1], chunk_size=4)
    with pytest.raises(ValueError, match="Dv == D"):
        rat(q, k, v[..., :6], g, chunk_size=4)
    with pytest.raises(TypeError, match="gate must be a floating"):
        rat(q, k, v, (g > 0.5).astype(jnp.int32), chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        rat(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="same length as q"):
        rat(q, k[:, :-1], v[:, :-1], g[:, :-1], chunk_size=4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        rat(q[:, :, :3], k, v, g, chunk_size=4)
    with pytest.raises(ValueError, match="scale must be positive"):
        rat_reference(q, k, v, g, chunk_size=4, scale=-1.0)
    with pytest.raises(TypeError, match="rope must be"):
        rat(q, k, v, g, chunk_size=4, rope=10000.0)
    cache = rat_init_cache(B, 8, chunk_size=4, num_kv_heads=HKV, head_dim=D)
    with pytest.raises(ValueError, match="one token"):
        rat_step(q[:, :2], k[:, :2], v[:, :2], g[:, :2], cache, chunk_size=4)
    with pytest.raises(ValueError, match="do not fit the cache"):
        rat_step(q[:, :1], k[:, :1, :1], v[:, :1, :1], g[:, :1, :1], cache, chunk_size=4)


@pytest.mark.slow
def test_bench_memory_rat_section_smoke(tmp_path):
    """``python -m experiments.bench_memory --only rat`` at tiny sizes: every program timed, speedups positive."""
    results = bench_memory.main(["--smoke", "--only", "rat", "--out", str(tmp_path), "--name", "tiny"])
    section = results["sections"]["rat"]
    assert set(section["train_speedup"]) == {"64", "128"} and all(r > 0 for r in section["train_speedup"].values())
    assert section["decode_speedup"] > 0 and len(section["rows"]) == 6
    assert all(r["median_s"] > 0 and r["memory"]["peak"] > 0 for r in section["rows"])
    assert "## rat" in (tmp_path / "tiny.md").read_text()
