"""ACT (Yu et al., ICML 2024): on a planted sink, the calibrated map of both paths against the rule written in NumPy
(sinks found, sink columns scaled by β, the removed mass spread over the row's other keys in proportion, other
heads untouched, rows summing to 1); the xla path against the reference through the registry's conformance check
(output and q/k/v gradients, jit, bf16); the model-level use (a layer built with ``ACT``, a built model calibrated
by ``act_layers``) against the functional call; the head search; and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import masks
from attnjax.inference import (ACT, act_attention_reference, act_attention_xla, act_layers, act_sinks,
                               mean_received_attention, search_act_heads)
from attnjax.nn.attention import MultiHeadAttention
from attnjax.testing import conformance
from tests.helpers import assert_close, numpy_rng

B, T, HQ, HKV, D = 2, 11, 4, 2, 8
SINK, HEADS, ALPHA, BETA = 4, (1, 2), 4.0, 0.4


def planted_inputs():
    """q, k with key ``SINK`` drawing most of every later query's attention, and one-hot values (``v = I``), so the
    attention output is the attention map itself."""
    rng = numpy_rng(jax.random.PRNGKey(0))
    q = rng.standard_normal((B, T, HQ, D)).astype(np.float32) * 0.5
    k = rng.standard_normal((B, T, HKV, D)).astype(np.float32) * 0.5
    q[..., 0] += 3.0
    k[:, SINK, :, 0] += 3.0
    v = np.broadcast_to(np.eye(T, dtype=np.float32)[None, :, None, :], (B, T, HKV, T))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def numpy_act(q, k, heads, alpha, beta):
    """The rule in float64, loop by loop: causal softmax maps, mean received attention over the queries that see
    each key, sinks ``j > 0`` above ``alpha / T`` in the chosen heads, then ``β`` on the sinks and the rest spread
    over the row's other keys in proportion. Returns (calibrated maps [B, Hq, T, T], softmax maps, sinks
    [B, Hq, T])."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    maps, plain = np.zeros((B, HQ, T, T)), np.zeros((B, HQ, T, T))
    sinks = np.zeros((B, HQ, T), bool)
    for b in range(B):
        for h in range(HQ):
            s = q[b, :, h] @ k[b, :, h // (HQ // HKV)].T / np.sqrt(D)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            plain[b, h] = a.copy()
            if h in heads:
                score = a.sum(0) / np.arange(T, 0, -1)
                sinks[b, h] = (score > alpha / T) & (np.arange(T) > 0)
                for i in range(T):
                    row, cols = a[i].copy(), sinks[b, h]
                    removed, rest = (1 - beta) * row[cols].sum(), row[~cols].sum()
                    if rest > 0:
                        row[~cols] += removed * row[~cols] / rest
                        row[cols] *= beta
                    a[i] = row
            maps[b, h] = a
    return maps, plain, sinks


@pytest.mark.parametrize("path", [act_attention_reference, act_attention_xla])
def test_planted_sink_mass_moves_as_the_rule_says(path):
    q, k, v = planted_inputs()
    expected, plain, sinks = numpy_act(q, k, HEADS, ALPHA, BETA)
    assert sinks[:, list(HEADS), SINK].all() and sinks.sum() == len(HEADS) * B, "the planted key is the only sink"
    found = act_sinks(q, k, heads=HEADS, alpha=ALPHA, mask=masks.Causal(), block_q=4, block_kv=4)
    np.testing.assert_array_equal(np.asarray(found)[:, list(HEADS)], sinks[:, list(HEADS)])
    assert not np.asarray(found)[:, [0, 3]].any()

    options = dict(block_q=4, block_kv=4) if path is act_attention_xla else {}
    run = jax.jit(functools.partial(path, heads=HEADS, alpha=ALPHA, beta=BETA, mask=masks.Causal(), **options))
    got = np.asarray(run(q, k, v)).transpose(0, 2, 1, 3)  # [B, Hq, T, S]: the calibrated maps
    assert_close(got, expected, atol=1e-5, name=path.__name__)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got[:, [0, 3]], plain[:, [0, 3]], atol=1e-6)  # other heads untouched
    late = slice(SINK, T)  # rows that see the sink: β of its attention stays, the rest is spread
    np.testing.assert_allclose(got[:, list(HEADS), late, SINK], BETA * plain[:, list(HEADS), late, SINK], atol=1e-6)
    assert (got[:, list(HEADS), late, :SINK] > plain[:, list(HEADS), late, :SINK]).all()
    np.testing.assert_allclose(got[:, list(HEADS), :SINK], plain[:, list(HEADS), :SINK], atol=1e-6)


def test_xla_matches_reference_with_gradients_jit_and_bf16():
    config = conformance.small_tiles(ACT(heads=(0, 3), alpha=3.0))
    case = next(c for c in conformance.cases(config) if c.name == "core")  # causal, GQA, cross (T < S)
    arrays = conformance.inputs(case)
    found = act_sinks(arrays["q"], arrays["k"], heads=config.heads, alpha=config.alpha, mask=masks.Causal())
    assert bool(found.any()), "the case must have sinks, else it only checks softmax"
    conformance.check_against_reference(config, "xla", case)
    conformance.check_bf16(config, "xla", case)


class TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([MultiHeadAttention(16, HQ, num_kv_heads=HKV, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        for layer in self.layers:
            x = x + layer(x, mask=masks.Causal())
        return x


def test_model_level_use_equals_the_functional_call():
    model = TwoLayers(nnx.Rngs(0))
    built = MultiHeadAttention(16, HQ, num_kv_heads=HKV, mechanism=ACT(heads=(1, 2), alpha=1.5), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, 16)) * 3.0
    call = nnx.jit(lambda layer, x: layer(x, mask=masks.Causal()))
    plain = call(model.layers[0], x)
    act_layers(model, [(1, 2), ()], alpha=1.5)
    layer = model.layers[0]
    assert layer.mechanism == built.mechanism and model.layers[1].mechanism.name == "softmax"
    calibrated = call(layer, x)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    functional = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, mechanism=ACT(heads=(1, 2), alpha=1.5),
                                                           mask=masks.Causal()))(q, k, v)
    assert_close(calibrated, layer.out(functional), atol=1e-6, name="act_layers")
    assert_close(call(built, x), calibrated, atol=1e-6, name="built with ACT (same initial weights)")
    assert float(jnp.max(jnp.abs(calibrated - plain))) > 1e-3, "the calibration changed nothing"


def test_head_search_keeps_the_heads_that_help():
    helpful = {(0, 2), (1, 0)}
    calls = []

    def evaluate(heads_per_layer):
        calls.append(heads_per_layer)
        chosen = {(l, h) for l, hs in enumerate(heads_per_layer) for h in hs}
        return 0.5 + 0.1 * len(chosen & helpful) - 0.1 * len(chosen - helpful)

    assert search_act_heads(evaluate, num_layers=2, num_heads=3) == ((2,), (0,))
    assert len(calls) == 1 + 2 * 3 and calls[0] == ((), ())
    assert search_act_heads(evaluate, num_layers=2, num_heads=3, layers=[1]) == ((), (0,))


def test_errors_name_the_argument():
    q, k, v = planted_inputs()
    with pytest.raises(TypeError, match="heads must hold ints"):
        ACT(heads=(1.5,), alpha=1.0)
    with pytest.raises(ValueError, match="heads must be distinct"):
        ACT(heads=(1, 1), alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        ACT(heads=(1,), alpha=0.0)
    with pytest.raises(ValueError, match=r"beta .* must be in \[0, 1\]"):
        ACT(heads=(1,), alpha=1.0, beta=1.5)
    with pytest.raises(ValueError, match=r"heads \(7,\) must index the 4 query heads"):
        act_attention_reference(q, k, v, heads=(7,), alpha=1.0)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        mean_received_attention(q, k, block_q=0)
    with pytest.raises(NotImplementedError, match="does not support"):
        attnjax.attention(q, k, v, mechanism=ACT(heads=(1,), alpha=1.0), bias=jnp.zeros((T, T)))
    model = TwoLayers(nnx.Rngs(0))
    with pytest.raises(ValueError, match="heads has 1 entries but the model has 2"):
        act_layers(model, [(1,)], alpha=1.0)
    model.layers[1].mechanism = attnjax.softmax.Sigmoid()
    with pytest.raises(NotImplementedError, match="layer 1 has mechanism 'sigmoid'"):
        act_layers(model, [(), (0,)], alpha=1.0)
