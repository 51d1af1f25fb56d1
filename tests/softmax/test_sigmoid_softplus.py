"""Sigmoid attention (FlashSigmoid) and softplus attention: every fast path against its reference.

Paths: the blocked ``xla`` path, the Pallas GPU kernel in interpret mode and the Pallas TPU kernel
in TPU interpret mode, each forward and gradients (q, k, v) in one jit at XLA's lowest backend
optimization level (the interpreted kernels are compile-bound on CPU). Lengths are odd (T=37,
S=45, 16-wide tiles) and heads grouped (GQA). Plus the properties the papers rely on:
sigmoid with ``b = −log n`` keeps the output norm flat in ``n``; softplus weights are a
distribution that the power ``p`` sharpens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax as aj
from attnjax import masks
from attnjax.positional import ALiBi, alibi_slopes
from attnjax.blocked import weights
from attnjax.softmax import sigmoid, softplus
from tests.helpers import TOLERANCE, assert_close, random_qkv

KEY = jax.random.PRNGKey(0)
T, S = 37, 45
BLOCKS = dict(block_q=16, block_kv=16)


def segment_ids(B, L, key=KEY, num=3):
    return jnp.sort(jax.random.randint(key, (B, L), 0, num), axis=1)


MASKS = {
    "causal": lambda B: masks.Causal(),
    "window": lambda B: masks.SlidingWindow(5, 3),
    "causal&segments": lambda B: masks.Causal() & masks.Segments(segment_ids(B, T), segment_ids(B, S)),
    "window&segments": lambda B: masks.SlidingWindow(6, 0) & masks.Segments(segment_ids(B, T), segment_ids(B, S)),
}
MECHANISMS = {
    "sigmoid": (sigmoid.sigmoid_attention_reference, sigmoid.sigmoid_attention_xla, sigmoid.sigmoid_attention_pallas,
                {}),
    "softplus": (softplus.softplus_attention_reference, softplus.softplus_attention_xla,
                 softplus.softplus_attention_pallas, dict(power=2.0, train_length=16)),
}


def out_and_grads(fn, args):
    """``fn(*args)`` and the gradients of ``Σ fn(*args)·w`` (fixed random ``w``) wrt q, k, v, one jit."""
    w = jax.random.normal(jax.random.PRNGKey(123), jax.eval_shape(fn, *args).shape, jnp.float32)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    compiled = jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    (_, out), g = compiled(*args)
    return out, g


def check(fast, reference, args, dtype):
    out, g = out_and_grads(fast, args)
    out_e, g_e = out_and_grads(reference, args)
    assert out.dtype == out_e.dtype == dtype
    rtol = TOLERANCE[dtype]
    assert_close(out, out_e, rtol=rtol, name="out")
    for a, e, n in zip(g, g_e, "qkv"):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, rtol=rtol, name=f"d{n}")


# (mechanism, path, mask, dtype, extras): the xla path of both mechanisms in float32 and bfloat16;
# the Pallas GPU kernel with each mechanism, float32 and bfloat16 between them (both dtypes for both
# with --runslow); the TPU kernel (slow to interpret) with the weight function new to it
# (tests/kernels/test_flash_tpu.py covers SigmoidWeight there). Causal, sliding-window and segment masks,
# ALiBi, the soft cap and (xla) dropout are spread over the cases. Kernels run one batch row.
CASES = [
    ("sigmoid", "xla", "window&segments", jnp.float32, dict(alibi=True, logits_soft_cap=5.0)),
    ("sigmoid", "xla", "causal&segments", jnp.bfloat16, dict(dropout_rate=0.2, rng=jax.random.PRNGKey(5))),
    ("softplus", "xla", "window&segments", jnp.float32, dict(alibi=True, logits_soft_cap=5.0)),
    ("softplus", "xla", "causal&segments", jnp.bfloat16, dict(dropout_rate=0.2, rng=jax.random.PRNGKey(5))),
    ("sigmoid", "pallas_gpu", "causal&segments", jnp.float32, dict(alibi=True)),
    ("softplus", "pallas_gpu", "window&segments", jnp.bfloat16, dict(logits_soft_cap=5.0)),
    pytest.param("sigmoid", "pallas_gpu", "window", jnp.bfloat16, {}, marks=pytest.mark.slow),
    pytest.param("softplus", "pallas_gpu", "causal", jnp.float32, {}, marks=pytest.mark.slow),
    pytest.param("softplus", "pallas_tpu", "causal", jnp.float32, {}, marks=pytest.mark.slow),
]


def case_id(case) -> str:
    mechanism, path, mask_name, dtype, _ = case.values if hasattr(case, "values") else case
    return f"{mechanism}-{path}-{mask_name}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("mechanism,path,mask_name,dtype,extras", CASES, ids=[case_id(c) for c in CASES])
def test_fast_path_matches_reference(mechanism, path, mask_name, dtype, extras):
    ref_fn, xla_fn, pallas_fn, config = MECHANISMS[mechanism]
    extras = dict(extras)
    B, Hq, Hkv = {"xla": (2, 4, 2), "pallas_gpu": (1, 4, 2), "pallas_tpu": (1, 2, 1)}[path]
    options = dict(config, mask=MASKS[mask_name](B))
    if extras.pop("alibi", False):
        options["bias"] = ALiBi(jnp.asarray(alibi_slopes(Hq)))
    options.update(extras)
    fast = {"xla": functools.partial(xla_fn, **BLOCKS),
            "pallas_gpu": functools.partial(pallas_fn, **BLOCKS, interpret=True),
            "pallas_tpu": functools.partial(pallas_fn, **BLOCKS, backend="tpu", interpret=True)}[path]
    args = random_qkv(KEY, B=B, T=T, S=S, Hq=Hq, Hkv=Hkv, D=16, dtype=dtype)
    check(functools.partial(fast, **options), functools.partial(ref_fn, **options), args, dtype)


def test_softplus_weight_function_derivative_and_masking():
    """``dweight`` is the derivative of ``weight(transform(s))``; a ``-inf`` logit weighs 0."""
    fn = weights.SoftplusWeight(power=3.0)

    @jax.jit
    def evaluate(s, m):
        auto = jax.vmap(jax.grad(lambda x: fn.weight(fn.transform(x), m)))(s)
        return fn.dweight(s, fn.weight(fn.transform(s), m)), auto, fn.transform(s), 3.0 * jnp.log(jax.nn.softplus(s))

    dweight, auto, transform, expected = evaluate(jnp.linspace(-40.0, 40.0, 161), jnp.float32(2.0))
    assert_close(dweight, auto, rtol=1e-4, name="dweight")
    assert_close(transform, expected, rtol=1e-6, name="transform")
    assert float(fn.weight(fn.transform(jnp.float32(-jnp.inf)), 2.0)) == 0.0
    assert float(fn.dweight(jnp.float32(5.0), jnp.float32(0.0))) == 0.0
    with pytest.raises(ValueError, match="power"):
        weights.SoftplusWeight(power=0.0)


def test_visible_keys_counts_the_dense_mask():
    """Structural, segment and per-head explicit parts in one mask; 8-wide tiles of 21 x 29 give
    empty, partial and full tiles."""
    mask = (masks.Causal() | masks.SlidingWindow(3, 1)) & masks.Segments(
        segment_ids(2, 21), segment_ids(2, 29)) & masks.Explicit(jax.random.bernoulli(KEY, 0.8, (1, 3, 21, 29)))
    counts, expected = jax.jit(lambda m: (softplus.visible_keys(m, 21, 29, block=8), m.dense(21, 29).sum(-1)))(mask)
    assert counts.shape == expected.shape == (2, 3, 21)
    np.testing.assert_array_equal(counts, expected)


def attention_weights(mechanism, T_, mask, implementation="xla"):
    """Rows of the attention matrix ``[T, S=T]``, read out with identity values."""
    q, k, _ = random_qkv(KEY, B=1, T=T_, Hq=1, D=8)
    eye = jnp.eye(T_, dtype=jnp.float32)[None, :, None, :]
    run = jax.jit(lambda q, k, v: aj.attention(q, k, v, mechanism=mechanism, mask=mask,
                                               implementation=implementation))
    return run(q, k, eye)[0, :, 0, :]


def test_softplus_weights_are_a_distribution_that_power_sharpens():
    w1 = attention_weights(softplus.Softplus(power=1.0, train_length=8), 24, masks.Causal())
    w2 = attention_weights(softplus.Softplus(power=2.0, train_length=8), 24, masks.Causal(), "reference")
    for w in (w1, w2):
        assert float(jnp.min(w)) >= 0.0
        np.testing.assert_allclose(jnp.sum(w, axis=-1), 1.0, rtol=1e-5)
        assert float(jnp.max(jnp.triu(w, 1))) == 0.0  # causal: nothing above the diagonal
    assert float(jnp.max(jnp.abs(w1 - w2))) > 1e-2

    def entropy(w):
        return -jnp.sum(jnp.where(w > 0, w * jnp.log(w), 0.0), axis=-1)

    rows = slice(2, None)  # row 0 has one key; row 1 has λ = log 2 / log 8, still not uniform
    assert bool(jnp.all(entropy(w2)[rows] < entropy(w1)[rows] - 1e-4))
    assert bool(jnp.all(jnp.max(w2, axis=-1)[rows] > jnp.max(w1, axis=-1)[rows]))


def test_softplus_length_scale_sharpens_long_rows():
    """λ_i = log n_i / log n_train grows with the row's key count: with n_train = 4, every row
    past 4 keys is sharper than without the scale."""
    scaled = attention_weights(softplus.Softplus(train_length=4), 24, masks.Causal(), "reference")
    plain = attention_weights(softplus.Softplus(train_length=None), 24, masks.Causal(), "reference")
    assert float(jnp.max(jnp.abs(jnp.sum(scaled, axis=-1) - 1.0))) < 1e-5
    top_scaled, top_plain = jnp.max(scaled, axis=-1), jnp.max(plain, axis=-1)
    assert bool(jnp.all(top_scaled[4:] > top_plain[4:]))


def test_sigmoid_output_norm_bounded_with_minus_log_n_bias():
    """Sigmoid attention at init-like inputs (unit-variance logits, values sharing a common
    direction as hidden states do): with ``b = −log n`` the mean output norm is flat in ``n``;
    with ``b = 0`` it grows like ``n`` (the paper's reason for the bias)."""
    lengths = [64, 512, 4096]
    mean = jax.random.normal(jax.random.PRNGKey(7), (16,))

    @jax.jit
    def mean_norms(q, k, v):
        norms = []
        for config in (sigmoid.Sigmoid(), sigmoid.Sigmoid(bias=0.0)):
            out = aj.attention(q, k, v + mean, mechanism=config, implementation="reference")
            norms.append(jnp.mean(jnp.linalg.norm(out, axis=-1)))
        return jnp.stack(norms)

    norms = np.array([mean_norms(*random_qkv(jax.random.PRNGKey(n), B=1, T=16, S=n, Hq=2, D=16))
                      for n in lengths])
    bounded, unbiased = norms[:, 0], norms[:, 1]
    assert bounded.max() / bounded.min() < 1.5, bounded
    assert unbiased[-1] / unbiased[0] > 0.5 * lengths[-1] / lengths[0], unbiased


@pytest.mark.parametrize("name", ["sigmoid", "softplus"])
def test_registry_api_and_module(name):
    entry = next(e for e in aj.registry.entries() if e.name == name)
    assert entry.family == "softmax" and set(entry.implementations) == {"reference", "xla", "pallas"}
    assert "sinks" not in entry.supports and "return_lse" not in entry.supports
    q, k, v = random_qkv(KEY, B=1, T=12, Hq=4, Hkv=2, D=8)
    with pytest.raises(NotImplementedError, match="sinks"):
        aj.attention(q, k, v, mechanism=name, sinks=jnp.zeros(4))
    for path in ("reference", "xla", "pallas"):
        with pytest.raises(NotImplementedError, match="normalizer"):
            entry.config().implementations()[path](q, k, v, return_lse=True)
    layer = aj.nn.MultiHeadAttention(16, 4, num_kv_heads=2, mechanism=name, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, jax.random.normal(KEY, (2, 12, 16)))
    assert y.shape == (2, 12, 16) and bool(jnp.all(jnp.isfinite(y)))
