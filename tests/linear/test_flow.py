"""Flow-Attention (Flowformer): fast paths against the quadratic reference (forward, gradients), the reference
against a port of the official code, causal steps against the parallel call, the registry entry, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.linear.flow import (Flow, FlowState, flow_attention, flow_attention_reference, flow_attention_step,
                                 flow_initial_state)
from tests.helpers import assert_close, outputs_and_grads, random_qkv

KEY = jax.random.PRNGKey(0)


def official(q, k, v, causal, eps=1e-6, clamp=1.0):
    """A port of thuml/Flowformer ``Flow_Attention`` / ``Flow_Attention_Causal`` (their eps placement: on every
    feature and summed vector) on ``[B, T, H, D]`` with K/V repeated over the query heads."""
    G = q.shape[2] // k.shape[2]
    q = jax.nn.sigmoid(q).transpose(0, 2, 1, 3)
    k = jax.nn.sigmoid(jnp.repeat(k, G, 2)).transpose(0, 2, 1, 3)
    v = jnp.repeat(v, G, 2).transpose(0, 2, 1, 3)
    if not causal:
        sink_in = 1 / jnp.einsum("nhld,nhd->nhl", q + eps, k.sum(2) + eps)
        source_out = 1 / jnp.einsum("nhld,nhd->nhl", k + eps, q.sum(2) + eps)
        sink = jnp.einsum("nhld,nhd->nhl", q + eps, (k * source_out[..., None]).sum(2) + eps)
        source = jnp.clip(jnp.einsum("nhld,nhd->nhl", k + eps, (q * sink_in[..., None]).sum(2) + eps), -clamp, clamp)
        allocation = jax.nn.sigmoid(sink * (q.shape[2] / k.shape[2]))
        competition = jax.nn.softmax(source, -1) * k.shape[2]
        kv = jnp.einsum("nhld,nhlm->nhdm", k, v * competition[..., None])
        x = jnp.einsum("nhld,nhdm->nhlm", q * sink_in[..., None], kv) * allocation[..., None]
        return x.transpose(0, 2, 1, 3)
    normal = jnp.arange(1.0, q.shape[2] + 1)[None, None, :]
    sink_in = normal / jnp.einsum("nhld,nhld->nhl", q + eps, k.cumsum(2) + eps)
    source_out = normal / jnp.einsum("nhld,nhld->nhl", k + eps, q.cumsum(2) + eps)
    sink = jnp.einsum("nhld,nhld->nhl", q + eps, (k * source_out[..., None]).cumsum(2) + eps) / normal
    source = jnp.einsum("nhld,nhld->nhl", k + eps, (q * sink_in[..., None]).cumsum(2) + eps) / normal
    source = jnp.exp(jnp.clip(source, -clamp, clamp))
    competition = source / source.cumsum(-1) * normal
    kv = jnp.cumsum(jnp.einsum("nhld,nhlm->nhldm", k, v * competition[..., None]), 2)
    x = jnp.einsum("nhld,nhldm->nhlm", q * (sink_in / normal)[..., None], kv) * jax.nn.sigmoid(sink)[..., None]
    return x.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("causal, T, S", [(False, 11, 17), (True, 13, 13)])
def test_reference_equals_the_official_code(causal, T, S):
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    ref = jax.jit(lambda *a: flow_attention_reference(*a, causal=causal))(q, k, v)
    assert_close(ref, jax.jit(lambda *a: official(*a, causal))(q, k, v), rtol=1e-5, name="official")


@pytest.mark.parametrize("causal, T, S", [(False, 11, 17), (True, 13, 13)])
def test_xla_equals_the_reference_forward_and_gradients(causal, T, S):
    """Odd lengths (not multiples of the chunk of 4), GQA (4 query heads over 2), Dv != D, cross (non-causal)."""
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8, Dv=6)
    ref = lambda *a: flow_attention_reference(*a, causal=causal)
    fast = lambda *a: flow_attention(*a, causal=causal, chunk_size=4, implementation="xla")
    (out, grads), (expected, expected_grads) = (outputs_and_grads(fn, (q, k, v), (0, 1, 2)) for fn in (fast, ref))
    assert_close(out, expected, rtol=2e-5, name="out")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert_close(g, e, rtol=1e-4, name=f"d{name}")


def test_causal_rows_see_only_the_past():
    q, k, v = random_qkv(KEY, B=1, T=9, Hq=2, D=4)
    call = jax.jit(lambda *a: flow_attention(*a, causal=True, chunk_size=4))
    out = call(q, k, v)
    changed = call(q.at[:, 5:].add(1.0), k.at[:, 5:].add(1.0), v.at[:, 5:].add(1.0))
    np.testing.assert_array_equal(np.asarray(out[:, :5]), np.asarray(changed[:, :5]))
    assert not np.allclose(out[:, 5:], changed[:, 5:])


def test_steps_and_the_recurrent_path_equal_the_parallel_causal_call_and_keep_the_state_dtype():
    q, k, v = random_qkv(KEY, B=2, T=9, Hq=4, Hkv=2, D=4, Dv=6)
    parallel = jax.jit(lambda *a: flow_attention(*a, causal=True, chunk_size=4))(q, k, v)
    recurrent = jax.jit(lambda *a: flow_attention(*a, causal=True, implementation="recurrent"))(q, k, v)
    assert_close(recurrent, parallel, rtol=2e-5, name="recurrent")
    step = jax.jit(flow_attention_step)
    state, outs = flow_initial_state(2, 4, 2, 4, 6), []
    for t in range(9):
        o, state = step(q[:, t], k[:, t], v[:, t], state)
        outs.append(o)
    assert isinstance(state, FlowState) and int(state.length) == 9
    assert_close(jnp.stack(outs, axis=1), parallel, rtol=2e-5, name="steps")
    o, low = step(q[:, 0], k[:, 0], v[:, 0], flow_initial_state(2, 4, 2, 4, 6, jnp.bfloat16))
    assert {a.dtype for a in jax.tree.leaves(low) if a.ndim} == {jnp.dtype(jnp.bfloat16)}
    assert_close(o, outs[0], rtol=1e-2, name="bf16 state")


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_is_finite_and_close(causal):
    q, k, v = random_qkv(KEY, B=1, T=17, Hq=2, D=8, dtype=jnp.bfloat16)
    out = jax.jit(lambda *a: flow_attention(*a, causal=causal, chunk_size=8))(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert_close(out, jax.jit(lambda *a: flow_attention_reference(*a, causal=causal))(*f32), rtol=2e-2, name="bf16")


def test_registry_entry_serves_no_mask_and_causal_and_refuses_the_rest():
    q, k, v = random_qkv(KEY, B=1, T=9, Hq=4, Hkv=2, D=4)
    config = Flow(chunk_size=4)
    for mask, causal in ((None, False), (masks.Causal(), True)):
        out = jax.jit(lambda *a: aj.attention(*a, mechanism=config, mask=mask, implementation="xla"))(q, k, v)
        expected = jax.jit(lambda *a: flow_attention_reference(*a, causal=causal))(q, k, v)
        assert_close(out, expected, rtol=2e-5, name=f"causal={causal}")
    with pytest.raises(NotImplementedError, match="no logit scale"):
        aj.attention(q, k, v, mechanism="flow", scale=0.5)
    with pytest.raises(NotImplementedError, match="masks.Causal"):
        aj.attention(q, k, v, mechanism="flow", mask=masks.SlidingWindow(2, 0), implementation="xla")
    with pytest.raises(NotImplementedError, match="cross"):
        aj.attention(q, k[:, :5], v[:, :5], mechanism="flow")


def test_errors():
    q, k, v = random_qkv(KEY, B=1, T=6, S=5, Hq=2, D=4)
    with pytest.raises(ValueError, match="as many keys as queries"):
        flow_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="clamp must be positive"):
        flow_attention(q, k, v, clamp=0.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        flow_attention_reference(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        flow_attention(q, k, v, chunk_size=0)
    with pytest.raises(NotImplementedError, match="causal only"):
        flow_attention(q, k, v, implementation="recurrent")
    with pytest.raises(ValueError, match="q_t must have shape"):
        flow_attention_step(q, k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match="state shapes"):
        flow_attention_step(q[:, 0], k[:, 0], v[:, 0], flow_initial_state(1, 2, 2, 4, 3))
