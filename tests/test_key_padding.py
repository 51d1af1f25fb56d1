"""Padding from lengths (``masks.from_lengths``) and key masks (``masks.Explicit.keys``).

Checked against ``jax.nn.dot_product_attention(query_seq_lengths=, key_value_seq_lengths=)``, against a
brute-force dense mask through each mechanism's reference, forward and backward, with padded query rows
exactly 0 and zero gradients for padding; blockwise skipping through ``block_schedule``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.sparse.static import SparseWindow
from tests.helpers import assert_close, grads, random_qkv

B, T, S, HQ, HKV, D = 3, 13, 11, 4, 2, 8
Q_LENGTHS = np.array([13, 5, 0], np.int32)   # a full example, a short one, an empty one
KV_LENGTHS = np.array([11, 4, 7], np.int32)  # odd lengths, not multiples of the tiles
QKV = random_qkv(jax.random.PRNGKey(0), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D)
PADDING = masks.from_lengths(jnp.asarray(Q_LENGTHS), jnp.asarray(KV_LENGTHS))

MECHANISMS = {
    "softmax": aj.softmax.Softmax(block_q=4, block_kv=4),
    "sigmoid": aj.softmax.Sigmoid(block_q=4, block_kv=4),
    "sparse_window": SparseWindow(window_blocks=1, block_q=4, block_kv=4),
}


def brute_force(q_lengths, kv_lengths, T, S):
    """bool ``[B, T, S]``: row ``t`` and column ``s`` both inside their example's lengths."""
    rows = np.arange(T)[None, :, None] < np.asarray(q_lengths)[:, None, None]
    cols = np.arange(S)[None, None, :] < np.asarray(kv_lengths)[:, None, None]
    return rows & cols


def dense_mask(mask, T=T, S=S):
    """The same mask as an ``Explicit`` ``[B, 1, T, S]`` array (the reference's input)."""
    return masks.Explicit(jnp.broadcast_to(mask.dense(T, S), (B, 1, T, S)))


def attend(q, k, v, **kwargs):
    """``aj.attention(q, k, v, **kwargs)`` compiled (an eager call runs the blocked paths op by op)."""
    return jax.jit(lambda q, k, v: aj.attention(q, k, v, **kwargs))(q, k, v)


def jax_nn(q, k, v, **kwargs):
    """``jax.nn.dot_product_attention(q, k, v, **kwargs)`` compiled."""
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kwargs))(q, k, v)


def assert_padding_is_zero(out, q_lengths=Q_LENGTHS):
    out = np.asarray(out)
    for b, length in enumerate(q_lengths):
        np.testing.assert_array_equal(out[b, length:], 0.0)


def test_dense_matches_brute_force():
    np.testing.assert_array_equal(np.asarray(PADDING.dense(T, S))[:, 0], brute_force(Q_LENGTHS, KV_LENGTHS, T, S))
    keys_only = masks.from_lengths(kv_lengths=KV_LENGTHS)
    np.testing.assert_array_equal(np.broadcast_to(keys_only.dense(T, S)[:, 0], (B, T, S)),
                                  brute_force([T] * B, KV_LENGTHS, T, S))
    key_mask = np.arange(S)[None, :] < KV_LENGTHS[:, None]
    np.testing.assert_array_equal(np.broadcast_to(masks.Explicit.keys(jnp.asarray(key_mask)).dense(T, S)[:, 0],
                                                  (B, T, S)), brute_force([T] * B, KV_LENGTHS, T, S))


def test_segments_form_is_the_same_mask():
    np.testing.assert_array_equal(np.asarray(PADDING.segments(T, S).dense(T, S)), np.asarray(PADDING.dense(T, S)))


@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas"])
def test_softmax_matches_jax_nn(implementation):
    q, k, v = QKV
    expected = jax_nn(q, k, v, query_seq_lengths=jnp.asarray(Q_LENGTHS), key_value_seq_lengths=jnp.asarray(KV_LENGTHS))
    out = attend(q, k, v, mechanism=MECHANISMS["softmax"], mask=PADDING, implementation=implementation)
    assert_close(out, expected)
    assert_padding_is_zero(out)


@pytest.mark.parametrize("mechanism,implementation", [
    ("softmax", "xla"), ("sigmoid", "xla"), ("sigmoid", "pallas"), ("sparse_window", "xla"),
])
def test_mechanisms_match_dense_mask(mechanism, implementation):
    config = MECHANISMS[mechanism]
    out = attend(*QKV, mechanism=config, mask=PADDING, implementation=implementation)
    expected = attend(*QKV, mechanism=config, mask=dense_mask(PADDING), implementation="reference")
    assert_close(out, expected)
    assert_padding_is_zero(out)


def test_linear_attention_refuses_padding():
    with pytest.raises(NotImplementedError, match="linear attention serves"):
        aj.attention(*QKV, mechanism="linear", mask=PADDING, implementation="xla")


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_gradients_match_dense_mask_and_vanish_on_padding(implementation):
    config = MECHANISMS["softmax"]

    def padded(q, k, v):
        return aj.attention(q, k, v, mechanism=config, mask=PADDING, implementation=implementation)

    def reference(q, k, v):
        return aj.attention(q, k, v, mechanism=config, mask=dense_mask(PADDING), implementation="reference")

    got = grads(padded, QKV, (0, 1, 2))
    for name, g, e in zip("qkv", got, grads(reference, QKV, (0, 1, 2))):
        assert_close(g, e, name=f"d{name}")
    dq, dk, dv = (np.asarray(g) for g in got)
    for b in range(B):
        np.testing.assert_array_equal(dq[b, Q_LENGTHS[b]:], 0.0)
        np.testing.assert_array_equal(dk[b, KV_LENGTHS[b]:], 0.0)
        np.testing.assert_array_equal(dv[b, KV_LENGTHS[b]:], 0.0)
    assert np.abs(dk[1, :KV_LENGTHS[1]]).max() > 0


SEGMENT_IDS = jnp.asarray(np.repeat(np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]]), B, 0)[:, :T], jnp.int32)
COMBINATIONS = {
    "causal": lambda: masks.Causal() & PADDING,
    "segments": lambda: masks.Segments(SEGMENT_IDS, SEGMENT_IDS[:, :S]) & PADDING,
    "causal_segments": lambda: masks.Causal() & masks.Segments(SEGMENT_IDS, SEGMENT_IDS[:, :S]) & PADDING,
    "or_window": lambda: PADDING | masks.SlidingWindow(1, 0),
    "keys_only_causal": lambda: masks.from_lengths(kv_lengths=KV_LENGTHS) & masks.Causal(),
}


SLOW_COMBINATIONS = {("causal", "xla"), ("causal", "pallas"), ("segments", "pallas"), ("keys_only_causal", "pallas")}
"""Cases the slow suite adds: the kernel evaluates the padding as segments and a combination as and/or, which
causal_segments (and, segments) and or_window (or) run by default; causal padding on xla is also checked against
jax.nn below."""


@pytest.mark.parametrize("name, implementation", [
    (n, i) if (n, i) not in SLOW_COMBINATIONS else pytest.param(n, i, marks=pytest.mark.slow)
    for n in COMBINATIONS for i in ("xla", "pallas")])
def test_combinations_match_dense_mask(name, implementation):
    mask = COMBINATIONS[name]()
    config = MECHANISMS["softmax"]
    out = attend(*QKV, mechanism=config, mask=mask, implementation=implementation)
    expected = attend(*QKV, mechanism=config, mask=dense_mask(mask), implementation="reference")
    assert_close(out, expected)
    if name not in ("or_window", "keys_only_causal"):
        assert_padding_is_zero(out)


def test_causal_padding_matches_jax_nn():
    q, k, v = random_qkv(jax.random.PRNGKey(1), B=B, T=T, S=T, Hq=HQ, Hkv=HKV, D=D)
    lengths = jnp.asarray([13, 6, 1], jnp.int32)
    expected = jax_nn(q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    out = attend(q, k, v, mechanism=MECHANISMS["softmax"], implementation="xla",
                 mask=masks.Causal() & masks.from_lengths(lengths, lengths))
    assert_close(out, expected)


def test_jit_with_traced_lengths():
    config = MECHANISMS["softmax"]
    traces = []

    @jax.jit
    def run(q, k, v, q_lengths, kv_lengths):
        traces.append(1)
        return aj.attention(q, k, v, mechanism=config, mask=masks.from_lengths(q_lengths, kv_lengths),
                            implementation="xla")

    for q_lengths, kv_lengths in ((Q_LENGTHS, KV_LENGTHS), (np.array([1, 13, 7], np.int32), np.array([3, 11, 0],
                                                                                                      np.int32))):
        out = run(*QKV, jnp.asarray(q_lengths), jnp.asarray(kv_lengths))
        mask = masks.Explicit(jnp.asarray(brute_force(q_lengths, kv_lengths, T, S))[:, None])
        assert_close(out, attend(*QKV, mask=mask, implementation="reference"))
        assert_padding_is_zero(out, q_lengths)
    assert len(traces) == 1, "new lengths must not retrace"


def test_block_summary_is_exact():
    summary = np.asarray(PADDING.block_summary(T, S, 4, 3))
    allowed = brute_force(Q_LENGTHS, KV_LENGTHS, T, S)
    for b in range(B):
        for i in range(summary.shape[2]):
            for j in range(summary.shape[3]):
                tile = allowed[b, 4 * i:4 * i + 4, 3 * j:3 * j + 3]
                truth = masks.EMPTY if not tile.any() else masks.FULL if tile.all() else masks.PARTIAL
                assert summary[b, 0, i, j] == truth, (b, i, j)


def test_padded_blocks_are_skipped():
    padding = masks.from_lengths(jnp.asarray([6, 2], jnp.int32), jnp.asarray([5, 3], jnp.int32))
    codes, lo, hi = masks.block_schedule(padding, 16, 16, 4, 4)
    codes = np.asarray(codes)
    assert (codes[:, 2:] == masks.EMPTY).all(), codes  # key tiles past every example's length
    assert (codes[2:] == masks.EMPTY).all(), codes  # query tiles past every example's length
    np.testing.assert_array_equal(np.asarray(hi - lo), [2, 2, 0, 0])
    codes, _, _ = masks.block_schedule(masks.Causal() & padding, 16, 16, 4, 4)
    assert (np.asarray(codes)[:, 2:] == masks.EMPTY).all()


@pytest.mark.parametrize("call,error,match", [
    (lambda: masks.from_lengths(kv_lengths=jnp.ones((B, 1), jnp.int32)), ValueError, r"kv_lengths must have shape \[B\]"),
    (lambda: masks.from_lengths(q_lengths=jnp.ones((B,), jnp.float32)), TypeError, "q_lengths must be integers"),
    (lambda: masks.from_lengths(jnp.ones((2,), jnp.int32), jnp.ones((3,), jnp.int32)), ValueError,
     "different batch sizes"),
    (lambda: aj.attention(*QKV, mask=masks.from_lengths(kv_lengths=jnp.ones((2,), jnp.int32))), ValueError,
     r"kv_lengths has shape \(2,\), expected \(3,\)"),
    (lambda: masks.Explicit.keys(jnp.ones((B, 1, S), bool)), ValueError, r"\[B, S\] key mask"),
    (lambda: masks.Explicit.keys(jnp.ones((B, S), jnp.int32)), TypeError, "bool key mask"),
    (lambda: aj.attention(*QKV, mask=masks.Explicit(jnp.ones((B, S), bool))), ValueError, r"Explicit\.keys"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    assert "Array(" not in str(info.value) and "[1 1" not in str(info.value)


def test_no_lengths_is_full():
    assert isinstance(masks.from_lengths(), masks.Full)


def test_explicit_key_mask_matches_lengths():
    key_mask = jnp.arange(S)[None, :] < jnp.asarray(KV_LENGTHS)[:, None]
    out = attend(*QKV, mechanism=MECHANISMS["softmax"], mask=masks.Explicit.keys(key_mask), implementation="xla")
    expected = attend(*QKV, mask=masks.from_lengths(kv_lengths=KV_LENGTHS), implementation="reference")
    assert_close(out, expected)
