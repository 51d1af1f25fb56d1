"""RoPE and ALiBi."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.positional import ALiBi, RoPE, alibi_slopes
from tests.helpers import assert_close


def test_rope_is_a_rotation_that_depends_on_relative_position():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 2, 8))
    y = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 2, 8))
    rope = RoPE()
    pos = jnp.arange(6)
    rx = rope(x, pos)
    np.testing.assert_allclose(jnp.linalg.norm(rx, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    dots = jnp.einsum("bthd,bshd->bhts", rope(x, pos), rope(y, pos))
    shifted = jnp.einsum("bthd,bshd->bhts", rope(x, pos + 17), rope(y, pos + 17))
    assert_close(shifted, dots, rtol=1e-5)
    assert_close(rope(x, jnp.zeros(6, jnp.int32)), x)


def test_rope_matches_complex_rotation():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 8))
    pos = jnp.arange(5)
    freqs = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    z = np.asarray(x[..., :4]) + 1j * np.asarray(x[..., 4:])
    z = z * np.exp(1j * np.asarray(pos)[None, :, None, None] * freqs)
    expected = np.concatenate([z.real, z.imag], -1)
    assert_close(RoPE()(x, pos), expected, rtol=1e-5)


def test_rope_partial_rotary_keeps_the_rest():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 1, 8))
    out = RoPE(rotary_dim=4)(x, jnp.arange(4))
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
    assert not np.allclose(out[..., :4], x[..., :4])


def test_rope_scalings():
    base = RoPE().frequencies(64)
    np.testing.assert_allclose(RoPE(scaling="linear", factor=4).frequencies(64), base / 4, rtol=1e-6)
    ntk = RoPE(scaling="ntk", factor=4).frequencies(64)
    assert ntk[0] == base[0] and ntk[-1] == pytest.approx(base[-1] / 4, rel=1e-5)
    llama = RoPE(base=500000.0, scaling="llama3", factor=8).frequencies(128)
    plain = RoPE(base=500000.0).frequencies(128)
    assert llama[0] == plain[0], "high frequencies are kept"
    assert llama[-1] == pytest.approx(plain[-1] / 8, rel=1e-5), "low frequencies are divided by the factor"
    assert np.all(np.diff(llama) <= 0), "frequencies stay monotone"


def test_rope_bf16_keeps_dtype():
    x = jnp.ones((1, 3, 1, 4), jnp.bfloat16)
    assert RoPE()(x, jnp.arange(3)).dtype == jnp.bfloat16


def test_rope_bad_arguments():
    with pytest.raises(ValueError, match="scaling"):
        RoPE(scaling="yarnish")
    with pytest.raises(ValueError, match="rotary_dim"):
        RoPE(rotary_dim=5)(jnp.ones((1, 2, 1, 8)), jnp.arange(2))
    with pytest.raises(ValueError, match="positions"):
        RoPE()(jnp.ones((1, 2, 1, 8)), jnp.arange(3))


def test_alibi_slopes_match_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    six = alibi_slopes(6)
    np.testing.assert_allclose(six[:4], alibi_slopes(4), rtol=1e-6)
    np.testing.assert_allclose(six[4:], alibi_slopes(8)[0::2][:2], rtol=1e-6)


def test_alibi_tile_equals_dense_slice():
    alibi = ALiBi(jnp.asarray(alibi_slopes(4)))
    dense = alibi.dense(10, 14)
    assert dense.shape == (1, 4, 10, 14)
    np.testing.assert_allclose(dense[0, 1, 9, 13], 0.0)
    np.testing.assert_allclose(dense[0, 0, 0, 0], -alibi_slopes(4)[0] * 4)
    tile = alibi.tile(jnp.arange(3, 7), jnp.arange(5, 9), 10, 14)
    np.testing.assert_allclose(tile, dense[:, :, 3:7, 5:9])
