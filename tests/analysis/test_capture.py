"""Whole-model capture: one entry per attention call, in call order, equal to q/k recomputed from the layers."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import attention, masks
from attnjax.analysis import attention_entropy, sink_scores
from attnjax.analysis.capture import AttentionInputs, apply_to_layers, attention_maps, capture_attention
from attnjax.nn import Aaren, FlowAttention, MultiHeadAttention, SlidingWindowAttention
from attnjax.nn.capture import CapturedAttention, is_capturing
from attnjax.nn.conv import MOATBlock
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.positional import RoPE
from attnjax.vision.window import (grid_attention, grid_attention_inputs, grid_groups, relative_position_index,
                                   window_attention, window_attention_inputs, window_groups)
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


class Mixed(nnx.Module):
    """An MHA with a T5 position bias and ``Aaren`` on the tokens of a 6 × 6 map, then a windowed ``MOATBlock``
    (3 × 3 windows, relative position table) on the map: three kinds of attention layer."""

    def __init__(self, rngs: nnx.Rngs):
        bias = functools.partial(T5RelativeBias, bidirectional=True, num_buckets=8, max_distance=16)
        self.mha = MultiHeadAttention(8, 4, num_kv_heads=2, position_bias=bias, rngs=rngs)
        self.aaren = Aaren(8, 2, rngs=rngs)
        self.moat = MOATBlock(8, head_dim=4, window_size=3, relative_position=True, norm="layer", rngs=rngs)

    def __call__(self, x):
        B, H, W, C = x.shape
        t = x.reshape(B, H * W, C)
        t = t + self.mha(t)
        t = t + self.aaren(t, mask=masks.Causal())
        return self.moat(t.reshape(B, H, W, C))


def numpy_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mixed_model_records_one_entry_per_attention_layer_with_its_map():
    model = Mixed(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 8))

    def run(model, x):
        out, captured = capture_attention(model, x)
        t = x.reshape(2, 36, 8)
        mha, aaren, moat = model.mha, model.aaren, model.moat
        t1 = t + mha(t)
        t2 = t1 + aaren(t1, mask=masks.Causal())
        h = moat.attention_norm(moat.mbconv(t2.reshape(2, 6, 6, 8)))
        parts = dict(q=mha.query(t), k=mha.key(t), t5=mha.position_bias().tile(jnp.arange(36), jnp.arange(36), 36, 36),
                     aaren_q=aaren.query[...], aaren_k=aaren.key(t1), moat_q=moat.query(h), moat_k=moat.key(h),
                     table=moat.relative_position[...])
        return out, model(x), captured, attention_maps(captured), parts

    out, plain, captured, maps, parts = nnx.jit(run)(model, x)
    p = {name: np.asarray(a, np.float64) for name, a in parts.items()}
    assert_close(out, plain, name="outputs")
    assert [c.path for c in captured] == [("mha",), ("aaren",), ("moat",)]
    assert [c.q.shape for c in captured] == [(2, 36, 4, 2), (2, 36, 2, 4), (2 * 4, 9, 2, 4)]
    assert [c.k.shape for c in captured] == [(2, 36, 2, 2), (2, 36, 2, 4), (2 * 4, 9, 2, 4)]
    # Each layer's map recomputed with NumPy from its projections.
    want = numpy_softmax(np.einsum("bthd,bshd->bhts", p["q"], np.repeat(p["k"], 2, axis=2)) / np.sqrt(2) + p["t5"])
    assert_close(maps[0], want, rtol=1e-4, name="MHA map with its T5 bias")
    s = np.einsum("hd,bshd->bhs", p["aaren_q"], p["aaren_k"])
    s = np.where(np.tril(np.ones((36, 36), bool)), s[:, :, None, :] / 2.0, -np.inf)
    assert_close(maps[1], numpy_softmax(s), rtol=1e-4, name="Aaren: each prefix's softmax of the learned query")
    windows = [p[name].reshape(2, 2, 3, 2, 3, 2, 4).transpose(0, 1, 3, 2, 4, 5, 6).reshape(8, 9, 2, 4)
               for name in ("moat_q", "moat_k")]
    table = p["table"][relative_position_index(3)]                                          # [9, 9, heads]
    logits = np.einsum("wthd,wshd->whts", *windows) / 2.0 + table.transpose(2, 0, 1)
    assert_close(maps[2], numpy_softmax(logits), rtol=1e-4, name="MOAT: softmax within each 3 x 3 window")


def test_layers_that_record_nothing_are_refused_or_left_out():
    class WithLinear(nnx.Module):
        def __init__(self, rngs):
            self.mha = MultiHeadAttention(8, 2, rngs=rngs)
            self.flow = FlowAttention(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.flow(self.mha(x))

    model, x = WithLinear(nnx.Rngs(0)), jnp.ones((1, 5, 8))
    with pytest.raises(NotImplementedError, match=r"recorded nothing .*: flow \(FlowAttention\)"):
        capture_attention(model, x)
    out, captured = capture_attention(model, x, uncaptured="ignore")
    assert [c.path for c in captured] == [("mha",)]
    assert_close(out, model(x), name="outputs")
    with pytest.raises(ValueError, match="uncaptured must be one of"):
        capture_attention(model, x, uncaptured="skip")


@pytest.mark.parametrize("partition", ["shifted-window", "grid"])
def test_window_inputs_are_the_call_that_window_attention_makes(partition):
    """What a window layer records (``window_attention_inputs`` / ``grid_attention_inputs``), attended with the
    values grouped the same way, gives ``window_attention`` / ``grid_attention`` on a padded map."""
    q, k, v = (jax.random.normal(key, (2, 5, 7, 2, 4)) for key in jax.random.split(jax.random.key(3), 3))
    table = jax.random.normal(jax.random.key(4), (5 * 5, 2))
    if partition == "grid":
        groups, _ = grid_groups(5, 7, grid_size=3)
        inputs, attend, where = grid_attention_inputs, grid_attention, dict(grid_size=3, relative_bias_table=table)
    else:
        groups = window_groups(5, 7, 3, 1)
        inputs, attend = window_attention_inputs, window_attention
        where = dict(window_size=3, shift_size=1, relative_bias_table=table)

    def run(q, k, v):
        qg, kg, mask, bias = inputs(q, k, **where)
        out = attention(qg, kg, groups.tokens(v), mask=mask, bias=bias)
        got = groups.unfold(out.reshape(*out.shape[:2], 8)).reshape(2, 5, 7, 2, 4)
        return qg, mask, bias, got, attend(q, k, v, **where)

    qg, mask, bias, got, want = jax.jit(run)(q, k, v)
    assert mask is not None and bias.shape == (2, 9, 9) and qg.shape[1:] == (9, 2, 4)
    assert_close(got, want, rtol=1e-5, name=partition)
