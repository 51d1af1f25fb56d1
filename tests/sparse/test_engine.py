"""Block-sparse engine: the xla gather path against the dense masked reference, and the dispatcher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.sparse import gather
from attnjax.sparse.engine import block_sparse_attention, block_sparse_attention_reference
from attnjax.sparse.gather import block_sparse_attention_xla
from attnjax.blocked.lists import BlockSparse, from_block_mask
from tests.helpers import TOLERANCE, assert_close, random_qkv

KEY = jax.random.PRNGKey(0)
T, S, BQ, BK = 37, 45, 8, 16
NQ, NK = 5, 3


def random_blocks(shape, seed=0, p=0.5, block_q=BQ, block_kv=BK, nq=NQ, nk=NK):
    """Static lists from a random numpy block mask ``[*shape, nq, nk]``; query block 1 sees nothing."""
    bm = np.random.default_rng(seed).random(tuple(shape) + (nq, nk)) < p
    bm[..., 1, :] = False
    return from_block_mask(bm, block_q, block_kv)


def segment_ids(B, L, seed):
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 3, (B, L)), axis=1), jnp.int32)


def check_lse(lse, expected):
    lse, expected = np.asarray(lse), np.asarray(expected)
    assert lse.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert_close(lse[finite], expected[finite], name="lse")


def outputs_and_grads(fn, q, k, v):
    """Jitted ``fn(q, k, v)`` and the gradients of a fixed random projection of all its outputs
    (``out``, and ``lse`` where finite). The projection is drawn by NumPy: no PRNG to compile."""
    shapes = jax.eval_shape(fn, q, k, v)
    shapes = shapes if isinstance(shapes, tuple) else (shapes,)
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(o.shape, np.float32)) for o in shapes]

    def loss(q, k, v, weights):
        outs = fn(q, k, v)
        outs = outs if isinstance(outs, tuple) else (outs,)
        total = sum(jnp.sum(jnp.where(jnp.isfinite(o), jnp.sin(o.astype(jnp.float32)) * w, 0.0))
                    for o, w in zip(outs, weights))
        return total, outs

    grads_, outs = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(q, k, v, weights)
    return outs, grads_


def check(q, k, v, blocks, rtol=None, **kw):
    """xla against the reference: outputs (and lse) and the gradients wrt q, k, v."""
    outs, grads_ = outputs_and_grads(functools.partial(block_sparse_attention_xla, blocks=blocks, **kw), q, k, v)
    outs_r, grads_r = outputs_and_grads(functools.partial(block_sparse_attention_reference, blocks=blocks, **kw),
                                        q, k, v)
    assert_close(outs[0], outs_r[0], rtol=rtol, name="out")
    if len(outs) > 1:
        check_lse(outs[1], outs_r[1])
    for a, e, n in zip(grads_, grads_r, "qkv"):
        assert_close(a, e, rtol=rtol, name=f"d{n}")
    return outs, grads_


@pytest.mark.slow
@pytest.mark.parametrize("list_shape", [(1, 1), (1, 4), (2, 1), (2, 4)])
def test_random_patterns_gqa_odd_lengths(list_shape):
    """Lists broadcast over batch/heads, GQA (Hq=4, Hkv=2), T=37, S=45, blocks 8/16, Dv != D.
    (The default suite covers (2, 4) with a fine mask in ``test_fine_masks``.)"""
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8, Dv=12)
    check(q, k, v, random_blocks(list_shape))


FINE_MASKS = {
    "causal&segments": lambda: masks.Causal() & masks.Segments(segment_ids(2, T, 1), segment_ids(2, S, 2)),
    "causal": lambda: masks.Causal(),
    "window": lambda: masks.SlidingWindow(9, 4),
    "explicit_per_head": lambda: masks.Explicit(jnp.asarray(np.random.default_rng(3).random((1, 4, T, S)) < 0.7)),
}


@pytest.mark.parametrize("name", [n if n == "causal&segments" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in FINE_MASKS])
def test_fine_masks(name, monkeypatch):
    """GQA, T=37, S=45, Dv != D; the lists vary over batch and heads, so batch- and head-dependent
    masks pick each tile's own row. Chunks of 2 query blocks (the last one padded), steps of 2
    list slots (the last one padded)."""
    monkeypatch.setattr(gather, "KEYS_PER_STEP", 2 * BK)
    monkeypatch.setattr(gather, "TILE_ELEMENTS_PER_STEP", 2 * 2 * 4 * BQ * 2 * BK)
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8, Dv=12)
    check(q, k, v, random_blocks((2, 4), seed=1, p=0.7), mask=FINE_MASKS[name]())


@pytest.mark.parametrize("T_,S_,cap,dtype", [
    (45, 37, 5.0, jnp.bfloat16),
    pytest.param(16, 45, None, jnp.float32, marks=pytest.mark.slow),
    pytest.param(T, S, None, jnp.float16, marks=pytest.mark.slow),
])
def test_cross_lengths_soft_cap_low_precision(T_, S_, cap, dtype):
    """T != S under a causal fine mask (bottom-right), soft cap and scale, low precision (f32
    statistics, output in q's dtype), and one list shared by every head of a GQA group."""
    q, k, v = random_qkv(KEY, B=1, T=T_, S=S_, Hq=4, Hkv=2, D=8, dtype=dtype)
    blocks = random_blocks((1, 1), seed=2, p=0.7, nq=-(-T_ // BQ))
    (out, lse), _ = check(3 * q, k, v, blocks, rtol=TOLERANCE[dtype], mask=masks.Causal(),
                          logits_soft_cap=cap, scale=0.7, return_lse=True)
    assert out.dtype == dtype and lse.dtype == jnp.float32


def test_dynamic_lists_built_under_jit():
    """Top-2 key blocks per query block by q·mean(K_block) (MoBA-like), computed inside jit."""
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)

    def select(q, k):
        qm = jnp.pad(q, ((0, 0), (0, NQ * BQ - T), (0, 0), (0, 0))).reshape(2, NQ, BQ, 4, 8).mean(2)
        km = jnp.pad(k, ((0, 0), (0, NK * BK - S), (0, 0), (0, 0))).reshape(2, NK, BK, 2, 8).mean(2)
        scores = jnp.einsum("bihd,bjhd->bhij", qm, jnp.repeat(km, 2, axis=2))
        top = jax.lax.top_k(scores, 2)[1]
        bm = jnp.zeros(scores.shape, bool).at[
            jnp.arange(2)[:, None, None, None], jnp.arange(4)[None, :, None, None],
            jnp.arange(NQ)[None, None, :, None], top].set(True)
        return from_block_mask(bm, BQ, BK, max_blocks=3)

    @jax.jit
    def selected(q, k, v):
        blocks = select(q, k)
        return block_sparse_attention_xla(q, k, v, blocks, mask=masks.Causal()), blocks

    out, blocks = selected(q, k, v)
    assert not blocks.is_static and blocks.max_blocks == 3
    (out_checked,), _ = check(q, k, v, blocks, mask=masks.Causal())
    assert_close(out, out_checked, name="lists selected inside jit")


def test_empty_rows_and_return_lse_with_its_gradient(monkeypatch):
    """Query block 1 lists nothing: output 0, lse -inf, finite grads; elsewhere lse and its
    gradient match the reference. One query block per chunk, one list slot per step."""
    monkeypatch.setattr(gather, "KEYS_PER_STEP", BK)
    monkeypatch.setattr(gather, "TILE_ELEMENTS_PER_STEP", 4 * BQ * BK)
    q, k, v = random_qkv(KEY, B=1, T=T, S=S, Hq=4, Hkv=2, D=8)
    blocks = random_blocks((1, 4), seed=5, p=0.7)
    assert (np.asarray(blocks.counts)[:, :, 1] == 0).all()
    (out, lse), grads_ = check(q, k, v, blocks, mask=masks.SlidingWindow(12, 0), return_lse=True)
    assert lse.shape == (1, T, 4)
    np.testing.assert_array_equal(np.asarray(out[:, BQ:2 * BQ]), 0.0)
    assert np.isneginf(np.asarray(lse[:, BQ:2 * BQ])).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in grads_)
    nothing = from_block_mask(np.zeros((NQ, NK), bool), BQ, BK)
    np.testing.assert_array_equal(np.asarray(jax.jit(block_sparse_attention_xla)(q, k, v, nothing)), 0.0)


def test_jit_and_vmap():
    q, k, v = random_qkv(KEY, B=3, T=T, S=S, Hq=2, D=8)
    blocks = random_blocks((1, 2), seed=8)
    expected = jax.jit(functools.partial(block_sparse_attention_reference, blocks=blocks))(q, k, v)
    per_example = jax.jit(jax.vmap(lambda a, b, c: block_sparse_attention_xla(a[None], b[None], c[None], blocks)[0]))
    assert_close(per_example(q, k, v), expected, name="vmap, static lists")
    dynamic = jax.tree.map(jnp.asarray, blocks)
    vmapped = jax.jit(jax.vmap(lambda a, b, c, bs: block_sparse_attention_xla(a[None], b[None], c[None], bs)[0],
                               in_axes=(0, 0, 0, None)))
    assert_close(vmapped(q, k, v, dynamic), expected, name="vmap, dynamic lists")


def test_dispatcher_auto_is_xla_on_cpu_and_errors():
    q, k, v = random_qkv(KEY, B=1, T=T, S=S, Hq=2, D=8)
    blocks = random_blocks((1, 2), seed=9)
    auto = jax.jit(functools.partial(block_sparse_attention, blocks=blocks, mask=masks.Causal()))
    xla = jax.jit(functools.partial(block_sparse_attention_xla, blocks=blocks, mask=masks.Causal()))
    np.testing.assert_array_equal(np.asarray(auto(q, k, v)), np.asarray(xla(q, k, v)))
    with pytest.raises(TypeError, match="BlockSparse"):
        block_sparse_attention(q, k, v, np.ones((1, 2, NQ, 1), np.int32))
    wrong_nq = from_block_mask(np.ones((NQ + 1, NK), bool), BQ, BK)
    with pytest.raises(ValueError, match="expected"):
        block_sparse_attention(q, k, v, wrong_nq, implementation="xla")
    wrong_nk = BlockSparse(blocks.indices, blocks.counts, BQ, BK, NK + 1)
    with pytest.raises(ValueError, match="num_kv_blocks"):
        block_sparse_attention(q, k, v, wrong_nk)


def _temp_bytes(fn, L, grad):
    x = jax.ShapeDtypeStruct((1, L, 2, 64), jnp.float32)
    f = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2)) if grad else fn
    return jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [pytest.param(False, marks=pytest.mark.slow), True])
def test_memory_far_below_reference(grad):
    """T=4096, blocks 64, density 1/8 (a causal band): compiled temp memory vs the dense reference."""
    L, block = 4096, 64
    n = L // block
    band = (np.arange(n)[:, None] - np.arange(n)[None, :])
    blocks = from_block_mask((band >= 0) & (band < n // 8), block, block)
    xla = functools.partial(block_sparse_attention_xla, blocks=blocks, mask=masks.Causal())
    ref = functools.partial(block_sparse_attention_reference, blocks=blocks, mask=masks.Causal())
    sparse, dense = _temp_bytes(xla, L, grad), _temp_bytes(ref, L, grad)
    assert sparse * 20 < dense, (sparse, dense)
