"""RCMHA (Sugiharto et al. 2023): the layer against a plain reference of its equations, decode step by step
against the parallel call, the parameter count, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.positional.rcmha import RCMHA, CausalDepthwiseConv, RCMHACache
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import assert_close

D_MODEL, HEADS, HEAD_DIM, K = 16, 2, 6, 3


def causal_depthwise_conv(x, kernel, bias):
    """``y_t = b + Σ_s w_s x_(t−K+1+s)`` with zeros before the sequence: PyTorch's ``Conv1d(D, D, K,
    groups=D)`` on ``batch·heads`` rows with ``K − 1`` zeros on the left, x ``[B, T, H, D]``."""
    B, T, H, D = x.shape
    rows = x.transpose(0, 2, 1, 3).reshape(B * H, T, D)
    y = jax.lax.conv_general_dilated(rows, kernel[:, None, :], (1,), [(kernel.shape[0] - 1, 0)],
                                     dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=D,
                                     precision=jax.lax.Precision.HIGHEST)
    y = y.reshape(B, H, T, D).transpose(0, 2, 1, 3)
    return y if bias is None else y + bias


def rcmha_reference(p, x):
    """Sugiharto et al. 2023 with Dai et al. 2019 §3.3's logits
    ``A_ij = q_iᵀk_j + q_iᵀW_R R_(i−j) + uᵀk_j + vᵀW_R R_(i−j)``, causal softmax of ``A / √D``."""
    T = x.shape[1]
    q = causal_depthwise_conv(jnp.einsum("btc,chd->bthd", x, p["query"]["kernel"]), p["query_conv"]["kernel"],
                              p["query_conv"]["bias"])
    k = causal_depthwise_conv(jnp.einsum("btc,chd->bthd", x, p["key"]["kernel"]), p["key_conv"]["kernel"], None)
    v = causal_depthwise_conv(jnp.einsum("btc,chd->bthd", x, p["value"]["kernel"]) + p["value"]["bias"],
                              p["value_conv"]["kernel"], p["value_conv"]["bias"])
    half = D_MODEL // 2
    inv_freq = 1.0 / 10000.0 ** (jnp.arange(half) * 2.0 / D_MODEL)
    rel = (jnp.arange(T)[:, None] - jnp.arange(T)[None, :]).astype(jnp.float32)[..., None] * inv_freq
    R = jnp.concatenate([jnp.sin(rel), jnp.cos(rel)], axis=-1)  # [T, T, d_model]
    WR = jnp.einsum("ijr,hrd->hijd", R, p["w_r"])
    A = (jnp.einsum("bihd,bjhd->bhij", q, k) + jnp.einsum("bihd,hijd->bhij", q, WR)
         + jnp.einsum("hd,bjhd->bhj", p["u"], k)[:, :, None, :] + jnp.einsum("hd,hijd->hij", p["v"], WR)[None])
    A = jnp.where(jnp.tril(jnp.ones((T, T), bool)), A / jnp.sqrt(HEAD_DIM), -jnp.inf)
    out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(A, axis=-1), v)
    return jnp.einsum("bihd,hdc->bic", out, p["out"]["kernel"]) + p["out"]["bias"]


def model(**kwargs):
    return RCMHA(D_MODEL, HEADS, head_dim=HEAD_DIM, kernel_size=K, **kwargs, rngs=nnx.Rngs(0))


def test_layer_matches_the_plain_reference_forward_and_gradients():
    x = jax.random.normal(jax.random.key(1), (2, 9, D_MODEL))
    check_module_against_reference(model(), rcmha_reference, x, call_kwargs={"mask": masks.Causal()}, rtol=5e-5)


def test_decode_step_by_step_equals_the_parallel_call():
    layer = model()
    x = jax.random.normal(jax.random.key(2), (2, 9, D_MODEL))
    expected = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x)
    step = nnx.jit(lambda m, x_t, cache: m.decode(x_t, cache))
    cache, outputs = layer.init_cache(2, 12), []
    assert isinstance(cache, RCMHACache) and cache.window.shape == (3, 2, K - 1, HEADS, HEAD_DIM)
    for t in range(x.shape[1]):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        outputs.append(y_t)
    assert int(cache.kv.length) == 9
    assert_close(jnp.concatenate(outputs, axis=1), expected, atol=2e-5, rtol=2e-5, name="decode")


def test_parameter_count_formula():
    d, H, D = D_MODEL, HEADS, HEAD_DIM
    # W_q, W_k, W_v (+ b_v), W_o (+ b_o), W_R; depthwise kernels (q, k, v) and biases (q, v); u, v
    want = 4 * d * H * D + H * D + d + H * d * D + 3 * K * D + 2 * D + 2 * H * D
    assert parameter_count(model()) == want == 5 * d * H * D + 3 * H * D + 3 * K * D + 2 * D + d


def test_the_convolution_is_causal_and_reads_its_history():
    conv = CausalDepthwiseConv(4, 3, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (1, 6, 2, 4))
    whole, tail = nnx.jit(lambda c, x: (c(x), c(x[:, 4:], history=x[:, 2:4])))(conv, x)
    assert_close(whole, causal_depthwise_conv(x, conv.kernel[...], conv.bias[...]), atol=1e-6)
    assert_close(tail, whole[:, 4:], atol=1e-6)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="d_model must be even"):
        RCMHA(15, 3, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="implementation"):
        model(implementation="pallas")
    with pytest.raises(ValueError, match="kernel_size"):
        RCMHA(D_MODEL, HEADS, kernel_size=0, rngs=nnx.Rngs(0))
    layer = model()
    with pytest.raises(ValueError, match=r"\[batch, seq, 16\]"):
        layer(jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="x_t"):
        layer.decode(jnp.zeros((2, 2, D_MODEL)), layer.init_cache(2, 4))
    np.testing.assert_array_equal(np.asarray(layer.init_cache(1, 3).kv.k), np.zeros((1, 3, HEADS, HEAD_DIM)))
