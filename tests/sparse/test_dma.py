"""Dynamic mask attention (Shi et al. 2025): key lists against a NumPy brute force, the token-engine path
against the dense reference (forward and gradients, bias included), and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse.dma import dynamic_mask_attention, dynamic_mask_bias, dynamic_mask_lists
from tests.helpers import assert_close, random_qkv

B, HQ, HKV, D, KEEP = 2, 4, 2, 8, 5


def inputs(T=13, S=13, dtype=jnp.float32, seed=0):
    q, k, v = random_qkv(jax.random.PRNGKey(seed), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D, dtype=dtype)
    bias = jnp.asarray(np.random.default_rng(seed).standard_normal((B, HKV, S)), jnp.float32)
    return q, k, v, bias


def brute_force_lists(bias, keep, T, causal):
    """Per (b, kv head, query): the kept key set, by sorting each allowed prefix in plain Python."""
    bias = np.asarray(bias)
    S = bias.shape[-1]
    out = {}
    for b in range(bias.shape[0]):
        for h in range(bias.shape[1]):
            for i in range(T):
                last = i + S - T if causal else S - 1
                keys = sorted(range(last + 1), key=lambda j: -bias[b, h, j])
                out[b, h, i] = set(keys[:keep])
    return out


@pytest.mark.parametrize("causal,T", [(False, 13), (True, 13), (True, 9)])
def test_key_lists_match_brute_force_and_never_look_ahead(causal, T):
    _, _, _, bias = inputs(seed=3)
    S = bias.shape[-1]
    ids = np.asarray(dynamic_mask_lists(bias, KEEP, num_heads=HQ, T=T, causal=causal).indices)
    assert ids.shape == (B, HQ, T if causal else 1, KEEP)
    want = brute_force_lists(bias, KEEP, T, causal)
    for (b, h, i), keys in want.items():
        for g in range(HQ // HKV):
            row = ids[b, h * (HQ // HKV) + g, i if causal else 0]
            assert set(row[row >= 0].tolist()) == keys, (b, h, i)
            if causal:
                assert row.max() <= i + S - T, "a causal list holds a later key"


@pytest.mark.parametrize("mask_name,T", [pytest.param("none", 13, marks=pytest.mark.slow), ("causal", 9)])
def test_xla_matches_reference_forward_and_gradients(mask_name, T):
    q, k, v, bias = inputs(T=T)
    mask = masks.Causal() if mask_name == "causal" else None

    def run(impl, q, k, v, bias):
        out, lse = dynamic_mask_attention(q, k, v, bias, keep=KEEP, mask=mask, implementation=impl, return_lse=True)
        return out, jnp.where(jnp.isfinite(lse), lse, 0.0)

    out_shape = jax.eval_shape(lambda *a: run("reference", *a), q, k, v, bias)[0].shape
    w = jax.random.normal(jax.random.PRNGKey(9), out_shape)

    def loss(impl, *a):
        out, lse = run(impl, *a)
        return (out * w).sum() + lse.sum(), (out, lse)

    # each path's (out, lse) and gradients from one compile
    outputs_and_grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4), has_aux=True), static_argnums=0)
    g_ref, ref = outputs_and_grads("reference", q, k, v, bias)
    g_fast, fast = outputs_and_grads("xla", q, k, v, bias)
    assert_close(fast[0], ref[0], name="out")
    assert_close(fast[1], ref[1], name="lse")
    for name, a, e in zip(("q", "k", "v", "bias"), g_fast, g_ref):
        assert_close(a, e, atol=1e-4, name=f"d{name}")
    assert float(jnp.abs(g_fast[3]).max()) > 0, "the bias gets a gradient"


@pytest.mark.slow
def test_keeping_every_key_is_softmax_with_the_bias_and_gradients_reach_w_dt_and_a():
    q, k, v, _ = inputs()
    rng = np.random.default_rng(4)
    w_dt = jnp.asarray(rng.standard_normal((HKV * D, HKV)), jnp.float32)
    a = jnp.asarray([0.5, -1.0], jnp.float32)

    def dma(w_dt, a, keep):
        return dynamic_mask_attention(q, k, v, dynamic_mask_bias(v, w_dt, a), keep=keep, mask=masks.Causal(),
                                      implementation="xla")

    bias = dynamic_mask_bias(v, w_dt, a)
    np.testing.assert_allclose(np.asarray(bias), np.asarray(a)[None, :, None] * np.log1p(np.exp(
        np.einsum("bsf,fh->bhs", np.asarray(v).reshape(B, -1, HKV * D), np.asarray(w_dt)))), rtol=1e-5, atol=1e-6)
    dense = softmax_attention_reference(q, k, v, mask=masks.Causal(),
                                        bias=jnp.repeat(bias, HQ // HKV, axis=1)[:, :, None, :])
    assert_close(jax.jit(dma, static_argnums=2)(w_dt, a, 13), dense, name="keep=S")
    g = jax.jit(jax.grad(lambda w, a: (dma(w, a, KEEP) ** 2).sum(), argnums=(0, 1)))(w_dt, a)
    assert all(float(jnp.abs(x).max()) > 0 for x in g), "W_dt and A are trained through the bias"


def test_bf16_is_finite_and_keeps_its_dtype():
    q, k, v, bias = inputs(dtype=jnp.bfloat16)
    out = jax.jit(lambda *a: dynamic_mask_attention(*a, keep=KEEP, mask=masks.Causal(), implementation="xla"))(
        q, k, v, bias)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, bias = inputs()
    with pytest.raises(ValueError, match=r"bias must be \[B, Hkv, S\] = \(2, 2, 13\)"):
        dynamic_mask_attention(q, k, v, bias[:, :1], keep=KEEP)
    with pytest.raises(TypeError, match="bias must be a float array"):
        dynamic_mask_attention(q, k, v, bias.astype(jnp.int32), keep=KEEP)
    with pytest.raises(ValueError, match="keep"):
        dynamic_mask_attention(q, k, v, bias, keep=0)
    with pytest.raises(ValueError, match=r"expected w_dt \(16, 2\)"):
        dynamic_mask_bias(v, jnp.zeros((8, 2)), jnp.zeros((2,)))
    with pytest.raises(NotImplementedError):
        dynamic_mask_attention(q, k, v, bias, keep=KEEP, implementation="pallas")
