"""DaViT's ChannelAttention and dual-attention block against plain references of the official code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.davit import ChannelAttention, ConvPosEnc, DaViTBlock, SpatialWindowAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count


def image(shape=(2, 5, 7, 8), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def linear(p, x):
    return jnp.einsum("...c,cd->...d", x, p["kernel"], precision="highest") + p["bias"]


def channel_attention_reference(p, x, groups):
    """Official ChannelAttention.forward: q, k, v = qkv(x); k *= C_g^-1/2; A = softmax(k^T v); x = (A q^T)^T; proj."""
    B, H, W, C = x.shape
    cg = C // groups
    q, k, v = (a.reshape(B, H * W, groups, cg) for a in jnp.split(linear(p["qkv"], x), 3, axis=-1))
    a = jax.nn.softmax(jnp.einsum("bngc,bngd->bgcd", k * cg ** -0.5, v, precision="highest"), axis=-1)
    out = jnp.einsum("bgcd,bngd->bngc", a, q, precision="highest")
    return linear(p["proj"], out.reshape(B, H, W, C))


def window_attention_reference(p, x, heads, window):
    """Official WindowAttention on (padded) windows, written as one masked softmax over the H*W pixels: a pixel
    attends to the real pixels of its own window."""
    B, H, W, C = x.shape
    d = C // heads
    q, k, v = (a.reshape(B, H * W, heads, d) for a in jnp.split(linear(p["qkv"], x), 3, axis=-1))
    ys, xs = np.divmod(np.arange(H * W), W)
    win = (ys // window) * W + xs // window
    same = win[:, None] == win[None, :]
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") * d ** -0.5
    a = jax.nn.softmax(jnp.where(same, logits, -jnp.inf), axis=-1)
    return linear(p["proj"], jnp.einsum("bhts,bshd->bthd", a, v, precision="highest").reshape(B, H, W, C))


def layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def cpe(p, x):
    return x + conv2d(x, p["proj"]["kernel"], p["proj"]["bias"], padding=((1, 1), (1, 1)), groups=x.shape[-1])


def half_reference(p, x, attn):
    """Official SpatialBlock / ChannelBlock: cpe0; x + attn(norm1); cpe1; x + mlp(norm2) (exact GELU)."""
    x = cpe(p["cpe"][0], x)
    x = x + attn(p["attn"], layer_norm(p["norm1"], x))
    x = cpe(p["cpe"][1], x)
    hidden = jax.nn.gelu(linear(p["mlp"]["fc1"], layer_norm(p["norm2"], x)), approximate=False)
    return x + linear(p["mlp"]["fc2"], hidden)


def davit_block_reference(p, x, heads, window):
    x = half_reference(p["spatial"], x, lambda q, y: window_attention_reference(q, y, heads, window))
    return half_reference(p["channel"], x, lambda q, y: channel_attention_reference(q, y, heads))


@pytest.mark.slow
def test_davit_block_equals_the_official_spatial_then_channel_blocks_forward_and_gradients():
    """A 5x7 map in 3x3 windows (padded at the bottom and right), 2 heads / channel groups; ChannelAttention is
    checked inside the block (its qkv roles, scale and every parameter's gradient)."""
    model = DaViTBlock(8, 2, window_size=3, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: davit_block_reference(p, x, 2, 3), image(), rtol=1e-4)


def test_parameter_counts():
    C, E = 16, 64
    build = {"channel": lambda: ChannelAttention(C, 4, rngs=nnx.Rngs(0)),
             "channel_no_bias": lambda: ChannelAttention(C, 4, qkv_bias=False, rngs=nnx.Rngs(0)),
             "window": lambda: SpatialWindowAttention(C, 4, rngs=nnx.Rngs(0)),
             "cpe": lambda: ConvPosEnc(C, rngs=nnx.Rngs(0)),
             "block": lambda: DaViTBlock(C, 4, rngs=nnx.Rngs(0)),
             "block_no_bias": lambda: DaViTBlock(C, 4, qkv_bias=False, rngs=nnx.Rngs(0))}
    counts = {name: parameter_count(nnx.eval_shape(fn)) for name, fn in build.items()}
    half = (4 * C * C + 4 * C) + 2 * (9 * C + C) + 4 * C + (2 * C * E + E + C)
    assert counts == {"channel": 4 * C * C + 4 * C, "channel_no_bias": 4 * C * C + C, "window": 4 * C * C + 4 * C,
                      "cpe": 10 * C, "block": 2 * half, "block_no_bias": 2 * half - 6 * C}


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = DaViTBlock(8, 2, window_size=3, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 8\] \(NHWC\)"):
        model(image((2, 5, 7, 16)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 8\] \(NHWC\)"):
        ChannelAttention(8, 2, rngs=nnx.Rngs(0))(image((2, 35, 8)))
    with pytest.raises(ValueError, match=r"d_model \(8\) must be a multiple of num_heads \(3\)"):
        ChannelAttention(8, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window_size must be a positive int or a pair"):
        DaViTBlock(8, 2, window_size=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvPosEnc(8, 4, rngs=nnx.Rngs(0))
