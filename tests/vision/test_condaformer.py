"""ConDaFormer's disassembled (tri-plane) window attention against a dense softmax over all voxels whose mask
the test builds by a loop over the voxel coordinates, with the contextual relative position terms of the
official kernels written out pair by pair."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.condaformer import (condaformer_attention, condaformer_attention_reference, plane_merge,
                                        plane_partition, plane_valid)
from tests.helpers import assert_close, assert_grads_close


def plane_mask_by_loop(grid, window, shift):
    """``bool [3, T, T]``: in head group g, voxels i and j attend iff they share coordinate g and, along each
    other axis a, the shifted window ``(c_a + s) // w``."""
    cells = list(itertools.product(*(range(n) for n in grid)))
    mask = np.zeros((3, len(cells), len(cells)), bool)
    for g in range(3):
        for i, ci in enumerate(cells):
            for j, cj in enumerate(cells):
                mask[g, i, j] = ci[g] == cj[g] and all((ci[a] + shift) // window == (cj[a] + shift) // window
                                                       for a in range(3) if a != g)
    return mask


def dense_tri_plane(q, k, v, tables, mask, window):
    """Per head group g: logit = scale·q_i·(k_j + Σ_a Tq[Δ_a]) + k_j·Σ_a Tk[Δ_a] and
    out = Σ_j p_ij (v_j + Σ_a Tv[Δ_a]), Δ_a = c_a(i) − c_a(j) + w − 1, over all voxels under ``mask``."""
    B, F, H, W, heads, D = q.shape
    G, T = heads // 3, F * H * W
    coords = np.array(list(itertools.product(range(F), range(H), range(W))))
    delta = np.clip(coords[:, None] - coords[None, :] + window - 1, 0, 2 * window - 2)  # [T, T, 3]
    qf, kf, vf = (a.reshape(B, T, heads, a.shape[-1]) for a in (q, k, v))
    outs = []
    for g in range(3):
        qg, kg, vg = (a[:, :, g * G:(g + 1) * G] for a in (qf, kf, vf))
        if tables is None:
            rq = rk = rv = 0.0
        else:
            rq, rk, rv = (sum(t[delta[..., a], a] for a in range(3)) for t in tables)  # [T, T, G, ·]
        logits = jnp.einsum("bigd,bjgd->bgij", qg, kg, precision="highest") / np.sqrt(D)
        if tables is not None:
            logits += jnp.einsum("bigd,ijgd->bgij", qg, rq, precision="highest") / np.sqrt(D)
            logits += jnp.einsum("bjgd,ijgd->bgij", kg, rk, precision="highest")
        p = jax.nn.softmax(jnp.where(mask[g], logits, -jnp.inf), axis=-1)
        out = jnp.einsum("bgij,bjgd->bigd", p, vg, precision="highest")
        if tables is not None:
            out += jnp.einsum("bgij,ijgd->bigd", p, rv, precision="highest")
        outs.append(out)
    return jnp.concatenate(outs, axis=2).reshape(v.shape)


def inputs(grid=(3, 5, 4), heads=6, D=4, Dv=3, window=2, B=1, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, *grid, heads, D)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, *grid, heads, Dv)), jnp.float32)
    tables = tuple(jnp.asarray(rng.normal(size=(2 * window - 1, 3, heads // 3, d)), jnp.float32) for d in (D, D, Dv))
    return q, k, v, tables


def check_against_dense(window, shift, tables, q, k, v):
    """The fast path and the library reference against ``dense_tri_plane`` on the loop's mask; returns both
    functions of ``(q, k, v, tables)``."""
    mask = jnp.asarray(plane_mask_by_loop(q.shape[1:4], window, window // 2 if shift else 0))

    def fast(q, k, v, tables):
        return condaformer_attention(q, k, v, window, shift=shift, tables=tables)

    def dense(q, k, v, tables):
        return dense_tri_plane(q, k, v, tables, mask, window)

    expected = jax.jit(dense)(q, k, v, tables)
    assert_close(jax.jit(fast)(q, k, v, tables), expected, rtol=1e-5, name="tri-plane attention")
    reference = jax.jit(lambda *a: condaformer_attention_reference(*a[:3], window, shift=shift, tables=a[3]))
    assert_close(reference(q, k, v, tables), expected, rtol=1e-5, name="reference")
    return fast, dense


def test_tri_plane_attention_without_tables():
    """3x3 plane windows on a 3 x 5 x 4 grid (no axis a multiple of the window: border windows cropped)."""
    q, k, v, _ = inputs(window=3)
    check_against_dense(3, False, None, q, k, v)


def test_shifted_tri_plane_attention_with_position_tables_forward_and_gradients():
    """Shifted 2x2 plane windows on the 3 x 5 x 4 grid, the contextual tables; gradients of q, k, v and each
    table (those of the plain fold without tables are the same reshapes)."""
    q, k, v, tables = inputs(window=2)
    fast, dense = check_against_dense(2, True, tables, q, k, v)
    assert_grads_close(lambda *a: fast(*a[:3], a[3:]), lambda *a: dense(*a[:3], a[3:]), (q, k, v) + tables,
                       argnums=range(6), rtol=1e-5, names=["q", "k", "v", "q_table", "k_table", "v_table"])


def test_plane_partition_round_trips_and_marks_padding():
    x = jnp.arange(2 * 3 * 5 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 5, 4, 2)
    cases = list(itertools.product(range(3), (0, 1)))

    @jax.jit
    def round_trips(x):
        return [(plane_merge(plane_partition(x, axis, 2, shift), axis, 2, shift, (3, 5, 4)),
                 plane_partition(jnp.ones((1, 3, 5, 4, 1)), axis, 2, shift)[..., 0]) for axis, shift in cases]

    for (axis, shift), (back, ones) in zip(cases, round_trips(x)):
        np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
        np.testing.assert_array_equal(plane_valid((3, 5, 4), axis, 2, shift), np.asarray(ones) == 1)


def test_bf16_is_finite():
    q, k, v, tables = (jax.tree.map(lambda a: a.astype(jnp.bfloat16), t) for t in inputs(grid=(2, 3, 3)))
    out = jax.jit(lambda *a: condaformer_attention(*a[:3], 2, shift=True, tables=a[3]))(q, k, v, tables)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    q, k, v, tables = inputs()
    with pytest.raises(ValueError, match=r"q must have shape \[batch, depth, height, width, heads, head_dim\]"):
        condaformer_attention(q[0], k, v)
    with pytest.raises(ValueError, match="heads must be a multiple of 3"):
        condaformer_attention(q[..., :4, :], k[..., :4, :], v[..., :4, :])
    with pytest.raises(ValueError, match=r"v_table must have shape \[2w - 1, 3, heads/3, 3\] = \[3, 3, 2, 3\]"):
        condaformer_attention(q, k, v, 2, tables=(tables[0], tables[1], tables[0]))
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        condaformer_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="tables must be None or"):
        condaformer_attention(q, k, v, 2, tables=tables[:2])
