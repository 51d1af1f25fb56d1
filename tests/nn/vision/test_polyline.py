"""PolylinePathAttention against a plain port of the official PPMA layer (MambaAttentionAllDouble + PathEmbeding2D)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.polyline import PolylinePathAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def segsum(x):
    """The official ``generate_structed_mask_1d``: ``[..., n] -> [..., n, n]``, cumsum differences, symmetric."""
    c = jnp.cumsum(x, axis=-1)
    n = x.shape[-1]
    lower = jnp.where(jnp.tril(jnp.ones((n, n), bool)), c[..., :, None] - c[..., None, :], 0.0)
    upper = jnp.where(jnp.triu(jnp.ones((n, n), bool), 1), c[..., None, :] - c[..., :, None], 0.0)
    return lower + upper


def theta_shift(x, D):
    """The official RoPE on ``[B, heads, H, W, D]`` at the flattened index, interleaved pairs."""
    angle = jnp.repeat(1.0 / 10000 ** jnp.linspace(0, 1, D // 2), 2)
    index = jnp.arange(x.shape[2] * x.shape[3], dtype=jnp.float32)
    sin = jnp.sin(index[:, None] * angle).reshape(x.shape[2], x.shape[3], D)
    cos = jnp.cos(index[:, None] * angle).reshape(x.shape[2], x.shape[3], D)
    rotated = jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def ppma_reference(p, x, heads):
    """Port of the official forward (PyTorch layout kept): masks built as dense [B, n, L, L] additive terms."""
    B, H, W, C = x.shape
    D, L = C // heads, H * W
    lin = lambda name, y: jnp.einsum("...c,cd->...d", y, p[name]["kernel"], precision="highest") + p[name]["bias"]
    q, k, v = lin("query", x), lin("key", x), lin("value", x)
    lepe = conv2d(v, p["lepe"]["kernel"], p["lepe"]["bias"], padding=((2, 2), (2, 2)), groups=C)
    k = k * D ** -0.5
    q = q.reshape(B, H, W, heads, D).transpose(0, 3, 1, 2, 4)
    k = k.reshape(B, H, W, heads, D).transpose(0, 3, 1, 2, 4)
    qr, kr = theta_shift(q, D).reshape(B, heads, L, D), theta_shift(k, D).reshape(B, heads, L, D)
    vr = v.reshape(B, L, heads, D).transpose(0, 2, 1, 3)
    # PathEmbeding2D
    dt = jnp.einsum("blnd,de->blne", x.reshape(B, L, heads, D), p["decay"]["kernel"], precision="highest")
    A = -jnp.exp(p["a_log"])
    dt_alpha = jax.nn.softplus(dt[..., 0] + p["dt_bias"]) * A
    dt_beta = jax.nn.softplus(dt[..., 1] + p["dt_bias"]) * A
    mask_w = segsum(dt_alpha.reshape(B, H, W, heads).transpose(0, 1, 3, 2))     # (B, height, n, W, W)
    mask_h = segsum(dt_beta.reshape(B, H, W, heads).transpose(0, 2, 3, 1))      # (B, width, n, H, H)
    mask_w = jnp.broadcast_to(mask_w.transpose(0, 2, 1, 3, 4)[:, :, :, None], (B, heads, H, H, W, W))
    mask_h = jnp.broadcast_to(mask_h.transpose(0, 2, 3, 4, 1)[:, :, :, :, None], (B, heads, H, H, W, W))
    mask = (mask_w + mask_h).transpose(0, 1, 2, 4, 3, 5).reshape(B, heads, L, L)
    # MambaAttentionAllDouble
    s = jnp.einsum("bnqd,bnkd->bnqk", qr, kr, precision="highest")
    attn = 0.5 * jax.nn.softmax(s + mask, -1) + 0.5 * jax.nn.softmax(s + mask.transpose(0, 1, 3, 2), -1)
    out = jnp.einsum("bnqk,bnkd->bqnd", attn, vr, precision="highest").reshape(B, H, W, C)
    return lin("out", out + lepe)


def test_module_equals_the_official_layer_forward_and_gradients():
    model = PolylinePathAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    # larger decays and projections than at initialization, so the mask and every term matter
    model.a_log[...] = jnp.log(jnp.array([3.0, 8.0]))
    for name in ("query", "key", "decay"):
        layer = getattr(model, name)
        layer.kernel[...] = layer.kernel[...] * 20
    check_module_against_reference(model, lambda p, x: ppma_reference(p, x, 2), image(), rtol=1e-4)


@pytest.mark.parametrize("C, heads, lepe", [(16, 2, True), (64, 4, False)])
def test_parameter_count(C, heads, lepe):
    expected = 4 * (C * C + C) + 2 * (C // heads) + 2 * heads + (26 * C if lepe else 0)
    model = nnx.eval_shape(lambda: PolylinePathAttention(C, num_heads=heads, lepe=lepe, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected


def test_initialization_follows_mamba2():
    model = PolylinePathAttention(64, num_heads=16, rngs=nnx.Rngs(0))
    dt = jax.nn.softplus(model.dt_bias[...])
    assert np.all((dt >= 0.001 * 0.999) & (dt <= 0.1 * 1.001))
    A = jnp.exp(model.a_log[...])
    assert np.all((A >= 1.0) & (A <= 1.1))
    assert abs(float(jnp.std(model.query.kernel[...])) - 0.02) < 0.003


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = PolylinePathAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\)"):
        model(image((2, 5, 7, 8)))
    with pytest.raises(ValueError, match=r"channels \(16\) must be a multiple of num_heads \(3\)"):
        PolylinePathAttention(16, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even head dimension"):
        PolylinePathAttention(12, num_heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="paths must be a non-empty sequence"):
        PolylinePathAttention(16, paths=("diagonal",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown implementation 'flash'"):
        PolylinePathAttention(16, implementation="flash", rngs=nnx.Rngs(0))
