"""Block lists (attnjax.blocked.lists): conversions, padding contract, transposition, mask behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnjax import masks
from attnjax.sparse import (BlockSparse, allowed_blocks, density, from_block_ids, from_block_mask, to_block_mask,
                            transpose)


def _random_block_mask(seed, shape=(2, 3, 5, 7), p=0.35):
    return np.random.default_rng(seed).random(shape) < p


def _check_padding_contract(blocks: BlockSparse, block_mask: np.ndarray):
    indices, counts = np.asarray(blocks.indices), np.asarray(blocks.counts)
    for idx in np.ndindex(counts.shape):
        row, n = indices[idx], counts[idx]
        assert list(row[:n]) == list(np.flatnonzero(block_mask[idx])[:n])  # ascending, unique, lowest ids first
        assert np.all(row[n:] == (row[n - 1] if n else 0))  # padded slots repeat the last valid id


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_static_lists_round_trip_and_padding(seed, p):
    bm = _random_block_mask(seed, p=p)
    blocks = from_block_mask(bm, 16, 8)
    assert blocks.is_static and blocks.max_blocks == max(1, bm.sum(-1).max())
    np.testing.assert_array_equal(to_block_mask(blocks), bm)
    np.testing.assert_array_equal(blocks.counts, bm.sum(-1))
    _check_padding_contract(blocks, bm)


@pytest.mark.parametrize("under_jit", [False, True])
def test_lists_from_chosen_ids_equal_lists_from_their_mask(under_jit):
    """Distinct ids in random order, some not counted (and rows with none): the same lists as the
    block mask they mark, with K kept."""
    rng = np.random.default_rng(4)
    nk, K = 9, 4
    ids = np.argsort(rng.random((2, 3, 5, nk)), axis=-1)[..., :K].astype(np.int32)
    valid = rng.random(ids.shape) < 0.6
    valid[0, 0, 0] = False
    bm = ((ids[..., None] == np.arange(nk)) & valid[..., None]).any(-2)
    build = lambda i, v: from_block_ids(i, v, 16, 8, nk)  # noqa: E731
    blocks = jax.jit(build)(jnp.asarray(ids), jnp.asarray(valid)) if under_jit else build(ids, valid)
    assert blocks.max_blocks == K and blocks.is_static != under_jit
    np.testing.assert_array_equal(np.asarray(blocks.counts), valid.sum(-1))
    np.testing.assert_array_equal(np.asarray(to_block_mask(blocks)), bm)
    _check_padding_contract(blocks, bm)


def test_dynamic_lists_under_jit_equal_static_lists():
    bm = _random_block_mask(1)
    static = from_block_mask(bm, 16, 16)
    dynamic = jax.jit(lambda m: from_block_mask(m, 16, 16, max_blocks=static.max_blocks))(jnp.asarray(bm))
    assert not dynamic.is_static
    np.testing.assert_array_equal(dynamic.indices, static.indices)
    np.testing.assert_array_equal(dynamic.counts, static.counts)


def test_max_blocks_keeps_the_lowest_ids():
    bm = np.ones((1, 1, 2, 6), bool)
    blocks = from_block_mask(jnp.asarray(bm), 4, 4, max_blocks=3)
    np.testing.assert_array_equal(blocks.indices[0, 0], [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(blocks.counts[0, 0], [3, 3])
    with pytest.raises(ValueError, match="max_blocks"):
        from_block_mask(bm, 4, 4, max_blocks=7)


def test_rank_two_mask_gets_unit_batch_and_heads():
    blocks = from_block_mask(np.eye(3, dtype=bool), 4, 4)
    assert blocks.indices.shape == (1, 1, 3, 1)
    np.testing.assert_array_equal(blocks.indices[0, 0, :, 0], [0, 1, 2])


def test_transpose_swaps_roles():
    bm = _random_block_mask(2)
    t = transpose(from_block_mask(bm, 16, 8))
    assert (t.block_q, t.block_kv, t.num_kv_blocks) == (8, 16, bm.shape[2])
    np.testing.assert_array_equal(to_block_mask(t), bm.swapaxes(-1, -2))
    _check_padding_contract(t, bm.swapaxes(-1, -2))


def test_dense_mask_expands_blocks_and_clips_ragged_edges():
    T, S, bq, bk = 37, 45, 16, 8
    bm = _random_block_mask(3, (1, 2, 3, 6))
    dense = np.asarray(from_block_mask(bm, bq, bk).dense(T, S))
    expected = bm[:, :, np.arange(T) // bq][:, :, :, np.arange(S) // bk]
    np.testing.assert_array_equal(dense, expected)
    combined = np.asarray((from_block_mask(bm, bq, bk) & masks.Causal()).dense(T, S))
    np.testing.assert_array_equal(combined, expected & np.asarray(masks.Causal().dense(T, S)))


def test_block_summary_at_own_and_other_tile_sizes():
    T, S = 40, 40
    blocks = from_block_mask(_random_block_mask(4, (1, 1, 5, 5)), 8, 8)
    own = blocks.block_summary(T, S, 8, 8)
    np.testing.assert_array_equal(own != masks.EMPTY, to_block_mask(blocks))
    other = np.asarray(blocks.block_summary(T, S, 16, 16))
    dense = np.asarray(blocks.dense(T, S))[0, 0]
    for i in range(3):
        for j in range(3):
            tile = dense[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]
            code = masks.EMPTY if not tile.any() else masks.FULL if tile.all() else masks.PARTIAL
            assert other[0, 0, i, j] == code


def test_check_names_the_bad_field():
    blocks = from_block_mask(_random_block_mask(5, (1, 2, 3, 4)), 16, 16)
    blocks.check(batch=2, num_heads=2, T=48, S=64)
    with pytest.raises(ValueError, match=r"indices has shape .* expected"):
        blocks.check(batch=2, num_heads=2, T=80, S=64)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        blocks.check(batch=2, num_heads=2, T=48, S=80)
    with pytest.raises(ValueError, match="indices has shape"):
        blocks.check(batch=2, num_heads=3, T=48, S=64)


def test_allowed_blocks_and_density():
    causal = allowed_blocks(masks.Causal(), 64, 64, 16, 16)
    np.testing.assert_array_equal(causal[0, 0], np.tril(np.ones((4, 4), bool)))
    assert allowed_blocks(None, 64, 64, 16, 16).all()
    assert density(from_block_mask(causal, 16, 16)) == pytest.approx(10 / 16)
