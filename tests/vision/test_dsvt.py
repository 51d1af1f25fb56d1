"""DSVT's dynamic set partition against a plain loop over the published rule (eq. 3), and set attention
against a dense softmax whose mask the test builds from the loop's sets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.dsvt import (dsvt_layer_partition, dsvt_set_attention, dsvt_set_attention_reference,
                                 dsvt_set_ids)
from tests.helpers import assert_close

set_ids = jax.jit(dsvt_set_ids, static_argnums=(2, 3), static_argnames=("axis", "shift"))


def sets_by_loop(coords, valid, window, set_size, axis, shift):
    """The sets of each row, as lists of voxel indices: window ``(c + s) // w``, voxels of a window sorted by
    their in-window position (x-major or y-major, ties by index), slot ``i`` of set ``j`` holding the voxel
    of rank ``floor((j·S + i)·N/(n·S))`` with ``n = ceil(N/S)`` (DSVT eq. 3, ``get_set_single_shift``)."""
    B, N, ndim = coords.shape
    result = []
    for b in range(B):
        windows = {}
        for i in range(N):
            if not valid[b, i]:
                continue
            c = [int(coords[b, i, a]) + shift[a] for a in range(ndim)]
            inner = [c[a] % window[a] for a in range(ndim)]
            key = inner if axis == "x" else [inner[1], inner[0]] + inner[2:]
            windows.setdefault(tuple(c[a] // window[a] for a in range(ndim)), []).append((key, i))
        sets = []
        for members in windows.values():
            members.sort()
            count = len(members)
            n = math.ceil(count / set_size)
            for j in range(n):
                slots = [(j * set_size + i) * count // (n * set_size) for i in range(set_size)]
                sets.append(sorted({members[s][1] for s in slots}))
        result.append(sets)
    return result


def voxels(B=2, N=40, extent=(11, 9), ndim=2, p_valid=0.85, seed=0):
    """Distinct random voxel coordinates per row inside ``extent``, some of them padding."""
    rng = np.random.default_rng(seed)
    extent = tuple(extent) + (3,) * (ndim - len(extent))
    cells = np.stack([rng.permutation(math.prod(extent))[:N] for _ in range(B)])
    coords = np.stack(np.unravel_index(cells, extent), axis=-1).astype(np.int32)
    return coords, rng.random((B, N)) < p_valid


CONFIGS = [  # window, set_size, axis, shift
    ((4, 3), 3, "x", False),
    ((4, 3), 3, "y", True),
    ((5, 5), 4, "y", (1, 3)),
    ((3, 4, 2), 2, "x", True),
    ((12, 12, 3), 36, "y", (6, 6, 0)),
]


@pytest.mark.parametrize("window, set_size, axis, shift", CONFIGS)
def test_set_ids_equal_the_published_rule(window, set_size, axis, shift):
    coords, valid = voxels(ndim=len(window), N=60 if len(window) == 3 else 40)
    shifts = tuple(w // 2 for w in window) if shift is True else (0,) * len(window) if shift is False else shift
    ids = np.asarray(set_ids(jnp.asarray(coords), jnp.asarray(valid), window, set_size, axis=axis, shift=shift))
    assert np.all(ids[~valid] == -1) and np.all(ids[valid] >= 0)
    for b, sets in enumerate(sets_by_loop(coords, valid, window, set_size, axis, shifts)):
        assert sorted(sets) == sorted(sorted(np.flatnonzero(ids[b] == i).tolist()) for i in np.unique(ids[b][valid[b]]))
        assert all(1 <= len(s) <= set_size for s in sets)


def test_sets_of_a_window_split_its_sorted_voxels_evenly():
    """One 3 x 3 window with all 9 voxels, S = 4: n = 3 sets of ranks [0, 3), [3, 6), [6, 9) (eq. 3: slots
    0,0,1,2 | 3,3,4,5 | 6,6,7,8), rows of the window in x-major order, its columns in y-major order; the id is
    the window's first sorted position (0) plus the set index."""
    coords = np.stack(np.unravel_index(np.arange(9), (3, 3)), axis=-1)[None].astype(np.int32)  # x-major
    for axis, expected in (("x", [0, 0, 0, 1, 1, 1, 2, 2, 2]), ("y", [0, 1, 2, 0, 1, 2, 0, 1, 2])):
        ids = set_ids(jnp.asarray(coords), None, 3, 4, axis=axis)
        np.testing.assert_array_equal(np.asarray(ids)[0], expected)


def test_set_attention_equals_the_dense_masked_softmax():
    """Forward only: the gradients are region_attention's (the ids are integers), checked in test_region.py."""
    window, set_size, axis, shift = (4, 3), 3, "y", True
    coords, valid = voxels()
    mask = np.zeros((2, 40, 40), bool)
    for b, sets in enumerate(sets_by_loop(coords, valid, window, set_size, axis, (2, 1))):
        for s in sets:
            mask[b][np.ix_(s, s)] = True
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(2, 40, 2, 4)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(2, 40, 2, 3)), jnp.float32)
    coords, valid, mask = jnp.asarray(coords), jnp.asarray(valid), jnp.asarray(mask)

    def fast(q, k, v):
        return dsvt_set_attention(q, k, v, coords, valid, window, set_size, axis=axis, shift=shift)

    def dense(q, k, v):
        logits = jnp.einsum("bihd,bjhd->bhij", q, k, precision="highest") / 2.0
        weights = jax.nn.softmax(jnp.where(mask[:, None], logits, -1e30), axis=-1) * mask.any(-1)[:, None, :, None]
        return jnp.einsum("bhij,bjhd->bihd", weights, v, precision="highest")

    expected = jax.jit(dense)(q, k, v)
    assert_close(jax.jit(fast)(q, k, v), expected, rtol=1e-5, name="set attention")
    reference = jax.jit(lambda q, k, v: dsvt_set_attention_reference(q, k, v, coords, valid, window, set_size,
                                                                     axis=axis, shift=shift))
    assert_close(reference(q, k, v), expected, rtol=1e-5, name="reference")


def test_rotated_schedule_follows_the_official_blocks():
    """Layers 2b, 2b + 1 of block b: y-axis then x-axis sets; odd blocks shifted (``DSVTBlock``)."""
    assert [dsvt_layer_partition(i) for i in range(6)] == [("y", False), ("x", False), ("y", True), ("x", True),
                                                          ("y", False), ("x", False)]


def test_bad_inputs_name_the_argument():
    coords, valid = (jnp.asarray(a) for a in voxels())
    with pytest.raises(ValueError, match=r"coords must have shape \[batch, voxels, 2 or 3\]"):
        dsvt_set_ids(coords[0], None, 4)
    with pytest.raises(TypeError, match="coords must hold integer voxel coordinates"):
        dsvt_set_ids(coords.astype(jnp.float32), None, 4)
    with pytest.raises(ValueError, match=r"valid must be a bool array of shape \[batch, voxels\] = \[2, 40\]"):
        dsvt_set_ids(coords, valid[:, :5], 4)
    with pytest.raises(ValueError, match="window_shape must be a positive int or 2 positive ints"):
        dsvt_set_ids(coords, valid, (4, 4, 4))
    with pytest.raises(ValueError, match="axis must be one of"):
        dsvt_set_ids(coords, valid, 4, axis="z")
    with pytest.raises(ValueError, match="set_size must be a positive int"):
        dsvt_set_ids(coords, valid, 4, 0)
    with pytest.raises(ValueError, match="shift must be a bool or 2 ints"):
        dsvt_set_ids(coords, valid, 4, shift=(1,))
    with pytest.raises(ValueError, match="layer must be a non-negative int"):
        dsvt_layer_partition(-1)
