"""PMIMemory (Zeng et al. 2023, PMI) against a plain reference of its equations on the parameters, output and
every parameter's and input's gradient; the memory carried by ``step``; bf16; jit; error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.memory.pmi import PMIState
from attnjax.nn.memory import PMIMemory
from attnjax.nn.registry import modules
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close

D, H, N, C, K, DEPTH, ALPHA = 8, 2, 4, 3, 2, 2, 0.7
SCALE = (D // H) ** -0.5


def normal(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def layer(**kwargs):
    return PMIMemory(D, H, mem_slots=N, ltm_segments=C, topk=K, mlp_depth=DEPTH, alpha=ALPHA, **kwargs,
                     rngs=nnx.Rngs(0))


def einsum(spec, *arrays):
    return jnp.einsum(spec, *arrays, precision="highest")


def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def linear(x, p):
    return einsum("...i,io->...o", x, p["kernel"]) + p["bias"]


def attend(p, queries, keys, topk=None):
    """Multi-head attention with the layer's shared projections, heads concatenated; with ``topk`` each query
    keeps its ``topk`` largest softmax weights (the rest set to 0, no renormalization)."""
    q = einsum("btd,dhe->bthe", queries, p["query"]["kernel"]) + p["query"]["bias"]
    k = einsum("bsd,dhe->bshe", keys, p["key"]["kernel"])
    v = einsum("bsd,dhe->bshe", keys, p["value"]["kernel"]) + p["value"]["bias"]
    w = jax.nn.softmax(SCALE * einsum("bthe,bshe->bhts", q, k), axis=-1)
    if topk is not None and topk < w.shape[-1]:
        kth = jnp.sort(w, axis=-1)[..., -topk][..., None]
        w = jnp.where(w >= kth, w, 0.0)
    o = einsum("bhts,bshe->bthe", w, v)
    return o.reshape(*o.shape[:2], -1)


def pmi_reference(p, x, working, long_term):
    """One PMI step from the equations (official SW_LTM.forward_step; the paper's eq. 11-12)."""
    xp = linear(x, p["input_proj"])
    written = layer_norm(working + attend(p, working, xp, topk=K), p["write_norm"])  # competitive write
    hidden = written
    for _ in range(DEPTH):
        hidden = jax.nn.relu(linear(hidden, p["mlp"]))
    candidate = layer_norm(written + hidden, p["mlp_norm"])
    association = long_term.sum(-1)[..., None] * candidate[:, None]  # outer(M_l 1, M_w) per slot
    long_term = layer_norm(long_term + association, p["long_term_norm"])
    gates = (linear(jax.nn.relu(p["gate_input_scale"] * xp).mean(1), p["gate_input"])[:, None]
             + einsum("bnd,nde->bne", jnp.tanh(working), p["gate_memory_kernel"]) + p["gate_memory_bias"])
    i, f = jax.nn.sigmoid(gates[..., :D] + p["input_bias"]), jax.nn.sigmoid(gates[..., D:] + p["forget_bias"])
    working = i * jnp.tanh(candidate) + f * working
    u_w = attend(p, xp, working)  # MHC
    u_l = attend(p, xp, long_term.mean(1), topk=K)  # MHSC
    u_wl = attend(p, u_l, u_w)  # eq. 11
    return ALPHA * u_w + (1 - ALPHA) * u_wl, working, long_term  # eq. 12


class Step(nnx.Module):
    """``layer.step(x, state)`` with the output and the new state flattened into one array, so that the checker
    compares the output, the new memory, and the gradients of every parameter, of x and of the state."""

    def __init__(self, inner: PMIMemory):
        self.inner = inner

    def __call__(self, x, working, long_term):
        return flat(*self.inner.step(x, PMIState(working, long_term)))


def flat(y, state):
    return jnp.concatenate([a.reshape(a.shape[0], -1) for a in (y, *state)], axis=1)


def step_reference(p, x, working, long_term):
    y, working, long_term = pmi_reference(p["inner"], x, working, long_term)
    return flat(y, (working, long_term))


def test_step_equals_the_reference_forward_and_every_gradient():
    """``long_term_init`` enters through ``initial_state`` only (checked below); every other parameter here."""
    x, working, long_term = normal((2, 9, D), 1), normal((2, N, D), 2), normal((2, C, N, D), 3)
    check_module_against_reference(Step(layer(implementation="reference")), step_reference, x, working,
                                   long_term, rtol=1e-4)


CALL = nnx.jit(lambda m, x: m(x))
STEP = nnx.jit(lambda m, x, s: m.step(x, s))


def test_the_memory_carries_from_step_to_step_and_the_call_starts_from_the_initial_state():
    model = layer()
    x = normal((2, 9, D), 4)
    state = model.initial_state(2)
    np.testing.assert_array_equal(state.working[0], np.eye(N, D))
    np.testing.assert_array_equal(state.long_term[1], model.long_term_init[...])
    y1, state1 = STEP(model, x, state)
    y2, state2 = STEP(model, x, state1)
    assert_close(CALL(model, x), y1, rtol=1e-6, name="call == step from initial_state")
    assert state1.working.dtype == state1.long_term.dtype == jnp.float32
    assert not np.allclose(y1, y2, atol=1e-3), "the second step reads the memory the first one wrote"
    assert not np.allclose(state1.working, state2.working, atol=1e-3)
    assert not np.allclose(state.long_term, state1.long_term, atol=1e-2)


def test_after_one_update_the_association_vanishes_while_the_long_term_norm_is_at_its_initialization():
    """A property of the official update ``M_l = LN(M_l + (M_l 1) ⊗ M̃_w)``: with the layer norm's initial
    scale 1 and bias 0, every row of the updated ``M_l`` sums to 0, so the next association adds nothing;
    the long-term memory keeps changing across steps only once training moves the norm's bias."""
    model = layer()
    state1 = STEP(model, normal((2, 9, D), 4), model.initial_state(2))[1]
    np.testing.assert_allclose(np.asarray(state1.long_term).sum(-1), 0.0, atol=1e-5)
    model.long_term_norm.bias[...] = normal((D,), 6)
    state1 = STEP(model, normal((2, 9, D), 4), model.initial_state(2))[1]
    _, state2 = STEP(model, normal((2, 9, D), 4), state1)
    assert not np.allclose(state1.long_term, state2.long_term, atol=1e-2)


def test_bfloat16_input_gives_finite_bfloat16_output_close_to_float32():
    model, x = layer(), normal((2, 9, D), 5)
    y = CALL(model, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    assert_close(y, CALL(model, x.astype(jnp.bfloat16).astype(jnp.float32)), rtol=2e-2, name="bf16")


def test_registered_as_a_non_causal_layer_and_parameter_count():
    (spec,) = [s for s in modules("layer") if s.name == "pmi"]
    assert spec.module is PMIMemory and not spec.causal and not spec.decodes
    k = H * (D // H)
    expected = (D * D + D) + (D * k + k) + D * k + (D * D + D) + (D * D + D) + 6 * D \
        + D + (2 * D * D + 2 * D) + N * (2 * D * D + 2 * D) + 2 + C * N * D
    assert parameter_count(layer()) == expected
    assert set(parameters(layer())) >= {"long_term_init", "gate_memory_kernel", "input_bias", "forget_bias"}


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m(normal((2, 9, 7))), ValueError, r"x must have shape \[batch, seq, 8\], got \[2, 9, 7\]"),
    (lambda m: m(jnp.zeros((2, 9, D), jnp.int32)), TypeError, r"x must be a floating-point array .* int32"),
    (lambda m: m(normal((2, 9, D)), mask=masks.Causal()), NotImplementedError,
     r"PMIMemory takes mask=None only .* got Causal"),
    (lambda m: m.step(normal((2, 9, D)), PMIState(normal((2, N, D)), normal((2, C + 1, N, D)))), ValueError,
     r"state.long_term must be a floating-point array of shape \[2, 3, 4, 8\] for x with batch 2, "
     r"got float32\[2, 4, 4, 8\]"),
    (lambda m: m.step(normal((2, 9, D)), PMIState(normal((3, N, D)), normal((2, C, N, D)))), ValueError,
     r"state.working must be a floating-point array of shape \[2, 4, 8\] for x with batch 2, got float32\[3, 4, 8\]"),
    (lambda m: m.step(normal((2, 9, D)), (normal((2, N, D)), normal((2, C, N, D)))), TypeError,
     "state must be a PMIState"),
    (lambda m: m.initial_state(0), ValueError, "batch must be a positive int, got 0"),
])
def test_bad_input_is_refused_naming_the_argument_and_shapes(call, error, message):
    with pytest.raises(error, match=message):
        call(layer())


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=10, num_heads=4), r"d_model \(10\) must be a multiple of num_heads \(4\)"),
    (dict(topk=0), "topk must be a positive int, got 0"),
    (dict(mem_slots=-1), "mem_slots must be a positive int, got -1"),
    (dict(alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
    (dict(scale=0.0), "scale must be positive, got 0.0"),
])
def test_bad_configuration_is_refused_naming_the_argument(kwargs, message):
    kwargs = {"d_model": D, "num_heads": H, **kwargs}
    with pytest.raises(ValueError, match=message):
        PMIMemory(**kwargs, rngs=nnx.Rngs(0))
