"""attnjax.attention: dispatch, fallback, and clear errors for bad input."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks, registry
from attnjax.checks import check_qkv
from tests.helpers import assert_close, random_qkv

KEY = jax.random.PRNGKey(0)
Q, K, V = random_qkv(KEY, B=2, T=10, S=12, Hq=4, Hkv=2, D=8)


def call(q=Q, k=K, v=V, **kw):
    return aj.attention(q, k, v, **kw)


@pytest.mark.parametrize("implementation", ["reference", "xla", "auto"])
def test_implementations_agree(implementation):
    out = call(mask=masks.Causal(), implementation=implementation)
    assert out.shape == (2, 10, 4, 8) and out.dtype == Q.dtype
    assert_close(out, call(mask=masks.Causal(), implementation="reference"))


def test_mechanism_by_name_or_config():
    by_config = call(mechanism=aj.softmax.Softmax(block_q=4, block_kv=4), implementation="xla")
    assert_close(by_config, call(mechanism="softmax"))


def test_missing_implementation_raises_not_implemented():
    with pytest.raises(NotImplementedError, match="no 'recurrent' implementation"):
        call(implementation="recurrent")


def test_auto_falls_back_on_not_implemented():
    calls = []

    def refuses(q, k, v, **kw):
        calls.append("xla")
        raise NotImplementedError("not this one")

    def serves(q, k, v, **kw):
        calls.append("reference")
        return jnp.zeros(q.shape[:3] + v.shape[3:], q.dtype)

    @dataclasses.dataclass(frozen=True)
    class Fallback:
        name: ClassVar[str] = "fallback-test"
        family: ClassVar[str] = "softmax"
        paper: ClassVar[str] = "test"
        supports: ClassVar[frozenset] = frozenset(registry.OPTIONS)

        def implementations(self):
            return {"reference": serves, "xla": refuses}

    out = call(mechanism=Fallback())
    assert calls == ["xla", "reference"] and out.shape == (2, 10, 4, 8)


def test_unsupported_option_raises_not_implemented():
    @dataclasses.dataclass(frozen=True)
    class NoMasks:
        name: ClassVar[str] = "no-masks"
        family: ClassVar[str] = "softmax"
        paper: ClassVar[str] = "test"
        supports: ClassVar[frozenset] = frozenset({"gqa", "cross"})

        def implementations(self):
            return {"reference": aj.softmax.softmax_attention_reference}

    with pytest.raises(NotImplementedError, match=r"does not support \['mask'\]"):
        call(mechanism=NoMasks(), mask=masks.Causal())


BAD_INPUTS = {
    "q rank 3": (dict(q=Q[0]), ValueError, r"q must have rank 4 .* got shape \(10, 4, 8\)"),
    "k rank 5": (dict(k=K[None]), ValueError, "k must have rank 4"),
    "head dim mismatch": (dict(k=K[..., :6], v=V[..., :6]), ValueError, "k head_dim 6 != q head_dim 8"),
    "heads not multiple": (dict(k=K[:, :, :1].repeat(3, 2), v=V[:, :, :1].repeat(3, 2)), ValueError,
                           r"q heads \(4\) must be a multiple of kv heads \(3\)"),
    "kv length mismatch": (dict(v=V[:, :5]), ValueError, "k and v must agree"),
    "batch mismatch": (dict(k=K[:1], v=V[:1]), ValueError, "batch sizes differ"),
    "integer q": (dict(q=Q.astype(jnp.int32)), TypeError, "q must be a floating-point array"),
    "dtype mix": (dict(q=Q.astype(jnp.bfloat16)), TypeError, "share one dtype"),
    "segments shape": (dict(mask=masks.Segments(jnp.zeros((2, 9), jnp.int32), jnp.zeros((2, 12), jnp.int32))),
                       ValueError, r"q_segment_ids has shape \(2, 9\), expected \(2, 10\)"),
    "float segment ids": (dict(mask=masks.Segments(jnp.zeros((2, 10)), jnp.zeros((2, 12)))), TypeError,
                          "must be integers"),
    "explicit shape": (dict(mask=masks.Explicit(jnp.ones((10, 11), bool))), ValueError,
                       r"Explicit mask has shape \(10, 11\), expected .*\[2, 4, 10, 12\]"),
    "explicit dtype": (dict(mask=masks.Explicit(jnp.ones((10, 12)))), TypeError, "Explicit mask must be bool"),
    "array as mask": (dict(mask=jnp.ones((10, 12), bool)), TypeError, "mask must be an attnjax.masks value"),
    "bias shape": (dict(bias=jnp.ones((3, 10, 12))), ValueError, r"bias has shape \(3, 10, 12\)"),
    "sinks shape": (dict(sinks=jnp.ones((2,))), ValueError, r"sinks must have shape \[Hq\] = \(4,\)"),
    "dropout without rng": (dict(dropout_rate=0.1), ValueError, "needs an rng"),
    "dropout rate": (dict(dropout_rate=1.0, rng=KEY), ValueError, r"dropout_rate must be in \[0, 1\)"),
    "negative scale": (dict(scale=-1.0), ValueError, "scale must be positive"),
    "soft cap": (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be positive"),
    "unknown mechanism": (dict(mechanism="nope"), ValueError, "unknown mechanism 'nope'; registered"),
    "mechanism type": (dict(mechanism=3), TypeError, "mechanism must be a registry name or a config"),
    "unknown implementation": (dict(implementation="cuda"), ValueError, "unknown implementation 'cuda'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(case):
    kwargs, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call(**kwargs)


def test_registry_lists_softmax_with_its_implementations():
    entry = {e.name: e for e in registry.entries()}["softmax"]
    assert entry.implementations == ("reference", "xla", "pallas")
    assert entry.family == "softmax" and "Vaswani" in entry.paper
    assert registry.list() == registry.entries()


@pytest.mark.slow  # tests/test_conformance.py runs every registered mechanism's paths against its reference
@pytest.mark.filterwarnings("ignore::attnjax.sparse.DenseSelectionWarning")  # every selector is dense at T = 10
def test_output_finite_for_every_registered_mechanism():
    """The "auto" path of every mechanism, jitted (each family's tests compare every path with its reference),
    with GQA and T != S where the mechanism claims them."""
    for entry in registry.entries():
        mask = masks.Causal() if "mask" in entry.supports else None
        k, v = (K, V) if "cross" in entry.supports else (K[:, :10], V[:, :10])
        if "gqa" not in entry.supports:
            k, v = (jnp.repeat(a, 2, axis=2) for a in (k, v))
        out = jax.jit(lambda q, k, v: call(q, k, v, mechanism=entry.name, mask=mask))(Q, k, v)
        assert np.all(np.isfinite(np.asarray(out))), entry.name


def test_check_qkv_is_usable_on_its_own():
    check_qkv(Q, K, V)
    with pytest.raises(ValueError, match="v must have rank 4"):
        check_qkv(Q, K, V[0])


@pytest.mark.parametrize("B,T,S", [(0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)])
@pytest.mark.parametrize("name", ["softmax", "stick_breaking", "linear", "moba"])
def test_zero_length_batch_or_sequence(name, B, T, S):
    """``B``, ``T`` or ``S`` of 0: an empty output, or with no keys every row outputs 0 (lse -inf,
    or the sink logit); gradients are zeros of the input shapes."""
    q, k, v = jnp.ones((B, T, 2, 4)), jnp.ones((B, S, 2, 4)), jnp.ones((B, S, 2, 3))
    mask = None if name == "linear" else masks.Causal()
    out = aj.attention(q, k, v, mechanism=name, mask=mask)
    assert out.shape == (B, T, 2, 3) and not bool(jnp.any(out))
    dq, dk = jax.grad(lambda q, k: aj.attention(q, k, v, mechanism=name, mask=mask).sum(), (0, 1))(q, k)
    assert dq.shape == q.shape and dk.shape == k.shape
    if name == "softmax":
        _, lse = aj.attention(q, k, v, mask=mask, return_lse=True)
        assert lse.shape == (B, T, 2) and bool(jnp.all(lse == -jnp.inf))
        _, lse = aj.attention(q, k, v, sinks=jnp.array([0.5, -1.0]), return_lse=True)
        assert bool(jnp.all(lse == jnp.array([0.5, -1.0])))
