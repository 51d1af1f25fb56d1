"""attnjax.nn.MultiHeadAttention: shapes, GQA, masks, RoPE, KV-cache decoding, dropout, jit/grad, Linen bridge."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

from attnjax import masks
from attnjax.nn import KVCache, MultiHeadAttention, SlidingWindowAttention
from attnjax.positional import RoPE
from attnjax.softmax import Softmax
from tests.helpers import assert_close

B, T, D_MODEL, HEADS = 2, 6, 16, 4


def inputs(seed=0, T=T, d=D_MODEL):
    return jax.random.normal(jax.random.key(seed), (B, T, d), jnp.float32)


def layer(**kw):
    """A small layer; the naive path keeps eager tests fast (the blocked path is tested in test_softmax)."""
    return MultiHeadAttention(D_MODEL, HEADS, **{"implementation": "reference", "rngs": nnx.Rngs(0), **kw})


def naive_mha(m, x, context):
    """Hand-written MHA with repeated KV heads, from the module's parameters."""
    q = jnp.einsum("btd,dhk->bthk", x, m.query.kernel[...])
    k = jnp.einsum("bsd,dhk->bshk", context, m.key.kernel[...])
    v = jnp.einsum("bsd,dhk->bshk", context, m.value.kernel[...])
    group = m.num_heads // m.num_kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    p = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(m.head_dim), axis=-1)
    return jnp.einsum("bhts,bshk,hkd->btd", p, v, m.out.kernel[...])


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_self_attention_matches_naive(num_kv_heads):
    m = layer(num_kv_heads=num_kv_heads)
    x = inputs()
    y = m(x)
    assert y.shape == (B, T, D_MODEL)
    assert m.key.kernel.shape == (D_MODEL, num_kv_heads, D_MODEL // HEADS)
    assert_close(y, naive_mha(m, x, x), rtol=1e-5, name="y")


def test_cross_attention_matches_naive():
    m = layer(num_kv_heads=2, head_dim=8, context_dim=12)
    x, context = inputs(), inputs(seed=1, T=5, d=12)
    y = m(x, context)
    assert y.shape == (B, T, D_MODEL)
    assert_close(y, naive_mha(m, x, context), rtol=1e-5, name="y")


def test_qkv_bias_and_dtype():
    m = layer(qkv_bias=True, dtype=jnp.bfloat16)
    assert m.query.bias is not None and m.out.bias is None
    assert m.query.kernel.dtype == jnp.float32
    assert m(inputs()).dtype == jnp.bfloat16


def test_causal_mask_hides_future_tokens():
    m = layer(num_kv_heads=2, rope=RoPE())
    x = inputs()
    changed = x.at[:, 4:].set(inputs(seed=1)[:, 4:])
    y, y_changed = m(x, mask=masks.Causal()), m(changed, mask=masks.Causal())
    np.testing.assert_array_equal(y[:, :4], y_changed[:, :4])
    assert not np.allclose(y[:, 4:], y_changed[:, 4:])
    assert not np.allclose(m(x)[:, :4], y[:, :4])  # without the mask the past does see the future


def test_rope_positions():
    m = layer(rope=RoPE())
    x = inputs()
    # RoPE is relative: shifting every position leaves attention unchanged, other positions don't.
    assert_close(m(x, positions=jnp.arange(T) + 7), m(x), rtol=1e-5, name="shifted")
    assert not np.allclose(m(x, positions=jnp.arange(T)[::-1]), m(x), atol=1e-4)
    with pytest.raises(ValueError, match="cross-attention"):
        m(x, inputs(seed=1), positions=jnp.arange(T))


@pytest.mark.parametrize("jit, implementation", [(False, "reference"), (True, "auto")])
def test_decode_matches_parallel_causal(jit, implementation):
    m = layer(num_kv_heads=2, qkv_bias=True, rope=RoPE(base=100.0), implementation=implementation)
    x = inputs()
    expected = m(x, mask=masks.Causal())
    decode = nnx.jit(MultiHeadAttention.decode) if jit else MultiHeadAttention.decode
    cache = m.init_cache(B, max_len=T + 3)
    assert cache.k.shape == (B, T + 3, 2, D_MODEL // HEADS) and int(cache.length) == 0
    steps = []
    for t in range(T):
        y_t, cache = decode(m, x[:, t:t + 1], cache)
        steps.append(y_t)
    assert isinstance(cache, KVCache) and int(cache.length) == T
    assert_close(jnp.concatenate(steps, axis=1), expected, atol=1e-5, rtol=1e-5, name="decode")


def test_decode_checks_input_and_mechanism():
    m = layer()
    with pytest.raises(ValueError, match="x_t"):
        m.decode(inputs(T=2), m.init_cache(B, 4))

    @dataclasses.dataclass(frozen=True)
    class Unregistered(Softmax):
        name: ClassVar[str] = "unregistered"

    m = layer(mechanism=Unregistered())
    assert_close(m(inputs()), naive_mha(m, inputs(), inputs()), rtol=1e-5, name="y")
    with pytest.raises(NotImplementedError, match="softmax"):
        m.decode(inputs(T=1), KVCache(jnp.zeros((B, 4, HEADS, 4)), jnp.zeros((B, 4, HEADS, 4)), jnp.int32(0)))


def test_dropout_train_eval_and_seed():
    x = inputs()
    m = layer(dropout_rate=0.5)
    train_1, train_2 = m(x), m(x)
    assert not np.allclose(train_1, train_2)  # the dropout stream advances between calls
    assert_close(layer(dropout_rate=0.5)(x), train_1, rtol=0, atol=0, name="same seed")
    plain = m(x, deterministic=True)
    assert_close(plain, layer()(x), rtol=0, atol=0, name="no dropout")
    assert not np.allclose(train_1, plain)
    assert_close(nnx.view(m, deterministic=True)(x), plain, rtol=0, atol=0, name="view")
    m.eval()
    assert_close(m(x), plain, rtol=0, atol=0, name="eval")
    m.train()
    assert not np.allclose(m(x), plain)


def test_jit_and_grad():
    m = layer(num_kv_heads=2, rope=RoPE(), dropout_rate=0.1)
    x, target = inputs(), inputs(seed=1)

    @nnx.jit
    def forward(m, x):
        return m(x, mask=masks.Causal())

    assert not np.allclose(forward(m, x), forward(m, x))  # rng state is carried through jit
    m.eval()
    assert_close(forward(m, x), m(x, mask=masks.Causal()), rtol=1e-6, name="jit")

    def loss(m):
        return jnp.mean((m(x, mask=masks.Causal()) - target) ** 2)

    @nnx.jit
    def sgd_step(m):
        value, grads = nnx.value_and_grad(loss)(m)
        nnx.update(m, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(m, nnx.Param), grads))
        return value, grads

    before, grads = sgd_step(m)
    for path, g in nnx.to_flat_state(grads):
        assert np.all(np.isfinite(g[...])) and np.any(g[...] != 0), path
    assert loss(m) < before


def test_linen_bridge():
    kw = dict(num_kv_heads=2, rope=RoPE(), dropout_rate=0.1, implementation="reference")
    model = bridge.to_linen(MultiHeadAttention, D_MODEL, HEADS, **kw)
    x = inputs()
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    assert variables["params"]["key"]["kernel"].shape == (D_MODEL, 2, D_MODEL // HEADS)

    m = layer(**kw)
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    apply = jax.jit(model.apply, static_argnames="deterministic")
    y = apply({"params": params}, x, mask=masks.Causal(), deterministic=True)
    assert_close(y, m(x, mask=masks.Causal(), deterministic=True), rtol=1e-6, name="linen")
    dropped = apply({"params": params}, x, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(dropped, apply({"params": params}, x, deterministic=True))

    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, deterministic=True) ** 2)))(params)
    expected = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, deterministic=True) ** 2)))(m)
    jax.tree_util.tree_map_with_path(lambda path, g, e: assert_close(g, e, rtol=1e-5, name=jax.tree_util.keystr(path)),
                                     grads, nnx.to_pure_dict(expected))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(d_model=10), "d_model"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=5, rope=RoPE()), "rotary_dim"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(implementation="cuda"), "implementation"),
    (dict(mechanism="no-such-mechanism"), "unknown mechanism"),
])
def test_bad_constructor_args(kwargs, match):
    kwargs = {"d_model": D_MODEL, "num_heads": HEADS, "rngs": nnx.Rngs(0), **kwargs}
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_bad_constructor_types():
    with pytest.raises(TypeError, match="rope must be"):
        layer(rope="rope")
    with pytest.raises(TypeError, match="mechanism must be"):
        layer(mechanism=Softmax)  # the class, not a config object


def test_bad_call_inputs():
    m = layer(context_dim=12)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        m(inputs(d=12))
    with pytest.raises(ValueError, match="context"):
        m(inputs(), inputs(d=16))
    token_ids = jnp.zeros((B, T), jnp.int32)
    with pytest.raises(TypeError, match=r"x must be a floating-point array .*embed token ids first.* int32"):
        m(token_ids)
    with pytest.raises(TypeError, match=r"context must be a floating-point array .* int8"):
        m(inputs(), jnp.zeros((B, T, 12), jnp.int8))
    with pytest.raises(TypeError, match=r"x_t must be a floating-point array .* uint8"):
        m.decode(jnp.zeros((B, 1, D_MODEL), jnp.uint8), m.init_cache(B, 4))


@pytest.mark.parametrize("batch, max_len, name", [(B, 0, "max_len"), (B, -1, "max_len"), (0, 4, "batch"),
                                                  (-B, 4, "batch"), (B, 4.0, "max_len")])
def test_init_cache_refuses_non_positive_sizes(batch, max_len, name):
    value = max_len if name == "max_len" else batch
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value}"):
        layer().init_cache(batch, max_len)


@dataclasses.dataclass(frozen=True)
class NoGQANoMask(Softmax):
    """Softmax without the "gqa" and "mask" options: a mechanism a GQA or windowed module can't use."""

    name: ClassVar[str] = "no_gqa_no_mask"
    supports: ClassVar[frozenset] = frozenset({"cross"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=2, mechanism=NoGQANoMask()), r"MultiHeadAttention needs \['gqa'\] from its mechanism, "
                                                   r"which 'no_gqa_no_mask' does not support"),
    (dict(dropout_rate=0.1, mechanism="stick_breaking"), r"needs \['dropout'\] .* 'stick_breaking'"),
    (dict(num_kv_heads=1, dropout_rate=0.1, mechanism=NoGQANoMask()), r"needs \['dropout', 'gqa'\]"),
    (dict(mechanism="reversed", implementation="pallas"), "'reversed' has no 'pallas' implementation"),
    (dict(implementation="recurrent"), "'softmax' has no 'recurrent' implementation"),
])
def test_unusable_mechanism_is_refused_at_construction(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        layer(**kwargs)


def test_usable_mechanisms_construct():
    layer(mechanism=NoGQANoMask())  # no GQA, no dropout: nothing it lacks is needed
    layer(num_kv_heads=2, mechanism="stick_breaking")
    layer(dropout_rate=0.1, mechanism="sigmoid", implementation="pallas")


def test_sliding_window_needs_a_mechanism_with_masks():
    with pytest.raises(NotImplementedError, match=r"SlidingWindowAttention needs \['mask'\]"):
        SlidingWindowAttention(D_MODEL, HEADS, window=2, mechanism=NoGQANoMask(), rngs=nnx.Rngs(0))


def test_unknown_mechanism_name_lists_the_registered_names():
    with pytest.raises(ValueError, match=r"unknown mechanism 'sofmax'.*'softmax'"):
        layer(mechanism="sofmax")
