"""VHD / VHR (He et al., ACL 2025): on a hand-built layer where one head reads the span and the other ignores it,
the divergence scores the first and VHR selects it; the surge filter and the median rule on constructed scores;
T-VHD; the reinforced layer against head outputs scaled by alpha before W_O (decoding included); and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.inference.head_steering import (head_divergence, head_outputs, reinforce_heads, select_heads,
                                             token_divergence)
from attnjax.nn.attention import MultiHeadAttention
from tests.helpers import assert_close

heads_of = nnx.jit(lambda layer, x: head_outputs(layer, x, mask=masks.Causal()))
call = nnx.jit(lambda layer, x: layer(x, mask=masks.Causal()))


def span_layer() -> MultiHeadAttention:
    """Features: [1, text content, span flag, span content]. Head 0 attends uniformly and reads the span content;
    head 1 gives span keys a logit of -36/sqrt(2) and reads the text content."""
    layer = MultiHeadAttention(4, 2, out_bias=True, rngs=nnx.Rngs(0))
    wq, wk, wv = (np.zeros((4, 2, 2), np.float32) for _ in range(3))
    wq[0, 1, 0] = 6.0
    wk[2, 1, 0] = -6.0
    wv[3, 0, 0] = 1.0
    wv[1, 1, 0] = 1.0
    layer.query.kernel[...], layer.key.kernel[...], layer.value.kernel[...] = map(jnp.asarray, (wq, wk, wv))
    return layer


def span_inputs():
    rng = np.random.default_rng(0)
    text = np.stack([np.ones(4), rng.standard_normal(4), np.zeros(4), np.zeros(4)], -1)
    span = np.stack([np.ones(3), np.zeros(3), np.ones(3), rng.standard_normal(3) + 2.0], -1)
    return (jnp.asarray(np.concatenate([span, text])[None], jnp.float32), jnp.asarray(text[None], jnp.float32))


def test_divergence_scores_the_head_that_reads_the_span():
    layer = span_layer()
    with_span, without_span = span_inputs()
    a, b = heads_of(layer, with_span), heads_of(layer, without_span)
    vhd = np.asarray(head_divergence(a[:, -1], b[:, -1]))
    expected = np.linalg.norm(np.asarray(a[:, -1], np.float64) - np.asarray(b[:, -1], np.float64), axis=-1)
    np.testing.assert_allclose(vhd, expected, rtol=1e-6, atol=1e-7)
    assert vhd[0, 0] > 0.5 and vhd[0, 1] < 1e-5, vhd
    np.testing.assert_array_equal(np.asarray(select_heads(a[:, -1], b[:, -1])), [[True, False]])


def constructed_outputs(vhd, ta):
    """Head outputs with ``‖with − without‖ = vhd`` and ``‖without‖² = ta`` (orthogonal axes)."""
    without = np.zeros((1, len(vhd), 2), np.float32)
    without[0, :, 0] = np.sqrt(ta)
    with_span = without.copy()
    with_span[0, :, 1] = vhd
    return jnp.asarray(with_span), jnp.asarray(without)


def test_surges_are_zeroed_before_the_median_rule():
    vhd = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 20.0])
    quiet = constructed_outputs(vhd, np.ones(6))  # no TA surge: keep the upper half by VHD
    np.testing.assert_array_equal(np.asarray(select_heads(*quiet))[0], [0, 0, 0, 1, 1, 1])
    surge = constructed_outputs(vhd, np.array([1.0, 1.0, 1.0, 1.0, 1.0, 50.0]))  # head 5 surges in VHD and TA
    np.testing.assert_array_equal(np.asarray(select_heads(*surge))[0], [0, 0, 1, 1, 1, 0])
    only_vhd = constructed_outputs(vhd, np.array([50.0, 1.0, 1.0, 1.0, 1.0, 1.0]))  # TA high elsewhere: kept
    np.testing.assert_array_equal(np.asarray(select_heads(*only_vhd))[0], [0, 0, 0, 1, 1, 1])


def test_token_divergence_sums_the_top_k_of_each_layer():
    layers = [jnp.array([[0.1, 0.9, 0.5]]), jnp.array([[2.0, 0.0, 1.0]])]
    assert_close(token_divergence(layers, 2), np.array([0.9 + 0.5 + 2.0 + 1.0]), atol=1e-6, name="T-VHD")
    assert_close(token_divergence(jnp.stack(layers), 1), np.array([2.9]), atol=1e-6, name="T-VHD stacked")


def test_reinforced_layer_scales_the_chosen_heads_before_w_o():
    layer = MultiHeadAttention(8, 4, num_kv_heads=2, out_bias=True, rngs=nnx.Rngs(1))
    layer.out.bias[...] = jnp.arange(8.0)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 8))
    before = call(layer, x)
    reinforced = reinforce_heads(layer, np.array([True, False, False, True]), alpha=2.0)
    gain = jnp.array([2.0, 1.0, 1.0, 2.0])[None, None, :, None]
    heads = heads_of(layer, x)
    assert_close(layer.out(heads), before, atol=1e-6, name="head_outputs")
    expected = layer.out(heads * gain)
    assert_close(call(reinforced, x), expected, atol=1e-5, name="reinforced")
    assert_close(call(layer, x), before, atol=0.0, name="original untouched")
    assert_close(call(reinforce_heads(layer, [0, 3]), x), expected, atol=1e-5, name="by index")
    step, _ = nnx.jit(lambda m, x: m.decode(x, m.init_cache(2, 5)))(reinforced, x[:, :1])
    assert_close(step, expected[:, :1], atol=1e-5, name="decode")


def test_errors_name_the_argument():
    layer = MultiHeadAttention(8, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="with_span and without_span must have the same shape"):
        head_divergence(jnp.zeros((1, 4, 2)), jnp.zeros((1, 4, 3)))
    with pytest.raises(ValueError, match="without_span must be head outputs"):
        select_heads(jnp.zeros((1, 4, 2)), jnp.zeros((4,)))
    with pytest.raises(ValueError, match=r"heads \[4\] must index the layer's 4 query heads"):
        reinforce_heads(layer, [4])
    with pytest.raises(ValueError, match=r"bool mask must have shape \[Hq\] = \[4\]"):
        reinforce_heads(layer, np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="layer must be an attnjax.nn.MultiHeadAttention"):
        head_outputs(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), jnp.zeros((1, 3, 8)))
    with pytest.raises(ValueError, match="k=3 exceeds the 2 heads of layer 0"):
        token_divergence([jnp.zeros((1, 2))], 3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        token_divergence([jnp.zeros((1, 2))], 0)
