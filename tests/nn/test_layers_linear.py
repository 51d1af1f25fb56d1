"""TransNormerLLM and BASED layers: parts against direct formulas, decode checks, training step, bf16, dropout.

Causality, decode == parallel, jit, gradients and the Linen bridge of every layer and block are in the
module conformance suite (tests/test_module_conformance.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

from attnjax.nn.based import BasedBlock, BasedLinearAttention, SlidingWindowAttention
from attnjax.nn.transnormer import LRPE, SGLU, TransNormerAttention, TransNormerBlock, srms_norm, transnormer_decay
from tests.helpers import assert_close

B, T, D_MODEL, HEADS = 2, 11, 16, 2
WINDOW = 4  # small, so that the sequences below run well past it

SMALL = {"transnormer": (TransNormerAttention, dict(chunk_size=4)),
         "transnormer_block": (TransNormerBlock, dict(chunk_size=4, hidden_dim=24)),
         "based": (BasedLinearAttention, dict(feature_dim=4, chunk_size=4)),
         "sliding_window": (SlidingWindowAttention, dict(window=WINDOW)),
         "based_block": (BasedBlock, dict(feature_dim=4, window=WINDOW, mlp_dim=24, chunk_size=4))}


def inputs(seed=0, T=T, d=D_MODEL):
    return jax.random.normal(jax.random.key(seed), (B, T, d), jnp.float32)


def make(name, **kw):
    """A small layer or block."""
    cls, small = SMALL[name]
    return cls(D_MODEL, HEADS, **{**small, "rngs": nnx.Rngs(0), **kw})


# --- parts against direct formulas -------------------------------------------------------------

def test_srms_norm():
    x = jax.random.normal(jax.random.key(0), (3, 5, 8)) * 3.0
    expected = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) / np.sqrt(8))
    assert_close(srms_norm(x, eps=0.0), expected, rtol=1e-6, name="srms")
    assert_close(srms_norm(7.0 * x), srms_norm(x), rtol=1e-5, name="scale invariant")
    assert np.all(srms_norm(jnp.zeros((2, 4))) == 0)
    assert srms_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_lrpe_is_a_relative_rotation():
    H, D, n = 2, 3, 6
    lrpe = LRPE(H, D)
    theta = np.asarray(lrpe.theta[...])
    np.testing.assert_allclose(theta.reshape(-1), 10000.0 ** (-2 * np.arange(H * D) / (H * D)), rtol=1e-6)
    q = jax.random.normal(jax.random.key(1), (1, n, H, D))
    k = jax.random.normal(jax.random.key(2), (1, n, H, D))
    pos = jnp.arange(n) * 3
    qe, ke = lrpe(q, pos), lrpe(k, pos)
    assert qe.shape == (1, n, H, 2 * D)
    scores = jnp.einsum("bshd,bthd->bhst", qe, ke)
    rel = (pos[:, None] - pos[None, :]).astype(jnp.float32)  # [s, t]
    expected = jnp.einsum("bshd,bthd,sthd->bhst", q, k, jnp.cos(rel[:, :, None, None] * theta))
    assert_close(scores, expected, rtol=1e-5, name="scores")
    shifted = jnp.einsum("bshd,bthd->bhst", lrpe(q, pos + 17), lrpe(k, pos + 17))
    assert_close(shifted, scores, rtol=1e-4, name="shift invariant")


def test_sglu():
    m = SGLU(D_MODEL, 24, rngs=nnx.Rngs(0))
    x = inputs()
    expected = ((x @ m.value.kernel[...]) * (x @ m.gate.kernel[...])) @ m.out.kernel[...]
    assert_close(m(x), expected, rtol=1e-5, name="sglu")
    assert m.value.kernel.shape == (D_MODEL, 24) and m.value.bias is None
    assert SGLU(D_MODEL, rngs=nnx.Rngs(0)).value.kernel.shape == (D_MODEL, 2 * D_MODEL)


def test_transnormer_decay():
    lam = [transnormer_decay(8, layer, 4) for layer in range(4)]
    assert all(x.shape == (8,) and np.all((x > 0) & (x <= 1)) for x in lam)
    slopes = 2.0 ** (-np.arange(1, 9))  # ALiBi slopes for 8 heads
    np.testing.assert_allclose(lam[0], np.exp(-slopes * (1 + 1e-5)), rtol=1e-6)
    np.testing.assert_allclose(lam[2], np.exp(-slopes * (1 / 3 + 1e-5)), rtol=1e-6)
    assert np.all(np.diff(np.stack(lam), axis=0) > 0)  # upper layers decay slower
    assert np.all(np.diff(lam[0]) > 0)  # later heads decay slower
    with pytest.raises(ValueError, match="layer_idx"):
        transnormer_decay(8, 4, 4)


def naive_transnormer(m, x):
    """TransNormerLLM's gated linear attention as a quadratic masked sum, from the module's parameters."""
    p = lambda lin: jnp.einsum("btd,dhk->bthk", x, lin.kernel[...])
    q, k, v, u = jax.nn.silu(p(m.query)), jax.nn.silu(p(m.key)), p(m.value), p(m.gate)
    if m.lrpe is not None:
        angle = jnp.arange(x.shape[1])[:, None, None] * m.lrpe.theta[...]
        q, k = (jnp.concatenate([a * jnp.cos(angle), a * jnp.sin(angle)], -1) for a in (q, k))
    s, t = np.arange(x.shape[1])[:, None], np.arange(x.shape[1])[None, :]
    lam = np.asarray(m.decay)[:, None, None]
    weight = np.where(s >= t, lam ** np.maximum(s - t, 0), 0.0)  # [H, T, T]
    o = jnp.einsum("bshk,bthk,hst,bthv->bshv", q, k, weight, v).reshape(*x.shape[:2], -1)
    o = o / jnp.sqrt(jnp.mean(o * o, -1, keepdims=True) + m.eps)
    return jnp.einsum("bshv,hvd->bsd", o.reshape(v.shape) * u, m.out.kernel[...])


@pytest.mark.parametrize("lrpe, implementation", [(True, "reference"), (False, "xla"), (True, "auto")])
def test_transnormer_attention_matches_naive(lrpe, implementation):
    m = TransNormerAttention(D_MODEL, HEADS, lrpe=lrpe, layer_idx=1, num_layers=3, chunk_size=4,
                             implementation=implementation, rngs=nnx.Rngs(0))
    x = inputs()
    y = m(x)
    assert y.shape == (B, T, D_MODEL)
    assert m.init_cache(B, T).state.shape == (B, HEADS, (16 if lrpe else 8), 8)
    assert_close(y, naive_transnormer(m, x), rtol=1e-5, name="y")


def test_transnormer_block_is_pre_norm_residual():
    m = TransNormerBlock(D_MODEL, HEADS, hidden_dim=24, chunk_size=4, rngs=nnx.Rngs(0))
    x = inputs()
    h = x + m.attention(srms_norm(x))
    assert_close(m(x), h + m.mlp(srms_norm(h)), rtol=1e-6, name="block")


def naive_based_linear(m, x):
    """zoology's Based forward: Taylor features, causal cumsums, normalized."""
    p = lambda lin: jnp.einsum("btd,dhk->bhtk", x, lin.kernel[...])
    F = m.feature_dim

    def taylor(z):
        outer = (z[..., :, None] * z[..., None, :]).reshape(*z.shape[:-1], -1) / np.sqrt(2)
        return jnp.concatenate([jnp.ones_like(z[..., :1]), z / F ** 0.25, outer / np.sqrt(F)], -1)

    q, k, v = taylor(p(m.query))[..., None, :], taylor(p(m.key))[..., None, :], p(m.value)[..., None]
    y = (q * jnp.cumsum(k * v, axis=2)).sum(-1) / (q * jnp.cumsum(k, axis=2)).sum(-1)
    return jnp.einsum("bhtv,hvd->btd", y, m.out.kernel[...])


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_based_linear_matches_zoology_formula(implementation):
    m = BasedLinearAttention(D_MODEL, HEADS, feature_dim=4, chunk_size=4, implementation=implementation,
                             rngs=nnx.Rngs(0))
    x = inputs()
    assert m.init_cache(B, T).state.shape == m.init_cache(B, 100 * T).state.shape == (B, HEADS, 1 + 4 + 16, 8 + 1)
    assert_close(m(x), naive_based_linear(m, x), rtol=1e-5, name="y")


def test_sliding_window_matches_naive():
    m = SlidingWindowAttention(D_MODEL, 4, num_kv_heads=2, window=WINDOW, implementation="reference",
                               rngs=nnx.Rngs(0))
    x = inputs()
    q = jnp.einsum("btd,dhk->bthk", x, m.query.kernel[...])
    k, v = (jnp.repeat(jnp.einsum("btd,dhk->bthk", x, w.kernel[...]), 2, axis=2) for w in (m.key, m.value))
    s, t = np.arange(T)[:, None], np.arange(T)[None, :]
    logits = jnp.einsum("bshk,bthk->bhst", q, k) / np.sqrt(4)
    p = jax.nn.softmax(jnp.where((t <= s) & (t > s - WINDOW), logits, -jnp.inf), axis=-1)
    expected = jnp.einsum("bhst,bthk,hkd->bsd", p, v, m.out.kernel[...])
    assert_close(m(x), expected, rtol=1e-5, name="y")
    assert m.init_cache(B, T).k.shape == (B, WINDOW, 2, 4)


# --- every layer and block: input checks, a training step, bf16, the Linen bridge, dropout -----

def test_decode_checks_input():
    m = make("transnormer")
    with pytest.raises(ValueError, match="x_t"):
        m.decode(inputs(T=2), m.init_cache(B, T))
    m = make("sliding_window")
    with pytest.raises(ValueError, match="x_t"):
        m.decode(inputs(T=1), m.init_cache(B + 1, T))


@pytest.mark.parametrize("name", ["transnormer_block", "based_block"])
def test_jit_and_grad(name):
    m = make(name)
    x, target = inputs(), inputs(seed=1)

    def loss(m):
        return jnp.mean((m(x) - target) ** 2)

    @nnx.jit
    def sgd_step(m):
        value, grads = nnx.value_and_grad(loss)(m)
        nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(m, nnx.Param), grads))
        return value, grads

    assert_close(nnx.jit(lambda m, x: m(x))(m, x), m(x), rtol=1e-5, name="jit")
    before, grads = sgd_step(m)
    for path, g in nnx.to_flat_state(grads):
        assert np.all(np.isfinite(g[...])) and np.any(g[...] != 0), path
    after, _ = sgd_step(m)  # the loss after the first step (the same compiled step, not an eager call)
    assert after < before


@pytest.mark.parametrize("name", ["transnormer", "based"])
def test_bfloat16(name):
    m = make(name, dtype=jnp.bfloat16)
    x = inputs().astype(jnp.bfloat16)
    y = m(x)
    assert y.dtype == jnp.bfloat16 and m.query.kernel.dtype == jnp.float32
    y_t, cache = m.decode(x[:, :1], m.init_cache(B, T))
    assert y_t.dtype == jnp.bfloat16 and cache.state.dtype == jnp.float32
    assert_close(y_t, y[:, :1], rtol=2e-2, name="first step")


def test_linen_bridge():
    model = bridge.to_linen(TransNormerBlock, D_MODEL, HEADS, **SMALL["transnormer_block"][1])
    x = inputs()
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["attention"]["lrpe"]["theta"].shape == (HEADS, D_MODEL // HEADS)
    m = make("transnormer_block")
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    assert_close(jax.jit(model.apply)({"params": params}, x), m(x), rtol=1e-6, name="linen")


def test_based_block_dropout():
    m = make("based_block", dropout_rate=0.5)
    x = inputs()
    assert not np.allclose(m(x), m(x))
    assert_close(nnx.view(m, deterministic=True)(x), m(x, deterministic=True), rtol=0, atol=0, name="view")


@pytest.mark.parametrize("cls, kwargs, match", [
    (TransNormerAttention, dict(num_heads=3), "multiple of num_heads"),
    (TransNormerAttention, dict(num_heads=0), "num_heads"),
    (TransNormerAttention, dict(head_dim=0), "head_dim"),
    (TransNormerAttention, dict(layer_idx=2, num_layers=2), "layer_idx"),
    (TransNormerAttention, dict(chunk_size=0), "chunk_size"),
    (TransNormerAttention, dict(implementation="cuda"), "implementation"),
    (TransNormerBlock, dict(hidden_dim=0), "hidden_dim"),
    (BasedLinearAttention, dict(feature_dim=0), "feature_dim"),
    (BasedLinearAttention, dict(d_model=-1), "d_model"),
    (SlidingWindowAttention, dict(window=0), "window"),
    (SlidingWindowAttention, dict(context_dim=8), "self-attention"),
    (SlidingWindowAttention, dict(num_kv_heads=3), "num_kv_heads"),
    (BasedBlock, dict(window=-2), "window"),
    (BasedBlock, dict(mlp_dim=0), "mlp_dim"),
])
def test_bad_constructor_args(cls, kwargs, match):
    kwargs = {"d_model": D_MODEL, "num_heads": HEADS, "rngs": nnx.Rngs(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
