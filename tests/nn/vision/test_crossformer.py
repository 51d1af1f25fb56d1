"""CrossFormer block, dynamic position bias and cross-scale embedding against plain references of Wang et al. 2022
(sec. 3.1-3.3) and the official code (cheerss/CrossFormer ``models/crossformer.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.crossformer import CrossFormerBlock, CrossScaleEmbedding, DynamicPositionBias
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from tests.helpers import assert_close


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def layer_norm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def linear(x, p):
    return jnp.einsum("...c,cd->...d", x, p["kernel"], precision="highest") + p["bias"]


def dpb_reference(p, offsets):
    """Official DynamicPosBias(residual=False): pos3(pos2(pos1(pos_proj(offsets)))), pos_i = Linear(ReLU(LN(.))),
    the last Linear without bias unless the parameters have one."""
    h = linear(offsets, p["project"])
    for n in range(3):
        layer = p["layers"][n]
        h = linear(jax.nn.relu(layer_norm(h, p["norms"][n])), {"bias": 0.0, **layer})
    return h


def block_reference(p, x, heads, long_distance, g, i):
    """x + Proj(grouped attention with DPB bias)(LN(x)), then x + FC2(GELU(FC1(LN(x)))); the groups and the in-group
    positions come from pixel coordinates: SDA windows (y // g, x // g) at (y mod g, x mod g); LDA classes
    (y mod i, x mod i) at (y // i, x // i)."""
    B, H, W, C = x.shape
    hd = C // heads
    y, xx = np.divmod(np.arange(H * W), W)
    if long_distance:
        key, slot, group = np.stack([y % i, xx % i], -1), np.stack([y // i, xx // i], -1), (-(-H // i), -(-W // i))
    else:
        key, slot, group = np.stack([y // g, xx // g], -1), np.stack([y % g, xx % g], -1), (g, g)
    mask = (key[:, None] == key[None, :]).all(-1)
    gh, gw = group
    offsets = jnp.asarray([[dy, dx] for dy in range(1 - gh, gh) for dx in range(1 - gw, gw)], jnp.float32)
    table = dpb_reference(p["position_bias"], offsets)
    d = slot[:, None] - slot[None, :]
    bias = jnp.moveaxis(table[(d[..., 0] + gh - 1) * (2 * gw - 1) + d[..., 1] + gw - 1], -1, 0)
    qkv = linear(layer_norm(x, p["attention_norm"]), p["qkv"]).reshape(B, H * W, 3, heads, hd)
    logits = jnp.einsum("bthd,bshd->bhts", qkv[:, :, 0], qkv[:, :, 1], precision="highest") * hd ** -0.5 + bias
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    o = jnp.einsum("bhts,bshd->bthd", weights, qkv[:, :, 2], precision="highest").reshape(B, H, W, C)
    x = x + linear(o, p["proj"])
    h = linear(layer_norm(x, p["mlp_norm"]), p["fc1"])
    return x + linear(0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2))), p["fc2"])


@pytest.mark.parametrize("long_distance", [pytest.param(False, marks=pytest.mark.slow), True])
def test_crossformer_block_equals_the_formula_forward_and_gradients(long_distance):
    """5x7 map: neither a multiple of G = 3 (SDA) nor of I = 2 (LDA, 3x4 groups). SDA is slow-marked: the flag
    only selects the functional op, whose SDA path tests/vision/test_crossformer.py checks with a DPB table."""
    model = CrossFormerBlock(16, num_heads=2, group_size=3, interval=2, long_distance=long_distance, dpb_dim=4,
                             rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: block_reference(p, x, 2, long_distance, 3, 2), image(),
                                   rtol=1e-4)


def dpb_count(P, heads, use_bias=False):
    return 3 * P + 2 * (2 * P + P * P + P) + 2 * P + P * heads + heads * use_bias


@pytest.mark.parametrize("C, heads, ratio, dpb_dim, expected_p", [(96, 3, 4.0, None, 6), (16, 2, 2.0, 4, 4)])
def test_block_parameter_count(C, heads, ratio, dpb_dim, expected_p):
    M = int(C * ratio)
    expected = 2 * C + 3 * C * C + 3 * C + C * C + C + 2 * C + C * M + M + M * C + C + dpb_count(expected_p, heads)
    model = nnx.eval_shape(lambda: CrossFormerBlock(C, num_heads=heads, mlp_ratio=ratio, dpb_dim=dpb_dim,
                                                    rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected
    assert parameter_count(model.position_bias) == dpb_count(expected_p, heads)


def test_dynamic_position_bias_is_the_official_mlp():
    model = DynamicPositionBias(3, hidden=5, use_bias=True, rngs=nnx.Rngs(0))
    assert parameter_count(model) == dpb_count(5, 3, use_bias=True)
    offsets = jnp.asarray([[dy, dx] for dy in range(-2, 3) for dx in range(-1, 2)], jnp.float32)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert_close(nnx.jit(lambda m, o: m(o))(model, offsets), jax.jit(dpb_reference)(params, offsets), rtol=1e-5,
                 name="DPB")


def cel_reference(p, x, sizes, stride, norm):
    if norm == "before":
        x = layer_norm(x, p["norm"])
    ys = [conv2d(x, p["convs"][n]["kernel"], p["convs"][n]["bias"], stride=stride,
                 padding=[((K - stride) // 2,) * 2] * 2) for n, K in enumerate(sizes)]
    y = jnp.concatenate(ys, axis=-1)
    return layer_norm(y, p["norm"]) if norm == "after" else y


def test_cross_scale_embedding_equals_the_formula():
    """The first stage's CEL (kernels 4, 8, 16, 32 at stride 4, LayerNorm after) on a 9x13 map, forward and
    gradients; a later stage's (2, 4 at stride 2, LayerNorm before) on a 5x6 map, forward."""
    sizes, x = (4, 8, 16, 32), image((2, 9, 13, 3))
    model = CrossScaleEmbedding(3, 16, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: cel_reference(p, x, sizes, 4, "after"), x, rtol=1e-4)
    merge = CrossScaleEmbedding(8, 16, kernel_sizes=(2, 4), stride=2, norm="before", rngs=nnx.Rngs(0))
    x = image((2, 5, 6, 8))
    y = nnx.jit(lambda m, x: m(x))(merge, x)
    assert y.shape == (2, 2, 3, 16)
    params = nnx.to_pure_dict(nnx.state(merge, nnx.Param))
    assert_close(y, jax.jit(lambda p, x: cel_reference(p, x, (2, 4), 2, "before"))(params, x), rtol=1e-4,
                 name="merging CEL")


def test_cross_scale_embedding_parameter_count_and_channel_split():
    model = nnx.eval_shape(lambda: CrossScaleEmbedding(3, 96, rngs=nnx.Rngs(0)))  # first CEL: D/2, D/4, D/8, D/8
    assert [conv.kernel.shape[-1] for conv in model.convs] == [48, 24, 12, 12]
    expected = sum(K * K * 3 * c + c for K, c in zip((4, 8, 16, 32), (48, 24, 12, 12))) + 2 * 96
    assert parameter_count(model) == expected
    merge = nnx.eval_shape(lambda: CrossScaleEmbedding(96, 192, kernel_sizes=(2, 4), stride=2, norm="before",
                                                       rngs=nnx.Rngs(0)))
    assert parameter_count(merge) == (4 * 96 * 96 + 96) + (16 * 96 * 96 + 96) + 2 * 96


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = CrossFormerBlock(16, num_heads=2, interval=2, long_distance=True, dpb_dim=4, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\)"):
        model(image((2, 5, 7, 8)))
    with pytest.raises(ValueError, match=r"channels \(16\) must be a multiple of num_heads \(3\)"):
        CrossFormerBlock(16, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden must be at least 2"):
        CrossFormerBlock(16, num_heads=2, rngs=nnx.Rngs(0))        # default DPB width 16 // 16 = 1
    with pytest.raises(ValueError, match="interval must be a positive int or a pair"):
        CrossFormerBlock(16, num_heads=2, interval=0, dpb_dim=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"offsets must have shape \[offsets, 2\]"):
        DynamicPositionBias(2, hidden=4, rngs=nnx.Rngs(0))(jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="kernel_sizes must be ascending ints, each >= stride"):
        CrossScaleEmbedding(3, 16, kernel_sizes=(8, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_sizes must be ascending ints, each >= stride"):
        CrossScaleEmbedding(3, 16, kernel_sizes=(4, 7), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        CrossScaleEmbedding(3, 16, norm="none", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"out_channels \(12\) must be a multiple of 2\^\(kernels − 1\) = 8"):
        CrossScaleEmbedding(3, 12, rngs=nnx.Rngs(0))
