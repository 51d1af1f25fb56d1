"""Mask algebra: dense matrices, block summaries (soundness, exactness), and & / | laws."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnjax import masks

LENGTHS = st.integers(1, 24)
BLOCKS = st.integers(1, 9)


def window_bound():
    return st.one_of(st.none(), st.integers(0, 12))


def structural_masks():
    return st.one_of(
        st.just(masks.Full()),
        st.just(masks.Causal()),
        st.builds(masks.SlidingWindow, window_bound(), window_bound()),
        st.builds(masks.ChunkedCausal, st.integers(1, 8)),
    )


@st.composite
def data_masks(draw, T, S):
    kind = draw(st.sampled_from(["segments", "lengths", "explicit"]))
    if kind == "segments":
        q = np.sort(draw(st.lists(st.integers(0, 3), min_size=T, max_size=T)))
        k = np.sort(draw(st.lists(st.integers(0, 3), min_size=S, max_size=S)))
        return masks.Segments(jnp.asarray(q)[None], jnp.asarray(k)[None])
    if kind == "lengths":
        q_len = draw(st.one_of(st.none(), st.integers(-1, T + 1)))
        k_len = draw(st.one_of(st.none(), st.integers(-1, S + 1)))
        return masks.from_lengths(None if q_len is None else jnp.asarray([q_len]),
                                  None if k_len is None else jnp.asarray([k_len]))
    bits = draw(st.lists(st.booleans(), min_size=T * S, max_size=T * S))
    return masks.Explicit(jnp.asarray(bits).reshape(T, S))


@st.composite
def any_mask(draw, T, S, depth=2):
    leaf = draw(st.one_of(structural_masks(), data_masks(T, S)))
    if depth == 0 or draw(st.booleans()):
        return leaf
    other = draw(any_mask(T, S, depth - 1))
    return leaf & other if draw(st.booleans()) else leaf | other


def dense(m, T, S):
    return np.broadcast_to(np.asarray(m.dense(T, S)), (1, 1, T, S))[0, 0]


def tiles_of(matrix, bq, bk):
    T, S = matrix.shape
    for i in range(0, T, bq):
        for j in range(0, S, bk):
            yield i // bq, j // bk, matrix[i:i + bq, j:j + bk]


def check_summary(m, T, S, bq, bk, exact):
    d = dense(m, T, S)
    summary = np.asarray(m.block_summary(T, S, bq, bk))
    assert summary.shape[-2:] == (-(-T // bq), -(-S // bk))
    summary = np.broadcast_to(summary, (1, 1) + summary.shape[-2:])[0, 0]
    for i, j, tile in tiles_of(d, bq, bk):
        code = summary[i, j]
        truth = masks.EMPTY if not tile.any() else masks.FULL if tile.all() else masks.PARTIAL
        if exact:
            assert code == truth, (m, i, j, code, truth)
        else:
            assert code == truth or code == masks.PARTIAL, (m, i, j, code, truth)


def properties(body, *strategies, examples: int):
    """``body`` as two hypothesis tests: ``examples`` random cases in the default suite, four times as many in the
    slow one (each new shape compiles the masks' eager ops, which is most of this file's time)."""
    fast = settings(max_examples=examples, deadline=None)(given(*strategies)(body))
    more = settings(max_examples=4 * examples, deadline=None)(given(*strategies)(body))
    return fast, pytest.mark.slow(more)


def structural_summaries_are_exact(data, T, S, bq, bk):
    m = data.draw(structural_masks())
    check_summary(m, T, S, bq, bk, exact=not isinstance(m, masks.ChunkedCausal))


def lengths_summary_is_exact(T, S, bq, bk, q_len, k_len):
    m = masks.from_lengths(jnp.asarray([q_len]), jnp.asarray([k_len]))
    rows, cols = np.arange(T) < q_len, np.arange(S) < k_len
    np.testing.assert_array_equal(dense(m, T, S), rows[:, None] & cols[None, :])
    check_summary(m, T, S, bq, bk, exact=True)


def any_summary_is_sound(data, T, S, bq, bk):
    check_summary(data.draw(any_mask(T, S)), T, S, bq, bk, exact=False)


def and_or_laws(data, T, S):
    a, b, c = (data.draw(any_mask(T, S, depth=1)) for _ in range(3))
    da, db, dc = (dense(m, T, S) for m in (a, b, c))
    np.testing.assert_array_equal(dense(a & b, T, S), da & db)
    np.testing.assert_array_equal(dense(a | b, T, S), da | db)
    np.testing.assert_array_equal(dense(a & b, T, S), dense(b & a, T, S))
    np.testing.assert_array_equal(dense(a | b, T, S), dense(b | a, T, S))
    np.testing.assert_array_equal(dense((a & b) & c, T, S), dense(a & (b & c), T, S))
    np.testing.assert_array_equal(dense(a & (b | c), T, S), dense((a & b) | (a & c), T, S))
    np.testing.assert_array_equal(dense(a | (a & b), T, S), da)
    np.testing.assert_array_equal(dense(a & masks.Full(), T, S), da)
    np.testing.assert_array_equal(dense(a | masks.Full(), T, S), np.ones((T, S), bool))


test_structural_summaries_are_exact, test_structural_summaries_are_exact_more = properties(
    structural_summaries_are_exact, st.data(), LENGTHS, LENGTHS, BLOCKS, BLOCKS, examples=8)
test_lengths_summary_is_exact, test_lengths_summary_is_exact_more = properties(
    lengths_summary_is_exact, LENGTHS, LENGTHS, BLOCKS, BLOCKS, st.integers(-1, 25), st.integers(-1, 25), examples=4)
test_any_summary_is_sound, test_any_summary_is_sound_more = properties(
    any_summary_is_sound, st.data(), LENGTHS, LENGTHS, BLOCKS, BLOCKS, examples=3)
test_and_or_laws, test_and_or_laws_more = properties(and_or_laws, st.data(), LENGTHS, LENGTHS, examples=3)


def test_bottom_right_alignment():
    causal = dense(masks.Causal(), 2, 5)
    np.testing.assert_array_equal(causal, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    window = dense(masks.SlidingWindow(1, 0), 2, 5)
    np.testing.assert_array_equal(window, [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    chunked = dense(masks.ChunkedCausal(2), 4, 4)
    np.testing.assert_array_equal(chunked, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def test_segments_default_to_self_attention():
    ids = jnp.array([[0, 0, 1, 1, 1]])
    d = dense(masks.Segments(ids), 5, 5)
    np.testing.assert_array_equal(d, np.asarray(ids[0][:, None] == ids[0][None, :]))


@pytest.mark.parametrize("bad", [
    lambda: masks.SlidingWindow(-1, 0),
    lambda: masks.SlidingWindow(2.5, 0),
    lambda: masks.ChunkedCausal(0),
])
def test_bad_mask_arguments(bad):
    with pytest.raises(ValueError):
        bad()


def test_explicit_rank_2_is_t_by_s():
    key_mask = jnp.asarray([[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(masks.Explicit(key_mask).dense(2, 3)[0, 0], key_mask)
    np.testing.assert_array_equal(np.broadcast_to(masks.Explicit.keys(key_mask).dense(4, 3)[:, 0], (2, 4, 3)),
                                  np.broadcast_to(np.asarray(key_mask)[:, None, :], (2, 4, 3)))
    with pytest.raises(ValueError, match=r"rank-2 mask is \[T, S\] = \[4, 3\].*Explicit\.keys"):
        masks.Explicit(key_mask).check(2, 1, 4, 3)


def test_data_mask_repr_hides_values():
    text = repr(masks.Causal() & masks.from_lengths(jnp.arange(7), None) | masks.Explicit(jnp.ones((3, 4), bool)))
    assert text == "Or(a=And(a=Causal(), b=Lengths(q_lengths=int32[7], kv_lengths=None)), b=Explicit(mask=bool[3, 4]))"


def test_masks_combine_only_with_masks():
    with pytest.raises(TypeError, match="masks combine only with masks"):
        masks.Causal() & jnp.ones((3, 3), bool)


def test_block_schedule_skips_work():
    codes, lo, hi = masks.block_schedule(masks.Causal(), 64, 64, 16, 16)
    np.testing.assert_array_equal(np.asarray(hi - lo), [1, 2, 3, 4])
    assert codes[1, 0] == masks.FULL and codes[1, 1] == masks.PARTIAL and codes[0, 1] == masks.EMPTY
    _, lo, hi = masks.block_schedule(masks.SlidingWindow(16, 0), 64, 64, 16, 16)
    np.testing.assert_array_equal(np.asarray(lo), [0, 0, 1, 2])
    np.testing.assert_array_equal(np.asarray(hi - lo), [1, 2, 2, 2])
    codes, _, _ = masks.block_schedule(None, 20, 20, 16, 16)
    np.testing.assert_array_equal(np.asarray(codes), [[masks.FULL, masks.PARTIAL]] * 2)
    codes, lo, hi = masks.block_schedule(masks.Explicit(jnp.zeros((8, 8), bool)), 8, 8, 4, 4)
    np.testing.assert_array_equal(np.asarray(hi - lo), [0, 0])
