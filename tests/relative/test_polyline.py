"""Polyline path masked attention (PPMA): the mask against a walk along the path, the per-tile rule against the
dense mask, the blocked path against the dense equation (forward and gradients of q, k, v and both decays)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.relative.polyline import (PATHS, PolylineBias, polyline_attention, polyline_attention_reference,
                                       polyline_attention_xla, polyline_mask_reference)
from tests.helpers import assert_close, assert_outputs_and_grads_close

GRID = (5, 7)
N = GRID[0] * GRID[1]


def log_decays(B, H, seed=0, strength=0.5):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(-strength * rng.uniform(size=(B, N, H)), jnp.float32) for _ in range(2))


def walked_mask(log_alpha, log_beta, path):
    """M by walking the path one grid step at a time: from the key down/up its column to the query's row
    ("v2h"; "h2v" walks the transposed pair), then along that row; a step between neighbours k-1 and k
    multiplies by the decay of token k (beta on a column, alpha on a row)."""
    B, _, H = log_alpha.shape
    alpha = np.exp(np.asarray(log_alpha, np.float64)).reshape(B, *GRID, H)
    beta = np.exp(np.asarray(log_beta, np.float64)).reshape(B, *GRID, H)
    M = np.ones((B, H, N, N))
    for i in range(N):
        for j in range(N):
            (r, c), (r2, c2) = divmod(i, GRID[1]), divmod(j, GRID[1])
            if path == "h2v":
                (r, c), (r2, c2) = (r2, c2), (r, c)
            m = np.ones((B, H))
            row = r2
            while row != r:
                step = row + (1 if r > row else -1)
                m = m * beta[:, max(row, step), c2]
                row = step
            col = c2
            while col != c:
                step = col + (1 if c > col else -1)
                m = m * alpha[:, r, max(col, step)]
                col = step
            M[:, :, i, j] = m
    return M


@pytest.mark.parametrize("path", PATHS)
def test_dense_mask_and_rule_tiles_equal_the_walk_along_the_path(path):
    log_alpha, log_beta = log_decays(2, 2)
    walk = walked_mask(log_alpha, log_beta, path)
    dense = polyline_mask_reference(log_alpha, log_beta, grid=GRID, path=path)
    assert_close(dense, walk, rtol=1e-6)
    assert_close(polyline_mask_reference(log_alpha, log_beta, grid=GRID, path=path, log=True), np.log(walk), rtol=1e-6)
    rule = PolylineBias.from_log_decays(log_alpha, log_beta, grid=GRID, path=path)
    tile = rule.tile(jnp.arange(3, 19), jnp.arange(24, 40), N, N)            # key columns 35..39 are padding
    assert tile.shape == (2, 2, 16, 16)
    assert_close(jnp.exp(tile[..., :11]), walk[:, :, 3:19, 24:35], rtol=1e-6)
    assert_close(jnp.exp(rule.dense(N, N)), walk, rtol=1e-6)
    for rows, cols in [(range(7, 21), range(14, 28)), (range(3, 17), range(10, 24))]:  # whole grid rows, or not
        rows, cols = np.asarray(list(rows)), np.asarray(list(cols))
        tile = jax.jit(rule.tile, static_argnums=(2, 3))(jnp.asarray(rows), jnp.asarray(cols), N, N)
        assert_close(jnp.exp(tile), walk[:, :, rows][:, :, :, cols], rtol=1e-6)


def test_tile_gradients_equal_the_dense_mask_for_whole_grid_rows_and_other_runs():
    """The tile's backward (its transpose written by broadcasts for whole grid rows, with periodic key columns
    otherwise) equals the gradient of the dense mask's block wrt both log decays: whole rows; tile lengths of whole
    rows starting mid-row (the other branch of the alignment check); lengths of partial rows with padding keys."""
    log_alpha, log_beta = log_decays(2, 2, seed=1)
    runs = [(7, 14, 14, 21), (3, 10, 14, 14), (3, 24, 16, 16)]
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, 16, 21)), jnp.float32)

    def grads(la, lb):
        out = []
        for path in PATHS:
            for a, b, tq, tk in runs:
                n, m = min(tq, N - a), min(tk, N - b)

                def tile_loss(la, lb):
                    rule = PolylineBias.from_log_decays(la, lb, grid=GRID, path=path)
                    return jnp.sum(weights[..., :n, :m] * rule.tile(jnp.arange(a, a + tq), jnp.arange(b, b + tk), N,
                                                                    N)[..., :n, :m])

                def dense_loss(la, lb):
                    mask = polyline_mask_reference(la, lb, grid=GRID, path=path, log=True)
                    return jnp.sum(weights[..., :n, :m] * mask[..., a:a + n, b:b + m])

                out.append((jax.grad(tile_loss, (0, 1))(la, lb), jax.grad(dense_loss, (0, 1))(la, lb)))
        return out

    for got, want in jax.jit(grads)(log_alpha, log_beta):
        for g, w, name in zip(got, want, ("log_alpha", "log_beta")):
            assert_close(g, w, rtol=1e-5, atol=1e-5, name=name)


def test_the_two_paths_are_transposes_and_differ():
    log_alpha, log_beta = log_decays(1, 2, seed=3)
    v2h = polyline_mask_reference(log_alpha, log_beta, grid=GRID, path="v2h")
    h2v = polyline_mask_reference(log_alpha, log_beta, grid=GRID, path="h2v")
    np.testing.assert_array_equal(np.asarray(h2v), np.swapaxes(np.asarray(v2h), -1, -2))
    np.testing.assert_allclose(np.diagonal(np.asarray(v2h), axis1=-2, axis2=-1), 1.0)
    assert float(jnp.max(jnp.abs(v2h - h2v))) > 1e-2      # the turn is at (r, c') for one, (r', c) for the other


def _inputs(dtype=jnp.float32):
    q, k, v = (jnp.asarray(np.random.default_rng(s).normal(size=shape), dtype)
               for s, shape in enumerate(((2, N, 4, 8), (2, N, 2, 8), (2, N, 2, 6))))
    return q, k, v, *log_decays(2, 4, seed=5)


def test_blocked_path_equals_the_dense_equation_forward_and_gradients():
    """GQA (4 query heads on 2 KV heads), Dv != D, 14x21 tiles (whole grid rows) over N = 35 (padded rows and
    columns)."""
    args = _inputs()
    fast = jax.jit(lambda *a: polyline_attention_xla(*a, grid=GRID, block_q=14, block_kv=21))
    dense = jax.jit(lambda *a: polyline_attention_reference(*a, grid=GRID))
    assert_outputs_and_grads_close(fast, dense, args, argnums=range(5), rtol=1e-5,
                                   names=["q", "k", "v", "log_alpha", "log_beta"])


def test_reference_is_the_official_equation():
    """½·softmax(S + log M)·V + ½·softmax(S + log Mᵀ)·V, with the mask from the walk (not the library)."""
    q, k, v, log_alpha, log_beta = _inputs()
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) / np.sqrt(8)
    M = walked_mask(log_alpha, log_beta, "v2h")
    out = sum(0.5 * np.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s + np.log(m), axis=-1), vr)
              for m in (M, np.swapaxes(M, -1, -2)))
    assert_close(polyline_attention_reference(q, k, v, log_alpha, log_beta, grid=GRID), out, rtol=1e-5)


def test_one_direction_through_attnjax_attention_and_dispatch():
    q, k, v, log_alpha, log_beta = _inputs()
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    want = polyline_attention_reference(q, k, v, log_alpha, log_beta, grid=GRID, paths=("h2v",))
    rule = PolylineBias.from_log_decays(log_alpha, log_beta, grid=GRID, path="h2v")
    got = jax.jit(lambda q, k, v, rule: aj.attention(q, k, v, bias=rule, implementation="xla"))(q, k, v, rule)
    assert_close(got, want, rtol=1e-5)
    auto = jax.jit(lambda *a: polyline_attention(*a, grid=GRID, paths=("h2v",)))(q, k, v, log_alpha, log_beta)
    assert_close(auto, want, rtol=1e-5)


def test_bf16_is_finite_and_close():
    args = _inputs(jnp.bfloat16)
    out = jax.jit(lambda *a: polyline_attention_xla(*a, grid=GRID, block_q=16, block_kv=16))(*args)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    want = polyline_attention_reference(*(x.astype(jnp.float32) for x in args), grid=GRID)
    assert_close(out, want, rtol=2e-2)


def test_bad_inputs_name_the_argument():
    q, k, v, log_alpha, log_beta = _inputs()
    with pytest.raises(ValueError, match=r"q and k need Hg·Wg = 36 tokens for grid \(6, 6\)"):
        polyline_attention_reference(q, k, v, log_alpha, log_beta, grid=(6, 6))
    with pytest.raises(ValueError, match=r"log_alpha must have shape \[B, grid_height·grid_width, heads\] = "
                                         r"\[2, 35, 4\]"):
        polyline_attention_xla(q, k, v, log_alpha[..., :2], log_beta, grid=GRID)
    with pytest.raises(TypeError, match="log_beta must be a floating-point array"):
        polyline_mask_reference(log_alpha, log_beta.astype(jnp.int32), grid=GRID)
    with pytest.raises(ValueError, match="path must be one of"):
        polyline_mask_reference(log_alpha, log_beta, grid=GRID, path="diagonal")
    with pytest.raises(ValueError, match="grid must be a pair"):
        polyline_mask_reference(log_alpha, log_beta, grid=35)
    with pytest.raises(ValueError, match="paths must name at least one"):
        polyline_attention_reference(q, k, v, log_alpha, log_beta, grid=GRID, paths=())
    with pytest.raises(ValueError, match="scale must be positive"):
        polyline_attention_reference(q, k, v, log_alpha, log_beta, grid=GRID, scale=-1.0)
    with pytest.raises(NotImplementedError, match="no 'pallas' implementation"):
        polyline_attention(q, k, v, log_alpha, log_beta, grid=GRID, implementation="pallas")
    rule = PolylineBias.from_log_decays(log_alpha, log_beta, grid=GRID)
    with pytest.raises(ValueError, match="self-attention over N = 35 tokens, got T = 35, S = 20"):
        aj.attention(q, k[:, :20], v[:, :20], bias=rule)
