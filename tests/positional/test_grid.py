"""RelativeGridBias: Swin-ordered offset tables over a whole grid, per tile; CrossFormer's DPB through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax as aj
from attnjax.blocked import flash_attention_xla
from attnjax.nn.vision.crossformer import DynamicPositionBias
from attnjax.positional.grid import RelativeGridBias, check_grid, relative_grid_index
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.vision.crossformer import relative_offsets
from attnjax.vision.window import relative_position_index
from tests.helpers import assert_close

GRID = (5, 7)
N = 35
ROWS = 9 * 13


def loop_index(grid):
    """Swin's index for every pair of row-major grid tokens, one pair at a time."""
    gh, gw = grid
    index = np.zeros((gh * gw, gh * gw), np.int64)
    for i in range(gh * gw):
        for j in range(gh * gw):
            (yi, xi), (yj, xj) = divmod(i, gw), divmod(j, gw)
            index[i, j] = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
    return index


def test_tile_equals_the_dense_form_from_a_loop_and_the_swin_window_index():
    table = jax.random.normal(jax.random.key(0), (ROWS, 3))
    bias = RelativeGridBias(table, grid=GRID)
    index = loop_index(GRID)
    np.testing.assert_array_equal(index, relative_position_index(GRID))
    np.testing.assert_array_equal(np.asarray(relative_grid_index(jnp.arange(N), jnp.arange(N), GRID)), index)
    dense = np.asarray(bias.dense(N, N))
    assert dense.shape == (1, 3, N, N)
    np.testing.assert_array_equal(dense, np.moveaxis(np.asarray(table)[index], -1, 0)[None])
    # a tile with padding rows/columns past the grid: they repeat the last token (the paths mask or drop them)
    tile = np.asarray(bias.tile(jnp.arange(30, 40), jnp.arange(3, 11), N, N))
    rows, cols = np.minimum(np.arange(30, 40), N - 1), np.arange(3, 11)
    np.testing.assert_array_equal(tile, dense[:, :, rows][:, :, :, cols])
    # keys of whole grid rows are gathered as runs of the table's rows; keys starting mid-row, or not whole rows, per
    # pair: all equal the dense form
    for cols in (range(7, 21), range(3, 17), range(3, 6)):
        cols = np.asarray(list(cols))
        np.testing.assert_array_equal(np.asarray(bias.tile(jnp.arange(N), jnp.asarray(cols), N, N)), dense[..., cols])


def inputs(Hq, Hkv, table_heads, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (2, N, Hq, 8), dtype)
    k = jax.random.normal(ks[1], (2, N, Hkv, 8), dtype)
    v = jax.random.normal(ks[2], (2, N, Hkv, 8), dtype)
    return q, k, v, jax.random.normal(ks[3], (ROWS, table_heads))


@pytest.mark.parametrize("Hq,Hkv,table_heads,block_kv", [(4, 2, 4, 7), (2, 2, 1, 8)])
def test_blocked_xla_path_equals_the_reference_with_the_dense_bias_forward_and_gradients(Hq, Hkv, table_heads,
                                                                                         block_kv):
    """Key tiles of whole grid rows (7 = the grid width: runs of the table) or not (8: one gather per pair)."""
    q, k, v, table = inputs(Hq, Hkv, table_heads)
    index = jnp.asarray(loop_index(GRID))

    def loss(fn, rule):
        def f(q, k, v, table):
            bias = RelativeGridBias(table, grid=GRID) if rule else jnp.moveaxis(table[index], -1, 0)[None]
            out = fn(q, k, v, bias=bias)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, table)

    (_, want), dwant = loss(softmax_attention_reference, False)
    (_, got), dgot = loss(lambda *a, **kw: flash_attention_xla(*a, block_q=8, block_kv=block_kv, **kw), True)
    assert_close(got, want, rtol=1e-5)
    for g, w, name in zip(dgot, dwant, ("dq", "dk", "dv", "dtable")):
        assert_close(g, w, atol=2e-5, rtol=2e-5, name=name)
    assert float(jnp.abs(dwant[3]).max()) > 0


def test_dynamic_position_bias_gradients_reach_the_mlp_through_the_api():
    """Global attention over a 5x7 map with CrossFormer's DPB: the rule through ``attnjax.attention`` (xla) equals
    the MLP evaluated at every pair's offset, forward and gradients of every MLP weight."""
    dpb = DynamicPositionBias(2, hidden=4, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(dpb, nnx.Param)
    q, k, v, _ = inputs(2, 2, 2)
    y, x = np.divmod(np.arange(N), GRID[1])
    pair_offsets = jnp.asarray(np.stack([y[:, None] - y[None, :], x[:, None] - x[None, :]], -1), jnp.float32)

    def loss(params, rule):
        model = nnx.merge(graphdef, params)
        if rule:
            bias = model.grid_bias(GRID)
            out = aj.attention(q, k, v, bias=bias, implementation="xla")
        else:
            bias = jnp.moveaxis(model(pair_offsets.reshape(N * N, 2)).reshape(N, N, 2), -1, 0)[None]
            out = softmax_attention_reference(q, k, v, bias=bias)
        return jnp.sum(out * jnp.cos(out))

    got = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params)
    want = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
    assert_close(got[0], want[0], rtol=1e-5)
    flat, flat_want = jax.tree.leaves_with_path(got[1]), jax.tree.leaves_with_path(want[1])
    assert len(flat) == len(flat_want) == 13  # project (2), 3 norms (2 each), 2 hidden layers (2 each), last (1)
    for (path, g), (_, w) in zip(flat, flat_want):
        assert_close(g, w, atol=2e-5, rtol=2e-5, name=jax.tree_util.keystr(path))
        assert float(jnp.abs(w).max()) > 0, jax.tree_util.keystr(path)


def test_grid_bias_of_a_group_is_the_table_the_window_block_uses():
    dpb = DynamicPositionBias(3, hidden=4, rngs=nnx.Rngs(1))
    bias = dpb.grid_bias((3, 2))
    assert bias.grid == (3, 2) and bias.table.shape == (5 * 3, 3)
    assert_close(bias.table, dpb(jnp.asarray(relative_offsets((3, 2)))), rtol=0)
    assert jax.eval_shape(lambda: dpb.grid_bias(4)).grid == (4, 4)


def test_bf16_is_finite_through_the_api():
    q, k, v, table = inputs(2, 2, 2, jnp.bfloat16)
    out = jax.jit(lambda q, k, v, t: aj.attention(q, k, v, bias=RelativeGridBias(t.astype(jnp.bfloat16), grid=GRID),
                                                  implementation="xla"))(q, k, v, table)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_bad_grids_tables_and_lengths_are_refused():
    q = jnp.zeros((1, N, 2, 4))
    with pytest.raises(ValueError, match=r"RelativeGridBias table has shape \(116, 2\)"):
        aj.attention(q, q, q, bias=RelativeGridBias(jnp.zeros((ROWS - 1, 2)), grid=GRID))
    with pytest.raises(ValueError, match=r"expected \(\(2·gh − 1\)·\(2·gw − 1\), heads\) = \(117, 2\)"):
        aj.attention(q, q, q, bias=RelativeGridBias(jnp.zeros((ROWS, 3)), grid=GRID))
    with pytest.raises(TypeError, match="float"):
        aj.attention(q, q, q, bias=RelativeGridBias(jnp.zeros((ROWS, 2), jnp.int32), grid=GRID))
    with pytest.raises(ValueError, match=r"needs T = S = 35 tokens, got T=34, S=35"):
        aj.attention(q[:, :34], q, q, bias=RelativeGridBias(jnp.zeros((ROWS, 2)), grid=GRID))
    for grid in [(0, 3), (2,), "ab", (2.0, 3), (True, 2)]:
        with pytest.raises(ValueError, match="grid must be a pair"):
            check_grid(grid)
    with pytest.raises(ValueError, match="grid must be a pair"):
        RelativeGridBias(jnp.zeros((ROWS, 2)), grid=(5, -7))
