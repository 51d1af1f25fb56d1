"""docs/coming_from_jax_nn_and_flax.md: ``attnjax.attention`` equals ``jax.nn.dot_product_attention``
under the argument mapping the page gives, and differs where the page says it differs.

The checks run the reference path: the mapping is about semantics, and every fast path is checked
against the reference in tests/test_conformance.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import api, masks
from tests.helpers import assert_close, random_qkv

B, H, D = 2, 4, 8
SQUARE = 12
KEY = jax.random.key(7)
attention = functools.partial(api.attention, implementation="reference")


def qkv(T=SQUARE, S=SQUARE, Hkv=H):
    return random_qkv(KEY, B=B, T=T, S=S, Hq=H, Hkv=Hkv, D=D)


def test_plain_and_lse():
    q, k, v = qkv()
    expected, expected_lse = jax.nn.dot_product_attention(q, k, v, return_residual=True)
    out, lse = attention(q, k, v, return_lse=True)
    assert lse.dtype == jnp.float32 and lse.shape == (B, SQUARE, H)
    assert_close(out, expected, name="out")
    assert_close(lse, expected_lse, name="lse")


def test_causal_and_window_square():
    q, k, v = qkv()
    assert_close(attention(q, k, v, mask=masks.Causal()), jax.nn.dot_product_attention(q, k, v, is_causal=True))
    assert_close(attention(q, k, v, mask=masks.SlidingWindow(3, 1)),
                 jax.nn.dot_product_attention(q, k, v, local_window_size=(3, 1)))
    assert_close(attention(q, k, v, mask=masks.SlidingWindow(2, 2)),
                 jax.nn.dot_product_attention(q, k, v, local_window_size=2))
    assert_close(attention(q, k, v, mask=masks.Causal() & masks.SlidingWindow(3, 1)),
                 jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(3, 1)))


@pytest.mark.parametrize("T,S", [(5, SQUARE), (SQUARE, 5)])
def test_causal_alignment_when_lengths_differ(T, S):
    """attnjax's Causal() is bottom-right (row i sees j <= i + S - T); jax.nn's is_causal is top-left
    (j <= i); each of the page's top-left recipes gives jax.nn's result."""
    q, k, v = qkv(T, S)
    top_left = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    bottom_right = jnp.tril(jnp.ones((T, S), bool), k=S - T)
    out = attention(q, k, v, mask=masks.Causal())
    seen = bottom_right.any(axis=1)  # with T > S the first T - S rows see no key
    assert_close(out[:, seen], jax.nn.dot_product_attention(q, k, v, mask=bottom_right[None, None])[:, seen])
    np.testing.assert_array_equal(out[:, ~seen], 0)
    assert float(jnp.max(jnp.abs(out - top_left))) > 0.1

    assert_close(attention(q, k, v, mask=masks.Explicit(jnp.tril(jnp.ones((T, S), bool)))), top_left)
    if T <= S:
        assert_close(attention(q, k[:, :T], v[:, :T], mask=masks.Causal()), top_left)
    else:
        assert_close(attention(q, k, v, mask=masks.SlidingWindow(None, T - S)), top_left)
    left, right = (2, 8) if T < S else (8, 1)
    assert_close(attention(q, k, v, mask=masks.SlidingWindow(left + (S - T), right - (S - T))),
                 jax.nn.dot_product_attention(q, k, v, local_window_size=(left, right)))


@pytest.mark.parametrize("T,S,causal", [(SQUARE, SQUARE, True), (5, SQUARE, False)])
def test_lengths(T, S, causal):
    q, k, v = qkv(T, S)
    q_lengths = jnp.array([T - 2, 3], jnp.int32)
    kv_lengths = jnp.array([S, S - 4], jnp.int32)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=q_lengths,
                                            key_value_seq_lengths=kv_lengths)
    padding = masks.from_lengths(q_lengths=q_lengths, kv_lengths=kv_lengths)
    out = attention(q, k, v, mask=masks.Causal() & padding if causal else padding)
    assert_close(out, expected)
    np.testing.assert_array_equal(out[1, 3:], 0)
    kv_only = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths)
    padding = masks.from_lengths(kv_lengths=kv_lengths)
    assert_close(attention(q, k, v, mask=masks.Causal() & padding if causal else padding), kv_only)


def test_boolean_mask_and_bias():
    q, k, v = qkv(5, SQUARE)
    rng = np.random.default_rng(0)
    mask = rng.random((B, 1, 5, SQUARE)) < 0.5
    mask[..., 0] = True  # every row keeps a key (see test_fully_masked_row_differs)
    bias = jnp.asarray(rng.standard_normal((B, H, 5, SQUARE)), jnp.float32)
    assert_close(attention(q, k, v, mask=masks.Explicit(jnp.asarray(mask)), bias=bias),
                 jax.nn.dot_product_attention(q, k, v, bias, jnp.asarray(mask)))
    assert_close(attention(q, k, v, mask=masks.Explicit(jnp.asarray(mask[0, 0]))),
                 jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask[0, 0])))


def test_fully_masked_row_differs():
    """A row with no allowed key: 0 in attnjax, the mean of v over every key in jax.nn's xla path."""
    q, k, v = qkv()
    mask = jnp.ones((SQUARE, SQUARE), bool).at[0].set(False)
    out = attention(q, k, v, mask=masks.Explicit(mask))
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(out[:, 0], 0)
    assert_close(expected[:, 0], jnp.repeat(v.mean(axis=1), H // v.shape[2], axis=1))
    assert_close(out[:, 1:], expected[:, 1:])


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(Hkv):
    q, k, v = qkv(Hkv=Hkv)
    assert_close(attention(q, k, v, mask=masks.Causal()), jax.nn.dot_product_attention(q, k, v, is_causal=True))
