"""Selective attention (SSA) and reversed attention (DependencyViT): fast paths against references,
forward and grads; the paper formulas written out by hand; parent readouts; NNX modules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax as aj
from attnjax import masks
from attnjax.nn import MultiHeadAttention
from attnjax.nn.selective import SelectiveAttention
from attnjax.positional import RoPE
from attnjax.softmax import reversed as rev
from attnjax.softmax import selective as sel
from tests.helpers import TOLERANCE, assert_close, grads

BLOCKS = dict(block_q=16, block_kv=16)


def run_jitted(fn, *args):
    """``jax.jit(fn)(*args)`` compiled without LLVM optimizations: at these tiny shapes the compile
    time, not the run time, is the cost (this halves it)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def compare(fast, ref, args, argnums, rtol=None, names=None):
    """Forward and gradients (of a fixed random projection of the output) of two functions, each jitted once."""
    def run(fn):
        return run_jitted(lambda *a: (fn(*a), grads(fn, a, argnums)), *args)

    (out_f, g_f), (out_r, g_r) = run(fast), run(ref)
    assert_close(out_f, out_r, rtol=rtol, name="out")
    names = names or [f"arg{i}" for i in argnums]
    for a, e, n in zip(g_f, g_r, names):
        assert_close(a, e, rtol=rtol, name=f"d{n}")


def normal(shape, seed=0, scale=1.0, dtype=jnp.float32):
    """Standard-normal test data from NumPy: unlike ``jax.random``, no XLA compile per new shape."""
    return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


def host_qkv(B=2, T=37, S=None, Hq=4, Hkv=None, D=8, dtype=jnp.float32):
    """q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]``, v ``[B, S, Hkv, D]`` drawn with NumPy
    (``tests.helpers.random_qkv`` compiles ``jax.random`` once per shape)."""
    S = T if S is None else S
    Hkv = Hq if Hkv is None else Hkv
    return (normal((B, T, Hq, D), 1, dtype=dtype), normal((B, S, Hkv, D), 2, dtype=dtype),
            normal((B, S, Hkv, D), 3, dtype=dtype))


def ssa_params(Hq, Hkv, D, Dv, seed=4):
    """Nonzero SSA temperature parameters (query weight/bias, position scale, value weight/bias)."""
    return (normal((Hq, D), seed, 0.3), normal((Hq,), seed + 1, 0.3), jnp.abs(normal((Hq,), seed + 2, 0.3)),
            normal((Hkv, Dv), seed + 3, 0.3), normal((Hkv,), seed + 4, 0.3))


def ssa(implementation, **kw):
    def fn(q, k, v, qw, qb, c, vw, vb):
        return sel.selective_attention(q, k, v, query_weight=qw, query_bias=qb, position_scale=c, value_weight=vw,
                                       value_bias=vb, implementation=implementation, **kw)
    return fn


SSA_NAMES = ["q", "k", "v", "query_weight", "query_bias", "position_scale", "value_weight", "value_bias"]


# ------------------------------------------------------------------------------------------------
# Selective attention
# ------------------------------------------------------------------------------------------------


def test_selective_reference_is_the_paper_formula():
    """Temperature on the logit rows and on the value columns, written out with repeated KV heads."""
    B, T, Hq, Hkv, D = 2, 37, 4, 2, 8
    q, k, v = host_qkv(B=B, T=T, Hq=Hq, Hkv=Hkv, D=D)

    def by_hand(q, k, v, qw, qb, c, vw, vb):
        tau_q = 1 + jnp.tanh(jnp.einsum("bthd,hd->bth", q, qw) + qb) + c * jnp.log(jnp.arange(1, T + 1))[:, None]
        tau_v = 1 + jnp.tanh(jnp.einsum("bshd,hd->bsh", v, vw) + vb)
        kr, vr = jnp.repeat(k, Hq // Hkv, axis=2), jnp.repeat(v * tau_v[..., None], Hq // Hkv, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(D) * tau_q.transpose(0, 2, 1)[..., None]
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), vr)

    args = (q, k, v, *ssa_params(Hq, Hkv, D, D))
    out = run_jitted(ssa("reference", mask=masks.Causal()), *args)
    assert_close(out, run_jitted(by_hand, *args), rtol=1e-5, name="out")


def selective_case(dtype, T, S, Hq, Hkv, D=8, B=2):
    q, k, v = host_qkv(B=B, T=T, S=S, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype)
    return (q, k, v, *ssa_params(Hq, Hkv, D, D))


def test_selective_xla_against_reference():
    args = selective_case(jnp.float32, 37, 37, 4, 2)
    compare(ssa("xla", mask=masks.Causal(), **BLOCKS), ssa("reference", mask=masks.Causal()), args, range(8),
            names=SSA_NAMES)


@pytest.mark.parametrize("implementation,dtype,T,S,mask", [
    ("xla", jnp.bfloat16, 19, 37, None),
    ("pallas", jnp.float32, 37, 37, masks.Causal()),
])
def test_selective_bf16_and_pallas_forward(implementation, dtype, T, S, mask):
    """Forward only (one compile each); their gradients run under --runslow."""
    args = selective_case(dtype, T, S, 4, 2, D=16, B=1)
    kw = BLOCKS if implementation == "xla" else {}
    out = run_jitted(ssa(implementation, mask=mask, **kw), *args)
    assert_close(out, run_jitted(ssa("reference", mask=mask), *args), rtol=TOLERANCE[dtype], name="out")


@pytest.mark.slow
@pytest.mark.parametrize("implementation,dtype,T,S,mask", [
    ("xla", jnp.bfloat16, 19, 37, None),
    ("pallas", jnp.float32, 37, 37, masks.Causal()),
])
def test_selective_bf16_and_pallas_grads(implementation, dtype, T, S, mask):
    args = selective_case(dtype, T, S, 4, 2, D=16, B=1)
    kw = BLOCKS if implementation == "xla" else {}
    compare(ssa(implementation, mask=mask, **kw), ssa("reference", mask=mask), args, range(8),
            rtol=TOLERANCE[dtype], names=SSA_NAMES)


def test_selective_registry_config():
    q, k, v = host_qkv(B=1, T=21, Hq=4, Hkv=2, D=8)
    cfg = sel.Selective(position_scale=0.4)

    def outputs(q, k, v):
        ref = functools.partial(aj.attention, mask=masks.Causal(), implementation="reference")
        return (ref(q, k, v, mechanism=cfg),
                sel.selective_attention(q, k, v, position_scale=0.4, mask=masks.Causal(), implementation="reference"),
                ref(q, k, v, mechanism=sel.Selective(position_scale=0.0)), ref(q, k, v))

    config, functional, zero_scale, softmax = run_jitted(outputs, q, k, v)
    assert_close(config, functional, rtol=1e-6, name="config")
    assert_close(zero_scale, softmax, rtol=1e-6, name="c=0 is softmax")
    assert aj.registry.get("selective") is sel.Selective
    assert set(cfg.implementations()) == {"reference", "xla", "pallas"}
    with pytest.raises(ValueError, match="position_scale"):
        sel.Selective(position_scale=-1.0)
    with pytest.raises(ValueError, match="query_weight"):
        sel.selective_attention(q, k, v, query_weight=jnp.zeros((3, 8)))


def test_selective_temperature_values():
    q, _, _ = host_qkv(B=1, T=64, Hq=1, D=8)
    tau = sel.selective_temperature(q, position_scale=0.5, positions=jnp.arange(64))
    np.testing.assert_allclose(tau[0, :, 0], 1 + 0.5 * np.log(np.arange(1, 65)), rtol=1e-6)
    assert float(tau[0, 0, 0]) == 1.0


# ------------------------------------------------------------------------------------------------
# Selective attention: NNX module and MultiHeadAttention(mechanism="selective")
# ------------------------------------------------------------------------------------------------

D_MODEL, HEADS = 16, 4


def x_input(T=7, seed=0):
    return normal((2, T, D_MODEL), seed)


def test_selective_module_matches_functional_under_jit_and_grad():
    m = SelectiveAttention(D_MODEL, HEADS, num_kv_heads=2, implementation="reference", rngs=nnx.Rngs(0))
    qw, qb, c, vw, vb = ssa_params(HEADS, 2, 4, 4, seed=10)
    m.query_temperature[...], m.query_temperature_bias[...], m.value_temperature[...] = qw, qb, vw
    m.value_temperature_bias[...] = vb
    x = x_input()

    @nnx.jit
    def outputs(mod, x):
        q, k, v = mod.query(x), mod.key(x), mod.value(x)
        expected = mod.out(sel.selective_attention(
            q, k, v, query_weight=qw, query_bias=qb, position_scale=jax.nn.sigmoid(mod.position_logit[...]),
            value_weight=vw, value_bias=vb, mask=masks.Causal(), implementation="reference"))
        return mod(x, mask=masks.Causal()), expected

    assert_close(*outputs(m, x), rtol=1e-5, name="y")

    g = nnx.jit(nnx.grad(lambda mod: jnp.sum(mod(x, mask=masks.Causal()) ** 2)))(m)
    for name in ("query_temperature", "query_temperature_bias", "position_logit", "value_temperature",
                 "value_temperature_bias"):
        leaf = getattr(g, name)[...]
        assert np.all(np.isfinite(leaf)) and float(jnp.abs(leaf).max()) > 0, name


def test_selective_module_starts_as_mha_and_adds_few_params():
    x = x_input()
    fresh = SelectiveAttention(D_MODEL, HEADS, position_temperature=False, implementation="reference",
                               rngs=nnx.Rngs(1))
    mha = MultiHeadAttention(D_MODEL, HEADS, implementation="reference", rngs=nnx.Rngs(1))
    assert_close(fresh(x), mha(x), rtol=1e-6, name="tau = 1 at init")

    def count(model):
        return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

    big = nnx.eval_shape(lambda: SelectiveAttention(512, 8, rngs=nnx.Rngs(0)))
    base = nnx.eval_shape(lambda: MultiHeadAttention(512, 8, rngs=nnx.Rngs(0)))
    extra = count(big) - count(base)
    assert extra == (64 + 1) * (8 + 8) + 8
    assert extra / count(base) < 0.005
    with pytest.raises(ValueError, match="position_scale_init"):
        SelectiveAttention(D_MODEL, HEADS, position_scale_init=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="sequence-parallel"):
        SelectiveAttention(D_MODEL, HEADS, sequence_parallel="sp", rngs=nnx.Rngs(0))


def test_selective_module_decode_equals_parallel():
    model = SelectiveAttention(D_MODEL, HEADS, rope=RoPE(), implementation="reference", rngs=nnx.Rngs(2))
    for p in (model.query_temperature, model.value_temperature):
        p[...] = 0.3 * jnp.ones_like(p[...])
    x = x_input()
    full = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(model, x)
    step = nnx.jit(lambda m, x_t, cache: m.decode(x_t, cache))  # eager decoding runs op by op
    cache = model.init_cache(x.shape[0], x.shape[1])
    steps = []
    for t in range(x.shape[1]):
        y_t, cache = step(model, x[:, t:t + 1], cache)
        steps.append(y_t)
    assert_close(jnp.concatenate(steps, axis=1), full, rtol=1e-5, name="decode vs parallel")


@pytest.mark.parametrize("mechanism,functional", [
    (sel.Selective(position_scale=0.5),
     functools.partial(sel.selective_attention, position_scale=0.5, implementation="reference")),
    ("reversed", rev.reversed_attention_reference),
])
def test_multihead_attention_mechanisms(mechanism, functional):
    m = MultiHeadAttention(D_MODEL, HEADS, num_kv_heads=2, mechanism=mechanism, implementation="reference",
                           rngs=nnx.Rngs(0))
    x = x_input()

    @nnx.jit
    def outputs(mod, x):
        expected = mod.out(functional(mod.query(x), mod.key(x), mod.value(x), mask=masks.Causal()))
        return mod(x, mask=masks.Causal()), expected

    assert_close(*outputs(m, x), rtol=1e-5, name="y")


# ------------------------------------------------------------------------------------------------
# Reversed attention
# ------------------------------------------------------------------------------------------------


def reversed_fn(path, **kw):
    if path == "xla":
        return functools.partial(rev.reversed_attention_xla, **BLOCKS, **kw)
    return functools.partial(rev.reversed_attention_reference, **kw)


def test_reversed_reference_normalizes_columns():
    """Column sums are 1 for keys with an allowed query, 0 for keys without; rows are free."""
    T = 37
    q, k, _ = host_qkv(B=2, T=T, Hq=4, Hkv=2, D=8)
    no_query = jnp.arange(T) >= T - 3  # the last 3 keys: no query may receive them
    mask = masks.Causal() & masks.Explicit(~no_query)
    a, a_sink = run_jitted(lambda q, k: (rev.reversed_attention_weights(q, k, mask=mask),
                                         rev.reversed_attention_weights(q, k, mask=masks.Causal(), sinks=jnp.zeros(4))),
                           q, k)
    col = a.sum(axis=2)
    np.testing.assert_allclose(col[..., :T - 3], 1.0, rtol=1e-5)
    np.testing.assert_allclose(col[..., T - 3:], 0.0)
    assert np.all(np.asarray(a)[..., ~np.tril(np.ones((T, T), bool))] == 0)
    assert float(jnp.abs(a.sum(axis=3) - 1).max()) > 0.1  # rows are not normalized
    assert np.all(np.asarray(a_sink.sum(axis=2)) < 1.0)


def test_reversed_reference_is_transposed_softmax():
    """Reversed attention of (q, k) is the row softmax of the swapped problem, transposed."""
    q, k, v = host_qkv(B=1, T=11, Hq=2, D=8)

    def weights_and_outputs(q, k, v):
        a = rev.reversed_attention_weights(q, k)
        swapped = jax.nn.softmax(jnp.einsum("bjhd,bihd->bhji", k, q) / np.sqrt(8), axis=-1)
        return a, swapped.transpose(0, 1, 3, 2), rev.reversed_attention_reference(q, k, v), \
            jnp.einsum("bhij,bjhd->bihd", a, v)

    a, expected_a, out, expected_out = run_jitted(weights_and_outputs, q, k, v)
    assert_close(a, expected_a, rtol=1e-6, name="A")
    assert_close(out, expected_out, rtol=1e-6, name="out")


def test_reversed_xla_against_reference():
    """GQA, cross lengths, a window & segments mask, an array bias, sinks and dropout: forward and grads."""
    T, S = 19, 37
    q, k, v = host_qkv(B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    rng = np.random.default_rng(0)
    segments = masks.Segments(jnp.asarray(np.sort(rng.integers(0, 3, (2, T)), axis=1)),
                              jnp.asarray(np.sort(rng.integers(0, 3, (2, S)), axis=1)))
    kw = dict(mask=masks.SlidingWindow(9, 4) & segments, sinks=jnp.array([0.5, -1.0, 0.0, 1.0]), dropout_rate=0.2,
              rng=jax.random.PRNGKey(7))
    bias = normal((1, 4, T, S), 5, 0.5)

    def fast(q, k, v, b):
        return rev.reversed_attention_xla(q, k, v, bias=b, **BLOCKS, **kw)

    def ref(q, k, v, b):
        return rev.reversed_attention_reference(q, k, v, bias=b, **kw)

    compare(fast, ref, (q, k, v, bias), (0, 1, 2, 3), names=["q", "k", "v", "bias"])


def test_reversed_xla_bf16_forward():
    """Forward only (one compile); the bf16 and causal gradients run under --runslow."""
    q, k, v = host_qkv(B=2, T=37, Hq=2, D=8, dtype=jnp.bfloat16)
    out = run_jitted(reversed_fn("xla", mask=masks.Causal()), q, k, v)
    assert_close(out, reversed_fn("reference", mask=masks.Causal())(q, k, v), rtol=TOLERANCE[jnp.bfloat16])


@pytest.mark.slow
@pytest.mark.parametrize("dtype,T,S,Hq,Hkv,mask", [
    (jnp.float32, 37, 37, 4, 2, masks.Causal()),
    (jnp.bfloat16, 37, 37, 2, 2, None),
    (jnp.bfloat16, 19, 37, 4, 1, masks.SlidingWindow(9, 4)),
])
def test_reversed_xla_against_reference_sweep(dtype, T, S, Hq, Hkv, mask):
    q, k, v = host_qkv(B=2, T=T, S=S, Hq=Hq, Hkv=Hkv, D=8, dtype=dtype)
    compare(reversed_fn("xla", mask=mask), reversed_fn("reference", mask=mask), (q, k, v), (0, 1, 2),
            rtol=TOLERANCE[dtype], names="qkv")


def test_reversed_registry_and_fallback():
    q, k, v = host_qkv(B=1, T=13, Hq=2, D=8)
    assert aj.registry.get("reversed") is rev.Reversed
    capped = run_jitted(lambda *a: (aj.attention(*a, mechanism="reversed", logits_soft_cap=5.0),  # xla refuses
                                    rev.reversed_attention_reference(*a, logits_soft_cap=5.0)), q, k, v)
    assert_close(*capped, rtol=1e-6, name="auto falls back to the reference")
    with pytest.raises(NotImplementedError, match="logits_soft_cap"):
        aj.attention(q, k, v, mechanism="reversed", logits_soft_cap=5.0, implementation="xla")
    with pytest.raises(NotImplementedError, match="return_lse"):
        aj.attention(q, k, v, mechanism="reversed", return_lse=True)


def test_transposed_mask():
    inner = masks.Causal() & masks.SlidingWindow(4, 1)
    T, S = 9, 13
    t = rev.TransposedMask(inner)
    np.testing.assert_array_equal(t.dense(S, T), np.swapaxes(np.asarray(inner.dense(T, S)), -1, -2))
    summary = np.asarray(t.block_summary(S, T, 4, 2))
    dense = np.asarray(t.dense(S, T))[0, 0]
    for i in range(summary.shape[2]):
        for j in range(summary.shape[3]):
            block = dense[4 * i:4 * i + 4, 2 * j:2 * j + 2]
            if summary[0, 0, i, j] == masks.EMPTY:
                assert not block.any()
            if summary[0, 0, i, j] == masks.FULL:
                assert block.all()


# ------------------------------------------------------------------------------------------------
# Reversed attention: the dependency readouts
# ------------------------------------------------------------------------------------------------


def one_hot_tree(parent, T=6, strength=10.0):
    """q_i = e_i, k_j = strength·e_parent(j): child j's logits peak at its parent."""
    q = jnp.eye(T, dtype=jnp.float32)[None, :, None, :]
    k = strength * jnp.eye(T, dtype=jnp.float32)[jnp.asarray(parent)][None, :, None, :]
    return q, k


def test_dependency_parents_hand_made_tree():
    parent = [1, 1, 1, 2, 2, 4]  # token 1 is the root (its own parent)
    q, k = one_hot_tree(parent)
    silenced = jnp.ones((1, 6, 1)).at[0, 3, 0].set(0.0)  # message controller: child 3 sends nothing

    def readouts(q, k):
        parents = functools.partial(rev.dependency_parents, q, k, scale=1.0)
        a_m = rev.dependency_mask(q, k, scale=1.0)
        return (parents(), parents(mask=masks.Causal()), parents(mask=rev.TransposedMask(masks.Causal())), a_m,
                rev.tree_parents(a_m), rev.tree_parents(rev.dependency_mask(q, k, scale=1.0, head_weights=silenced)))

    free, causal, anti_causal, a_m, tree, silenced_tree = run_jitted(readouts, q, k)
    np.testing.assert_array_equal(free[0, :, 0], parent)
    # Causal: child j may only send to parents i >= j. Children 2..5 lose their parent and fall
    # back to the first allowed query (their allowed logits are all 0).
    np.testing.assert_array_equal(causal[0, :, 0], [1, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(anti_causal[0, :, 0], [0, 1, 1, 2, 2, 4])
    np.testing.assert_array_equal(tree[0], parent)
    np.testing.assert_allclose(a_m.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(silenced_tree[0], [1, 1, 1, -1, 2, 4])


def test_dependency_parents_blocked_matches_dense_argmax():
    T = 37
    q, k, _ = host_qkv(B=2, T=T, Hq=4, Hkv=2, D=8)
    mask = masks.Causal() & masks.Explicit(jnp.arange(T) < T - 2)  # last 2 children: no parent

    def blocked_and_dense(q, k):
        a = rev.reversed_attention_weights(q, k, mask=mask)  # [B, Hq, T, S]
        dense = jnp.where(a.sum(axis=2) > 0, jnp.argmax(a, axis=2), -1).transpose(0, 2, 1)
        return rev.dependency_parents(q, k, mask=mask, block_q=8), dense

    got, expected = run_jitted(blocked_and_dense, q, k)
    np.testing.assert_array_equal(got, expected)
    assert np.all(np.asarray(got)[:, T - 2:] == -1)
