"""CrossViT's single-query cross-attention (Chen, Fan & Panda 2021, sec. 3.4) against a plain einsum softmax
over ``x' = [f(cls) ‖ patches]``, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.crossvit import cls_cross_attention, cls_cross_attention_reference, fusion_tokens
from tests.helpers import assert_close, assert_grads_close, random_qkv


def einsum_cls_attention(q, k, v):
    """softmax(q kᵀ/√D) v for the one query, K/V heads repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bhd,bshd->bhs", q[:, 0], k, precision="highest") / np.sqrt(q.shape[-1])
    return jnp.einsum("bhs,bshd->bhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")[:, None]


def test_fusion_tokens_put_the_projected_cls_before_the_other_patches():
    cls, patches = jnp.full((2, 1, 3), 7.0), jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    tokens = np.asarray(fusion_tokens(cls, patches))
    assert tokens.shape == (2, 6, 3)
    np.testing.assert_array_equal(tokens[:, 0], 7.0)
    np.testing.assert_array_equal(tokens[:, 1:], np.asarray(patches))


def test_cls_cross_attention_equals_the_einsum_formula_forward_and_gradients():
    """One query over 1 + 11 tokens, GQA (4 query heads, 2 kv heads), Dv != D."""
    q, k, v = random_qkv(jax.random.key(0), B=2, T=1, S=12, Hq=4, Hkv=2, D=4, Dv=6)
    out, expected, library = jax.jit(lambda q, k, v: (cls_cross_attention(q, k, v), einsum_cls_attention(q, k, v),
                                                      cls_cross_attention_reference(q, k, v)))(q, k, v)
    assert out.shape == (2, 1, 4, 6)
    assert_close(out, expected, rtol=1e-5, name="cross-attention")
    assert_close(library, expected, rtol=1e-5, name="library reference")
    assert_grads_close(cls_cross_attention, einsum_cls_attention, (q, k, v), argnums=(0, 1, 2), rtol=1e-5,
                       names=["q", "k", "v"])


def test_bf16_is_finite():
    q, k, v = random_qkv(jax.random.key(1), B=1, T=1, S=9, Hq=2, D=4, dtype=jnp.bfloat16)
    out = jax.jit(cls_cross_attention)(30 * q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    q, k, v = random_qkv(jax.random.key(2), B=1, T=2, S=5, Hq=2, D=4)
    with pytest.raises(ValueError, match=r"q must be the CLS query alone, \[batch, 1, heads, head_dim\]"):
        cls_cross_attention(q, k, v)
    with pytest.raises(ValueError, match=r"k must have shape \[batch, tokens, heads, head_dim\]"):
        cls_cross_attention(q[:, :1], k[0], v)
    with pytest.raises(ValueError, match=r"cls must have shape \[batch, 1, channels\]"):
        fusion_tokens(jnp.ones((2, 2, 3)), jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match=r"patches must have shape \[batch, tokens, channels\] = \[2, N, 3\]"):
        fusion_tokens(jnp.ones((2, 1, 3)), jnp.ones((2, 5, 4)))
