"""PAT_ch, PAT_sp, PAT_sf and the PATNet block against plain references of Huang et al. 2025 (PATNet),
written from the official code's layers (github.com/haiduo/PartialNet, models/partialnet.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import PartialChannelAttention, PartialSelfAttention, PartialSpatialAttention, PATBlock
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from attnjax.vision.partial_attention import euclidean_rpe_buckets


def image(shape=(4, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


forward = nnx.jit(lambda model, x: model(x))


def batch_norm(p, x, train=True):
    """torch.nn.BatchNorm2d (eps 1e-5): batch statistics over (B, H, W) while training, else running (0, 1)."""
    if train:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    else:
        mean, var = 0.0, 1.0
    return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def hard_sigmoid(z):
    """torch.nn.Hardsigmoid: relu6(z + 3) / 6."""
    return jnp.clip(z + 3, 0, 6) / 6


def pat_ch_reference(p, x, c1=4, train=True):
    """Partial_conv3 (channel_type='se'): conv3x3 on the first C/4 channels; SRM (mean and unbiased std per
    channel, the (1, 2) channel-mixing convolution, BN, Hardsigmoid, scale) then BN on the rest."""
    x1, x2 = x[..., :c1], x[..., c1:]
    u = jnp.concatenate([x2.mean(axis=(1, 2)), x2.std(axis=(1, 2), ddof=1)], axis=-1)
    z = (u @ p["gate"]["kernel"])[:, None, None, :]
    g = hard_sigmoid(batch_norm(p["gate_norm"], z, train))
    return jnp.concatenate([conv2d(x1, p["conv"]["kernel"]), batch_norm(p["norm"], x2 * g, train)], axis=-1)


def pat_sp_reference(p, x, train=True):
    """partial_spatial_attn_layer_reverse(dim, 1): first half gated by one Hardsigmoid map then BN, second half
    BN then a 1x1 convolution."""
    c = x.shape[-1] - x.shape[-1] // 2
    x1, x2 = x[..., :c], x[..., c:]
    y1 = batch_norm(p["attn_norm"], x1 * hard_sigmoid(conv2d(x1, p["attn"]["kernel"])), train)
    return jnp.concatenate([y1, conv2d(batch_norm(p["conv_norm"], x2, train), p["conv"]["kernel"])], axis=-1)


def irpe_bucket(d, ratio):
    """iRPE's piecewise index (Wu et al. 2021, eq. 18) of a rounded Euclidean distance, offset by int(beta)."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    if d <= alpha:
        index = d
    else:
        index = min(beta, round(alpha + math.log(d / alpha) / math.log(gamma / alpha) * (beta - alpha)))
    return int(index) + int(beta)


def rpe_bias(table, height, width, ratio=20.0):
    positions = [(r, c) for r in range(height) for c in range(width)]
    buckets = np.array([[irpe_bucket(round(math.dist(a, b)), ratio) for b in positions] for a in positions])
    return table[:, buckets]


def pat_sf_reference(p, x, heads=4, c1=4, rpe=True):
    """Partial_conv3 (channel_type='self'): conv3x3 on the first C/4 channels; LayerNorm2d then RPEAttention
    (qkv without bias, q·k/sqrt(d) + iRPE bias, softmax, proj with bias) on the rest."""
    B, H, W, _ = x.shape
    x1, x2 = x[..., :c1], x[..., c1:]
    c2 = x2.shape[-1]
    mean, var = x2.mean(-1, keepdims=True), x2.var(-1, keepdims=True)
    t = ((x2 - mean) / jnp.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]).reshape(B, H * W, c2)
    qkv = (t @ p["qkv"]["kernel"]).reshape(B, H * W, 3, heads, c2 // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(c2 // heads)
    if rpe:
        logits = logits + rpe_bias(p["rpe"], H, W)[None]
    out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(logits, -1), v).reshape(B, H * W, c2)
    y2 = (out @ p["proj"]["kernel"] + p["proj"]["bias"]).reshape(B, H, W, c2)
    return jnp.concatenate([conv2d(x1, p["conv"]["kernel"]), y2], axis=-1)


def mlp_reference(p, x, activation=jax.nn.relu):
    """MLPBlock.mlp: Conv1x1 -> BN -> activation -> Conv1x1 -> partial_spatial_attn_layer_reverse."""
    h = activation(batch_norm(p["mlp_norm"], conv2d(x, p["fc1"]["kernel"])))
    return pat_sp_reference(p["spatial"], conv2d(h, p["fc2"]["kernel"]))


def with_random_rpe(model):
    """The iRPE table starts at 0 (as in the official code); random values make the reference check bite."""
    model.rpe[...] = jax.random.normal(jax.random.key(5), model.rpe.shape)
    return model


def test_pat_ch_equals_the_official_formula_forward_and_gradients():
    check_module_against_reference(PartialChannelAttention(16, rngs=nnx.Rngs(0)), pat_ch_reference, image())


def test_pat_ch_in_eval_mode_uses_running_statistics():
    model = PartialChannelAttention(16, rngs=nnx.Rngs(0))
    model.eval()
    built = nnx.eval_shape(lambda: PATBlock(16, use_running_average=True, rngs=nnx.Rngs(0)))
    assert all(norm.use_running_average for norm in (built.mixer.gate_norm, built.mlp_norm, built.spatial.conv_norm))
    check_module_against_reference(model, lambda p, x: pat_ch_reference(p, x, train=False), image(seed=1))


def test_pat_sp_equals_the_official_formula_forward_and_gradients():
    model, x = PartialSpatialAttention(16, rngs=nnx.Rngs(0)), image()
    check_module_against_reference(model, pat_sp_reference, x)
    forward(model, x)  # training mode: the running mean moves 0.1 of the way (PyTorch's momentum)
    np.testing.assert_allclose(model.conv_norm.mean[...], 0.1 * x[..., 8:].mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)


def test_irpe_buckets_follow_the_piecewise_index():
    for ratio in (1.0, 1.9, 20.0):
        positions = [(r, c) for r in range(6) for c in range(9)]
        expected = [[irpe_bucket(round(math.dist(a, b)), ratio) for b in positions] for a in positions]
        np.testing.assert_array_equal(euclidean_rpe_buckets(6, 9, ratio), expected)
    buckets = euclidean_rpe_buckets(1, 40, 1.0)  # alpha, beta, gamma = 1, 2, 8: distances past 1 compress
    assert list(buckets[0, :6]) == [2, 3, 3, 4, 4, 4]


def test_pat_sf_and_its_block_equal_the_official_formula():
    """PAT_sf (conv3x3, LayerNorm, multi-head attention with the iRPE bias) in its block: z = x + PAT_sf(x),
    y = z + MLP(z), the MLP ending in PAT_sp; BatchNorm in training mode."""
    model = PATBlock(16, mixer="self", rngs=nnx.Rngs(0))
    with_random_rpe(model.mixer)

    def reference(p, x):
        x = x + pat_sf_reference(p["mixer"], x)
        return x + mlp_reference(p, x)

    check_module_against_reference(model, reference, image(seed=3), rtol=5e-5)


def test_pat_ch_block_without_batch_norm_equals_the_official_block():
    """y = x + MLP(PAT_ch(x)), with norm="none" (every BatchNorm the identity) and GELU."""
    model = PATBlock(16, norm="none", activation="gelu", rngs=nnx.Rngs(0))

    def reference(p, x):
        x1, x2 = x[..., :4], x[..., 4:]
        u = jnp.concatenate([x2.mean(axis=(1, 2)), x2.std(axis=(1, 2), ddof=1)], axis=-1)
        g = hard_sigmoid(u @ p["mixer"]["gate"]["kernel"])[:, None, None, :]
        mixed = jnp.concatenate([conv2d(x1, p["mixer"]["conv"]["kernel"]), x2 * g], axis=-1)
        h = conv2d(jax.nn.gelu(conv2d(mixed, p["fc1"]["kernel"])), p["fc2"]["kernel"])
        h1, h2 = h[..., :8], h[..., 8:]
        sp = p["spatial"]
        y = jnp.concatenate([h1 * hard_sigmoid(conv2d(h1, sp["attn"]["kernel"])), conv2d(h2, sp["conv"]["kernel"])],
                            axis=-1)
        return x + y

    assert not any("norm" in str(path) for path, _ in nnx.to_flat_state(nnx.state(model)))
    check_module_against_reference(model, reference, image(seed=4), rtol=5e-5)


def count(cls, *args, **kwargs):
    """The parameter count of ``cls(*args, **kwargs)``, built abstractly (shapes only)."""
    return parameter_count(nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0))))


def test_parameter_counts():
    c, c1, c2 = 64, 16, 48
    pat_ch = 9 * c1 * c1 + 2 * c2 * c2 + 4 * c2                # conv3x3, the [mean; std] mixing, two BatchNorms
    pat_sp = 32 + 32 * 32 + 2 * c                               # gate conv, conv1x1, two BatchNorms
    pat_sf = 9 * c1 * c1 + 4 * c2 * c2 + c2 + 2 * c2 + 4 * 81   # conv, qkv + proj (+ bias), LayerNorm, iRPE
    mlp = 2 * 2 * c * c + 2 * 2 * c                             # two 1x1 convolutions, BatchNorm of 2C
    assert count(PartialChannelAttention, c) == pat_ch
    assert count(PartialChannelAttention, c, norm="none") == pat_ch - 4 * c2
    assert count(PartialSpatialAttention, c) == pat_sp
    assert count(PartialSelfAttention, c) == pat_sf
    assert count(PartialSelfAttention, c, relative_position=False) == pat_sf - 4 * 81
    assert count(PATBlock, c) == pat_ch + mlp + pat_sp
    assert count(PATBlock, c, mixer="self", spatial=False) == pat_sf + mlp


def test_bf16_is_finite_and_keeps_the_dtype():
    x = 30 * image(dtype=jnp.bfloat16)
    for model in (PartialChannelAttention(16, rngs=nnx.Rngs(0)), PATBlock(16, mixer="self", rngs=nnx.Rngs(0))):
        y = forward(model, x)
        assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_constant_channels_give_finite_gradients():
    model = PartialChannelAttention(16, rngs=nnx.Rngs(0))
    x = image().at[..., 10].set(1.0)
    grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1)))(model, x)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad))


def test_bad_inputs_name_the_argument():
    pat = nnx.eval_shape(lambda: PartialChannelAttention(16, rngs=nnx.Rngs(0)))  # the checks run before any math
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 16, 5, 7\]"):
        pat(image((2, 16, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        nnx.eval_shape(lambda: PartialSelfAttention(16, rngs=nnx.Rngs(0)))(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"x must have at least 2 positions \(H·W >= 2\).*\[2, 1, 1, 16\]"):
        pat(image((2, 1, 1, 16)))
    with pytest.raises(ValueError, match="n_div must be at least 2 and at most channels"):
        PartialSpatialAttention(16, n_div=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"C - C // n_div = 12 must be a multiple of num_heads \(5\)"):
        PartialSelfAttention(16, num_heads=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        PartialChannelAttention(16, norm="layer", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mixer must be one of"):
        PATBlock(16, mixer="spatial", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation must be one of"):
        PATBlock(16, activation="swish", rngs=nnx.Rngs(0))
