"""Lightning Attention-2 Pallas kernels (GPU and TPU lowerings, interpret mode on CPU) against a
naive quadratic masked reference: outputs, final state, and gradients of q, k, v, decay and
initial_state."""

import jax
import jax.numpy as jnp
import pytest

from attnjax import linear
from pallas_kernels.lightning import lightning_attention_pallas
from tests.helpers import TOLERANCE, assert_close, assert_grads_close, random_qkv

BACKENDS = ["gpu", "tpu"]


def naive_lightning(q, k, v, decay, initial_state=None, scale=None):
    """O = ((Q Kᵀ) ⊙ M) V + (Q ⊙ λ^(i+1)) S0 with M_ij = λ^(i−j) for j ≤ i, and
    S_T = λ^T S0 + Σ_j λ^(T−1−j) k_j v_jᵀ; all in f32, K/V repeated over GQA groups."""
    f32 = jnp.float32
    B, T, H, Dk = q.shape
    group = H // k.shape[2]
    scale = Dk ** -0.5 if scale is None else scale
    q = q.astype(f32) * scale
    k, v = (jnp.repeat(x.astype(f32), group, axis=2) for x in (k, v))
    s0 = jnp.zeros((B, H, Dk, v.shape[-1]), f32) if initial_state is None else initial_state
    log_decay = jnp.log(decay.astype(f32))  # [H]
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    mask = jnp.where(j <= i, jnp.exp(log_decay[:, None, None] * jnp.maximum(i - j, 0)), 0.0)  # [H, T, T]
    scores = jnp.einsum("bihd,bjhd->bhij", q, k) * mask
    pos = jnp.arange(T, dtype=f32)[:, None, None]  # [T, 1, 1] against [B, T, H, D]
    per_head = log_decay[:, None]  # [H, 1]
    out = (jnp.einsum("bhij,bjhe->bihe", scores, v)
           + jnp.einsum("bihd,bhde->bihe", q * jnp.exp(per_head * (pos + 1)), s0))
    state = (jnp.exp(log_decay * T)[:, None, None] * s0
             + jnp.einsum("bjhd,bjhe->bhde", k * jnp.exp(per_head * (T - 1 - pos)), v))
    return out, state


def _inputs(B=1, T=37, H=4, Hkv=2, Dk=16, Dv=8, decay=(1.0, 0.9, 0.5, 0.99), with_state=True, dtype=jnp.float32):
    q, k, v = random_qkv(jax.random.PRNGKey(T), B=B, T=T, Hq=H, Hkv=Hkv, D=Dk, Dv=Dv, dtype=dtype)
    s0 = jax.random.normal(jax.random.PRNGKey(7), (B, H, Dk, Dv), jnp.float32) if with_state else None
    return q, k, v, jnp.asarray(decay, jnp.float32), s0


def _flat(out, state):
    """Output and final state in one vector, so one cotangent exercises both."""
    return jnp.concatenate([out.astype(jnp.float32).ravel(), state.ravel()])


def outputs_and_grads(fn, args, argnums):
    """``((out, final_state), grads)`` of ``sum(_flat(*fn(*args)) * w)`` (the fixed random cotangent ``w`` of
    ``tests.helpers.grads``) from one compile: the gradient's forward pass gives the outputs."""
    w = jax.random.normal(jax.random.PRNGKey(123), jax.eval_shape(lambda *a: _flat(*fn(*a)), *args).shape,
                          jnp.float32)

    def loss(*a):
        out, state = fn(*a)
        return jnp.sum(_flat(out, state) * w), (out, state)

    (_, outputs), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(argnums), has_aux=True))(*args)
    return outputs, g


def check(kernel, reference, args, argnums, names, rtol=None, grad_rtol=None):
    """The kernel's output, final state and gradients against the reference's (one compile each);
    returns both ``(out, final_state)`` pairs."""
    (out, state), g = outputs_and_grads(kernel, args, argnums)
    (ref_out, ref_state), g_ref = outputs_and_grads(reference, args, argnums)
    assert_close(out, ref_out, rtol=rtol, name="out")
    assert_close(state, ref_state, rtol=rtol, name="final_state")
    for a, e, n in zip(g, g_ref, names):
        assert_close(a, e, rtol=grad_rtol, name=f"d{n}")
    return (out, state), (ref_out, ref_state)


CASES = {
    # name: (input kwargs, call kwargs). The first case mixes no decay (λ = 1) and strong decay.
    "gqa_ragged_c16": (dict(decay=(1.0, 0.9, 0.02, 0.99)), dict(chunk_size=16)),
    "mqa_c64_scale": (dict(T=70, H=2, Hkv=1, decay=(0.95, 1.0), with_state=False), dict(chunk_size=64, scale=0.3)),
    "no_decay": (dict(T=33, H=2, Hkv=2, decay=(1.0, 1.0)), dict(chunk_size=16)),
    "strong_decay": (dict(T=40, H=2, Hkv=1, decay=(0.02, 0.3)), dict(chunk_size=16)),
    "one_chunk_c128": (dict(T=20, H=2, Hkv=2, Dk=8, decay=(0.8, 1.0)), dict(chunk_size=128)),
}
DEFAULT_CASES = ("gqa_ragged_c16", "mqa_c64_scale", "one_chunk_c128")
SLOW_PAIRS = (("tpu", "one_chunk_c128"),)
"""(backend, case) pairs in the slow suite: a chunk longer than the sequence is the shared chunking code, run by
the GPU lowering by default."""


def _kernel_fn(backend, **call_kw):
    """Jitted ``(q, k, v, decay, initial_state) -> (out, final_state)`` (jit: one compile, not
    one per op, which keeps interpret mode fast)."""
    return jax.jit(lambda q, k, v, decay, s0: lightning_attention_pallas(
        q, k, v, decay, initial_state=s0, backend=backend, **call_kw))


@pytest.mark.parametrize("backend, case", [
    (b, c) if c in DEFAULT_CASES and (b, c) not in SLOW_PAIRS else pytest.param(b, c, marks=pytest.mark.slow)
    for b in BACKENDS for c in CASES])
def test_matches_naive(backend, case):
    input_kw, call_kw = CASES[case]
    q, k, v, decay, s0 = _inputs(**input_kw)
    scale = call_kw.get("scale")
    kernel = _kernel_fn(backend, **call_kw)
    zero_state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    (out, state), reference = check(kernel, lambda *a: naive_lightning(*a, scale=scale),
                                    (q, k, v, decay, zero_state if s0 is None else s0), range(5),
                                    ["q", "k", "v", "decay", "initial_state"], grad_rtol=1e-4)
    if s0 is None:  # the kernel without an initial state against the reference's (which starts from zeros)
        out, state = kernel(q, k, v, decay, None)
        assert_close(out, reference[0], name="out")
        assert_close(state, reference[1], name="final_state")
    assert out.dtype == q.dtype and state.dtype == jnp.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    q, k, v, decay, s0 = _inputs(T=37, dtype=jnp.bfloat16)
    rtol = TOLERANCE[jnp.bfloat16]
    (out, _), _ = check(_kernel_fn(backend, chunk_size=16), naive_lightning, (q, k, v, decay, s0), range(5),
                   ["q", "k", "v", "decay", "initial_state"], rtol=rtol, grad_rtol=rtol)
    assert out.dtype == jnp.bfloat16


def test_state_carries_across_calls():
    """Two jitted calls chained through final_state equal one call over both halves: the padded
    last chunk of the first call neither adds to nor over-decays the state."""
    q, k, v, decay, s0 = _inputs(T=42)
    kernel = _kernel_fn("gpu", chunk_size=16)
    out, state = kernel(q, k, v, decay, s0)
    out1, state1 = kernel(q[:, :21], k[:, :21], v[:, :21], decay, s0)
    out2, state2 = kernel(q[:, 21:], k[:, 21:], v[:, 21:], decay, state1)
    assert_close(jnp.concatenate([out1, out2], axis=1), out, name="out")
    assert_close(state2, state, name="final_state")


def test_vmap():
    """vmap over an extra leading axis (GPU lowering: jax 0.10's TPU interpret mode does not extend
    ``dimension_semantics`` for the grid axis that vmap adds; compiled Mosaic does)."""
    q, k, v, decay, s0 = _inputs(T=20, H=2, Hkv=1, decay=(0.9, 0.5))
    qs, ks, vs = (jnp.stack([x, 2 * x]) for x in (q, k, v))

    def kernel(q, k, v):
        return lightning_attention_pallas(q, k, v, decay, initial_state=s0, chunk_size=16, backend="gpu")

    def reference(q, k, v):
        return naive_lightning(q, k, v, decay, s0)

    check(jax.vmap(kernel), jax.vmap(reference), (qs, ks, vs), range(3), ["q", "k", "v"], grad_rtol=1e-4)


def test_rejects_bad_input():
    q, k, v = jnp.zeros((1, 8, 4, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 8))
    decay = jnp.ones((4,))
    with pytest.raises(ValueError, match="decay"):
        lightning_attention_pallas(q, k, v, decay[:2])
    with pytest.raises(ValueError, match="H % Hkv"):
        lightning_attention_pallas(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), decay)
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention_pallas(q, k, v, decay, initial_state=jnp.zeros((1, 1, 16, 8)))
    with pytest.raises(ValueError, match="backend"):
        lightning_attention_pallas(q, k, v, decay, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attention_pallas(q, k, v, decay, chunk_size=0)
    with pytest.raises(TypeError, match="dtype"):
        lightning_attention_pallas(q.astype(jnp.bfloat16), k, v, decay)


def test_matches_attnjax_linear():
    q, k, v, decay, s0 = _inputs(T=37)
    kernel = _kernel_fn("gpu", chunk_size=16)
    xla = jax.jit(lambda q, k, v, decay, s0: linear.linear_attention(
        q, k, v, feature_map="identity", normalize=False, decay=decay, chunk_size=16, initial_state=s0,
        return_state=True, implementation="xla"))
    out, state = kernel(q, k, v, decay, s0)
    ref_out, ref_state = xla(q, k, v, decay, s0)
    assert_close(out, ref_out, name="out")
    assert_close(state, ref_state, name="final_state")


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a real GPU or TPU (compiled kernel)")
def test_compiled_on_accelerator():
    q, k, v, decay, s0 = _inputs(B=2, T=200, H=4, Hkv=2, Dk=64, Dv=64)
    kernel = _kernel_fn(None, chunk_size=64, interpret=False)
    out, state = kernel(q, k, v, decay, s0)
    ref_out, ref_state = naive_lightning(q, k, v, decay, s0)
    assert_close(out, ref_out, rtol=1e-3, name="out")  # TF32 / MXU f32 passes
    assert_close(state, ref_state, rtol=1e-3, name="final_state")
    assert_grads_close(lambda *a: _flat(*kernel(*a)), lambda *a: _flat(*naive_lightning(*a)),
                       (q, k, v, decay, s0), argnums=range(5), rtol=1e-3)
