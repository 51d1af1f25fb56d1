"""attnjax.nn.low_rank: LowRankAttention against the paper's pooling written plainly (forward and every
gradient), causal and not, its attention matrix, parameter count, decoding, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.low_rank import LowRankAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close

B, T, DM, H = 2, 6, 8, 3


def inputs(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, DM), jnp.float32)


def plain_lama(p, x, causal):
    """A = softmax_i tanh((Pᵀc)_h (Qᵀx_i)_h) over i (<= t if causal); y = concat_h(A_h X) W_o + b_o."""
    s = jnp.tanh((p["context"] @ p["context_factor"])[None, None, :] * (x @ p["token_factor"]))   # [B, T, H]
    logits = jnp.broadcast_to(jnp.swapaxes(s, 1, 2)[:, :, None, :], (B, H, T, T))
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    m = jnp.einsum("bhti,bid->bthd", jax.nn.softmax(logits, axis=-1), x)
    y = jnp.einsum("bthd,hdm->btm", m, p["out"]["kernel"])
    return y + p["out"]["bias"] if "bias" in p["out"] else y


def test_module_equals_plain_pooling():
    """Causal (the prefix-sum path; the non-causal pooling is checked in tests/heads), every gradient."""
    layer = LowRankAttention(DM, H, causal=True, out_bias=True, rngs=nnx.Rngs(0))
    check_module_against_reference(layer, lambda p, x: plain_lama(p, x, True), inputs(), rtol=1e-5)


def test_attention_weights_are_the_papers_matrix():
    layer = LowRankAttention(DM, H, rngs=nnx.Rngs(1))
    x = inputs(1)
    p = parameters(layer)
    a = layer.attention_weights(x)
    s = np.tanh((np.asarray(p["context"]) @ p["context_factor"]) * (np.asarray(x) @ p["token_factor"]))
    expected = np.exp(np.swapaxes(s, 1, 2)) / np.exp(np.swapaxes(s, 1, 2)).sum(-1, keepdims=True)
    assert_close(a, expected, rtol=1e-6, name="A")
    assert_close(jnp.sum(a, axis=-1), np.ones((B, H)), rtol=1e-6, name="rows")


def test_parameter_count_is_linear_in_heads_for_the_scores():
    layer = nnx.eval_shape(lambda: LowRankAttention(DM, H, out_bias=True, rngs=nnx.Rngs(0)))
    assert parameter_count(layer) == 2 * DM * H + DM + H * DM * DM + DM


def test_decode_equals_the_non_causal_layer_called_causally():
    """A non-causal layer with mask=Causal() is the causal pooling, and decoding reproduces it."""
    layer = LowRankAttention(DM, H, causal=False, rngs=nnx.Rngs(2))
    x = inputs(2)
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x)
    step, cache, steps = nnx.jit(lambda m, x_t, c: m.decode(x_t, c)), layer.init_cache(B, T), []
    for t in range(T):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        steps.append(y_t)
    assert cache.numerator.dtype == jnp.float32 and cache.numerator.shape == (B, H, DM)
    assert_close(jnp.concatenate(steps, axis=1), y, rtol=1e-5, name="decode")


def test_bfloat16_module_is_finite():
    """Parameters and computation in bfloat16 (the layer is built inside the compiled call)."""
    def run(x):
        layer = LowRankAttention(DM, H, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        return layer(x, mask=masks.Causal())

    y = jax.jit(run)(inputs().astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        LowRankAttention(DM, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="implementation must be one of"):
        LowRankAttention(DM, H, implementation="xla", rngs=nnx.Rngs(0))
    layer = nnx.eval_shape(lambda: LowRankAttention(DM, H, rngs=nnx.Rngs(0)))
    with pytest.raises(NotImplementedError, match=r"takes mask=None or masks.Causal\(\) only"):
        layer(inputs(), mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 1, d_model\]"):
        layer.decode(inputs(), layer.init_cache(B, T))
