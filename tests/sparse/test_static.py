"""Static block selectors (catalog B1): each selector's lists equal the pattern it claims.

The claimed patterns are rebuilt here by brute force, pair by pair (Radial: token by token, then
pooled to tiles), independently of the numpy arithmetic in ``attnjax.sparse``.
"""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnjax
from attnjax import masks, registry
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.blocked.lists import allowed_blocks, density, to_block_mask
from attnjax.sparse.power import Power, power_blocks
from attnjax.sparse.radial import Radial, radial_blocks
from attnjax.sparse.s2 import S2, s2_blocks
from attnjax.sparse.static import (Dilated, SparseWindow, Streaming, dilated_blocks, sliding_window_blocks,
                                   streaming_blocks)
from tests.helpers import assert_close, assert_grads_close, random_qkv

KEY = jax.random.PRNGKey(0)
HYPOTHESIS = settings(max_examples=20, deadline=None)


# ---------------------------------------------------------------- brute-force claimed patterns

def query_positions_of_block(I, T, S, bq):
    """Positions (bottom-right aligned) of the valid query rows of query block I."""
    return [i + S - T for i in range(I * bq, min((I + 1) * bq, T))]


def brute_blocks(rule, T, S, bq, bk, causal):
    """[nq, nk]: rule(delta, J) per tile, ANDed with "the tile holds a causal pair" when causal."""
    nq, nk = -(-T // bq), -(-S // bk)
    out = np.zeros((nq, nk), bool)
    for I in range(nq):
        pos = query_positions_of_block(I, T, S, bq)
        lo, hi = math.floor(min(pos) / bk), math.floor(max(pos) / bk)
        for J in range(nk):
            delta = lo - J if J < lo else (hi - J if J > hi else 0)
            ok = rule(delta, J)
            if causal:
                ok = ok and J * bk <= max(pos)
            out[I, J] = ok
    return out


def window_rule(w):
    return lambda delta, J: abs(delta) <= w


def dilated_rule(span, r):
    return lambda delta, J: delta == 0 or (abs(delta) <= span and abs(delta) % r == 0)


def streaming_rule(sinks, w):
    return lambda delta, J: J < sinks or abs(delta) <= w


def power_rule(w):
    return lambda delta, J: abs(delta) <= w or abs(delta) in {2 ** e for e in range(12)}


def s2_rule(h, n, w):
    return lambda delta, J: J % n == h % n or abs(delta) <= w


def radial_pair(p, j, s, F, m, sink_frames):
    """The Radial token rule for query position p and key position j (module docstring of radial.py)."""
    if p >= F * s or j >= F * s:
        return True
    f, x, g, y = p // s, p % s, j // s, j % s
    if g < sink_frames:
        return True
    d = abs(f - g)
    w = s / 2 ** int(math.floor(math.log2(max(d, 1))))
    if w >= m:
        return abs(x - y) <= w
    return abs(x - y) <= m and d % math.ceil(m / w) == 0


def brute_radial(T, S, bq, bk, s, F, m, sink_frames, causal):
    """Tiles holding at least one pair the token rule allows (ANDed with causal tiles when causal)."""
    F = -(-S // s) if F is None else F
    tokens = np.array([[radial_pair(i + S - T, j, s, F, m, sink_frames) for j in range(S)] for i in range(T)])
    nq, nk = -(-T // bq), -(-S // bk)
    pooled = np.array([[tokens[I * bq:(I + 1) * bq, J * bk:(J + 1) * bk].any() for J in range(nk)]
                       for I in range(nq)])
    return pooled & brute_blocks(lambda delta, J: True, T, S, bq, bk, causal)


def claimed(selector, T, S, H, causal):
    """The brute-force block pattern a selector claims, [H or 1, nq, nk]."""
    bq, bk = selector.block_q, selector.block_kv
    if isinstance(selector, SparseWindow):
        return brute_blocks(window_rule(selector.window_blocks), T, S, bq, bk, causal)[None]
    if isinstance(selector, Dilated):
        return brute_blocks(dilated_rule(selector.span_blocks, selector.dilation), T, S, bq, bk, causal)[None]
    if isinstance(selector, Streaming):
        rule = streaming_rule(selector.sink_blocks, selector.window_blocks)
        return brute_blocks(rule, T, S, bq, bk, causal)[None]
    if isinstance(selector, Power):
        return brute_blocks(power_rule(selector.window_blocks), T, S, bq, bk, causal)[None]
    if isinstance(selector, S2):
        n = min(selector.num_shards, H)
        return np.stack([brute_blocks(s2_rule(h, n, selector.window_blocks), T, S, bq, bk, causal)
                         for h in range(H)])
    if isinstance(selector, Radial):
        m = bk if selector.min_window is None else selector.min_window
        return brute_radial(T, S, bq, bk, selector.frame_tokens, selector.num_frames, m, selector.sink_frames,
                            causal)[None]
    raise TypeError(type(selector))


def shapes_only(T, S, H):
    """Stand-ins for q and k: static selectors read only their shapes."""
    return np.zeros((1, T, H, 1), np.float32), np.zeros((1, S, H, 1), np.float32)


def selected(selector, T, S, H, causal):
    q, k = shapes_only(T, S, H)
    blocks = selector.select(q, k, mask=masks.Causal() if causal else None)
    assert blocks.is_static
    return to_block_mask(blocks)[0]


# ---------------------------------------------------------------- lists equal the claimed masks

lengths = st.integers(1, 64)
block_sizes = st.sampled_from([4, 8, 16])


@HYPOTHESIS
@given(T=lengths, S=lengths, bq=block_sizes, bk=block_sizes, w=st.integers(0, 4), causal=st.booleans())
def test_sparse_window_lists_equal_claimed_mask(T, S, bq, bk, w, causal):
    sel = SparseWindow(block_q=bq, block_kv=bk, window_blocks=w)
    np.testing.assert_array_equal(selected(sel, T, S, 1, causal), claimed(sel, T, S, 1, causal))
    np.testing.assert_array_equal(sliding_window_blocks(T, S, bq, bk, w, causal), claimed(sel, T, S, 1, causal)[0])


@HYPOTHESIS
@given(T=lengths, S=lengths, bq=block_sizes, bk=block_sizes, span=st.integers(0, 8), r=st.integers(1, 4),
       causal=st.booleans())
def test_dilated_lists_equal_claimed_mask(T, S, bq, bk, span, r, causal):
    sel = Dilated(block_q=bq, block_kv=bk, span_blocks=span, dilation=r)
    np.testing.assert_array_equal(selected(sel, T, S, 1, causal), claimed(sel, T, S, 1, causal))
    np.testing.assert_array_equal(dilated_blocks(T, S, bq, bk, span, r, causal), claimed(sel, T, S, 1, causal)[0])


@HYPOTHESIS
@given(T=lengths, S=lengths, bq=block_sizes, bk=block_sizes, sinks=st.integers(0, 3), w=st.integers(0, 3),
       causal=st.booleans())
def test_streaming_lists_equal_claimed_mask(T, S, bq, bk, sinks, w, causal):
    sel = Streaming(block_q=bq, block_kv=bk, sink_blocks=sinks, window_blocks=w)
    np.testing.assert_array_equal(selected(sel, T, S, 1, causal), claimed(sel, T, S, 1, causal))
    np.testing.assert_array_equal(streaming_blocks(T, S, bq, bk, sinks, w, causal),
                                  claimed(sel, T, S, 1, causal)[0])


@HYPOTHESIS
@given(T=st.integers(1, 128), S=st.integers(1, 128), bq=block_sizes, bk=block_sizes, w=st.integers(0, 3),
       causal=st.booleans())
def test_power_lists_equal_claimed_mask(T, S, bq, bk, w, causal):
    sel = Power(block_q=bq, block_kv=bk, window_blocks=w)
    np.testing.assert_array_equal(selected(sel, T, S, 1, causal), claimed(sel, T, S, 1, causal))
    np.testing.assert_array_equal(power_blocks(T, S, bq, bk, w, causal), claimed(sel, T, S, 1, causal)[0])


@HYPOTHESIS
@given(T=lengths, S=lengths, bq=block_sizes, bk=block_sizes, H=st.integers(1, 5), n=st.integers(1, 4),
       w=st.integers(0, 2), causal=st.booleans())
def test_s2_lists_equal_claimed_mask_per_head(T, S, bq, bk, H, n, w, causal):
    sel = S2(block_q=bq, block_kv=bk, num_shards=n, window_blocks=w)
    np.testing.assert_array_equal(selected(sel, T, S, H, causal), claimed(sel, T, S, H, causal))
    np.testing.assert_array_equal(s2_blocks(T, S, bq, bk, H, n, w, causal), claimed(sel, T, S, H, causal))


@HYPOTHESIS
@given(T=st.integers(1, 72), S=st.integers(1, 72), bq=block_sizes, bk=block_sizes,
       frame=st.sampled_from([(2, 2), (2, 4), (4, 4), (3, 5)]), frames=st.sampled_from([None, 2, 5]),
       m=st.sampled_from([None, 1, 3]), sink_frames=st.integers(0, 1), causal=st.booleans())
def test_radial_lists_equal_pooled_token_rule(T, S, bq, bk, frame, frames, m, sink_frames, causal):
    sel = Radial(block_q=bq, block_kv=bk, frame_shape=frame, num_frames=frames, min_window=m,
                 sink_frames=sink_frames)
    expected = claimed(sel, T, S, 1, causal)
    np.testing.assert_array_equal(selected(sel, T, S, 1, causal), expected)
    got = radial_blocks(T, S, bq, bk, sel.frame_tokens, frames, m, sink_frames, causal)
    np.testing.assert_array_equal(got, expected[0])


# ---------------------------------------------------------------- structural properties

SMALL = [
    SparseWindow(block_q=8, block_kv=8, window_blocks=1),
    Dilated(block_q=8, block_kv=8, span_blocks=3, dilation=2),
    Streaming(block_q=8, block_kv=8, sink_blocks=1, window_blocks=1),
    Power(block_q=8, block_kv=8, window_blocks=0),
    Radial(block_q=8, block_kv=8, frame_shape=(1, 2), min_window=2),  # sparse at T = 37 (tiles hold 4 frames)
    S2(block_q=8, block_kv=8, num_shards=2, window_blocks=0),
]
SMALL_IDS = [type(s).name for s in SMALL]


@pytest.mark.parametrize("selector", SMALL, ids=SMALL_IDS)
@pytest.mark.parametrize("T,S", [(96, 96), (40, 96), (96, 40)])
def test_causal_requests_never_list_blocks_above_the_diagonal(selector, T, S):
    bm = selected(selector, T, S, 4, causal=True)
    for I, J in zip(*np.nonzero(bm.any(0))):
        assert J * 8 <= max(query_positions_of_block(I, T, S, 8)), (I, J)
    assert not (bm & ~allowed_blocks(masks.Causal(), T, S, 8, 8)[0]).any()


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_s2_union_over_heads_covers_every_allowed_block(num_heads, causal):
    T = S = 200
    sel = S2(block_q=8, block_kv=8, num_shards=4, window_blocks=0)
    per_head = selected(sel, T, S, num_heads, causal)
    mask = masks.Causal() if causal else None
    np.testing.assert_array_equal(per_head.any(0), allowed_blocks(mask, T, S, 8, 8)[0, 0])
    if num_heads > 1:  # no single head sees everything
        assert all(not (head == per_head.any(0)).all() for head in per_head)


def test_radial_density_falls_like_log_n_over_n():
    """Density ≈ c·log2(F)/F over F frames: falling, with density·F/log2(F) bounded (O(n log n) work)."""
    frames = [4, 8, 16, 32, 64]
    dens = [radial_blocks(F * 64, F * 64, 16, 16, 64, sink_frames=0).mean() for F in frames]
    assert all(a > b for a, b in zip(dens, dens[1:])), dens
    ratios = [d * F / math.log2(F) for d, F in zip(dens, frames)]
    assert all(1.0 < r < 4.5 for r in ratios), ratios
    assert dens[-1] < 0.35


def test_densities_match_the_documented_formulas():
    T = S = 64 * 128
    nk = 128
    window = SparseWindow(window_blocks=8).select(*shapes_only(T, S, 1), mask=masks.Causal())
    assert abs(float(density(window)) - (9 - 36 / nk) / nk) < 1e-9  # rows I < 8 list I + 1 blocks
    dilated = Dilated(span_blocks=32, dilation=4).select(*shapes_only(T, S, 1), mask=masks.Causal())
    assert abs(float(density(dilated)) - (9 - 144 / nk) / nk) < 1e-9  # rows I < 32 list 1 + I // 4
    power = Power(window_blocks=4).select(*shapes_only(T, S, 1), mask=masks.Causal())
    per_row = [sum(1 for d in range(I + 1) if d <= 4 or d & (d - 1) == 0) for I in range(nk)]
    assert float(density(power)) == sum(per_row) / nk ** 2 <= (5 + math.log2(nk)) / nk
    s2 = S2(num_shards=8, window_blocks=8).select(*shapes_only(T, S, 8), mask=masks.Causal())
    assert abs(float(density(s2)) - (1 / 16 + 9 / nk)) < 2 / nk


# ---------------------------------------------------------------- attention through the engine

def dense_of(bm, T, S, bq, bk):
    """Token mask [1, H, T, S] of block mask [H, nq, nk]."""
    return np.repeat(np.repeat(bm, bq, axis=1), bk, axis=2)[None, :, :T, :S]


@pytest.mark.parametrize("selector", SMALL, ids=SMALL_IDS)
def test_attention_equals_reference_on_claimed_mask(selector):
    """Eager and jitted, self-attention at an odd length and cross-attention (T < S), GQA."""
    for T, S, jitted in ((37, 37, False), (37, 37, True), (19, 37, True)):
        q, k, v = random_qkv(KEY, B=1, T=T, S=S, Hq=4, Hkv=2, D=8)
        expected_mask = masks.Explicit(jnp.asarray(dense_of(claimed(selector, T, S, 4, True), T, S, 8, 8)))
        expected = softmax_attention_reference(q, k, v, mask=expected_mask & masks.Causal())

        def run(q, k, v):
            return attnjax.attention(q, k, v, mechanism=selector, mask=masks.Causal(), implementation="reference")

        assert_close((jax.jit(run) if jitted else run)(q, k, v), expected, name=f"{selector.name} {T}x{S} {jitted=}")


def test_data_mask_gives_dynamic_lists_under_jit():
    """A Segments mask makes the lists jax arrays (built inside jit): the claimed pattern & the data mask."""
    T = S = 40
    q, k, _ = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    ids = jnp.asarray(np.repeat(np.array([[0, 1, 2, 3], [0, 0, 1, 1]]), 10, axis=1))
    sel = S2(block_q=8, block_kv=8, num_shards=2, window_blocks=0)

    def lists(q, k, ids):
        blocks = sel.select(q, k, mask=masks.Causal() & masks.Segments(ids))
        assert not blocks.is_static and blocks.indices.shape[:2] == (2, 4)
        return to_block_mask(blocks)

    mask = masks.Causal() & masks.Segments(ids)
    expected = claimed(sel, T, S, 4, causal=True) & np.asarray(allowed_blocks(mask, T, S, 8, 8))
    np.testing.assert_array_equal(np.asarray(jax.jit(lists)(q, k, ids)), expected)


@pytest.mark.parametrize("T,S", [(10, 37), (37, 37), (1, 37), (37, 1), (200, 200)])
def test_default_configs_give_every_query_block_a_key_block(T, S):
    """Registry defaults (block 64) on odd lengths and T != S: valid lists, and a query block lists
    at least one key block whenever the causal mask leaves it any (its own block is always in)."""
    q, k = shapes_only(T, S, 4)
    causal_rows = allowed_blocks(masks.Causal(), T, S, 64, 64)[0, 0].any(-1)
    for name in ("sparse_window", "dilated", "streaming", "power", "radial", "s2"):
        assert registry.get(name).family == "sparse"
        blocks = registry.get(name)().select(q, k, mask=masks.Causal())
        blocks.check(1, 4, T, S)
        np.testing.assert_array_equal(np.asarray(blocks.counts) > 0,
                                      np.broadcast_to(causal_rows, blocks.counts.shape), name)


@pytest.mark.parametrize("make", [
    lambda: SparseWindow(window_blocks=-1), lambda: SparseWindow(block_q=0), lambda: Dilated(dilation=0),
    lambda: Streaming(sink_blocks=-1), lambda: Power(window_blocks=1.5), lambda: S2(num_shards=0),
    lambda: Radial(frame_shape=(0, 4)), lambda: Radial(frame_shape=(4,)), lambda: Radial(min_window=0),
    lambda: Radial(num_frames=0),
])
def test_bad_configs_raise(make):
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------------------- the xla engine path

HAS_GATHER = importlib.util.find_spec("attnjax.sparse.gather") is not None


def xla_and_reference(selector):
    def run(implementation):
        return lambda q, k, v: attnjax.attention(q, k, v, mechanism=selector, mask=masks.Causal(),
                                                 implementation=implementation)
    return run("xla"), run("reference")


@pytest.mark.skipif(not HAS_GATHER, reason="attnjax.sparse.gather (the engine's xla path) is not written yet")
@pytest.mark.parametrize("selector", SMALL, ids=SMALL_IDS)
def test_xla_path_matches_reference(selector):
    q, k, v = random_qkv(KEY, B=1, T=37, S=37, Hq=4, Hkv=2, D=8)
    xla, reference = xla_and_reference(selector)
    assert_close(jax.jit(xla)(q, k, v), reference(q, k, v), name=selector.name)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GATHER, reason="attnjax.sparse.gather (the engine's xla path) is not written yet")
@pytest.mark.parametrize("selector", SMALL, ids=SMALL_IDS)
def test_xla_path_grads_match_reference(selector):
    q, k, v = random_qkv(KEY, B=1, T=37, S=37, Hq=4, Hkv=2, D=8)
    xla, reference = xla_and_reference(selector)
    assert_grads_close(jax.jit(xla), reference, (q, k, v), argnums=(0, 1, 2), names=["q", "k", "v"])
