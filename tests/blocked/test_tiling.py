"""Tile helpers shared by the blocked paths."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.tiling import check_broadcastable, num_tiles, pad_axis, rank4, take_tile


def test_num_tiles_and_padding():
    assert [num_tiles(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    x = jnp.ones((2, 5, 3))
    padded = pad_axis(x, 1, 4)
    assert padded.shape == (2, 8, 3)
    np.testing.assert_array_equal(padded[:, 5:], 0)
    assert pad_axis(x, 1, 5) is x


def test_take_tile_keeps_broadcast_dims_and_clips():
    x = jnp.arange(12).reshape(1, 1, 3, 4)
    np.testing.assert_array_equal(take_tile(x, jnp.array([1, 2]), jnp.array([0, 3])), [[[[4, 7], [8, 11]]]])
    np.testing.assert_array_equal(take_tile(x, jnp.array([5]), jnp.array([9])), [[[[11]]]])
    column = jnp.arange(4).reshape(1, 1, 1, 4)
    assert take_tile(column, jnp.arange(3), jnp.array([1, 2])).shape == (1, 1, 1, 2)


def test_rank4_and_broadcast_check():
    assert rank4(jnp.ones((3, 4))).shape == (1, 1, 3, 4)
    check_broadcastable("x", jnp.ones((2, 1, 1, 4)), (2, 8, 3, 4))
    with pytest.raises(ValueError, match=r"x has shape \(3, 5\), expected one broadcastable to \[B, H, T, S\]"):
        check_broadcastable("x", jnp.ones((3, 5)), (2, 8, 3, 4))
    with pytest.raises(ValueError):
        check_broadcastable("x", jnp.ones((4,)), (2, 8, 3, 4))
