"""WAAD, head span and FAI (Li et al. 2025), blockwise, against NumPy computations of their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.analysis.distance import (FAI_HORIZON, WAAD_WINDOW, future_attention_influence,
                                       future_attention_influence_of_map, head_span, split_heads_by_span,
                                       windowed_attention_distance, windowed_attention_distance_of_map)
from tests.analysis.test_entropy_and_sinks import numpy_map
from tests.helpers import assert_close, random_qkv


def numpy_waad(p, window):
    """``Σ_s p_ts · min(max(t + S − T − s, 0), W)``."""
    T, S = p.shape[-2:]
    d = np.maximum(np.arange(T)[:, None] + S - T - np.arange(S)[None, :], 0)
    return (p * (d if window is None else np.minimum(d, window))).sum(-1)


def numpy_fai(p, allowed, horizon, queries):
    """``FAI_s``: the mean of ``p_ts`` over the counted queries ``t`` with ``lo <= t + S − T − s <= hi``."""
    B, H, T, S = p.shape
    lo, hi = horizon
    out = np.zeros((B, H, S))
    for b in range(B):
        for h in range(H):
            for s in range(S):
                ts = [t for t in range(T) if queries[b, t] and allowed[b, h, t, s]
                      and lo <= t + S - T - s and (hi is None or t + S - T - s <= hi)]
                out[b, h, s] = p[b, h, ts, s].mean() if ts else 0.0
    return out


def paper_fai(p, horizon, queries):
    """Eq. 10 as printed: ``T(s) = {t ∈ R : s + H_lo <= t <= min(N, s + H_hi)}`` on a square causal map (no mask
    term: every such ``t`` sees ``s``)."""
    B, H, N, _ = p.shape
    lo, hi = horizon
    out = np.zeros((B, H, N))
    for b in range(B):
        for s in range(N):
            ts = [t for t in range(N) if queries[b, t] and s + lo <= t <= min(N - 1, s + hi)]
            out[b, :, s] = p[b][:, ts, s].mean(-1) if ts else 0.0
    return out


CASES = [
    dict(T=37, S=37, Hq=4, Hkv=2, mask=masks.Causal(), window=WAAD_WINDOW, horizon=FAI_HORIZON, starts=(5, 9)),
    dict(T=21, S=45, Hq=2, Hkv=2, mask=masks.SlidingWindow(5, 3), window=3, horizon=(1, None), starts=None),
    dict(T=30, S=30, Hq=4, Hkv=1, mask=None, window=None, horizon=(0, 4), starts=(0, 12)),
]


@pytest.mark.parametrize("case", CASES, ids=["causal-gqa-paper-defaults", "window-cross", "full-mqa-unclipped"])
def test_blockwise_and_dense_equal_numpy_definitions(case):
    q, k, _ = random_qkv(jax.random.key(0), T=case["T"], S=case["S"], Hq=case["Hq"], Hkv=case["Hkv"], D=8)
    q = 3 * q
    p, allowed = numpy_map(q, k, case["mask"])
    T = case["T"]
    queries = None if case["starts"] is None else np.arange(T)[None, :] >= np.array(case["starts"])[:, None]
    of_map_queries = None if queries is None else queries[:, None]
    waad, fai, waad_of_map, fai_of_map = jax.jit(lambda q, k, p, allowed: (
        windowed_attention_distance(q, k, window=case["window"], mask=case["mask"], block_q=8),
        future_attention_influence(q, k, horizon=case["horizon"], queries=queries, mask=case["mask"], block_q=8),
        windowed_attention_distance_of_map(p, case["window"]),
        future_attention_influence_of_map(p, case["horizon"], allowed=allowed, queries=of_map_queries)))(
        q, k, p, allowed)
    expected_fai = numpy_fai(p, allowed, case["horizon"], np.ones((2, T), bool) if queries is None else queries)
    assert_close(waad, numpy_waad(p, case["window"]), rtol=1e-5, name="waad")
    assert_close(fai, expected_fai, rtol=1e-5, name="fai")
    assert_close(waad_of_map, numpy_waad(p, case["window"]), rtol=1e-5, name="waad of map")
    assert_close(fai_of_map, expected_fai, rtol=1e-5, name="fai of map")
    assert np.any(expected_fai > 0) and np.all(np.asarray(waad) >= 0)
    if isinstance(case["mask"], masks.Causal):
        assert_close(fai, paper_fai(p, case["horizon"], queries), rtol=1e-5, name="fai = eq. 10 under a causal mask")


def test_uniform_causal_map_by_hand():
    """q = 0: query t attends uniformly to keys 0..t, so p_ts = 1/(t+1)."""
    q = jnp.zeros((1, 5, 1, 4))
    k = jax.random.normal(jax.random.key(1), (1, 5, 1, 4))
    waad, fai = jax.jit(lambda q, k: (windowed_attention_distance(q, k, window=2, mask=masks.Causal(), block_q=2),
                                      future_attention_influence(q, k, horizon=(1, 2), mask=masks.Causal(),
                                                                 block_q=2)))(q, k)
    assert_close(waad[0, 0], [0.0, 1 / 2, 3 / 3, 5 / 4, 7 / 5], rtol=1e-6, name="min(t-s, 2) averaged over 0..t")
    assert_close(fai[0, 0], [(1 / 2 + 1 / 3) / 2, (1 / 3 + 1 / 4) / 2, (1 / 4 + 1 / 5) / 2, 1 / 5, 0.0], rtol=1e-6,
                 name="mean of 1/(t+1) over t in s+1..s+2")


def test_head_span_and_local_global_split():
    spans_by_row, empty = jax.jit(lambda: (head_span(jnp.array([[1.0, 2.0, 3.0, 4.0]]),
                                                     jnp.array([False, True, True, False])),
                                           head_span(jnp.array([1.0, 3.0]), jnp.array([False, False]))))()
    assert_close(spans_by_row, [2.5], name="mean over the selected rows")
    assert_close(empty, 0.0, name="no row selected")
    spans = np.array([[3.0, 1.0, 2.0], [5.0, 0.5, 4.0]])
    local, global_ = split_heads_by_span(spans)
    np.testing.assert_array_equal(local, [[False, False, False], [False, True, False]])
    np.testing.assert_array_equal(global_, [[False, False, False], [True, False, False]])
    local, global_ = split_heads_by_span(spans, fraction=0.5)
    np.testing.assert_array_equal(local, [[False, True, True], [False, True, False]])
    np.testing.assert_array_equal(global_, [[True, False, False], [True, False, True]])


def test_bad_inputs_name_the_argument():
    q, k, _ = random_qkv(jax.random.key(2), B=2, T=8, S=8, Hq=2, Hkv=2, D=4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        windowed_attention_distance(q, k, window=0)
    with pytest.raises(ValueError, match="horizon must be a tuple"):
        future_attention_influence(q, k, horizon=(5, 2))
    with pytest.raises(ValueError, match="horizon must be a tuple"):
        future_attention_influence_of_map(jnp.eye(3), horizon=(-1, None))
    with pytest.raises(ValueError, match=r"queries must have shape \[T\] or \[B, T\] = \[2, 8\], got \[2, 7\]"):
        future_attention_influence(q, k, queries=jnp.ones((2, 7), bool))
    with pytest.raises(TypeError, match="queries must be a boolean array"):
        future_attention_influence(q, k, queries=jnp.ones(8, jnp.int32))
    with pytest.raises(ValueError, match=r"q \[B, T, Hq, D\] and k \[B, S, Hkv, D\]"):
        windowed_attention_distance(q, k[:, :, :, :3])
    with pytest.raises(ValueError, match="fraction must be in"):
        split_heads_by_span(np.ones(4), fraction=0.7)
