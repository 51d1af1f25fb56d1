"""Softmax attention: the blocked ``xla`` path against the reference and jax.nn, forward and grads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.dropout import dropout_seed, keep_mask
from attnjax.positional import ALiBi, alibi_slopes
from tests.helpers import TOLERANCE, assert_close, assert_grads_close, assert_outputs_and_grads_close, grads, random_qkv

KEY = jax.random.PRNGKey(0)
BLOCKS = dict(block_q=8, block_kv=16)


def xla(**kw):
    return functools.partial(aj.softmax.flash_attention_xla, **BLOCKS, **kw)


def ref(**kw):
    return functools.partial(aj.softmax.softmax_attention_reference, **kw)


def jax_nn(q, k, v, mask=None, bias=None, scale=None):
    """jax.nn.dot_product_attention with our mask/bias made dense."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    dense = None if mask is None else jnp.broadcast_to(mask.dense(T, S), (B, H, T, S))
    return jax.nn.dot_product_attention(q, k, v, mask=dense, bias=bias, scale=scale)


def segment_ids(B, L, key=KEY, num=3):
    """Sorted random segment ids [B, L] (packed sequences)."""
    cuts = jax.random.randint(key, (B, L), 0, num)
    return jnp.sort(cuts, axis=1)


def check_against_reference(q, k, v, rtol=None, argnums=(0, 1, 2), **kw):
    assert_outputs_and_grads_close(xla(**kw), ref(**kw), (q, k, v), argnums, rtol=rtol, names="qkv")


T, S = 37, 45
MASKS = {
    "none": lambda: None,
    "full": lambda: masks.Full(),
    "causal": lambda: masks.Causal(),
    "window": lambda: masks.SlidingWindow(5, 3),
    "causal_window": lambda: masks.SlidingWindow(6, 0),
    "chunked": lambda: masks.ChunkedCausal(8),
    "segments": lambda: masks.Segments(segment_ids(2, T), segment_ids(2, S, jax.random.PRNGKey(1))),
    "explicit": lambda: masks.Explicit(jax.random.bernoulli(KEY, 0.7, (2, 1, T, S))),
    "causal&segments": lambda: masks.Causal() & masks.Segments(segment_ids(2, T), segment_ids(2, S)),
    "window|explicit": lambda: masks.SlidingWindow(2, 2) | masks.Explicit(jnp.arange(S) < 3),
}


SLOW_MASKS = ("full", "causal_window", "chunked")
"""Masks whose structure another case already covers (none, window, causal): the slow suite runs them."""


@pytest.mark.parametrize("name", [n if n not in SLOW_MASKS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MASKS])
def test_masks_against_reference_and_jax_nn(name):
    mask = MASKS[name]()
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=16)
    check_against_reference(q, k, v, mask=mask)
    out = ref(mask=mask)(q, k, v)
    has_key = np.asarray(jnp.broadcast_to((masks.Full() if mask is None else mask).dense(T, S), (2, 4, T, S)).any(-1))
    expected = np.asarray(jax_nn(q, k, v, mask=mask))
    np.testing.assert_allclose(np.asarray(out)[has_key.transpose(0, 2, 1)],
                               expected[has_key.transpose(0, 2, 1)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,Hkv", [pytest.param(4, 4, marks=pytest.mark.slow), pytest.param(4, 2, marks=pytest.mark.slow),
                                     (6, 1)])  # MHA: every other test; GQA groups of 2: the mask tests
def test_gqa_and_mqa(Hq, Hkv):
    q, k, v = random_qkv(KEY, B=1, T=20, Hq=Hq, Hkv=Hkv, D=8, Dv=12)
    check_against_reference(q, k, v, mask=masks.Causal())
    q, k, v = random_qkv(KEY, B=1, T=20, Hq=Hq, Hkv=Hkv, D=8)  # jax.nn needs Dv == D
    assert_close(ref(mask=masks.Causal())(q, k, v), jax_nn(q, k, v, mask=masks.Causal()), name="vs jax.nn")


@pytest.mark.parametrize("T_,S_", [pytest.param(1, 30, marks=pytest.mark.slow), (7, 40), (40, 7),
                                    pytest.param(33, 33, marks=pytest.mark.slow)])
def test_cross_lengths_bottom_right_alignment(T_, S_):
    q, k, v = random_qkv(KEY, B=1, T=T_, S=S_, Hq=2, D=8)
    mask = masks.Causal()
    check_against_reference(q, k, v, mask=mask)
    dense = np.asarray(mask.dense(T_, S_))[0, 0]
    assert dense[-1].all() or T_ > S_, "last query sees every key when T <= S"
    assert dense.sum() == sum(min(S_, max(0, i + S_ - T_ + 1)) for i in range(T_))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.slow)])
def test_low_precision(dtype):
    q, k, v = random_qkv(KEY, B=1, T=40, S=40, Hq=4, Hkv=2, D=16, dtype=dtype)
    mask = masks.Causal()
    out = xla(mask=mask)(q, k, v)
    assert out.dtype == dtype
    exact = ref(mask=mask)(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert_close(out, exact, rtol=TOLERANCE[dtype], name="out vs f32")
    assert_close(ref(mask=mask)(q, k, v), exact, rtol=TOLERANCE[dtype], name="ref vs f32")
    g_low = grads(xla(mask=mask), (q, k, v), (0, 1, 2))
    g_f32 = grads(ref(mask=mask), tuple(x.astype(jnp.float32) for x in (q, k, v)), (0, 1, 2))
    for a, e, n in zip(g_low, g_f32, "qkv"):
        assert a.dtype == dtype
        assert_close(a, e, rtol=3 * TOLERANCE[dtype], name=f"d{n}")


def test_bf16_large_logits_do_not_overflow():
    q, k, v = random_qkv(KEY, B=1, T=64, Hq=2, D=16, dtype=jnp.bfloat16)
    out = xla(mask=masks.Causal(), scale=30.0)(q * 10, k * 10, v)
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, ref(mask=masks.Causal(), scale=30.0)(q * 10, k * 10, v), rtol=3e-2)


def test_soft_cap():
    q, k, v = random_qkv(KEY, B=1, T=30, Hq=2, D=16)
    check_against_reference(q * 4, k * 4, v, mask=masks.Causal(), logits_soft_cap=5.0)
    capped = ref(logits_soft_cap=5.0)(q * 4, k * 4, v)
    assert not np.allclose(capped, ref()(q * 4, k * 4, v), atol=1e-3), "the cap changes the result"


@pytest.mark.parametrize("shape", [pytest.param((2, 4, 30, 35), marks=pytest.mark.slow), (1, 4, 30, 35), (2, 1, 1, 35),
                                   (30, 35), (1, 4, 1, 35)])  # a full [B, H, T, S] bias: its batch axis is the first case's
def test_array_bias_and_its_gradient(shape):
    q, k, v = random_qkv(KEY, B=2, T=30, S=35, Hq=4, Hkv=2, D=8)
    bias = jax.random.normal(jax.random.PRNGKey(5), shape)
    fx = lambda q, k, v, b: xla(mask=masks.Causal(), bias=b)(q, k, v)
    fr = lambda q, k, v, b: ref(mask=masks.Causal(), bias=b)(q, k, v)
    assert_outputs_and_grads_close(fx, fr, (q, k, v, bias), (0, 1, 2, 3), names=["q", "k", "v", "bias"])
    assert_close(ref(bias=bias)(q, k, v), jax_nn(q, k, v, bias=jnp.broadcast_to(
        bias.reshape((1,) * (4 - bias.ndim) + bias.shape), (2, 4, 30, 35))), name="vs jax.nn")


def test_alibi_matches_dense_bias():
    q, k, v = random_qkv(KEY, B=1, T=33, Hq=4, D=8)
    alibi = ALiBi(jnp.asarray(alibi_slopes(4)))
    dense = alibi.dense(33, 33)
    assert dense.shape == (1, 4, 33, 33)
    check_against_reference(q, k, v, mask=masks.Causal(), bias=alibi)
    assert_close(xla(mask=masks.Causal(), bias=alibi)(q, k, v), ref(mask=masks.Causal(), bias=dense)(q, k, v))


def test_sinks_forward_and_gradient():
    q, k, v = random_qkv(KEY, B=2, T=25, Hq=4, Hkv=2, D=8)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    fx = lambda q, k, v, s: xla(mask=masks.SlidingWindow(4, 0), sinks=s)(q, k, v)
    fr = lambda q, k, v, s: ref(mask=masks.SlidingWindow(4, 0), sinks=s)(q, k, v)
    assert_outputs_and_grads_close(fx, fr, (q, k, v, sinks), (0, 1, 2, 3), names=["q", "k", "v", "sinks"])
    assert not np.allclose(fr(q, k, v, sinks), ref(mask=masks.SlidingWindow(4, 0))(q, k, v), atol=1e-3)


def test_sink_equals_zero_value_key():
    q, k, v = random_qkv(KEY, B=1, T=12, Hq=2, D=8)
    """A sink logit s is a key with zero value and logit s: a zero key plus a bias column s."""
    s = 1.5
    k0 = jnp.concatenate([jnp.zeros_like(k[:, :1]), k], 1)
    v0 = jnp.concatenate([jnp.zeros_like(v[:, :1]), v], 1)
    bias = jnp.concatenate([jnp.full((12, 1), s), jnp.zeros((12, 12))], 1)
    expected = ref(bias=bias)(q, k0, v0)
    assert_close(xla(sinks=jnp.full((2,), s))(q, k, v), expected)


def test_return_lse_and_its_gradient():
    q, k, v = random_qkv(KEY, B=1, T=30, S=36, Hq=4, Hkv=2, D=8)
    mask = masks.Causal() & masks.SlidingWindow(10, None)
    out, lse = xla(mask=mask, return_lse=True)(q, k, v)
    out_r, lse_r = ref(mask=mask, return_lse=True)(q, k, v)
    assert lse.shape == (1, 30, 4) and lse.dtype == jnp.float32
    assert_close(lse, lse_r, name="lse")
    logits = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(8)
    logits = jnp.where(mask.dense(30, 36), logits, -jnp.inf)
    assert_close(lse, jax.nn.logsumexp(logits, -1).transpose(0, 2, 1), name="lse vs logsumexp")
    fx = lambda q, k, v: jnp.sum(jnp.sin(xla(mask=mask, return_lse=True)(q, k, v)[1]))
    fr = lambda q, k, v: jnp.sum(jnp.sin(ref(mask=mask, return_lse=True)(q, k, v)[1]))
    for a, e in zip(jax.grad(fx, (0, 1, 2))(q, k, v), jax.grad(fr, (0, 1, 2))(q, k, v)):
        assert_close(a, e, name="grad through lse")


def test_fully_masked_rows_give_zero_and_finite_grads():
    q, k, v = random_qkv(KEY, B=1, T=20, Hq=2, D=8)
    allowed = jnp.ones((20, 20), bool).at[3].set(False).at[11:17].set(False)
    mask = masks.Explicit(allowed) & masks.Causal()
    for fn in (xla(mask=mask), ref(mask=mask)):
        out = fn(q, k, v)
        np.testing.assert_array_equal(np.asarray(out[0, 3]), 0.0)
        np.testing.assert_array_equal(np.asarray(out[0, 11:17]), 0.0)
        for g in grads(fn, (q, k, v), (0, 1, 2)):
            assert np.all(np.isfinite(np.asarray(g)))
    check_against_reference(q, k, v, mask=mask)
    _, lse = xla(mask=mask, return_lse=True)(q, k, v)
    assert np.all(np.isneginf(np.asarray(lse[0, 3])))


def test_dropout_deterministic_and_matches_reference():
    q, k, v = random_qkv(KEY, B=2, T=30, Hq=4, Hkv=2, D=8)
    rng = jax.random.PRNGKey(7)
    kw = dict(mask=masks.Causal(), dropout_rate=0.3, rng=rng)
    a, b = xla(**kw)(q, k, v), xla(**kw)(q, k, v)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check_against_reference(q, k, v, **kw)
    other = xla(mask=masks.Causal(), dropout_rate=0.3, rng=jax.random.PRNGKey(8))(q, k, v)
    assert not np.allclose(a, other)
    assert not np.allclose(a, xla(mask=masks.Causal())(q, k, v))


def test_dropout_keep_rate():
    keep = keep_mask(dropout_seed(jax.random.PRNGKey(0)), jnp.arange(2), jnp.arange(4), jnp.arange(128),
                     jnp.arange(128), 0.25)
    assert abs(float(keep.mean()) - 0.75) < 0.01
    assert abs(float(keep[0, 0].mean(0).std()) - np.sqrt(0.75 * 0.25 / 128)) < 0.02


def test_jit_and_vmap():
    q, k, v = random_qkv(KEY, B=3, T=20, Hq=2, D=8)
    mask = masks.Causal()
    expected = ref(mask=mask)(q, k, v)
    assert_close(jax.jit(xla(mask=mask))(q, k, v), expected, name="jit")
    per_example = jax.vmap(lambda a, b, c: xla(mask=mask)(a[None], b[None], c[None])[0])(q, k, v)
    assert_close(per_example, expected, name="vmap")
    seg = segment_ids(3, 20)
    vm = jax.vmap(lambda a, b, c, s: xla(mask=masks.Segments(s[None]))(a[None], b[None], c[None])[0])
    assert_close(vm(q, k, v, seg), ref(mask=masks.Segments(seg))(q, k, v), name="vmap over segment ids")


def test_memory_is_linear_in_length():
    """Compiled temp memory of the blocked path grows ~linearly; the reference's quadratically."""
    def temp_bytes(fn, L):
        q = jax.ShapeDtypeStruct((1, L, 2, 32), jnp.float32)
        loss = lambda q, k, v: jnp.sum(fn(q, k, v))
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blocked = functools.partial(aj.softmax.flash_attention_xla, mask=masks.Causal(), block_q=128, block_kv=128)
    small, large = temp_bytes(blocked, 1024), temp_bytes(blocked, 4096)
    assert large < 6 * small, (small, large)
    dense_large = temp_bytes(ref(mask=masks.Causal()), 4096)
    assert dense_large > 10 * large, (dense_large, large)


@pytest.mark.parametrize("name", ["causal", "window", "chunked", "causal&segments"])
def test_gradients_match_jax_nn(name):
    """Every row keeps at least one key here, so jax.nn's masking convention agrees with ours."""
    q, k, v = random_qkv(KEY, B=2, T=24, Hq=4, Hkv=2, D=8)
    mask = {"causal": masks.Causal(), "window": masks.SlidingWindow(3, 3), "chunked": masks.ChunkedCausal(8),
            "causal&segments": masks.Causal() & masks.Segments(segment_ids(2, 24))}[name]
    assert_grads_close(xla(mask=mask), lambda q, k, v: jax_nn(q, k, v, mask=mask), (q, k, v), (0, 1, 2),
                       names="qkv")


def test_public_backward_with_external_statistics_matches_autodiff():
    """``flash_attention_xla_backward`` given the forward's own out and lse equals the gradient of the reference."""
    q, k, v = random_qkv(jax.random.PRNGKey(7), T=37, S=45, Hq=4, Hkv=2)
    mask = masks.Causal()
    out, lse = aj.softmax.softmax_attention_reference(q, k, v, mask=mask, return_lse=True)
    d_out = jnp.asarray(np.random.default_rng(0).standard_normal(out.shape), jnp.float32)
    actual = aj.softmax.flash_attention_xla_backward(q, k, v, out, lse, d_out, mask=mask, block_q=16, block_kv=16)
    _, vjp = jax.vjp(lambda q, k, v: aj.softmax.softmax_attention_reference(q, k, v, mask=mask), q, k, v)
    for a, e, name in zip(actual, vjp(d_out), "qkv"):
        assert_close(a, e, name=f"d{name}")
