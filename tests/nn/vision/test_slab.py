"""SimplifiedLinearAttention and SLABBlock against plain references of SLAB's formulas (forward and gradients), the
re-parameterized block against the trained one at the end of the PRepBN schedule, parameter counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.normalization import set_progress
from attnjax.nn.vision.slab import SimplifiedLinearAttention, SLABBlock
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from tests.helpers import assert_close


def image(shape=(2, 5, 7, 8), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def linear(p, x):
    return jnp.einsum("bhwc,cd->bhwd", x, p["kernel"], precision="highest") + p.get("bias", 0)


def sla_reference(p, x, heads):
    """Q, K, V = x W + b; K += P; O = ReLU(Q)ReLU(K)ᵀV / (ReLU(Q)ReLU(K)ᵀ1 + 1e-6) + DWC(V) per head; proj."""
    B, H, W, C = x.shape
    d = C // heads
    q, k, v = jnp.split(linear(p["qkv"], x), 3, axis=-1)
    if "positional_encoding" in p:
        k = k + p["positional_encoding"].reshape(H, W, C)
    q, k, v = (a.reshape(B, H * W, heads, d) for a in (q, k, v))
    a = jnp.einsum("bihc,bjhc->bhij", jax.nn.relu(q), jax.nn.relu(k), precision="highest")
    o = jnp.einsum("bhij,bjhc->bihc", a, v, precision="highest") / (a.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    per_head = v.reshape(B, H, W, heads, d).transpose(0, 3, 1, 2, 4).reshape(B * heads, H, W, d)
    conv = conv2d(per_head, p["dwc"]["kernel"], p["dwc"]["bias"], groups=d)
    o = o.reshape(B, H, W, heads, d) + conv.reshape(B, heads, H, W, d).transpose(0, 2, 3, 1, 4)
    return linear(p["proj"], o.reshape(B, H, W, C))


def prepbn_reference(p, x, gamma):
    """γ LN(x) + (1 − γ)(BN(x) + α x), BatchNorm on the batch statistics over (B, H, W)."""
    ln, rep = p["layer_norm"], p["rep_batch_norm"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    layer = (x - mu) / jnp.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
    mean, bvar = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    batch = (x - mean) / jnp.sqrt(bvar + 1e-5) * rep["bn"]["scale"] + rep["bn"]["bias"] + rep["alpha"] * x
    return gamma * layer + (1 - gamma) * batch


def block_reference(p, x, heads, gamma):
    x = x + sla_reference(p["attn"], prepbn_reference(p["norm1"], x, gamma), heads)
    h = prepbn_reference(p["norm2"], x, gamma)
    h = jax.nn.gelu(linear(p["mlp"]["fc1"], h), approximate=False)
    return x + linear(p["mlp"]["fc2"], h)


def test_slab_block_with_prepbn_equals_the_formula_mid_schedule_in_training_mode():
    """Step 1 of 4: γ = 3/4; the BatchNorms use the batch statistics (training mode). The attention: a 5x7 map,
    2 heads of 4 channels, a 3x3 DWC shared by the heads, the learned position encoding on K."""
    model = SLABBlock(8, 2, kernel_size=3, input_size=(5, 7), total_steps=4, initial_step=1, rngs=nnx.Rngs(0))
    model.norm1.rep_batch_norm.alpha[...] = jnp.asarray(0.7)
    model.attn.positional_encoding[...] = 0.5 * image((35, 8), seed=3)
    check_module_against_reference(model, lambda p, x: block_reference(p, x, 2, 0.75), image(), rtol=1e-5,
                                   atol=1e-5)


def test_simplified_linear_attention_without_position_encoding_equals_the_formula():
    model = SimplifiedLinearAttention(8, 2, kernel_size=5, rngs=nnx.Rngs(0))
    x = image((2, 4, 6, 8))
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert "positional_encoding" not in p
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), sla_reference(p, x, 2), rtol=1e-5, name="SLA")


def test_reparameterized_block_equals_the_trained_block_at_the_end_of_the_schedule():
    """Two training steps with ``set_progress``, then eval mode: the block with its PRepBNs folded into BatchNorms
    gives the same output; a LayerNorm block comes back as an equal copy."""
    model = SLABBlock(8, 2, kernel_size=3, total_steps=1, rngs=nnx.Rngs(0))
    step = nnx.jit(lambda m, x, t: (set_progress(m, t), m(x))[1])
    for t in range(2):
        step(model, image(seed=t), t)
    model.eval()
    deployed = model.reparameterize()
    assert isinstance(deployed.norm1, nnx.BatchNorm) and isinstance(deployed.norm2, nnx.BatchNorm)
    forward = nnx.jit(lambda m, x: m(x))
    x = image(seed=5)
    assert_close(forward(deployed, x), forward(model, x), atol=1e-5, rtol=1e-6, name="re-parameterized")
    with pytest.raises(ValueError, match="needs the schedule finished"):
        SLABBlock(8, 2, total_steps=3, rngs=nnx.Rngs(0)).reparameterize()


@pytest.mark.parametrize("C, heads, k", [(8, 2, 3), (96, 3, 5)])
def test_parameter_counts(C, heads, k):
    d = C // heads
    attention = 3 * C * C + 3 * C + k * k * d + d + C * C + C

    def build(cls, **kw):
        return nnx.eval_shape(lambda: cls(C, heads, kernel_size=k, rngs=nnx.Rngs(0), **kw))

    assert parameter_count(build(SimplifiedLinearAttention)) == attention
    assert parameter_count(build(SimplifiedLinearAttention, input_size=(5, 7))) == attention + 35 * C
    mlp = 2 * C * 4 * C + 4 * C + C
    assert parameter_count(build(SLABBlock)) == attention + mlp + 2 * (4 * C + 1)
    assert parameter_count(build(SLABBlock, norm="layernorm")) == attention + mlp + 4 * C


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = SLABBlock(8, 2, kernel_size=3, norm="layernorm", rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 8\] \(NHWC\)"):
        model(image((2, 5, 7, 4)))
    with pytest.raises(ValueError, match=r"x is a 5x6 map but the position encoding was built for input_size"):
        SimplifiedLinearAttention(8, 2, input_size=(5, 7), rngs=nnx.Rngs(0))(image((1, 5, 6, 8)))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SimplifiedLinearAttention(8, 2, kernel_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        SLABBlock(8, 2, norm="batch", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"d_model \(8\) must be a multiple of num_heads \(3\)"):
        SimplifiedLinearAttention(8, 3, rngs=nnx.Rngs(0))
