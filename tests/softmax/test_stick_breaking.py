"""Stick-breaking attention (attnjax.softmax.stick_breaking, pallas_kernels.stick_breaking).

The dense reference is checked by hand (3 tokens) and for its weights' invariants; the blocked
XLA path and the Pallas kernels (GPU kernel in interpret mode, TPU kernel in TPU interpret mode)
are compared with it, forward and gradients, each in one jit compiled at XLA's lowest backend
optimization level (the interpreted kernels are compile-bound on CPU).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax as aj
from attnjax import masks
from attnjax.positional import ALiBi, alibi_slopes
from attnjax.softmax import stick_breaking as sb
from pallas_kernels.stick_breaking import stick_breaking_attention_pallas
from pallas_kernels.stick_breaking.tiles import own_key_allowed
from tests.helpers import TOLERANCE, assert_close, random_qkv

KEY = jax.random.PRNGKey(0)
CAUSAL = masks.Causal()


def ref(**kw):
    return functools.partial(sb.stick_breaking_attention_reference, **kw)


def xla(**kw):
    return functools.partial(sb.stick_breaking_attention_xla, block_q=8, block_kv=16, **kw)


def gpu(**kw):
    return functools.partial(stick_breaking_attention_pallas, block_q=16, block_kv=16, backend="cpu", **kw)


def tpu(**kw):
    return functools.partial(stick_breaking_attention_pallas, block_q=16, block_kv=16, backend="tpu", interpret=True, **kw)


def out_and_grads(fn, args, argnums=(0, 1, 2)):
    """Output and gradients of ``sum(fn(*args) * w)`` (fixed random ``w``), in one fast jit."""
    w = jax.random.normal(jax.random.PRNGKey(123), jax.eval_shape(fn, *args).shape, jnp.float32)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    jitted = jax.jit(jax.value_and_grad(loss, argnums=tuple(argnums), has_aux=True))
    compiled = jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    (_, out), g = compiled(*args)
    return out, g


def check(fn, expected, args, argnums=(0, 1, 2), names="qkv", rtol=None):
    out, g = out_and_grads(fn, args, argnums)
    out_e, g_e = out_and_grads(expected, args, argnums)
    assert out.dtype == out_e.dtype == args[0].dtype
    assert_close(out, out_e, rtol=rtol, name="out")
    for a, e, n in zip(g, g_e, names):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, rtol=rtol, name=f"d{n}")


def segment_ids(B, L, key=KEY, num=3):
    return jnp.sort(jax.random.randint(key, (B, L), 0, num), axis=1)


# ------------------------------------------------------------------------------------- reference


def three_tokens():
    """z_10 = z_20 = 0 (β = 1/2), z_21 = log 3 (β = 3/4): q = 1, k = (0, log 3, 5), scale 1."""
    q = jnp.ones((1, 3, 1, 1))
    k = jnp.array([0.0, math.log(3.0), 5.0]).reshape(1, 3, 1, 1)
    v = jnp.array([1.0, 10.0, 100.0]).reshape(1, 3, 1, 1)
    return q, k, v


def test_three_tokens_by_hand():
    # Row 1: A_10 = 1/2, r = 1/2.  Row 2: A_21 = 3/4, A_20 = 1/2·(1 − 3/4) = 1/8, r = 1/2·1/4 = 1/8.
    # Row 0 has no earlier key: r = 1, out = v_0.  The diagonal (z_11 = log 3, z_22 = 5) is unused.
    q, k, v = three_tokens()
    a, r = sb.stick_breaking_weights(q, k, mask=CAUSAL, scale=1.0)
    np.testing.assert_allclose(a[0, 0], [[0, 0, 0], [0.5, 0, 0], [0.125, 0.75, 0]], atol=1e-6)
    np.testing.assert_allclose(r[0, :, 0], [1.0, 0.5, 0.125], atol=1e-6)
    expected = [1.0, 0.5 * 1 + 0.5 * 10, 0.125 * 1 + 0.75 * 10 + 0.125 * 100]
    for fn in (ref, xla, gpu):
        out, rem = jax.jit(fn(mask=CAUSAL, scale=1.0, return_remainder=True))(q, k, v)
        np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)
        np.testing.assert_allclose(rem[0, :, 0], [1.0, 0.5, 0.125], rtol=1e-6)


def test_weights_are_a_broken_stick():
    """A ≥ 0, zero on and above the diagonal, rows sum to ≤ 1, and the remainder 1 − Σ_j A_ij is
    the unbroken stick ∏_{j<i} (1 − β_ij) (logits large enough to saturate some β)."""
    q, k, _ = random_qkv(KEY, B=2, T=40, Hq=2, D=16)
    a, r = jax.jit(functools.partial(sb.stick_breaking_weights, mask=CAUSAL, scale=1.0))(q, k)
    assert a.shape == (2, 2, 40, 40) and r.shape == (2, 40, 2)
    assert float(a.min()) >= 0.0
    assert float(jnp.abs(jnp.triu(a)).max()) == 0.0
    assert float(a.sum(-1).max()) <= 1.0 + 1e-6
    assert float(a.sum(-1).max()) > 0.99  # some rows use up (almost) the whole stick
    beta = jax.nn.sigmoid(jnp.einsum("bthd,bshd->bhts", q, k))
    unbroken = jnp.prod(jnp.where(jnp.tril(jnp.ones((40, 40), bool), -1), 1 - beta, 1.0), axis=-1)
    assert_close(r, unbroken.transpose(0, 2, 1), atol=1e-6)


def test_recency_equal_logits():
    """With equal logits the nearest key gets the most weight, A_i,i−d = β(1 − β)^(d−1)."""
    T, z = 6, 0.3
    q = jnp.ones((1, T, 1, 1))
    k = jnp.full((1, T, 1, 1), z)
    a, _ = jax.jit(functools.partial(sb.stick_breaking_weights, mask=CAUSAL, scale=1.0))(q, k)
    beta = 1 / (1 + math.exp(-z))
    np.testing.assert_allclose(a[0, 0, T - 1, :T - 1], [beta * (1 - beta) ** (T - 2 - j) for j in range(T - 1)],
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------- xla path


def test_xla_matches_reference_f32_gqa_segments_cap_array_bias():
    """Odd T (5 ragged query tiles), GQA, causal & packed segments, soft cap, array bias (and its
    gradient)."""
    q, k, v = random_qkv(jax.random.PRNGKey(1), B=2, T=37, Hq=4, Hkv=2, D=16)
    bias = jax.random.normal(KEY, (1, 4, 37, 37))
    options = dict(mask=CAUSAL & masks.Segments(segment_ids(2, 37)), logits_soft_cap=2.0)
    check(lambda q, k, v, b: xla(bias=b, **options)(q, k, v), lambda q, k, v, b: ref(bias=b, **options)(q, k, v),
          (q, k, v, bias), argnums=(0, 1, 2, 3), names=["q", "k", "v", "bias"])


def test_xla_matches_reference_bf16_cross_mqa_window_alibi():
    """bf16; T < S (queries are the last T positions, the remainder takes v at i + S − T); MQA;
    Dv != D; a causal sliding window; ALiBi."""
    args = random_qkv(jax.random.PRNGKey(2), B=1, T=21, S=37, Hq=2, Hkv=1, D=16, Dv=8, dtype=jnp.bfloat16)
    options = dict(mask=masks.SlidingWindow(11, 0), bias=ALiBi(alibi_slopes(2)))
    check(xla(**options), ref(**options), args, rtol=TOLERANCE[jnp.bfloat16])


# ------------------------------------------------------------------------------------------ pallas


def test_pallas_gpu_interpret_matches_reference():
    """GQA, odd T (3 ragged tiles), causal & packed segments, soft cap."""
    args = random_qkv(jax.random.PRNGKey(2), B=2, T=37, Hq=4, Hkv=2, D=16)
    options = dict(mask=CAUSAL & masks.Segments(segment_ids(2, 37)), logits_soft_cap=3.0)
    check(gpu(**options), ref(**options), args)


def test_pallas_gpu_interpret_bf16_cross():
    args = random_qkv(jax.random.PRNGKey(3), B=1, T=20, S=37, Hq=2, D=16, dtype=jnp.bfloat16)
    check(gpu(mask=masks.ChunkedCausal(8)), ref(mask=masks.ChunkedCausal(8)), args, rtol=TOLERANCE[jnp.bfloat16])


@pytest.mark.slow
def test_pallas_tpu_interpret_matches_reference():
    args = random_qkv(jax.random.PRNGKey(4), B=1, T=37, Hq=2, Hkv=1, D=16)
    options = dict(mask=masks.SlidingWindow(20, 0), logits_soft_cap=3.0)
    check(tpu(**options), ref(**options), args)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_hardware(platform):
    """The kernels lower to Triton / Mosaic (cross-lowering from the CPU host; no device run)."""
    q, k, v = random_qkv(KEY, B=1, T=256, Hq=4, Hkv=2, D=64, dtype=jnp.bfloat16)
    backend = "gpu" if platform == "cuda" else "tpu"

    def loss(q, k, v):
        out = stick_breaking_attention_pallas(q, k, v, mask=CAUSAL, logits_soft_cap=30.0, backend=backend, interpret=False)
        return out.astype(jnp.float32).sum()

    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    assert "stick_breaking_fwd" in text and "stick_breaking_bwd" in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU for the real Triton kernels")
def test_triton_kernels_on_gpu():
    args = random_qkv(KEY, B=2, T=300, Hq=8, Hkv=2, D=64, dtype=jnp.bfloat16)
    exact = tuple(x.astype(jnp.float32) for x in args)
    for mask in (CAUSAL, masks.SlidingWindow(64, 0) & masks.Segments(segment_ids(2, 300))):
        out, g = out_and_grads(functools.partial(stick_breaking_attention_pallas, mask=mask, backend="gpu"), args)
        out_e, g_e = out_and_grads(ref(mask=mask), exact)
        assert_close(out, out_e, rtol=TOLERANCE[jnp.bfloat16], name="out")
        for a, e, n in zip(g, g_e, "qkv"):
            assert_close(a, e, rtol=3 * TOLERANCE[jnp.bfloat16], name=f"d{n}")


# ------------------------------------------------------------------------------- api, module, errors


def test_api_and_registry():
    entry = {e.name: e for e in aj.registry.entries()}["stick_breaking"]
    assert entry.family == "softmax" and entry.implementations == ("reference", "xla", "pallas")
    q, k, v = random_qkv(KEY, B=1, T=19, Hq=4, Hkv=2, D=8)

    def attend(q, k, v):
        return [aj.attention(q, k, v, mechanism=mechanism, mask=CAUSAL, implementation=implementation)
                for mechanism, implementation in (("stick_breaking", "reference"), ("stick_breaking", "auto"),
                                                  (sb.StickBreaking(block_q=8, block_kv=8), "xla"))]

    expected, auto, blocked = jax.jit(attend).lower(q, k, v).compile(
        compiler_options={"xla_backend_optimization_level": 0})(q, k, v)
    assert_close(auto, expected)  # "auto" runs the xla path on CPU
    assert_close(blocked, expected)


def test_multi_head_attention_module():
    x = jax.random.normal(KEY, (2, 11, 16))

    @jax.jit  # one compile for construction, forward and gradients
    def run(x):
        layer = aj.nn.MultiHeadAttention(16, 4, num_kv_heads=2, mechanism="stick_breaking", rngs=nnx.Rngs(0))
        (_, y), grads = nnx.value_and_grad(lambda m: (lambda y: (jnp.sum(y ** 2), y))(m(x, mask=CAUSAL)),
                                           has_aux=True)(layer)
        own = layer.out(jnp.repeat(layer.value(x[:, :1]), 2, axis=2))
        return y, own, jax.tree.leaves(nnx.state(grads))

    y, own, grads = run(x)
    assert y.shape == x.shape
    # The first token has no earlier key: the whole stick is left for its own value.
    assert_close(y[:, :1], own)
    assert grads and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("mask", [None, masks.Full(), masks.SlidingWindow(3, 3), masks.Causal() | masks.Full()])
def test_non_causal_masks_raise(mask):
    q, k, v = random_qkv(KEY, B=1, T=8, Hq=2, D=8)
    for fn in (ref(mask=mask), xla(mask=mask), gpu(mask=mask)):
        with pytest.raises(NotImplementedError, match="causal only"):
            fn(q, k, v)
    with pytest.raises(NotImplementedError):
        aj.attention(q, k, v, mechanism="stick_breaking", mask=mask)


def test_unsupported_options_raise():
    q, k, v = random_qkv(KEY, B=1, T=8, Hq=2, D=8)
    with pytest.raises(NotImplementedError, match="sinks"):
        aj.attention(q, k, v, mechanism="stick_breaking", mask=CAUSAL, sinks=jnp.zeros(2), implementation="xla")
    with pytest.raises(NotImplementedError, match="lse"):
        aj.attention(q, k, v, mechanism="stick_breaking", mask=CAUSAL, return_lse=True)
    with pytest.raises(NotImplementedError, match="dropout"):
        aj.attention(q, k, v, mechanism="stick_breaking", mask=CAUSAL, dropout_rate=0.1, rng=KEY)
    with pytest.raises(NotImplementedError, match="bias"):
        gpu(mask=CAUSAL, bias=ALiBi(alibi_slopes(2)))(q, k, v)
    with pytest.raises(NotImplementedError, match="structural"):
        tpu(mask=CAUSAL & masks.Segments(jnp.zeros((1, 8), jnp.int32)))(q, k, v)
    with pytest.raises(ValueError, match="T <= S"):
        xla(mask=CAUSAL)(q, k[:, :5], v[:, :5])


# ------------------------------------------------------------------------------------------ sweeps


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mask_name", ["causal", "chunked", "causal&segments", "window"])
def test_sweep_against_reference(impl, dtype, mask_name):
    mask = {"causal": CAUSAL, "chunked": masks.ChunkedCausal(24), "window": masks.SlidingWindow(40, 0),
            "causal&segments": CAUSAL & masks.Segments(segment_ids(2, 130))}[mask_name]
    if impl == "tpu" and mask_name == "causal&segments":
        pytest.skip("the TPU kernel evaluates structural masks only")
    fn = {"xla": functools.partial(sb.stick_breaking_attention_xla, block_q=32, block_kv=64),
          "gpu": functools.partial(stick_breaking_attention_pallas, block_q=32, block_kv=64, backend="cpu"),
          "tpu": functools.partial(stick_breaking_attention_pallas, block_q=32, block_kv=64, backend="tpu", interpret=True),
          }[impl]
    args = random_qkv(jax.random.PRNGKey(5), B=2, T=130, Hq=4, Hkv=2, D=32, dtype=dtype)
    check(functools.partial(fn, mask=mask), ref(mask=mask), args, rtol=TOLERANCE[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "gpu"])
def test_vmap_over_an_extra_axis(impl):
    fn = {"xla": xla, "gpu": gpu}[impl](mask=CAUSAL)
    q, k, v = random_qkv(KEY, B=2, T=24, Hq=2, D=16)
    stacked = jax.jit(jax.vmap(fn))(q[:, None], k[:, None], v[:, None])[:, 0]
    assert_close(stacked, ref(mask=CAUSAL)(q, k, v))


@pytest.mark.parametrize("implementation", [pytest.param("reference", marks=pytest.mark.slow), "xla",
                                            pytest.param("pallas", marks=pytest.mark.slow)])
def test_row_with_no_allowed_key_is_zero(implementation):
    """A query whose mask allows no key, its own position included (padding from lengths), outputs 0
    and gets no remainder; the other rows equal attention over the unpadded prefix; grads are finite
    and 0 on the padded rows."""
    q, k, v = random_qkv(KEY, B=2, T=13, Hq=2, Hkv=2, D=8)
    lengths = jnp.array([9, 13])
    mask = CAUSAL & masks.from_lengths(q_lengths=lengths, kv_lengths=lengths)
    call = functools.partial(aj.attention, mechanism="stick_breaking", implementation=implementation)
    (_, out), dq = jax.jit(jax.value_and_grad(lambda q: (lambda y: (jnp.sum(y ** 2), y))(call(q, k, v, mask=mask)),
                                              has_aux=True))(q)  # output and dq from one compile
    assert float(jnp.abs(out[0, 9:]).max()) == 0.0
    prefix = jax.jit(lambda q, k, v: call(q, k, v, mask=CAUSAL))(q[:1, :9], k[:1, :9], v[:1, :9])
    assert_close(out[0, :9], prefix[0], rtol=1e-5, name="unpadded rows")
    assert bool(jnp.all(jnp.isfinite(dq))) and float(jnp.abs(dq[0, 9:]).max()) == 0.0


def test_remainder_is_zero_where_the_own_key_is_masked():
    """``own_key_allowed`` against the dense mask's diagonal, and the reference's remainder follows it."""
    q, k, _ = random_qkv(KEY, B=2, T=7, Hq=2, Hkv=2, D=8, S=11)
    ids = jnp.array([[0] * 11, [0] * 6 + [1] * 5])
    q_ids = jnp.array([[0] * 7, [1] * 3 + [2] * 4])
    mask = CAUSAL & masks.Segments(q_ids, ids)
    dense = mask.tile(jnp.arange(7), jnp.arange(11), 7, 11)                     # [B, 1, T, S]
    diagonal = dense[:, 0, jnp.arange(7), jnp.arange(7) + 4]                    # [B, T]
    own = own_key_allowed(mask, 7, 11)                                          # [B, T, 1]
    np.testing.assert_array_equal(np.broadcast_to(own[..., 0], (2, 7)), diagonal)
    _, r = sb.stick_breaking_weights(q, k, mask=mask)
    assert float(jnp.abs(jnp.where(diagonal[..., None], 0.0, r)).max()) == 0.0
