"""HaloNet blocked local self-attention against a dense masked softmax whose [Tq, T] mask, relative table rows and
bias entries are built here pixel by pixel (Vaswani et al., CVPR 2021, sec. 2; timm ``PosEmbedRel``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.halo import HaloLayout, HaloMask, halo_attention, halo_attention_pallas, halo_attention_xla
from attnjax.vision.halo import halo_attention_reference
from tests.helpers import assert_close, assert_grads_close, outputs_and_grads


def pairs_by_loop(Hq, Wq, H, W, b, h, s):
    """For each (query, key) of the flattened grids: allowed, timm's table rows along y and x, bias row, bias col.

    Query (yq, xq) is pixel (s·yq, s·xq) of block (yq // (b/s), xq // (b/s)); it sees the pixels of the block
    grown by h on each side that lie inside the H x W map.
    """
    bq, win = b // s, b + 2 * h
    shape = (Hq * Wq, H * W)
    allowed = np.zeros(shape, bool)
    rel_y, rel_x, bias_row, bias_col = (np.zeros(shape, np.int32) for _ in range(4))
    for yq in range(Hq):
        for xq in range(Wq):
            p, (by, iy), (bx, ix) = yq * Wq + xq, divmod(yq, bq), divmod(xq, bq)
            for Y in range(by * b - h, by * b + b + h):
                for X in range(bx * b - h, bx * b + b + h):
                    if 0 <= Y < H and 0 <= X < W:
                        ty, tx = Y - (by * b - h), X - (bx * b - h)
                        key = Y * W + X
                        allowed[p, key] = True
                        rel_y[p, key], rel_x[p, key] = ty - iy + win - 1, tx - ix + win - 1
                        bias_row[p, key], bias_col[p, key] = iy * bq + ix, ty * win + tx
    return allowed, rel_y, rel_x, bias_row, bias_col


def dense_reference(q, k, v, rh, rw, bias, *, b, h, s, pairs):
    """softmax over all H·W keys of scale·q·k + q·r_h[row] + q·r_w[row] + bias, masked by ``pairs``."""
    allowed, rel_y, rel_x, bias_row, bias_col = pairs
    B, Hq, Wq, heads, D = q.shape
    qf = q.reshape(B, Hq * Wq, heads, D)
    kf, vf = k.reshape(B, -1, heads, D), v.reshape(B, -1, heads, v.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision="highest") / np.sqrt(D)
    if rh is not None:
        logits = logits + jnp.einsum("bqhd,qkd->bhqk", qf, rh[rel_y], precision="highest")
        logits = logits + jnp.einsum("bqhd,qkd->bhqk", qf, rw[rel_x], precision="highest")
    if bias is not None:
        logits = logits + bias[:, bias_row, bias_col]
    logits = jnp.where(allowed, logits, -jnp.inf)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), vf, precision="highest")
    return out.reshape(B, Hq, Wq, heads, -1)


def inputs(H, W, b, h, s, *, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    layout = HaloLayout(H, W, b, h, s)
    Hq, Wq = layout.query_shape
    q, k = (jnp.asarray(rng.normal(size=shape), dtype) for shape in ((2, Hq, Wq, 2, 4), (2, H, W, 2, 4)))
    v = jnp.asarray(rng.normal(size=(2, H, W, 2, 3)), dtype)
    rh, rw = (jnp.asarray(rng.normal(size=(layout.table_size, 4)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(2, layout.query_block ** 2, layout.window ** 2)), jnp.float32)
    return (q, k, v, rh, rw, bias), pairs_by_loop(Hq, Wq, H, W, b, h, s)


CASES = [(7, 9, 4, 1, 1), (7, 9, 4, 2, 1), (7, 9, 4, 1, 2)]
"""(H, W, b, h, s): a grid that is not a multiple of the block, halos 1 and 2, and strided queries."""


@pytest.mark.parametrize("H, W, b, h, s", CASES)
def test_xla_path_and_reference_equal_the_dense_softmax_forward_and_gradients(H, W, b, h, s):
    args, pairs = inputs(H, W, b, h, s)
    geometry = dict(block_size=b, halo_size=h, stride=s)

    def expected(q, k, v, rh, rw, bias):
        return dense_reference(q, k, v, rh, rw, bias, b=b, h=h, s=s, pairs=pairs)

    def xla(q, k, v, rh, rw, bias):
        return halo_attention(q, k, v, relative_height=rh, relative_width=rw, bias=bias, implementation="xla",
                              **geometry)

    (got, grads), (want, want_grads) = (outputs_and_grads(fn, args, range(6)) for fn in (xla, expected))
    assert want.shape == (2, -(-H // s), -(-W // s), 2, 3)
    assert_close(got, want, name="xla")
    names = ["q", "k", "v", "relative_height", "relative_width", "bias"]
    for n, a, e in zip(names, grads, want_grads):
        assert_close(a, e, name=f"d{n}")


def test_reference_path_equals_the_dense_softmax_forward_and_gradients():
    """The op's own dense reference (strided queries, halo 2 > half the block) against the loop-built one."""
    args, pairs = inputs(7, 9, 4, 2, 2, seed=1)

    def reference(q, k, v, rh, rw, bias):
        return halo_attention_reference(q, k, v, block_size=4, halo_size=2, stride=2, relative_height=rh,
                                        relative_width=rw, bias=bias)

    def expected(*a):
        return dense_reference(*a, b=4, h=2, s=2, pairs=pairs)

    (got, grads), (want, want_grads) = (outputs_and_grads(fn, args, range(6)) for fn in (reference, expected))
    assert_close(got, want, name="reference")
    for n, a, e in zip(["q", "k", "v", "relative_height", "relative_width", "bias"], grads, want_grads):
        assert_close(a, e, name=f"d{n}")


def test_border_keys_are_masked_not_zero_padded():
    """A border query gets the softmax over the real pixels of its window only: with v = 1 everywhere the
    output is exactly 1 (a zero-padded key taking part would pull it below 1)."""
    (q, k, v, *_), _ = inputs(5, 6, 4, 2, 1)
    out = jax.jit(lambda q, k, v: halo_attention_xla(q, k, v, block_size=4, halo_size=2))(q, k, jnp.ones_like(v))
    np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)


@pytest.mark.parametrize("gradients", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_pallas_path_on_the_block_sparse_engine_equals_the_dense_softmax(gradients):
    """Tile-major b x b blocks through the engine's kernel (interpret mode on CPU), forward (and gradients)."""
    (q, k, v, *_), pairs = inputs(7, 9, 4, 1, 1, seed=2)

    def expected(q, k, v):
        return dense_reference(q, k, v, None, None, None, b=4, h=1, s=1, pairs=pairs)

    def pallas(q, k, v):
        return halo_attention_pallas(q, k, v, block_size=4, halo_size=1)

    assert_close(jax.jit(pallas)(q, k, v), jax.jit(expected)(q, k, v), name="pallas")
    if gradients:
        assert_grads_close(pallas, expected, (q, k, v), argnums=range(3), names=["q", "k", "v"])


@pytest.mark.slow
@pytest.mark.parametrize("H, W, b, h, s", [(7, 9, 4, 2, 1), (7, 9, 4, 1, 2), (6, 10, 2, 3, 1)])
def test_pallas_path_more_geometries(H, W, b, h, s):
    (q, k, v, *_), pairs = inputs(H, W, b, h, s, seed=3)
    got = jax.jit(lambda q, k, v: halo_attention_pallas(q, k, v, block_size=b, halo_size=h, stride=s))(q, k, v)
    assert_close(got, dense_reference(q, k, v, None, None, None, b=b, h=h, s=s, pairs=pairs), name="pallas")


@pytest.mark.parametrize("H, W, b, h, s", CASES + [(6, 10, 2, 3, 1)])
def test_halo_mask_tiles_and_block_summary_agree_with_the_loop(H, W, b, h, s):
    """The engine's fine mask, read back from tile-major to grid order, is the loop's mask; the block codes
    are exact (EMPTY: no pair, FULL: every pair) and the lists hold the nonempty blocks."""
    layout = HaloLayout(H, W, b, h, s)
    mask = HaloMask(layout)
    (nh, nw), bq, (Hq, Wq) = layout.blocks, layout.query_block, layout.query_shape
    tiles = mask.tile(np.arange(mask.num_queries), np.arange(mask.num_keys), mask.num_queries, mask.num_keys)[0, 0]
    qy, qx = np.meshgrid(np.arange(Hq), np.arange(Wq), indexing="ij")
    ky, kx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    q_tok = ((qy // bq) * nw + qx // bq) * bq * bq + (qy % bq) * bq + qx % bq
    k_tok = ((ky // b) * nw + kx // b) * b * b + (ky % b) * b + kx % b
    np.testing.assert_array_equal(tiles[q_tok.ravel()][:, k_tok.ravel()], pairs_by_loop(Hq, Wq, H, W, b, h, s)[0])
    assert tiles.sum() == tiles[q_tok.ravel()][:, k_tok.ravel()].sum(), "padding tokens must see nothing"
    per_tile = tiles.reshape(nh * nw, bq * bq, nh * nw, b * b)
    codes = mask.block_summary(mask.num_queries, mask.num_keys, bq * bq, b * b)[0, 0]
    np.testing.assert_array_equal(codes, np.where(per_tile.any((1, 3)), np.where(per_tile.all((1, 3)), 2, 1), 0))
    lists = mask.block_lists()
    for i in range(nh * nw):
        count = lists.counts[0, 0, i]
        np.testing.assert_array_equal(lists.indices[0, 0, i, :count], np.flatnonzero(codes[i]))


def test_auto_serves_relative_tables_and_pallas_refuses_them():
    (q, k, v, rh, rw, _), pairs = inputs(7, 9, 4, 1, 1)
    with pytest.raises(NotImplementedError, match="relative position tables or a bias"):
        halo_attention(q, k, v, block_size=4, halo_size=1, relative_height=rh, relative_width=rw,
                       implementation="pallas")
    got = jax.jit(lambda q, k, v, rh, rw: halo_attention(q, k, v, block_size=4, halo_size=1, relative_height=rh,
                                                         relative_width=rw))(q, k, v, rh, rw)
    assert_close(got, dense_reference(q, k, v, rh, rw, None, b=4, h=1, s=1, pairs=pairs), name="auto")


def test_bf16_is_finite_and_close_to_float32():
    (q, k, v, rh, rw, bias), _ = inputs(7, 9, 4, 2, 1, dtype=jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, rh, rw, bias: halo_attention(q, k, v, block_size=4, halo_size=2, relative_height=rh,
                                                              relative_width=rw, bias=bias, implementation="xla"))
    out = fn(q, k, v, rh, rw, bias)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    as32 = [a.astype(jnp.float32) for a in (q, k, v)]
    assert_close(out, fn(*as32, rh, rw, bias), rtol=2e-2, name="bf16")


def test_xla_path_never_builds_a_token_by_token_array():
    """At 32 x 32 tokens in 8 x 8 blocks with halo 3, no value of the traced computation (forward and backward)
    has T² = 1024² elements or more: memory is O(blocks · (b + 2h)²), not O(T²)."""
    x = jnp.zeros((1, 32, 32, 1, 8))
    tables = jnp.zeros((2 * 14 - 1, 8))

    def loss(q, k, v, rh, rw):
        return halo_attention_xla(q, k, v, block_size=8, halo_size=3, relative_height=rh, relative_width=rw).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(x, x, x, tables, tables)
    sizes = [int(np.prod(var.aval.shape)) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars]
    assert max(sizes) < 1024 ** 2 // 4, max(sizes)


def test_bad_inputs_name_the_argument():
    (q, k, v, rh, rw, bias), _ = inputs(7, 9, 4, 1, 1)
    call = dict(block_size=4, halo_size=1)
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        halo_attention(q, k, v, block_size=0, halo_size=1)
    with pytest.raises(ValueError, match="halo_size must be a non-negative int, got -1"):
        halo_attention(q, k, v, block_size=4, halo_size=-1)
    with pytest.raises(ValueError, match="halo_size must be a non-negative int, got 1.5"):
        halo_attention(q, k, v, block_size=4, halo_size=1.5)
    with pytest.raises(ValueError, match=r"block_size \(4\) must be a multiple of stride \(3\)"):
        halo_attention(q, k, v, block_size=4, halo_size=1, stride=3)
    with pytest.raises(ValueError, match=r"q must have the grid \[⌈H/stride⌉, ⌈W/stride⌉\] = \[4, 5\]"):
        halo_attention(q, k, v, **call, stride=2)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\], got a "
                                         r"float32\[7, 9, 2, 4\]"):
        halo_attention(q[0], k, v, **call)
    with pytest.raises(ValueError, match=r"k and v must share \[batch, height, width, heads\]"):
        halo_attention(q, k, v[:, :6], **call)
    with pytest.raises(TypeError, match="k must be a floating-point array"):
        halo_attention(q, k.astype(jnp.int32), v, **call)
    with pytest.raises(ValueError, match="relative_height and relative_width go together"):
        halo_attention(q, k, v, **call, relative_height=rh)
    with pytest.raises(ValueError, match=r"relative_width must have shape .* = \[11, 4\], got a float32\[9, 4\]"):
        halo_attention(q, k, v, **call, relative_height=rh, relative_width=rw[:9])
    with pytest.raises(ValueError, match=r"bias must have shape .* = \[2, 16, 36\]"):
        halo_attention(q, k, v, **call, bias=bias[:, :4])
    with pytest.raises(ValueError, match="scale must be positive"):
        halo_attention(q, k, v, **call, scale=-1.0)
    with pytest.raises(ValueError, match="unknown implementation 'xlaa'"):
        halo_attention(q, k, v, **call, implementation="xlaa")
