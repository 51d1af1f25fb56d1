"""CrossViTCrossAttention against a plain einsum reference of the official fusion (Chen, Fan & Panda 2021,
sec. 3.4; IBM/CrossViT ``MultiScaleBlock``), forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.crossvit import CrossViTCrossAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count


def layer_norm(p, x):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def linear(p, x):
    y = jnp.einsum("btc,cd->btd", x, p["kernel"], precision="highest")
    return y + p["bias"] if "bias" in p else y


def crossvit_reference(p, x, other, heads=2):
    """f(CLS_i) joins branch j's patches; the CLS is the one query; y = f(CLS_i) + attention; g back; patches_i kept."""
    cls = linear(p["project"], jax.nn.gelu(layer_norm(p["project_norm"], x[:, :1]), approximate=False))
    tokens = jnp.concatenate([cls, other[:, 1:]], axis=1)
    h = layer_norm(p["norm"], tokens)
    B, S, C = h.shape
    q = linear(p["query"], h[:, :1]).reshape(B, heads, C // heads)
    k = linear(p["key"], h).reshape(B, S, heads, C // heads)
    v = linear(p["value"], h).reshape(B, S, heads, C // heads)
    weights = jax.nn.softmax(jnp.einsum("bhd,bshd->bhs", q, k, precision="highest") / np.sqrt(C // heads), axis=-1)
    y = cls + linear(p["out"], jnp.einsum("bhs,bshd->bhd", weights, v, precision="highest").reshape(B, 1, C))
    back = linear(p["revert"], jax.nn.gelu(layer_norm(p["revert_norm"], y), approximate=False))
    return jnp.concatenate([back, x[:, 1:]], axis=1)


def branches(seed=0, dtype=jnp.float32):
    ks, kl = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ks, (2, 13, 8), dtype), jax.random.normal(kl, (2, 6, 16), dtype)


def test_cross_attention_equals_the_official_fusion_forward_and_gradients():
    """The large branch (width 16, 5 patches) reads the small one (width 8, 12 patches). The reference keeps the
    large branch's patches and never reads the small branch's CLS: the output and the input gradients show both."""
    small, large = branches()
    check_module_against_reference(CrossViTCrossAttention(16, 8, 2, rngs=nnx.Rngs(1)), crossvit_reference,
                                   large, small)


def test_parameter_count():
    def count(ci, cj, heads, qkv_bias=True):
        return parameter_count(nnx.eval_shape(lambda: CrossViTCrossAttention(ci, cj, heads, qkv_bias=qkv_bias,
                                                                             rngs=nnx.Rngs(0))))

    assert count(192, 384, 12) == 3 * 192 + 2 * 192 * 384 + 4 * 384 ** 2 + 8 * 384
    assert count(384, 192, 6, qkv_bias=False) == 3 * 384 + 2 * 384 * 192 + 4 * 192 ** 2 + 6 * 192


def test_bad_inputs_name_the_argument():
    model = CrossViTCrossAttention(8, 16, 2, rngs=nnx.Rngs(0))
    small, large = branches()
    with pytest.raises(ValueError, match=r"other must have shape \[batch, seq, 16\]"):
        model(small, small)
    with pytest.raises(ValueError, match="x and other must share the batch"):
        model(small, large[:1])
    with pytest.raises(ValueError, match=r"other_dim \(16\) must be a multiple of num_heads \(3\)"):
        CrossViTCrossAttention(8, 16, 3, rngs=nnx.Rngs(0))
