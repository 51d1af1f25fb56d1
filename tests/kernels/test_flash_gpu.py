"""Pallas flash attention (pallas_kernels.flash): forward and gradients against the reference.

On CPU the GPU (Triton) kernel runs in Pallas interpret mode; every comparison is jitted once
(forward + all gradients in one compile, at XLA's lowest backend optimization level: the
interpreted kernels are compile-bound on CPU) to keep the file fast. The reference is
``attnjax.softmax.softmax_attention_reference``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.dispatch import auto_order
from attnjax.positional import ALiBi, alibi_slopes
from pallas_kernels.common import pick_block
from pallas_kernels.common.gpu import compiler_params
from pallas_kernels.flash import SigmoidWeight, common, flash_attention_pallas
from tests.helpers import TOLERANCE, assert_close, random_qkv

KEY = jax.random.PRNGKey(0)
BLOCKS = dict(block_q=16, block_kv=16)


def pallas(**kw):
    return functools.partial(flash_attention_pallas, **BLOCKS, **kw)


def ref(**kw):
    return functools.partial(aj.softmax.softmax_attention_reference, **kw)


def out_and_grads(fn, args, argnums):
    """Output and gradients of ``sum(fn(*args) * w)`` (fixed random ``w``), in one jit."""
    shape = jax.eval_shape(fn, *args).shape
    w = jax.random.normal(jax.random.PRNGKey(123), shape, jnp.float32)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    jitted = jax.jit(jax.value_and_grad(loss, argnums=tuple(argnums), has_aux=True))
    (_, out), g = compile_fast(jitted, *args)(*args)
    return out, g


def compile_fast(jitted, *args):
    return jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def check(fn, expected_fn, args, argnums=(0, 1, 2), names="qkv", rtol=None, grad_rtol=None):
    out, g = out_and_grads(fn, args, argnums)
    out_e, g_e = out_and_grads(expected_fn, args, argnums)
    assert out.dtype == out_e.dtype
    assert_close(out, out_e, rtol=rtol, name="out")
    for a, e, n in zip(g, g_e, names):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, rtol=grad_rtol or rtol, name=f"d{n}")
    return out, g


def segment_ids(B, L, key=KEY, num=3):
    return jnp.sort(jax.random.randint(key, (B, L), 0, num), axis=1)


T, S = 37, 45  # not multiples of the 16-wide blocks; T != S
MASKS = {
    "none": lambda: None,
    "causal": lambda: masks.Causal(),
    "window": lambda: masks.SlidingWindow(5, 3),
    "chunked": lambda: masks.ChunkedCausal(8),
    "segments": lambda: masks.Segments(segment_ids(2, T), segment_ids(2, S, jax.random.PRNGKey(1))),
    "explicit": lambda: masks.Explicit(jax.random.bernoulli(KEY, 0.7, (2, 1, T, S))),
    "causal&segments": lambda: masks.Causal() & masks.Segments(segment_ids(2, T), segment_ids(2, S)),
    "window|explicit": lambda: masks.SlidingWindow(2, 2) | masks.Explicit((jnp.arange(S) < 3)[None, :]),
}


SLOW_MASKS = ("causal", "window", "chunked", "causal&segments")
"""Masks whose in-kernel plan other default cases already run: causal (the cross-length, GQA, head-dim and
low-precision tests), window (sinks, empty tiles), chunked (the same iota comparison as window), an ``and``
(return_lse's causal & window, fully masked rows' explicit & causal) of segments (the segments case). The slow
suite runs them."""


@pytest.mark.parametrize("name", [n if n not in SLOW_MASKS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in MASKS])
def test_masks_forward_and_grads(name):
    mask = MASKS[name]()
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=16)
    check(pallas(mask=mask), ref(mask=mask), (q, k, v))


@pytest.mark.parametrize("T_,S_", [(1, 30), (40, 7)])
def test_cross_lengths_bottom_right_causal(T_, S_):
    q, k, v = random_qkv(KEY, B=1, T=T_, S=S_, Hq=2, D=8)
    check(pallas(mask=masks.Causal()), ref(mask=masks.Causal()), (q, k, v))


@pytest.mark.parametrize("Hq,Hkv", [pytest.param(4, 4, marks=pytest.mark.slow), (6, 1)])
def test_gqa_mqa_and_dv_not_d(Hq, Hkv):
    """MQA with Dv != D (one KV head for 6 query heads); plain multi-head (slow) is the cross-length cases' layout."""
    q, k, v = random_qkv(KEY, B=1, T=33, Hq=Hq, Hkv=Hkv, D=16, Dv=24)
    check(pallas(mask=masks.Causal()), ref(mask=masks.Causal()), (q, k, v))


def test_soft_cap_with_alibi():
    q, k, v = random_qkv(KEY, B=1, T=30, Hq=4, Hkv=2, D=16)
    alibi = ALiBi(jnp.asarray(alibi_slopes(4)))
    kw = dict(mask=masks.Causal(), logits_soft_cap=5.0, bias=alibi)
    check(pallas(**kw), ref(**kw), (q * 4, k * 4, v))
    capped, uncapped = jax.jit(lambda q, k, v: (ref(**kw)(q, k, v), ref(mask=masks.Causal(), bias=alibi)(q, k, v)))(
        q * 4, k * 4, v)
    assert not np.allclose(capped, uncapped, atol=1e-3), "the cap changes the result"


def test_sinks_forward_and_gradient():
    q, k, v = random_qkv(KEY, B=2, T=25, Hq=4, Hkv=2, D=8)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    mask = masks.SlidingWindow(4, 0)
    fp = lambda q, k, v, s: pallas(mask=mask, sinks=s)(q, k, v)
    fr = lambda q, k, v, s: ref(mask=mask, sinks=s)(q, k, v)
    _, (_, _, _, d_sinks) = check(fp, fr, (q, k, v, sinks), (0, 1, 2, 3), ["q", "k", "v", "sinks"])
    assert float(jnp.max(jnp.abs(d_sinks))) > 1e-3, "dsinks is not trivially zero"


@pytest.mark.parametrize("shape", [(2, 4, 30, 35), (30, 35)])
def test_array_bias_and_its_gradient(shape):
    q, k, v = random_qkv(KEY, B=2, T=30, S=35, Hq=4, Hkv=2, D=8)
    bias = jax.random.normal(jax.random.PRNGKey(5), shape)
    fp = lambda q, k, v, b: pallas(mask=masks.Causal(), bias=b)(q, k, v)
    fr = lambda q, k, v, b: ref(mask=masks.Causal(), bias=b)(q, k, v)
    check(fp, fr, (q, k, v, bias), (0, 1, 2, 3), ["q", "k", "v", "bias"])


def test_return_lse_and_its_gradient():
    q, k, v = random_qkv(KEY, B=1, T=30, S=36, Hq=4, Hkv=2, D=8)
    mask = masks.Causal() & masks.SlidingWindow(10, None)
    out, lse = compile_fast(jax.jit(pallas(mask=mask, return_lse=True)), q, k, v)(q, k, v)
    out_r, lse_r = jax.jit(ref(mask=mask, return_lse=True))(q, k, v)
    assert lse.shape == (1, 30, 4) and lse.dtype == jnp.float32
    assert_close(out, out_r, name="out")
    assert_close(lse, lse_r, name="lse")
    # A loss through both outputs exercises dlse and dO together.
    fp = lambda q, k, v: (lambda o, l: o.sum(-1) + jnp.sin(l))(*pallas(mask=mask, return_lse=True)(q, k, v))
    fr = lambda q, k, v: (lambda o, l: o.sum(-1) + jnp.sin(l))(*ref(mask=mask, return_lse=True)(q, k, v))
    check(fp, fr, (q, k, v))


def test_fully_masked_rows_give_zero_finite_grads_and_neg_inf_lse():
    q, k, v = random_qkv(KEY, B=1, T=20, Hq=2, D=8)
    allowed = jnp.ones((20, 20), bool).at[3].set(False).at[11:17].set(False)
    mask = masks.Explicit(allowed) & masks.Causal()
    out, g = check(pallas(mask=mask), ref(mask=mask), (q, k, v))
    np.testing.assert_array_equal(np.asarray(out[0, 3]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[0, 11:17]), 0.0)
    for x in g:
        assert np.all(np.isfinite(np.asarray(x)))
    _, lse = compile_fast(jax.jit(pallas(mask=mask, return_lse=True)), q, k, v)(q, k, v)
    assert np.all(np.isneginf(np.asarray(lse[0, 3]))) and np.all(np.isfinite(np.asarray(lse[0, :3])))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision(dtype):
    q, k, v = random_qkv(KEY, B=1, T=40, Hq=4, Hkv=2, D=16, dtype=dtype)
    mask = masks.Causal()
    out, g = out_and_grads(pallas(mask=mask), (q, k, v), (0, 1, 2))
    exact, g_exact = out_and_grads(ref(mask=mask), tuple(x.astype(jnp.float32) for x in (q, k, v)), (0, 1, 2))
    assert out.dtype == dtype
    assert_close(out, exact, rtol=TOLERANCE[dtype], name="out vs f32")
    for a, e, n in zip(g, g_exact, "qkv"):
        assert a.dtype == dtype
        assert_close(a, e, rtol=3 * TOLERANCE[dtype], name=f"d{n}")


@pytest.mark.parametrize("D,Dv", [pytest.param(64, 64, marks=pytest.mark.slow), (192, 128),
                                  pytest.param(128, 128, marks=pytest.mark.slow),
                                  pytest.param(256, 256, marks=pytest.mark.slow)])
def test_head_dims(D, Dv):
    """D = 192 is padded to the next power of two and Dv = 128 differs from it; the power-of-two sizes are slow
    (the other tests run D = 8 and 16)."""
    q, k, v = random_qkv(KEY, B=1, T=20, Hq=2, Hkv=1, D=D, Dv=Dv)
    check(pallas(mask=masks.Causal()), ref(mask=masks.Causal()), (q, k, v))


def test_empty_tiles_are_skipped():
    """Keys no query can see hold NaN: skipped tiles never touch them (out and grads stay finite)."""
    q, k, v = random_qkv(KEY, B=1, T=16, S=64, Hq=2, D=8)
    mask = masks.SlidingWindow(4, 0)  # queries sit at positions 48..63 and see keys 44..63
    codes, lo, hi = masks.block_schedule(mask, 16, 64, 16, 16)
    assert int(lo[0]) == 2 and int(hi[0]) == 4
    poisoned = lambda x: x.at[:, :32].set(jnp.nan)
    fp = lambda q, k, v: pallas(mask=mask)(q, poisoned(k), poisoned(v))
    out, g = check(fp, ref(mask=mask), (q, k, v))
    np.testing.assert_array_equal(np.asarray(g[1][:, :32]), 0.0)


def test_sigmoid_weight_function_against_plain_reference():
    """The extension point: sigmoid attention ``Σ_j sigmoid(s_ij + b) v_j`` reuses the skeleton."""
    q, k, v = random_qkv(KEY, B=1, T=30, S=35, Hq=4, Hkv=2, D=8)
    b = -float(np.log(35))
    mask = masks.Causal()

    def plain(q, k, v):
        kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(8) + ALiBi(jnp.asarray(alibi_slopes(4))).dense(30, 35)
        w = jnp.where(mask.dense(30, 35), jax.nn.sigmoid(s + b), 0.0)
        return jnp.einsum("bhts,bshd->bthd", w, vv)

    fp = pallas(mask=mask, bias=ALiBi(jnp.asarray(alibi_slopes(4))), weight_fn=SigmoidWeight(bias=b))
    check(fp, plain, (q, k, v))
    with pytest.raises(NotImplementedError, match="sinks"):
        pallas(weight_fn=SigmoidWeight(), sinks=jnp.zeros(4))(q, k, v)


def test_vmap_over_batch():
    q, k, v = random_qkv(KEY, B=3, T=20, Hq=2, D=8)
    seg = segment_ids(3, 20)
    fn = jax.vmap(lambda a, b, c, s: pallas(mask=masks.Segments(s[None]))(a[None], b[None], c[None])[0])
    assert_close(compile_fast(jax.jit(fn), q, k, v, seg)(q, k, v, seg), ref(mask=masks.Segments(seg))(q, k, v), name="vmap")


def test_api_pallas_on_cpu_and_auto_skips_it():
    q, k, v = random_qkv(KEY, B=1, T=20, Hq=4, Hkv=2, D=8)
    api = jax.jit(lambda q, k, v: aj.attention(q, k, v, mask=masks.Causal(), implementation="pallas"))
    out = compile_fast(api, q, k, v)(q, k, v)
    assert_close(out, ref(mask=masks.Causal())(q, k, v))
    assert "pallas" in aj.softmax.Softmax().implementations()
    assert "pallas" not in auto_order("cpu") and auto_order("gpu")[0] == "pallas"
    if jax.default_backend() == "cpu":
        assert "pallas" not in auto_order()


def test_unsupported_requests_raise_not_implemented():
    q, k, v = random_qkv(KEY, B=1, T=20, Hq=2, D=8)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attention_pallas(q, k, v, dropout_rate=0.1, rng=jax.random.PRNGKey(0))

    class Odd(masks.Mask):
        def tile(self, q_idx, kv_idx, T, S):
            return (q_idx[:, None] % 2 == kv_idx[None, :] % 2)[None, None]

    with pytest.raises(NotImplementedError, match="Odd"):
        flash_attention_pallas(q, k, v, mask=Odd())
    with pytest.raises(NotImplementedError, match="head dims"):
        flash_attention_pallas(*random_qkv(KEY, B=1, T=4, Hq=1, D=320))
    with pytest.raises(ValueError, match="k head_dim"):  # shapes are checked once, at the entry point
        aj.attention(q, k[..., :4], v, implementation="pallas")
    # "auto" falls back to xla when the kernel refuses (only relevant where auto tries pallas).
    out = jax.jit(lambda q, k, v: aj.attention(q, k, v, dropout_rate=0.1, rng=jax.random.PRNGKey(0)))(q, k, v)
    assert out.shape == q.shape


def test_block_and_compiler_choices():
    assert pick_block(128, 37) == 64 and pick_block(128, 5) == 16
    st = jax.eval_shape(lambda q, k, v: flash_attention_pallas(q, k, v, block_q=512, block_kv=100),
                        *random_qkv(KEY, B=1, T=300, Hq=1, D=8))
    assert st.shape == (1, 300, 1, 8)
    assert common.schedule(masks.Causal(), 64, 64, 16, 16).q_lo.tolist() == [0, 1, 2, 3]
    params = compiler_params(256, 256, 128, 64)
    assert params.num_warps == 8 and params.num_stages == 2
    assert compiler_params(64, 64, 128, 64).num_warps == 4


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU for the real Triton lowering")
def test_triton_lowering_on_gpu():
    q, k, v = random_qkv(KEY, B=2, T=300, S=300, Hq=8, Hkv=2, D=64, dtype=jnp.bfloat16)
    for mask in (None, masks.Causal(), masks.SlidingWindow(64, 0) & masks.Segments(segment_ids(2, 300))):
        fp = functools.partial(flash_attention_pallas, mask=mask, sinks=jnp.linspace(-1, 1, 8), backend="gpu")
        out, g = out_and_grads(fp, (q, k, v), (0, 1, 2))
        exact, g_exact = out_and_grads(ref(mask=mask, sinks=jnp.linspace(-1, 1, 8)),
                                       tuple(x.astype(jnp.float32) for x in (q, k, v)), (0, 1, 2))
        assert_close(out, exact, rtol=TOLERANCE[jnp.bfloat16], name="out")
        for a, e, n in zip(g, g_exact, "qkv"):
            assert_close(a, e, rtol=3 * TOLERANCE[jnp.bfloat16], name=f"d{n}")
