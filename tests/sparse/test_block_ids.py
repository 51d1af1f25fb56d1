"""``from_block_ids`` with repeated ids: a ValueError for concrete ids, deduplication for traced ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse import block_sparse_attention, from_block_ids, to_block_mask
from tests.helpers import assert_close, random_qkv

T, S, BQ, BK = 19, 29, 8, 8
NQ, NK, K = 3, 4, 5


def _ids_with_repeats(seed, shape=(2, 3, NQ, K)):
    """Random ids in ``[0, NK)`` (``K > NK``, so most rows repeat one) and a random ``valid``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, NK, shape).astype(np.int32), rng.random(shape) < 0.7


def _brute_force_block_mask(ids, valid):
    """Bool ``[Bl, Hl, nq, nk]``: the set of valid ids of each row."""
    return ((ids[..., None] == np.arange(NK)) & valid[..., None]).any(-2)


@pytest.mark.parametrize("kind", ["numpy", "python", "jax"])
def test_concrete_repeats_raise_naming_the_row_and_slots(kind):
    ids = np.array([[[[0, 2, 1], [3, 1, 3], [2, 0, 1]]]], np.int32)  # row i=1 lists block 3 in slots 0 and 2
    valid = np.ones(ids.shape, bool)
    convert = {"numpy": lambda x: x, "python": lambda x: x.tolist(), "jax": jnp.asarray}[kind]
    with pytest.raises(ValueError, match=r"ids \(1, 1, 3, 3\) lists key block 3 more than once in row "
                                         r"\[b, h, i\] = \[0, 0, 1\] \(slots 0 and 2\)"):
        from_block_ids(convert(ids), convert(valid), BQ, BK, NK)


def test_repeats_in_slots_that_do_not_count_are_allowed():
    ids = np.array([[[[1, 1, 3]]]], np.int32)
    blocks = from_block_ids(ids, np.array([[[[True, False, True]]]]), BQ, BK, NK)
    assert blocks.is_static
    np.testing.assert_array_equal(blocks.indices, [[[[1, 3, 3]]]])
    np.testing.assert_array_equal(blocks.counts, [[[2]]])


def test_concrete_ids_out_of_range_raise():
    with pytest.raises(ValueError, match=r"outside \[0, num_kv_blocks=4\) at \[b, h, i, slot\] = \[0, 0, 0, 1\]"):
        from_block_ids(np.array([[[[0, 4]]]]), np.ones((1, 1, 1, 2), bool), BQ, BK, NK)


def test_the_message_never_holds_the_arrays():
    ids = np.zeros((4, 8, 64, 64), np.int32)
    with pytest.raises(ValueError) as info:
        from_block_ids(ids, np.ones(ids.shape, bool), BQ, BK, 64)
    assert len(str(info.value)) < 300


def test_mismatched_valid_shape_raises():
    with pytest.raises(ValueError, match=r"ids \(1, 1, 2, 3\) and valid \(1, 1, 2, 2\)"):
        from_block_ids(np.zeros((1, 1, 2, 3), np.int32), np.ones((1, 1, 2, 2), bool), BQ, BK, NK)


def test_traced_repeats_are_deduplicated():
    """Under jit each row lists its distinct valid ids once, ascending, with the padding contract."""
    ids, valid = _ids_with_repeats(0)
    blocks = jax.jit(lambda i, v: from_block_ids(i, v, BQ, BK, NK))(jnp.asarray(ids), jnp.asarray(valid))
    expected = _brute_force_block_mask(ids, valid)
    assert not blocks.is_static and blocks.max_blocks == K
    np.testing.assert_array_equal(np.asarray(to_block_mask(blocks)), expected)
    np.testing.assert_array_equal(np.asarray(blocks.counts), expected.sum(-1))
    indices, counts = np.asarray(blocks.indices), np.asarray(blocks.counts)
    for row in np.ndindex(counts.shape):
        n = counts[row]
        assert list(indices[row][:n]) == list(np.flatnonzero(expected[row]))
        assert np.all(indices[row][n:] == (indices[row][n - 1] if n else 0))


def test_traced_repeats_attend_each_block_once():
    """Lists from repeated traced ids, through the block-sparse engine under jit, equal dense softmax
    under the mask of the deduplicated ids (counting a repeated block twice would not)."""
    ids, valid = _ids_with_repeats(1)
    assert (valid[..., :, None] & valid[..., None, :] & (ids[..., :, None] == ids[..., None, :])
            & ~np.eye(K, dtype=bool)).any(), "the case must hold repeats"
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=2, T=T, S=S, Hq=3, Hkv=3, D=8)

    @jax.jit
    def sparse(q, k, v, ids, valid):
        blocks = from_block_ids(ids, valid, BQ, BK, NK)
        return block_sparse_attention(q, k, v, blocks, mask=masks.Causal(), implementation="xla")

    bm = _brute_force_block_mask(ids, valid)
    dense = bm[:, :, np.arange(T) // BQ][:, :, :, np.arange(S) // BK]
    expected = softmax_attention_reference(q, k, v, mask=masks.Explicit(dense) & masks.Causal())
    assert_close(sparse(q, k, v, jnp.asarray(ids), jnp.asarray(valid)), expected)
