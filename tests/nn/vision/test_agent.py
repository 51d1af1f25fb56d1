"""AgentAttention against a plain reference of the official agent attention module (dense two-softmax product)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.agent import AgentAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def adaptive_pool_matrix(size, out):
    """torch.nn.AdaptiveAvgPool1d as a matrix: bin i averages [floor(i*size/out), ceil((i+1)*size/out))."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = int(np.floor(i * size / out)), int(np.ceil((i + 1) * size / out))
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def agent_module_reference(p, x, heads, pool):
    """The official AgentAttention.forward: qkv; agents = AdaptiveAvgPool(q); biases = interpolate(7x7 table) + row
    + column terms; x = softmax(q A^T s + B2) softmax(A k^T s + B1) v + DWC(v); proj."""
    B, H, W, C = x.shape
    d, n = C // heads, pool * pool
    qkv = jnp.einsum("bhwc,cd->bhwd", x, p["qkv"]["kernel"], precision="highest") + p["qkv"]["bias"]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    agents = jnp.einsum("ih,bhwc,jw->bijc", adaptive_pool_matrix(H, pool), q, adaptive_pool_matrix(W, pool),
                        precision="highest").reshape(B, n, heads, d)

    def resize(table):  # F.interpolate(table, size=(H, W), mode="bilinear"), align_corners=False
        return jax.image.resize(table, (heads, n, H, W), "linear", antialias=False)

    b1 = (resize(p["an_bias"]) + p["ah_bias"][..., :, None] + p["aw_bias"][..., None, :]).reshape(heads, n, H * W)
    b2 = (jnp.transpose(resize(p["na_bias"]), (0, 2, 3, 1)) + p["ha_bias"][:, :, None, :]
          + p["wa_bias"][:, None, :, :]).reshape(heads, H * W, n)
    qh, kh, vh = (a.reshape(B, H * W, heads, d) for a in (q, k, v))
    s = d ** -0.5
    p1 = jax.nn.softmax(jnp.einsum("bnhd,bshd->bhns", agents, kh, precision="highest") * s + b1, axis=-1)
    p2 = jax.nn.softmax(jnp.einsum("bthd,bnhd->bhtn", qh, agents, precision="highest") * s + b2, axis=-1)
    o = jnp.einsum("bhtn,bhns,bshd->bthd", p2, p1, vh, precision="highest").reshape(B, H, W, C)
    o = o + conv2d(v, p["dwc"]["kernel"], p["dwc"]["bias"], padding=((1, 1), (1, 1)), groups=C)
    return jnp.einsum("bhwc,cd->bhwd", o, p["proj"]["kernel"], precision="highest") + p["proj"]["bias"]


def test_agent_attention_equals_the_official_forward_and_gradients():
    """A 5x7 map, 9 agents (3x3 pooling bins that overlap along the 5 rows), 2 heads; every parameter's gradient."""
    model = AgentAttention(16, 2, resolution=(5, 7), agent_num=9, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: agent_module_reference(p, x, 2, 3), image(), rtol=1e-4)


@pytest.mark.parametrize("C, heads, hw, n, qkv_bias", [(16, 2, (5, 7), 9, True), (64, 4, (14, 14), 49, False)])
def test_parameter_count(C, heads, hw, n, qkv_bias):
    expected = (3 * C * C + (3 * C if qkv_bias else 0)) + (C * C + C) + (9 * C + C) + 2 * heads * n * 49 \
        + 2 * heads * n * (hw[0] + hw[1])
    model = nnx.eval_shape(lambda: AgentAttention(C, heads, resolution=hw, agent_num=n, qkv_bias=qkv_bias,
                                                  rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = AgentAttention(16, 2, resolution=(5, 7), agent_num=4, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\)"):
        model(image((2, 5, 7, 8)))
    with pytest.raises(ValueError, match=r"must be the resolution \[5, 7\] the module was built for, got \[7, 5\]"):
        model(image((2, 7, 5, 16)))
    with pytest.raises(ValueError, match="agent_num must be a perfect square"):
        AgentAttention(16, 2, resolution=5, agent_num=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        AgentAttention(16, 2, resolution=5, kernel_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"d_model \(16\) must be a multiple of num_heads \(3\)"):
        AgentAttention(16, 3, resolution=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="resolution must be a positive int or a pair"):
        AgentAttention(16, 2, resolution=(5, 0), rngs=nnx.Rngs(0))
