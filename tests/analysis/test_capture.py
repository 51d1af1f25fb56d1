"""Whole-model capture: one entry per attention call, in call order, equal to q/k recomputed from the layers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.analysis import attention_entropy, sink_scores
from attnjax.analysis.capture import AttentionInputs, apply_to_layers, attention_maps, capture_attention
from attnjax.nn import MultiHeadAttention, SlidingWindowAttention
from attnjax.nn.capture import CapturedAttention, is_capturing
from attnjax.positional import RoPE
from tests.helpers import assert_close

B, T, D_MODEL = 2, 7, 16


class Stack(nnx.Module):
    """``b`` (sliding window, 2 heads), then ``a`` (GQA 4/2 with RoPE), then ``b`` again: the attribute
    order (a, b) is not the call order (b, a, b)."""

    def __init__(self, rngs: nnx.Rngs):
        self.a = MultiHeadAttention(D_MODEL, 4, num_kv_heads=2, rope=RoPE(base=100.0), rngs=rngs)
        self.b = SlidingWindowAttention(D_MODEL, 2, window=3, rngs=rngs)

    def __call__(self, x, *, mask=None):
        return self.b(self.a(self.b(x, mask=mask), mask=mask), mask=mask)


def by_hand(model: Stack, x: jax.Array):
    """The q and k each call attends with, from the layers' projections (and RoPE for ``a``)."""
    positions = jnp.arange(T)
    x1 = model.b(x, mask=masks.Causal())
    x2 = model.a(x1, mask=masks.Causal())
    qa, ka = model.a.rope(model.a.query(x1), positions), model.a.rope(model.a.key(x1), positions)
    return [(model.b.query(x), model.b.key(x)), (qa, ka), (model.b.query(x2), model.b.key(x2))], model(x, mask=masks.Causal())


@pytest.fixture(scope="module")
def setup():
    model = Stack(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, T, D_MODEL))
    return model, x


def test_one_entry_per_call_in_call_order_equal_to_hand_computed_q_k_and_tools(setup):
    model, x = setup
    graph, state = nnx.split(model)
    window = masks.SlidingWindow(2, 0) & masks.Causal()
    layer_masks = [window, masks.Causal(), window]

    def run(model, x):
        out, captured = capture_attention(model, x, mask=masks.Causal())
        hand, expected_out = by_hand(model, x)
        tools = (apply_to_layers(attention_entropy, captured, block_q=4), apply_to_layers(sink_scores, captured),
                 attention_maps(captured))
        hand_tools = ([attention_entropy(q, k, mask=m, block_q=3) for (q, k), m in zip(hand, layer_masks)],
                      [sink_scores(q, k, mask=m) for (q, k), m in zip(hand, layer_masks)])
        return out, captured, hand, expected_out, tools, hand_tools

    out, captured, hand, expected_out, (entropies, sinks, maps), (hand_entropies, hand_sinks) = nnx.jit(run)(model, x)
    assert [c.path for c in captured] == [("b",), ("a",), ("b",)] and [c.index for c in captured] == [0, 1, 2]
    assert [c.q.shape for c in captured] == [(B, T, 2, 8), (B, T, 4, 4), (B, T, 2, 8)]
    assert [c.k.shape for c in captured] == [(B, T, 2, 8), (B, T, 2, 4), (B, T, 2, 8)]
    assert [c.scale for c in captured] == [8 ** -0.5, 4 ** -0.5, 8 ** -0.5]
    for c, (q, k), m in zip(captured, hand, layer_masks):
        assert_close(c.q, q, name=f"q of {c.path}")
        assert_close(c.k, k, name=f"k of {c.path}")
        np.testing.assert_array_equal(np.asarray(c.mask.dense(T, T)), np.asarray(m.dense(T, T)))
    assert_close(out, expected_out, name="outputs")
    for e, h, s, hs, m in zip(entropies, hand_entropies, sinks, hand_sinks, maps):
        assert_close(e, h, rtol=1e-5, name="entropy")
        assert_close(s, hs, rtol=1e-5, name="sink scores")
        np.testing.assert_allclose(np.asarray(m).sum(-1), 1.0, rtol=1e-5)  # every row sees a key
    assert [e.shape for e in entropies] == [(B, 2, T), (B, 4, T), (B, 2, T)]
    assert np.max(np.asarray(entropies[0])) <= np.log(3) + 1e-5  # window of 3 keys
    assert np.max(np.asarray(entropies[1])[..., -1]) > np.log(3)  # the causal layer's last row sees 7 keys
    assert_unchanged(model, graph, state)


def assert_unchanged(model, graph, state):
    """No captured or other intermediate left behind; the same graph and the same state values."""
    assert not nnx.state(model, nnx.Intermediate) and not nnx.state(model, CapturedAttention)
    graph_after, state_after = nnx.split(model)
    assert graph_after == graph
    assert jax.tree.structure(state_after) == jax.tree.structure(state)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), state_after, state)))


def test_eager_capture_and_capture_off_by_default(setup):
    """Eagerly, on one layer: a plain call sows nothing (a sow outside ``nnx.capture`` would warn), a capture
    gives the layer's q and k with path ``()``, and the layer is unchanged."""
    layer, x = setup[0].a, setup[1][:, :3]
    graph, state = nnx.split(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not is_capturing()
        plain = layer(x)
        out, captured = capture_attention(layer, x)
        assert not is_capturing()
    assert_close(out, plain, name="outputs")
    (c,) = captured
    assert isinstance(c, AttentionInputs) and (c.path, c.index, c.mask, c.mechanism) == ((), 0, None, "softmax")
    positions = jnp.arange(3)
    assert_close(c.q, layer.rope(layer.query(x), positions), name="q")
    assert_close(c.k, layer.rope(layer.key(x), positions), name="k")
    assert_unchanged(layer, graph, state)


def test_non_softmax_layers_and_sequence_parallel_layers_are_refused():
    rngs = nnx.Rngs(0)
    x = jnp.ones((1, 4, 8))
    sigmoid = MultiHeadAttention(8, 2, mechanism="sigmoid", implementation="reference", rngs=rngs)
    _, captured = nnx.jit(capture_attention)(sigmoid, x)
    assert [c.mechanism for c in captured] == ["sigmoid"]
    with pytest.raises(ValueError, match="sigmoid"):
        apply_to_layers(attention_entropy, captured)
    with pytest.raises(TypeError, match="AttentionInputs"):
        apply_to_layers(attention_entropy, [(captured[0].q, captured[0].k)])
    sequence_parallel = MultiHeadAttention(8, 2, sequence_parallel="sp", rngs=rngs)
    with pytest.raises(NotImplementedError, match="sequence_parallel"):
        capture_attention(sequence_parallel, x, positions=jnp.arange(4))
    assert not is_capturing()
