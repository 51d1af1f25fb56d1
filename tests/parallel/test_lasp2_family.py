"""LASP-2 for the linear family through the linear-state interface (``attnjax.linear.sequence_state``):
``lasp2_mechanism_sharded`` on 8 fake CPU devices (an Explicit mesh, ``shard_map`` with ``check_vma``) against
each mechanism's single-device reference, forward and gradients of q, k and v, and the refusals."""

import jax
import jax.numpy as jnp
import pytest

import attnjax as aj
from attnjax.linear import Flow, InLine, KernelizedRPE, LinearAttention, rala_rotary
from attnjax.linear.flow import flow_attention_reference
from attnjax.linear.inline import inline_attention_reference
from attnjax.linear.rala import rala_reference
from attnjax.parallel import lasp2_mechanism_sharded
from tests.helpers import assert_close, random_qkv

B, T, HQ, HKV, D = 1, 16, 4, 2, 4
"""One shared shape: 2 tokens per device, GQA."""
ROTARY = rala_rotary(4, 4, D)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("seq",))


def cases(mesh):
    """``{name: (sharded fn, single-device reference fn)}``, each ``(q, k, v) -> [B, T, Hq, D]``."""
    def sharded(mechanism, **kw):
        return lambda q, k, v: lasp2_mechanism_sharded(q, k, v, mesh=mesh, seq_axis="seq", mechanism=mechanism, **kw)

    return {
        "flow": (sharded(Flow(chunk_size=2)), flow_attention_reference),
        "flow causal": (sharded(Flow(chunk_size=2), causal=True),
                        lambda q, k, v: flow_attention_reference(q, k, v, causal=True)),
        "inline": (sharded(InLine(feature_map="elu+1")),
                   lambda q, k, v: inline_attention_reference(q, k, v, feature_map="elu+1")),
        "rala rotary": (sharded("rala", rotary=ROTARY), lambda q, k, v: rala_reference(q, k, v, rotary=ROTARY)),
        "linear causal": (sharded(LinearAttention(chunk_size=2), causal=True),
                          lambda q, k, v: aj.attention(q, k, v, mechanism=LinearAttention(), mask=aj.masks.Causal(),
                                                       implementation="reference")),
    }


def outputs_and_grads(fns: dict, args: tuple) -> dict:
    """``{name: (out, (dq, dk, dv))}`` of ``sum(out * w)`` for every function, from one compile."""
    w = jax.random.normal(jax.random.PRNGKey(123), (B, T, HQ, D), jnp.float32)

    def all_of(*a):
        results = {}
        for name, fn in fns.items():
            def loss(*x, fn=fn):
                out = fn(*x)
                return jnp.sum(out.astype(jnp.float32) * w), out
            (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(*a)
            results[name] = (out, grads)
        return results

    return jax.jit(all_of)(*args)


def test_every_instance_matches_its_mechanism_forward_and_gradients(mesh):
    """Flow (non-causal and causal), InLine, RALA with its rotary tables and plain linear attention (through the
    config route) sharded over 8 devices equal the unsplit mechanism; one compile per side."""
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    table = cases(mesh)
    actual = outputs_and_grads({n: f for n, (f, _) in table.items()}, (q, k, v))
    expected = outputs_and_grads({n: r for n, (_, r) in table.items()}, (q, k, v))
    for name in table:
        (out, grads), (out_ref, grads_ref) = actual[name], expected[name]
        assert_close(out, out_ref, name=f"{name}: out")
        for g, g_ref, arg in zip(grads, grads_ref, "qkv"):
            assert_close(g, g_ref, name=f"{name}: d{arg}")


@pytest.mark.slow
def test_flow_with_a_clamp_past_the_constant_shift_matches(mesh):
    """Non-causal Flow with ``clamp > SHIFT_BY_CLAMP`` shifts its softmax by the gathered largest ``Ô``."""
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)
    fns = {"sharded": lambda q, k, v: lasp2_mechanism_sharded(q, k, v, mesh=mesh, seq_axis="seq",
                                                              mechanism=Flow(clamp=100.0)),
           "single": lambda q, k, v: flow_attention_reference(q, k, v, clamp=100.0)}
    results = outputs_and_grads(fns, (q, k, v))
    (out, grads), (out_ref, grads_ref) = results["sharded"], results["single"]
    assert_close(out, out_ref, name="out")
    for g, g_ref, arg in zip(grads, grads_ref, "qkv"):
        assert_close(g, g_ref, name=f"d{arg}")


def test_refusals_name_why(mesh):
    q, k, v = random_qkv(jax.random.PRNGKey(1), B=B, T=T, Hq=HQ, Hkv=HKV, D=D)

    def run(mechanism, **kw):
        return lasp2_mechanism_sharded(q, k, v, mesh=mesh, seq_axis="seq", mechanism=mechanism, **kw)

    with pytest.raises(NotImplementedError, match="kernelized_rpe has no finite linear state.*Toeplitz"):
        run(KernelizedRPE(feature_map="elu+1"))
    with pytest.raises(NotImplementedError, match="'softmax' exposes no linear state"):
        run("softmax")
    with pytest.raises(NotImplementedError, match="InLine attention is non-causal"):
        run("inline", causal=True)
    with pytest.raises(NotImplementedError, match="RALA is non-causal"):
        run("rala", causal=True)
    with pytest.raises(NotImplementedError, match="flow attention has no logit scale"):
        run("flow", scale=0.5)
    with pytest.raises(NotImplementedError, match="lightning has a decay, which needs causal=True"):
        run("lightning")
    with pytest.raises(ValueError, match=r"rotary must be \(sin, cos\), each of shape \[T, D\] = \[16, 4\]"):
        run("rala", rotary=(ROTARY[0][:8], ROTARY[1]))
