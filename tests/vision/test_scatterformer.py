"""ScatterFormer: window grouping against a brute-force loop, scattered linear attention against dense attention
computed window by window (forward, gradients), the submanifold depthwise convolutions of CWI against a
neighbour-table reference (forward, gradients), bf16, errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.scatterformer import (
    cross_window_interaction, scattered_linear_attention, scatterformer_attention, scatterformer_attention_reference,
    sparse_depthwise_conv, voxel_windows)
from tests.helpers import assert_close, outputs_and_grads

GRID = (7, 6, 3)


def voxels(B=2, N=13, grid=GRID, seed=0):
    """Distinct random cells per row; the last two voxels of row 1 are padding (with garbage coordinates)."""
    rng = np.random.default_rng(seed)
    cells = np.stack([rng.permutation(int(np.prod(grid)))[:N] for _ in range(B)])
    coords = np.stack(np.unravel_index(cells, grid), axis=-1).astype(np.int32)
    valid = np.ones((B, N), bool)
    valid[1, -2:] = False
    coords[1, -2:] = (-3, 99, 1)
    return coords, valid


def brute_force_windows(coords, valid, window, shift):
    """Per row: the dense rank of each valid voxel's window in sorted (x, y, z) order, -1 for padding."""
    ids = np.full(valid.shape, -1)
    for b in range(coords.shape[0]):
        keys = {i: tuple((coords[b, i] + np.array(shift)) // np.array(window)) for i in range(coords.shape[1])
                if valid[b, i]}
        rank = {key: r for r, key in enumerate(sorted(set(keys.values())))}
        for i, key in keys.items():
            ids[b, i] = rank[key]
    return ids


@pytest.mark.parametrize("window, shift, shift_values", [((3, 4, 2), False, (0, 0, 0)), ((3, 4, 2), True, (1, 2, 1)),
                                                         ((2, 2, 3), (1, 0, 2), (1, 0, 2))])
def test_grouping_equals_a_brute_force_loop(window, shift, shift_values):
    coords, valid = voxels()
    windows = jax.jit(lambda c, v: voxel_windows(c, v, window, shift))(coords, valid)
    expected = brute_force_windows(coords, valid, window, shift_values)
    np.testing.assert_array_equal(windows.window_ids, expected)
    order = np.asarray(windows.order)
    for b in range(2):
        assert sorted(order[b]) == list(range(13))
        packed = expected[b, order[b]]
        n = valid[b].sum()
        np.testing.assert_array_equal(packed[:n], np.sort(expected[b][valid[b]]))       # windows contiguous, by id
        assert np.all(packed[n:] == -1)                                                 # padding last
        np.testing.assert_array_equal(windows.segment_ids[b], packed)


def per_window_attention(q, k, v, ids):
    """Normalized ReLU linear attention computed window by window, float64 (the paper's eq. 3 per window)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    for b in range(q.shape[0]):
        for window in set(ids[b]) - {-1}:
            members = np.flatnonzero(ids[b] == window)
            for h in range(q.shape[2]):
                fq, fk = np.maximum(q[b, members, h], 0), np.maximum(k[b, members, h // (q.shape[2] // k.shape[2])], 0)
                scores = fq @ fk.T
                out[b, members, h] = scores @ v[b, members, h // (q.shape[2] // k.shape[2])] / (
                    scores.sum(-1, keepdims=True) + 1e-6)
    return out


def test_packed_attention_equals_dense_attention_window_by_window():
    """GQA (4 query heads over 2), Dv != D, windows of 1 to a few voxels, padding rows zero."""
    coords, valid = voxels()
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(2, 13, h, 4)), jnp.float32) for h in (4, 2))
    v = jnp.asarray(rng.normal(size=(2, 13, 2, 3)), jnp.float32)
    window = (3, 4, 3)
    expected = per_window_attention(q, k, v, brute_force_windows(coords, valid, window, (0, 0, 0)))
    fast = lambda *a: scatterformer_attention(*a, coords, valid, window, implementation="xla")
    ref = lambda *a: scatterformer_attention_reference(*a, coords, valid, window)
    (out, grads), (out_ref, grads_ref) = (outputs_and_grads(fn, (q, k, v), (0, 1, 2)) for fn in (fast, ref))
    assert_close(out, expected, rtol=1e-5, name="xla")
    assert_close(out_ref, expected, rtol=1e-5, name="reference")
    for name, g, e in zip("qkv", grads, grads_ref):
        assert_close(g, e, rtol=2e-5, name=f"d{name}")


def test_packed_op_is_linear_attention_on_runs():
    """``scattered_linear_attention`` on a packed sequence (runs of 3, 5, 1, 4 tokens) equals each run alone."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 13, 2, 4)), jnp.float32) for _ in range(3))
    ids = np.repeat([0, 1, 2, 3], [3, 5, 1, 4])[None]
    out = jax.jit(scattered_linear_attention)(q, k, v, jnp.asarray(ids, jnp.int32))
    assert_close(out, per_window_attention(q, k, v, ids), rtol=1e-5, name="packed")


def neighbour_conv(x, coords, valid, kernel):
    """Submanifold depthwise convolution through a neighbour table built by a Python loop over voxels and kernel
    offsets (jnp on the table, so it differentiates): ``y_i = Σ_δ kernel[δ + K//2] x[voxel at c_i + δ]``."""
    B, N, _ = coords.shape
    sizes = kernel.shape[:-1]
    offsets = list(itertools.product(*(range(-(s // 2), s // 2 + 1) for s in sizes)))
    table = np.full((B, N, len(offsets)), N)                                      # N: no neighbour (a zero row)
    for b in range(B):
        where = {tuple(coords[b, i]): i for i in range(N) if valid[b, i]}
        for i in range(N):
            for o, delta in enumerate(offsets):
                if valid[b, i]:
                    table[b, i, o] = where.get(tuple(coords[b, i] + np.array(delta)), N)
    padded = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
    gathered = jax.vmap(lambda p, t: p[t])(padded, jnp.asarray(table))           # [B, N, offsets, C]
    weights = jnp.stack([kernel[tuple(d + s // 2 for d, s in zip(delta, sizes))] for delta in offsets])
    return jnp.einsum("bnoc,oc->bnc", gathered, weights, precision="highest")


def test_cwi_equals_the_neighbour_loop_forward_and_gradients():
    """The three depthwise branches (3x3x3, 5 taps along x, 3 along y) and the identity group; C = 9: g = 2 and an
    identity group of 3."""
    coords, valid = voxels()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 13, 9)), jnp.float32)
    kernels = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 3, 3, 2), (5, 2), (3, 2)))

    def reference(x, local, along_x, along_y):
        parts = [neighbour_conv(x[..., 0:2], coords, valid, local),
                 neighbour_conv(x[..., 2:4], coords, valid, along_x[:, None, None]),
                 neighbour_conv(x[..., 4:6], coords, valid, along_y[None, :, None]), x[..., 6:]]
        return jnp.where(valid[..., None], jnp.concatenate(parts, -1), 0)

    fast = lambda *a: cross_window_interaction(a[0], coords, valid, GRID, *a[1:])
    args = (x, *kernels)
    (out, grads), (expected, expected_grads) = (outputs_and_grads(fn, args, range(4)) for fn in (fast, reference))
    assert_close(out, expected, rtol=1e-5, name="cwi")
    for i, g, e in zip(range(4), grads, expected_grads):
        assert_close(g, e, rtol=1e-5, name=f"d(arg {i})")


def test_bf16_is_finite_and_close():
    coords, valid = voxels()
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 13, 2, 4)), jnp.bfloat16) for _ in range(3))
    out = jax.jit(lambda *a: scatterformer_attention(*a, coords, valid, (3, 4, 3)))(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    expected = per_window_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                    brute_force_windows(coords, valid, (3, 4, 3), (0, 0, 0)))
    assert_close(out, expected, rtol=2e-2, name="bf16")


def test_errors_name_the_argument():
    coords, valid = voxels()
    q = jnp.zeros((2, 13, 2, 4))
    with pytest.raises(ValueError, match=r"coords must have shape \[batch, voxels, 2 or 3\]"):
        voxel_windows(coords[..., :1], valid, 2)
    with pytest.raises(TypeError, match="coords must hold integer"):
        voxel_windows(coords.astype(np.float32), valid, 2)
    with pytest.raises(ValueError, match="window_shape must be a positive int or 3 positive ints"):
        voxel_windows(coords, valid, (2, 0, 2))
    with pytest.raises(ValueError, match=r"valid must be a bool array of shape \[batch, voxels\]"):
        voxel_windows(coords, valid[:, :5], 2)
    with pytest.raises(ValueError, match=r"with \[batch, voxels\] = \[2, 13\] \(one row per voxel"):
        scatterformer_attention(q, q, q, coords[:, :5], valid[:, :5], 2)
    x = jnp.zeros((2, 13, 4))
    with pytest.raises(ValueError, match=r"kernel must have shape \[K_0, ..., K_2, 4\] with odd sizes"):
        sparse_depthwise_conv(x, coords, valid, jnp.zeros((2, 3, 3, 4)), GRID)
    with pytest.raises(ValueError, match="grid_shape must hold 3 positive ints"):
        sparse_depthwise_conv(x, coords, valid, jnp.zeros((3, 3, 3, 4)), (7, 6))
    with pytest.raises(ValueError, match=r"coords of valid voxels must lie in \[0, grid_shape\)"):
        sparse_depthwise_conv(x, coords, valid, jnp.zeros((3, 3, 3, 4)), (3, 6, 3))
    with pytest.raises(ValueError, match=r"x_kernel must have shape \['K', 1\] \(g = C // 4 = 1\)"):
        cross_window_interaction(x, coords, valid, GRID, jnp.zeros((3, 3, 3, 1)), jnp.zeros((3, 2)), jnp.zeros((3, 1)))
