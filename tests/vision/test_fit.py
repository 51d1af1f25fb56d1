"""FIT's grouped attention (Chen & Li 2023, sec. 2) against a dense masked softmax whose block-diagonal mask is
built here from the token indices, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.fit import (group_mask, group_tokens, grouped_attention, grouped_attention_reference,
                                ungroup_tokens)
from tests.helpers import assert_close, assert_grads_close, random_qkv


def same_group_mask(queries, keys, groups):
    """``[T, S]``: query t and key s share a group, by loops over the contiguous groups."""
    mask = np.zeros((queries, keys), bool)
    n, m = queries // groups, keys // groups
    for g in range(groups):
        for t in range(g * n, (g + 1) * n):
            for s in range(g * m, (g + 1) * m):
                mask[t, s] = True
    return mask


def dense_masked_attention(q, k, v, mask):
    """Softmax over all keys with the disallowed ones at -inf (GQA by repeating K/V)."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, v, precision="highest")


def test_group_and_ungroup_fold_contiguous_groups_into_the_batch():
    x = np.arange(2 * 12 * 3, dtype=np.float32).reshape(2, 12, 3)
    folded = np.asarray(group_tokens(jnp.asarray(x), 4))
    expected = np.stack([x[b, g * 3:(g + 1) * 3] for b in range(2) for g in range(4)])
    np.testing.assert_array_equal(folded, expected)
    np.testing.assert_array_equal(np.asarray(ungroup_tokens(jnp.asarray(folded), 4)), x)
    np.testing.assert_array_equal(group_mask(6, 12, 3), same_group_mask(6, 12, 3))


def test_grouped_attention_equals_dense_masked_softmax_forward_and_gradients():
    """Data -> latent: 2 latents per group read 4 data tokens (3 groups), GQA, Dv != D. Groups of different sizes on
    the query and key sides; local self-attention (T = S) is the block-diagonal case, checked in the FITBlock test."""
    T, S, Hq, Hkv, Dv, groups = 6, 12, 4, 2, 6, 3
    q, k, v = random_qkv(jax.random.key(0), B=2, T=T, S=S, Hq=Hq, Hkv=Hkv, D=4, Dv=Dv)
    mask = same_group_mask(T, S, groups)

    def fast(q, k, v):
        return grouped_attention(q, k, v, groups)

    def reference(q, k, v):
        return dense_masked_attention(q, k, v, mask)

    out, expected, library = jax.jit(lambda q, k, v: (fast(q, k, v), reference(q, k, v),
                                                      grouped_attention_reference(q, k, v, groups)))(q, k, v)
    assert out.shape == (2, T, Hq, Dv)
    assert_close(out, expected, rtol=1e-5, name="grouped attention")
    assert_close(library, expected, rtol=1e-5, name="library reference")
    assert_grads_close(fast, reference, (q, k, v), argnums=(0, 1, 2), rtol=1e-5, names=["q", "k", "v"])


def test_bf16_is_finite_and_keeps_the_dtype():
    q, k, v = random_qkv(jax.random.key(1), B=1, T=12, S=6, Hq=2, D=4, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: grouped_attention(q, k, v, 3))(30 * q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    q, k, v = random_qkv(jax.random.key(2), B=1, T=12, S=9, Hq=2, D=4)
    with pytest.raises(ValueError, match="k has 9 tokens, not a multiple of num_groups=2"):
        grouped_attention(q, k, v, 2)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, tokens, heads, head_dim\]"):
        grouped_attention(q[0], k, v, 3)
    with pytest.raises(ValueError, match="num_groups must be a positive int, got 0"):
        grouped_attention(q, k, v, 0)
    with pytest.raises(ValueError, match=r"x must have shape \[batch·5, tokens, ...\]"):
        ungroup_tokens(jnp.ones((4, 3, 2)), 5)
