"""RALAttention and RAVLTBlock against plain references of the official ``GateLinearAttentionNoSilu`` and ``Block``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.rala import RALAttention, RAVLTBlock
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count


def image(shape=(2, 3, 5, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def dense(p, x):
    return jnp.einsum("bhwc,cd->bhwd", x, p["kernel"], precision="highest") + p["bias"]


def depthwise(p, x):
    return conv2d(x, p["kernel"], p["bias"], groups=x.shape[-1])


def rope(height, width, d):
    """The official ``RoPE``: ``θ = 1/10000^linspace(0, 1, d/4)`` per pair; rows on the first half, columns on the
    second."""
    angle = np.repeat(1.0 / 10000 ** np.linspace(0, 1, d // 4), 2)
    rows = np.broadcast_to(np.arange(height)[:, None, None] * angle, (height, width, d // 2))
    cols = np.broadcast_to(np.arange(width)[None, :, None] * angle, (height, width, d // 2))
    a = np.concatenate([rows, cols], -1).reshape(height * width, d)
    return jnp.asarray(np.sin(a), jnp.float32), jnp.asarray(np.cos(a), jnp.float32)


def rala_reference(p, x, heads):
    """``GateLinearAttentionNoSilu.forward`` line by line (layout ``[B, heads, N, d]``)."""
    B, H, W, C = x.shape
    N, d = H * W, C // heads
    qkvo = dense(p["qkvo"], x)
    q, k, v, o = (qkvo[..., i * C:(i + 1) * C] for i in range(4))
    lepe = depthwise(p["lepe"], v)
    q, k, vh = (t.reshape(B, N, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    q, k = jax.nn.elu(q) + 1.0, jax.nn.elu(k) + 1.0
    eff = jax.nn.softmax(d ** -0.5 * jnp.einsum("bnid,bnjd->bnij", q.mean(2, keepdims=True), k,
                                                 precision="highest"), axis=-1)
    k = k * jnp.swapaxes(eff, -1, -2) * N
    sin, cos = rope(H, W, d)

    def theta_shift(t):
        return t * cos + jnp.stack([-t[..., 1::2], t[..., 0::2]], -1).reshape(t.shape) * sin

    z = 1 / (jnp.einsum("bnld,bnd->bnl", q, k.mean(2), precision="highest")[..., None] + 1e-6)
    kv = jnp.einsum("bnld,bnle->bnde", theta_shift(k) * N ** -0.5, vh * N ** -0.5, precision="highest")
    res = jnp.einsum("bnld,bnde->bnle", theta_shift(q), kv, precision="highest") * z
    res = res.transpose(0, 2, 1, 3).reshape(B, H, W, C) + lepe
    return dense(p["proj"], res * o)


def ravlt_reference(p, x, heads):
    """The official ``Block`` with layer scale: CPE, attention and the FFN with its residual depthwise conv."""
    def layer_norm(q, t):
        mu = t.mean(-1, keepdims=True)
        return (t - mu) / jnp.sqrt(((t - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * q["scale"] + q["bias"]

    x = x + depthwise(p["pos"], x)
    x = x + p["gamma1"] * rala_reference(p["attn"], layer_norm(p["norm1"], x), heads)
    h = jax.nn.gelu(dense(p["fc1"], layer_norm(p["norm2"], x)), approximate=False)
    return x + p["gamma2"] * dense(p["fc2"], h + depthwise(p["dwconv"], h))


@pytest.mark.slow
def test_ravlt_block_equals_the_official_block_forward_and_gradients():
    """A 3x5 map, 2 heads of 8 channels; the block's check covers its RALAttention (every parameter's gradient).
    Layer scales drawn away from their initial 1 so that a misplaced scale shows."""
    model = RAVLTBlock(16, num_heads=2, mlp_ratio=2.0, rngs=nnx.Rngs(1))
    model.gamma1[...] = jnp.linspace(0.5, 1.5, 16)
    model.gamma2[...] = jnp.linspace(1.5, 0.5, 16)
    check_module_against_reference(model, lambda p, x: ravlt_reference(p, x, 2), image(seed=1), rtol=1e-4)


@pytest.mark.parametrize("C, ratio, layer_scale", [(16, 3.5, 1.0), (32, 2.0, None)])
def test_parameter_count(C, ratio, layer_scale):
    M = int(C * ratio)
    attention = 5 * C * C + 31 * C
    assert parameter_count(nnx.eval_shape(lambda: RALAttention(C, num_heads=2, rngs=nnx.Rngs(0)))) == attention
    expected = 10 * C + 4 * C + attention + 2 * C * M + 11 * M + C + (2 * C if layer_scale is not None else 0)
    block = nnx.eval_shape(lambda: RAVLTBlock(C, num_heads=2, mlp_ratio=ratio, layer_scale=layer_scale,
                                              rngs=nnx.Rngs(0)))
    assert parameter_count(block) == expected


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    attention = RALAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(attention, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    model = RAVLTBlock(16, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\)"):
        model(image((2, 3, 5, 8)))
    with pytest.raises(ValueError, match=r"channels \(24\) must be num_heads \(4\) times a multiple of 4"):
        RALAttention(24, num_heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mlp_ratio must be a number"):
        RAVLTBlock(16, mlp_ratio=0.01, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="layer_scale must be a number or None"):
        RAVLTBlock(16, layer_scale="1", rngs=nnx.Rngs(0))
