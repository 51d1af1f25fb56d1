"""DaViT's channel group attention: the attention path over channel tokens against the definition and NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.channel_attention import channel_group_attention, channel_group_attention_reference
from tests.helpers import assert_close, assert_grads_close


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def channel_loops(q, k, v, scale):
    """Per batch and group: A = softmax(scale * Q^T K) over key channels [Cq, Ck]; out = (A V^T)^T."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for g in range(q.shape[2]):
            logits = scale * q[b, :, g].T @ k[b, :, g]
            a = np.exp(logits - logits.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            out[b, :, g] = (a @ v[b, :, g].T).T
    return out


def test_channel_group_attention_equals_the_definition_forward_and_gradients():
    """N = 35 positions (a 5x7 map), 3 groups, 6 query channels over 4 key channels per group."""
    q, k, v = normal((2, 35, 3, 6), 0), normal((2, 35, 3, 4), 1), normal((2, 35, 3, 4), 2)
    fast, reference = jax.jit(lambda *a: (channel_group_attention(*a), channel_group_attention_reference(*a)))(q, k, v)
    assert fast.shape == (2, 35, 3, 6)
    expected = channel_loops(q, k, v, 4 ** -0.5)
    assert_close(fast, expected, rtol=1e-5, name="channel attention")
    assert_close(reference, expected, rtol=1e-5, name="reference")
    assert_grads_close(channel_group_attention, channel_group_attention_reference, (q, k, v), argnums=(0, 1, 2),
                       rtol=1e-5, names=["q", "k", "v"])


def test_scale_and_the_reference_implementation():
    """The N^-1/2 scale of ChannelAttentionV2 (Florence-2) through scale=, and implementation="reference"."""
    q, k, v = normal((1, 9, 2, 4), 0), normal((1, 9, 2, 4), 1), normal((1, 9, 2, 4), 2)
    scaled, by_reference = jax.jit(lambda *a: (channel_group_attention(*a, scale=9 ** -0.5),
                                               channel_group_attention(*a, implementation="reference")))(q, k, v)
    assert_close(scaled, channel_loops(q, k, v, 9 ** -0.5), rtol=1e-5, name="scale")
    assert_close(by_reference, channel_loops(q, k, v, 0.5), rtol=1e-5, name="implementation='reference'")


def test_bf16_is_finite():
    q, k, v = (normal((1, 35, 2, 8), i, jnp.bfloat16) * 10 for i in range(3))
    out = jax.jit(channel_group_attention)(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    x = jnp.ones((1, 9, 2, 4))
    with pytest.raises(ValueError, match=r"q must have shape \[batch, positions, groups, group_channels\]"):
        channel_group_attention(x[0], x, x)
    with pytest.raises(ValueError, match=r"q \[1, 9, 2, 4\], k \[1, 9, 2, 4\], v \[1, 9, 2, 3\]"):
        channel_group_attention(x, x, x[..., :3])
    with pytest.raises(ValueError, match="the same positions and groups"):
        channel_group_attention_reference(x[:, :8], x, x)
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        channel_group_attention(x.astype(jnp.bfloat16), x, x)
    with pytest.raises(TypeError, match="k must be a floating-point array"):
        channel_group_attention(x, x.astype(jnp.int32), x)
