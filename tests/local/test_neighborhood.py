"""Neighborhood attention (NA / dilated / causal / GNA stride) on 1-D, 2-D and 3-D grids.

Masks and block lists against a brute-force window enumeration; the engine path against the direct
dense reference, forward and grads.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnjax as aj
from attnjax import masks
from attnjax.local.neighborhood import (Neighborhood, NeighborhoodMask, neighborhood_attention,
                                        neighborhood_attention_reference)
from attnjax.blocked.lists import density, to_block_mask
from tests.helpers import TOLERANCE, assert_close, random_qkv

KEY = jax.random.PRNGKey(0)


def brute_axis(L, k, d, s, causal):
    """Per-axis neighbours by enumeration: the residue class as a list, the window as a slice of it."""
    allowed = np.zeros((L, L), bool)
    for i in range(L):
        members = list(range(i % d, L, d))
        c = members.index(i)
        if causal:
            leader = min(c // s * s + s - 1, len(members) - 1)
            window = [m for pos, m in enumerate(members) if leader - k < pos <= c]
        elif len(members) <= k:
            window = members
        else:
            leader = min(c // s * s + s // 2, len(members) - 1)
            start = min(range(len(members) - k + 1), key=lambda st: abs(st - (leader - k // 2)))
            window = members[start:start + k]
        allowed[i, window] = True
    return allowed


def brute_grid(na):
    """``[N, N]`` in row-major grid order: a pair is allowed iff every axis allows it."""
    coords = np.unravel_index(np.arange(math.prod(na.grid)), na.grid)
    allowed = np.ones((len(coords[0]),) * 2, bool)
    for a, c in enumerate(coords):
        axis = brute_axis(na.grid[a], na.kernel_size[a], na.dilation[a], na.stride[a], na.causal[a])
        allowed &= axis[c[:, None], c[None, :]]
    return allowed


def tiled_positions(na):
    """Grid index of every tiled token, -1 on padding (NumPy: no compilation per example)."""
    idx = np.arange(na.num_tokens)
    _, valid = na.coordinates(idx)
    return np.where(valid, na.grid_index(idx), -1)


def to_tiled_order(na, grid_matrix):
    pos = tiled_positions(na)
    real = pos >= 0
    out = np.zeros((na.num_tokens,) * 2, bool)
    out[np.ix_(real, real)] = grid_matrix[np.ix_(pos[real], pos[real])]
    return out


def tile_reduce(m, block, op):
    n = m.shape[0] // block
    return op(m.reshape(n, block, n, block), axis=(1, 3))


@st.composite
def configs(draw):
    ndim = draw(st.integers(1, 3))
    max_len = {1: 14, 2: 9, 3: 5}[ndim]
    axes = []
    for _ in range(ndim):
        k = draw(st.integers(1, 5))
        axes.append((draw(st.integers(1, max_len)), k, draw(st.integers(1, 3)), draw(st.integers(1, k)),
                     draw(st.booleans()), draw(st.integers(1, 4))))
    grid, kernel, dilation, stride, causal, tile = zip(*axes)
    return NeighborhoodMask(grid, kernel, dilation, stride, causal, tile)


@settings(max_examples=20, deadline=None)
@given(configs())
def test_masks_lists_and_summary_equal_brute_force(na):
    expected = brute_grid(na)
    np.testing.assert_array_equal(na.grid_dense(), expected)

    tiled = to_tiled_order(na, expected)
    N = na.num_tokens
    np.testing.assert_array_equal(na.tile(np.arange(N), np.arange(N), N, N)[0, 0], tiled)

    blocks = na.block_lists()
    assert blocks.is_static and blocks.block_q == blocks.block_kv == na.block_size
    np.testing.assert_array_equal(to_block_mask(blocks)[0, 0], tile_reduce(tiled, na.block_size, np.any))
    idx, counts = blocks.indices[0, 0], blocks.counts[0, 0]
    assert blocks.max_blocks == max(1, counts.max())
    for row, count in zip(idx, counts):
        assert np.all(np.diff(row[:count]) > 0) and np.all(row[count:] == (row[count - 1] if count else 0))

    codes = na.block_summary(N, N, na.block_size, na.block_size)[0, 0]
    any_, all_ = tile_reduce(tiled, na.block_size, np.any), tile_reduce(tiled, na.block_size, np.all)
    np.testing.assert_array_equal(codes, np.where(any_, np.where(all_, masks.FULL, masks.PARTIAL), masks.EMPTY))

    real = tiled_positions(na) >= 0
    counts_per_query = tiled.sum(1)[real]
    assert np.all(counts_per_query <= math.prod(na.kernel_size)) and np.all(counts_per_query >= 1)
    if not any(na.causal) and all(k * d <= L for k, d, L in zip(na.kernel_size, na.dilation, na.grid)):
        assert np.all(counts_per_query == math.prod(na.kernel_size))


def test_block_summary_at_other_block_sizes_is_exact():
    na = NeighborhoodMask((6, 7), 3, dilation=(2, 1), causal=(False, True), tile_shape=(2, 4))
    N = na.num_tokens
    dense = na.tile(np.arange(N), np.arange(N), N, N)[0, 0]
    codes = na.block_summary(N, N, 5, 3)[0, 0]
    assert codes.shape == (-(-N // 5), -(-N // 3))
    padded = np.pad(dense, ((0, codes.shape[0] * 5 - N), (0, codes.shape[1] * 3 - N)))
    any_ = padded.reshape(codes.shape[0], 5, codes.shape[1], 3).any(axis=(1, 3))
    np.testing.assert_array_equal(codes == masks.EMPTY, ~any_)


@pytest.mark.parametrize("causal", [False, True])
def test_stride_equal_to_kernel_is_block_attention(causal):
    grid, kernel = (8, 12), (4, 3)
    na = NeighborhoodMask(grid, kernel, stride=kernel, causal=causal)
    coords = np.unravel_index(np.arange(96), grid)
    expected = np.ones((96, 96), bool)
    for c, k in zip(coords, kernel):
        expected &= (c[:, None] // k) == (c[None, :] // k)
        if causal:
            expected &= c[None, :] <= c[:, None]
    np.testing.assert_array_equal(na.grid_dense(), expected)


def test_tiles_round_trip_match_coordinates_and_the_traced_mask():
    na = NeighborhoodMask((7, 9), 3, dilation=(1, 2), causal=(True, False), tile_shape=(4, 2))
    x = jnp.arange(1.0, 64.0).reshape(1, 63, 1)
    tiled, back = jax.jit(lambda x: (na.to_tiles(x), na.from_tiles(na.to_tiles(x))))(x)
    assert tiled.shape == (1, na.num_tokens, 1)
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(np.asarray(tiled)[0, :, 0] - 1, tiled_positions(na))
    first_tile = np.asarray(tiled[0, :8, 0]).reshape(4, 2) - 1
    np.testing.assert_array_equal(first_tile, np.arange(4)[:, None] * 9 + np.array([0, 2]))
    N = na.num_tokens
    traced = jax.jit(lambda i: na.tile(i, i, N, N))(jnp.arange(N))
    np.testing.assert_array_equal(traced, na.tile(np.arange(N), np.arange(N), N, N))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodMask((8,), 3, stride=4)
    with pytest.raises(ValueError, match="one value per grid axis"):
        NeighborhoodMask((8, 8), (3, 3, 3))
    q, k, v = random_qkv(KEY, B=1, T=12, Hq=2, D=4)
    with pytest.raises(ValueError, match="T <= S"):
        neighborhood_attention(q, k[:, :6], v[:, :6], kernel_size=3, grid=(6,))
    with pytest.raises(ValueError, match="spatial shape"):
        neighborhood_attention(q.reshape(1, 3, 4, 2, 4), k.reshape(1, 4, 3, 2, 4), v.reshape(1, 4, 3, 2, 4),
                               kernel_size=3)


CASES = {
    "1d": dict(spatial=(37,), kernel_size=5, dilation=2, stride=2, causal=False, tile_shape=(8,)),
    "2d": dict(spatial=(7, 9), kernel_size=(3, 5), dilation=(2, 1), stride=(1, 3), causal=(True, False),
               tile_shape=(4, 4)),
    "3d": dict(spatial=(3, 5, 6), kernel_size=(2, 3, 3), dilation=(1, 1, 2), stride=(2, 1, 1),
               causal=(False, False, True), tile_shape=(2, 2, 4)),
}


def grid_qkv(spatial, dtype=jnp.float32, Dv=8):
    q, k, v = random_qkv(KEY, B=2, T=math.prod(spatial), Hq=4, Hkv=2, D=8, Dv=Dv, dtype=dtype)
    return tuple(x.reshape(2, *spatial, *x.shape[2:]) for x in (q, k, v))


def engine_and_reference(case, implementation):
    params = {name: value for name, value in case.items() if name not in ("spatial", "tile_shape")}
    engine = jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, tile_shape=case["tile_shape"],
                                                            implementation=implementation, **params))
    reference = jax.jit(lambda q, k, v: neighborhood_attention_reference(q, k, v, **params))
    return engine, reference


def assert_jit_close_with_grads(fn_actual, fn_expected, args, names="qkv"):
    """Outputs and gradients of ``sum(fn(*args) * w)`` (fixed random ``w``), each side one jitted compile."""
    w = jax.random.normal(jax.random.PRNGKey(123), jax.eval_shape(fn_expected, *args).shape, jnp.float32)

    def value_and_grads(fn):
        def loss(*a):
            out = fn(*a)
            return jnp.sum(out.astype(jnp.float32) * w), out
        return jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)

    (grads_a, out_a), (grads_e, out_e) = value_and_grads(fn_actual), value_and_grads(fn_expected)
    assert_close(out_a, out_e, name="out")
    for actual, expected, name in zip(grads_a, grads_e, names):
        assert_close(actual, expected, name=f"d{name}")


@pytest.mark.parametrize("name, implementation", [("1d", "xla"), ("2d", "xla"), ("2d", "reference")])
def test_engine_matches_direct_reference(name, implementation):
    case = CASES[name]
    q, k, v = grid_qkv(case["spatial"], Dv=4 if name == "3d" else 8)
    engine, reference = engine_and_reference(case, implementation)
    out = engine(q, k, v)
    assert out.shape == q.shape[:-1] + (v.shape[-1],)
    assert_close(out, reference(q, k, v))


@pytest.mark.parametrize("name", ["3d", pytest.param("2d", marks=pytest.mark.slow),
                                  pytest.param("1d", marks=pytest.mark.slow)])
def test_engine_forward_and_grads_match_direct_reference(name):
    case = CASES[name]
    q, k, v = grid_qkv(case["spatial"], Dv=4 if name == "3d" else 8)
    assert_jit_close_with_grads(*engine_and_reference(case, "xla"), (q, k, v))


def test_engine_bf16():
    case = CASES["2d"]
    q, k, v = grid_qkv(case["spatial"], dtype=jnp.bfloat16)
    engine, reference = engine_and_reference(case, "xla")
    out = engine(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)),
                 rtol=TOLERANCE[jnp.bfloat16])


def test_cross_queries_mask_and_lse_on_tokens():
    """Queries = the last T of S grid positions, an extra causal mask, the log-sum-exp."""
    q, k, v = random_qkv(KEY, B=1, T=21, S=30, Hq=2, Hkv=1, D=8)
    params = dict(kernel_size=(3, 4), dilation=(1, 2), grid=(5, 6), mask=masks.Causal(), return_lse=True)
    out, lse = jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, tile_shape=(2, 4), implementation="xla",
                                                              **params))(q, k, v)
    ref_out, ref_lse = jax.jit(lambda q, k, v: neighborhood_attention_reference(q, k, v, **params))(q, k, v)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


def test_registered_mechanism_reshapes_tokens_into_the_grid():
    q, k, v = grid_qkv((6, 5))
    flat = [x.reshape(2, 30, *x.shape[-2:]) for x in (q, k, v)]
    config = Neighborhood(kernel_size=3, dilation=(1, 2), grid=(6, 5))
    out = jax.jit(lambda *x: aj.attention(*x, mechanism=config, implementation="reference",
                                          logits_soft_cap=5.0))(*flat)
    expected = jax.jit(lambda q, k, v: neighborhood_attention_reference(
        q, k, v, kernel_size=3, dilation=(1, 2), logits_soft_cap=5.0))(q, k, v)
    assert_close(out, expected.reshape(out.shape))
    with pytest.raises(NotImplementedError, match="sinks"):
        aj.attention(*flat, mechanism=config, implementation="reference", sinks=jnp.zeros(4))


def test_registered_default_on_odd_cross_lengths_with_mask_xla():
    q, k, v = random_qkv(KEY, B=2, T=29, S=37, Hq=4, Hkv=2, D=8)
    kwargs = dict(mechanism="neighborhood", mask=masks.Causal(), return_lse=True)
    out, lse = jax.jit(lambda q, k, v: aj.attention(q, k, v, implementation="xla", **kwargs))(q, k, v)
    ref_out, ref_lse = jax.jit(lambda *x: aj.attention(*x, implementation="reference", **kwargs))(q, k, v)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


@pytest.mark.parametrize("kernel_size", [7, 13])
@pytest.mark.parametrize("side", [64, 128])
def test_density_2d(kernel_size, side):
    """8×8 tiles, k ≤ 17: a border tile touches 2 key tiles per axis, an inner tile 3."""
    na = NeighborhoodMask((side, side), kernel_size, tile_shape=(8, 8))
    n = side // 8
    assert float(density(na.block_lists())) == pytest.approx(((2 * 2 + 3 * (n - 2)) / n ** 2) ** 2)


@pytest.mark.slow
def test_pallas_path_in_interpret_mode_with_grads():
    q, k, v = random_qkv(KEY, B=1, T=21, S=30, Hq=2, Hkv=1, D=16)
    params = dict(kernel_size=(3, 4), dilation=(1, 2), stride=(2, 1), causal=(False, True), grid=(5, 6),
                  mask=masks.Causal())
    pallas = jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, tile_shape=(4, 4), implementation="pallas",
                                                            **params))
    reference = jax.jit(lambda q, k, v: neighborhood_attention_reference(q, k, v, **params))
    assert_jit_close_with_grads(pallas, reference, (q, k, v))
