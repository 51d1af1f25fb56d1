"""The layers and blocks of ``attnjax.nn`` take ``MultiHeadAttention``'s call and cache arguments.

``__call__(x, ..., *, mask=None, ...)`` with a subset of MHA's parameters in MHA's order, and for every
decoding one ``init_cache(batch, max_len, dtype=None)`` and ``decode(x_t, cache) -> (y_t, cache)``, so a
model or a generation loop written for ``MultiHeadAttention`` takes any of them unchanged (the loop
itself runs over every decoding spec in ``tests/test_module_conformance.py``). Also: what a layer
does with a mask it can or can't serve, integer inputs, and bad cache sizes.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn import (Aaren, BasedBlock, BasedLinearAttention, MultiHeadAttention, SimplicialAttention,
                        SlidingWindowAttention, TransNormerAttention, TransNormerBlock)
from attnjax.nn.registry import modules
from tests.helpers import assert_close

SPECS = [spec for spec in modules() if spec.kind in ("layer", "block")]
DECODERS = [spec for spec in SPECS if spec.decodes]
CAUSAL_BY_CONSTRUCTION = (Aaren, BasedLinearAttention, TransNormerAttention, TransNormerBlock, BasedBlock)


def parametrize(specs):
    return pytest.mark.parametrize("spec", specs, ids=lambda spec: f"{spec.kind}-{spec.name}")


def parameters(method) -> list:
    """``(name, kind, default)`` of each parameter after ``self``."""
    return [(p.name, p.kind, p.default) for p in list(inspect.signature(method).parameters.values())[1:]]


def normal(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def traced(spec, fn):
    """``fn(model)`` on the spec's module, built and called under ``jax.eval_shape``: no initializer or layer runs or
    compiles, and the argument checks raise while tracing."""
    return jax.eval_shape(lambda: fn(spec.build(nnx.Rngs(0))))


def test_every_layer_and_block_is_covered():
    assert {spec.module for spec in SPECS} >= {MultiHeadAttention, SimplicialAttention, SlidingWindowAttention,
                                               *CAUSAL_BY_CONSTRUCTION}
    assert {spec.module for spec in DECODERS} >= {MultiHeadAttention, SlidingWindowAttention, *CAUSAL_BY_CONSTRUCTION}


@parametrize(SPECS)
def test_call_takes_multi_head_attentions_arguments(spec):
    mha = {name: (name, kind, default) for name, kind, default in parameters(MultiHeadAttention.__call__)}
    own = parameters(spec.module.__call__)
    names = [name for name, _, _ in own]
    assert names[0] == "x" and "mask" in names, names
    assert own == [mha[name] for name in mha if name in names], "MHA's parameters (kind, default), in MHA's order"


@parametrize(DECODERS)
def test_cache_methods_take_multi_head_attentions_arguments(spec):
    for method in ("init_cache", "decode"):
        assert parameters(getattr(spec.module, method)) == parameters(getattr(MultiHeadAttention, method)), method


@parametrize(SPECS)
def test_integer_inputs_are_refused_naming_the_argument_and_dtype(spec):
    token_ids = jnp.zeros(spec.inputs, jnp.int32)
    with pytest.raises(TypeError, match=r"x must be a floating-point array .* got dtype int32"):
        traced(spec, lambda model: model(token_ids, **spec.call_kwargs))
    if spec.decodes:
        with pytest.raises(TypeError, match=r"x_t must be a floating-point array .* got dtype int32"):
            traced(spec, lambda model: model.decode(token_ids[:, :1], model.init_cache(spec.inputs[0], 4)))


@parametrize(DECODERS)
@pytest.mark.parametrize("batch, max_len, name", [(0, 4, "batch"), (-2, 4, "batch"), (2, 0, "max_len"),
                                                  (2, -1, "max_len")])
def test_init_cache_refuses_non_positive_sizes(spec, batch, max_len, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        traced(spec, lambda model: model.init_cache(batch, max_len))


@parametrize(DECODERS)
def test_init_cache_dtype_is_kept_by_decode(spec):
    """Shapes and dtypes only: the module is built, its cache made and one step decoded under ``jax.eval_shape``."""
    def floats(cache):
        return {a.dtype for a in jax.tree.leaves(cache) if jnp.issubdtype(a.dtype, jnp.floating)}

    def build_and_decode(x_t):
        model = spec.build(nnx.Rngs(0))
        cache = model.init_cache(spec.inputs[0], 4, jnp.bfloat16)
        return cache, model.decode(x_t, cache)

    x_t = jax.ShapeDtypeStruct((spec.inputs[0], 1, spec.inputs[2]), jnp.float32)
    cache, (y_t, stepped) = jax.eval_shape(build_and_decode, x_t)
    assert floats(cache) == {jnp.dtype(jnp.bfloat16)}
    assert floats(stepped) == {jnp.dtype(jnp.bfloat16)} and y_t.shape == (spec.inputs[0], 1, spec.inputs[2])


@parametrize([spec for spec in SPECS if spec.module in CAUSAL_BY_CONSTRUCTION])
def test_causal_by_construction_layers_refuse_other_masks(spec):
    x = normal(spec.inputs)
    for mask in (masks.SlidingWindow(2, 0), masks.Causal() & masks.Segments(jnp.zeros(spec.inputs[:2], jnp.int32))):
        with pytest.raises(NotImplementedError, match=r"takes mask=None or masks.Causal\(\) only, got"):
            traced(spec, lambda model: model(x, mask=mask))


def test_sliding_window_combines_a_mask_with_its_window():
    """Packed sequences: with ``Segments`` each segment is attended as if it were alone."""
    layer = SlidingWindowAttention(16, 2, window=3, implementation="reference", rngs=nnx.Rngs(0))
    call = nnx.jit(lambda m, x, mask: m(x, mask=mask))
    a, b = normal((1, 5, 16), 1), normal((1, 4, 16), 2)
    ids = jnp.array([[0] * 5 + [1] * 4])
    packed = call(layer, jnp.concatenate([a, b], axis=1), masks.Segments(ids))
    assert_close(packed, jnp.concatenate([call(layer, a, None), call(layer, b, None)], axis=1), rtol=1e-5,
                 name="segments")
    assert_close(call(layer, a, masks.Causal()), call(layer, a, None), rtol=0, atol=0, name="causal")


def test_sliding_window_cache_holds_at_most_max_len_tokens():
    layer = SlidingWindowAttention(16, 2, window=4, rngs=nnx.Rngs(0))
    x = normal((2, 3, 16))
    cache = layer.init_cache(2, 3)
    assert cache.k.shape == (2, 3, 2, 8) and layer.init_cache(2, 30).k.shape == (2, 4, 2, 8)
    decode, steps = nnx.jit(lambda m, x_t, c: m.decode(x_t, c)), []
    for t in range(3):
        y_t, cache = decode(layer, x[:, t:t + 1], cache)
        steps.append(y_t)
    parallel = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x)
    assert_close(jnp.concatenate(steps, axis=1), parallel, rtol=1e-5, name="decode")


def test_simplicial_causal_mask_makes_a_non_causal_layer_causal():
    make = lambda causal: SimplicialAttention(16, 2, causal=causal, implementation="reference", rngs=nnx.Rngs(0))
    x = normal((1, 5, 16))
    bidirectional, causal = make(False), make(True)
    assert_close(bidirectional(x, mask=masks.Causal()), causal(x), rtol=1e-6, name="causal")
    assert not np.allclose(bidirectional(x), causal(x), atol=1e-4)
    with pytest.raises(NotImplementedError, match=r"SimplicialAttention takes mask=None or masks.Causal\(\) only"):
        causal(x, mask=masks.SlidingWindow(1, 0))
    with pytest.raises(NotImplementedError, match=r"causal=False\) does not decode"):
        bidirectional.init_cache(1, 8)
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 1, d_model\]"):
        causal.decode(x[:, :2], causal.init_cache(1, 8))
