"""L2ViTBlock (global: LGA + LCM; local: window attention) against plain references of
L²ViT's official blocks (forward and gradients), eval mode, parameter counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.l2vit import ATTENTIONS, L2ViTBlock, LinearGlobalAttention, LocalConcentration
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from tests.helpers import assert_close


def image(shape=(2, 5, 7, 8), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def linear(p, x):
    return jnp.einsum("bhwc,cd->bhwd", x, p["kernel"], precision="highest") + p.get("bias", 0)


def layer_norm(p, x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def dwconv(p, x):
    return conv2d(x, p["kernel"], p["bias"], groups=x.shape[-1])


def heads_of(p, x, heads):
    B, H, W, C = x.shape
    return (a.reshape(B, H, W, heads, C // heads) for a in jnp.split(linear(p["qkv"], x), 3, axis=-1))


def lga_reference(p, x, heads, floor=100.0):
    """O = τ_h ReLU(Q)(ReLU(K)ᵀV) / max(ReLU(Q)ReLU(K)ᵀ1, c) per head over all pixels, then proj."""
    B, H, W, C = x.shape
    q, k, v = (a.reshape(B, H * W, heads, -1) for a in heads_of(p, x, heads))
    a = jnp.einsum("bihc,bjhc->bhij", jax.nn.relu(q), jax.nn.relu(k), precision="highest")
    o = jnp.einsum("bhij,bjhc->bihc", a, v, precision="highest")
    o = p["temperature"][:, None] * o / jnp.maximum(a.sum(-1), floor).transpose(0, 2, 1)[..., None]
    return linear(p["proj"], o.reshape(B, H, W, C))


def lcm_reference(p, x):
    """conv2(BN(GELU(conv1(x)))), BatchNorm on the batch statistics."""
    h = jax.nn.gelu(dwconv(p["conv1"], x), approximate=False)
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    return dwconv(p["conv2"], (h - mean) / jnp.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"])


def window_reference(p, x, heads, m):
    """softmax(QKᵀ/√d)V inside each m x m window (H, W multiples of m), no position bias, then proj."""
    B, H, W, C = x.shape

    def fold(a):
        a = a.reshape(B, H // m, m, W // m, m, heads, -1).transpose(0, 1, 3, 5, 2, 4, 6)
        return a.reshape(B, H // m, W // m, heads, m * m, -1)

    q, k, v = (fold(a) for a in heads_of(p, x, heads))
    logits = jnp.einsum("bijhtd,bijhsd->bijhts", q, k, precision="highest") / np.sqrt(C // heads)
    o = jnp.einsum("bijhts,bijhsd->bijhtd", jax.nn.softmax(logits, -1), v, precision="highest")
    o = o.reshape(B, H // m, W // m, heads, m, m, -1).transpose(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, C)
    return linear(p["proj"], o)


def mlp(p, x):
    return linear(p["fc2"], jax.nn.gelu(linear(p["fc1"], x), approximate=False))


def block_reference(p, x, heads, attention, m=3):
    x = x + dwconv(p["cpe1"], x)
    if attention == "local":
        x = x + window_reference(p["attn"], layer_norm(p["norm1"], x), heads, m)
        x = x + dwconv(p["cpe2"], x)
    else:
        x = x + lga_reference(p["attn"], layer_norm(p["norm1"], x), heads, floor=2.0)
        x = x + lcm_reference(p["local_mp"], layer_norm(p["norm3"], x))
    return x + mlp(p["mlp"], layer_norm(p["norm2"], x))


@pytest.mark.parametrize("attention, shape", [("global", (2, 5, 7, 8)), ("local", (2, 6, 6, 8))])
def test_blocks_equal_the_official_structure_forward_and_gradients(attention, shape):
    """Global: CPE, LGA (a learned per-head temperature; a floor of 2, so that the normalizer's gradient flows:
    with the default 100 these tiny heads are all floored), LCM (BatchNorm in training mode, 3x3 kernels), MLP;
    local: CPE, attention in 3x3 windows, CPE, MLP."""
    model = L2ViTBlock(8, 2, attention=attention, window_size=3, lcm_kernel_size=3, denominator_floor=2.0,
                       rngs=nnx.Rngs(0))
    if attention == "global":
        model.attn.temperature[...] = jnp.asarray([0.3, 0.8])
    check_module_against_reference(model, lambda p, x: block_reference(p, x, 2, attention), image(shape), rtol=1e-5)


def test_local_concentration_in_eval_mode_uses_running_statistics():
    model = LocalConcentration(8, kernel_size=3, rngs=nnx.Rngs(0))
    model.bn.mean[...], model.bn.var[...] = 0.5 * image((8,), seed=1), 1 + image((8,), seed=2) ** 2
    model.eval()
    x = image()
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    h = jax.nn.gelu(dwconv(p["conv1"], x), approximate=False)
    h = (h - model.bn.mean[...]) / jnp.sqrt(model.bn.var[...] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), dwconv(p["conv2"], h), rtol=1e-5, name="eval")


@pytest.mark.parametrize("C, heads", [(8, 2), (96, 3)])
def test_parameter_counts(C, heads):
    qkv_proj, mlp_count, cpe, ln = 4 * C * C + 4 * C, 8 * C * C + 5 * C, 9 * C + C, 2 * C
    lcm = 2 * (49 * C + C) + 2 * C

    def build(attention):
        return nnx.eval_shape(lambda: L2ViTBlock(C, heads, attention=attention, rngs=nnx.Rngs(0)))

    assert parameter_count(build("local")) == 2 * cpe + 2 * ln + qkv_proj + mlp_count
    assert parameter_count(build("global")) == cpe + 3 * ln + qkv_proj + heads + lcm + mlp_count
    assert parameter_count(nnx.eval_shape(lambda: LinearGlobalAttention(C, heads, rngs=nnx.Rngs(0)))) == (
        qkv_proj + heads)


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = L2ViTBlock(8, 2, attention="local", window_size=3, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 8\] \(NHWC\)"):
        model(image((2, 5, 7, 4)))
    with pytest.raises(ValueError, match=r"attention must be one of \('local', 'global'\)"):
        L2ViTBlock(8, 2, attention="windowed", rngs=nnx.Rngs(0))
    assert ATTENTIONS == ("local", "global")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        LocalConcentration(8, kernel_size=6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="denominator_floor must be a positive number"):
        LinearGlobalAttention(8, 2, denominator_floor=0, rngs=nnx.Rngs(0))
