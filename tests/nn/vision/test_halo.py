"""The HaloAttention module against a plain reference: 1x1 projections written with ``conv2d`` and the dense
loop-masked softmax of ``tests/vision/test_halo.py`` (Vaswani et al., CVPR 2021, sec. 2; timm ``HaloAttn``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.halo import HaloAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from tests.vision.test_halo import dense_reference, pairs_by_loop


def halo_reference(p, x, *, heads, head_dim, b, h, s):
    """q from the strided pixels, [k | v] per head from every pixel, then the dense masked softmax."""
    B, H, W, _ = x.shape
    q = conv2d(x[:, ::s, ::s], p["q"]["kernel"])
    q = q.reshape(*q.shape[:3], heads, head_dim)
    kv = conv2d(x, p["kv"]["kernel"]).reshape(B, H, W, heads, -1)
    k, v = kv[..., :head_dim], kv[..., head_dim:]
    rh, rw = (p[name] if name in p else None for name in ("relative_height", "relative_width"))
    out = dense_reference(q, k, v, rh, rw, None, b=b, h=h, s=s,
                          pairs=pairs_by_loop(q.shape[1], q.shape[2], H, W, b, h, s))
    return out.reshape(*out.shape[:3], -1)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(channels=8, num_heads=2, block_size=4, halo_size=1), (2, 7, 9, 8)),
    (dict(channels=8, out_channels=12, num_heads=2, head_dim=4, block_size=4, halo_size=2, stride=2,
          relative_position=False), (1, 7, 9, 8)),
])
def test_halo_attention_equals_the_reference_forward_and_gradients(kwargs, shape):
    """7 x 9 maps in 4 x 4 blocks: with the relative position tables, and strided without them."""
    layer = HaloAttention(**kwargs, rngs=nnx.Rngs(0))
    heads, s = kwargs["num_heads"], kwargs.get("stride", 1)
    head_dim = kwargs.get("head_dim", kwargs.get("out_channels", kwargs["channels"]) // heads)
    x = jax.random.normal(jax.random.key(1), shape)

    def reference(p, x):
        return halo_reference(p, x, heads=heads, head_dim=head_dim, b=kwargs["block_size"], h=kwargs["halo_size"],
                              s=s)

    check_module_against_reference(layer, reference, x)
    out_channels = kwargs.get("out_channels", kwargs["channels"])
    assert nnx.eval_shape(lambda m, x: m(x), layer, x).shape == (shape[0], -(-shape[1] // s), -(-shape[2] // s),
                                                                  out_channels)


@pytest.mark.parametrize("kwargs, expected", [
    # C·heads·(2·D + Dv) + 2·(2·(b + 2h) − 1)·D: timm's HaloAttn(dim=64, num_heads=8), b = 8, h = 3
    (dict(channels=64), 64 * 8 * (2 * 8 + 8) + 2 * 27 * 8),
    (dict(channels=64, out_channels=128, num_heads=4, head_dim=16, use_bias=True, stride=2),
     64 * 4 * (2 * 16 + 32) + 4 * (2 * 16 + 32) + 2 * 27 * 16),
    (dict(channels=16, num_heads=2, block_size=4, halo_size=1, relative_position=False), 16 * 2 * (2 * 8 + 8)),
])
def test_parameter_count(kwargs, expected):
    assert parameter_count(nnx.eval_shape(lambda: HaloAttention(**kwargs, rngs=nnx.Rngs(0)))) == expected


def test_bf16_is_finite():
    layer = HaloAttention(8, num_heads=2, block_size=4, halo_size=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(layer, jax.random.normal(jax.random.key(3), (1, 5, 6, 8), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"out_channels \(10\) must be a multiple of num_heads \(4\)"):
        HaloAttention(8, 10, num_heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="halo_size must be a non-negative int, got -1"):
        HaloAttention(8, num_heads=2, halo_size=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"block_size \(8\) must be a multiple of stride \(3\)"):
        HaloAttention(8, num_heads=2, stride=3, rngs=nnx.Rngs(0))
    layer = HaloAttention(8, num_heads=2, block_size=4, halo_size=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 8\]"):
        layer(jnp.ones((1, 5, 6, 4)))
