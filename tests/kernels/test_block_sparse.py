"""The Pallas block-sparse kernels (``pallas_kernels.block_sparse``) against
``attnjax.sparse.block_sparse_attention_reference``: outputs and gradients in q, k, v.

On CPU the GPU (Triton) kernel runs in Pallas interpret mode and the TPU (Mosaic) kernel in the
TPU interpreter; each comparison is one jit (forward and all gradients) compiled at XLA's lowest
backend optimization level, since the interpreted kernels are compile-bound. Block size 16,
T=37 / S=45 (ragged, T != S) so that lists span several tiles with padding.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.sparse import BlockSparse, allowed_blocks, block_sparse_attention, from_block_mask
from attnjax.sparse import block_sparse_attention_reference as reference
from pallas_kernels.block_sparse import block_sparse_attention_pallas, common
from tests.helpers import TOLERANCE, assert_close, random_qkv

KEY = jax.random.PRNGKey(0)
T, S, BLOCK = 37, 45, 16
NQ, NK = 3, 3


def out_and_grads(fn, args):
    """``fn(*args)`` and the gradients in q, k, v of ``Σ leaf·w`` over the output leaves (fixed
    random ``w``; non-finite lse entries get weight 0), in one jit."""
    shapes = jax.eval_shape(fn, *args)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(123), len(leaves))
    weights = [jax.random.normal(key, s.shape, jnp.float32) for key, s in zip(keys, leaves)]

    def loss(*a):
        out = fn(*a)
        total = sum(jnp.sum(jnp.where(jnp.isfinite(x), x.astype(jnp.float32), 0.0) * w)
                    for x, w in zip(jax.tree.leaves(out), weights))
        return total, out

    jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), g = jitted.lower(*args).compile({"xla_backend_optimization_level": 0})(*args)
    return out, g


def check(fn, expected_fn, args, rtol=None, grad_rtol=None):
    out, g = out_and_grads(fn, args)
    out_e, g_e = out_and_grads(expected_fn, args)
    for name, a, e in zip(("out", "lse"), jax.tree.leaves(out), jax.tree.leaves(out_e)):
        assert a.dtype == e.dtype, name
        finite = np.isfinite(np.asarray(e))
        np.testing.assert_array_equal(np.isfinite(np.asarray(a)), finite, err_msg=f"{name}: -inf rows differ")
        assert_close(jnp.where(finite, a, 0), jnp.where(finite, e, 0), rtol=rtol, name=name)
    for a, e, n in zip(g, g_e, "qkv"):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert_close(a, e, rtol=grad_rtol or rtol, name=f"d{n}")
    return out, g


def random_block_mask(shape, p=0.5, seed=0):
    return np.random.default_rng(seed).random(shape) < p


# ------------------------------------------------------------------------------- GPU kernel (interpret)


def test_static_lists_gqa_ragged_dv_empty_rows_and_unlisted_blocks():
    """Static per-(batch, head) lists, GQA 4 on 2, T=37 / S=45, Dv != D, a query block with an
    empty list, and a key block no list names (its K/V are NaN: the kernel never reads them)."""
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=16, Dv=8)
    bm = random_block_mask((2, 4, NQ, NK))
    bm[..., 1] = False  # key block 1 is never listed
    bm[1, 2, 0] = False  # an empty list: those rows see nothing
    bm[0, 0, 2, 2] = True
    blocks = from_block_mask(bm, BLOCK, BLOCK)
    assert blocks.is_static

    def poisoned(x):
        return x.at[:, BLOCK:2 * BLOCK].set(jnp.nan)

    def kernel(q, k, v):
        return block_sparse_attention(q, poisoned(k), poisoned(v), blocks, implementation="pallas")

    out, g = check(kernel, functools.partial(reference, blocks=blocks), (q, k, v))
    np.testing.assert_array_equal(np.asarray(out[1, :BLOCK, 2]), 0.0)
    np.testing.assert_array_equal(np.asarray(g[1][:, BLOCK:2 * BLOCK]), 0.0)


def _top_blocks(q, k, blocks_per_row=2):
    """Dynamic lists (inside jit, no host sync): per (b, h, query block) the key blocks with the
    largest ``mean(q_block)·mean(k_block)`` (MoBA-like), top ``blocks_per_row``."""
    B, _, Hq, D = q.shape
    G = Hq // k.shape[2]
    qm = jnp.pad(q, ((0, 0), (0, NQ * BLOCK - T), (0, 0), (0, 0))).reshape(B, NQ, BLOCK, Hq, D).mean(2)
    km = jnp.pad(k, ((0, 0), (0, NK * BLOCK - S), (0, 0), (0, 0))).reshape(B, NK, BLOCK, -1, D).mean(2)
    scores = jnp.einsum("bihd,bjhd->bhij", qm, jnp.repeat(km, G, axis=2))
    _, top = jax.lax.top_k(scores, blocks_per_row)
    bm = jnp.zeros(scores.shape, bool).at[
        jnp.arange(B)[:, None, None, None], jnp.arange(Hq)[None, :, None, None],
        jnp.arange(NQ)[None, None, :, None], top].set(True)
    return from_block_mask(bm, BLOCK, BLOCK, max_blocks=blocks_per_row)


def test_dynamic_lists_causal_soft_cap_and_lse():
    """Lists computed from q and k inside the jitted function (K = 2), a Causal fine mask (listed
    tiles above the diagonal are skipped, some rows see nothing), soft cap, lse and its gradient."""
    q, k, v = random_qkv(jax.random.PRNGKey(1), B=1, T=T, S=S, Hq=4, Hkv=2, D=16)
    options = dict(mask=masks.Causal(), logits_soft_cap=2.0, return_lse=True)

    def run(attention):
        def f(q, k, v):
            blocks = _top_blocks(q, k)
            assert not blocks.is_static
            return attention(q, k, v, blocks, **options)
        return f

    (out, lse), _ = check(run(block_sparse_attention_pallas), run(reference), (q * 3, k * 3, v))
    assert lse.shape == (1, T, 4) and lse.dtype == jnp.float32


@pytest.mark.slow
def test_bf16_broadcast_lists_window():
    """bf16 inputs (float32 statistics) with one list shared by every batch and head."""
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=2, T=T, S=S, Hq=2, D=16, dtype=jnp.bfloat16)
    blocks = from_block_mask(random_block_mask((NQ, NK), 0.7, seed=2), BLOCK, BLOCK)
    mask = masks.SlidingWindow(20, 4)
    out, g = out_and_grads(functools.partial(block_sparse_attention_pallas, blocks=blocks, mask=mask), (q, k, v))
    exact, g_exact = out_and_grads(functools.partial(reference, blocks=blocks, mask=mask),
                                   tuple(x.astype(jnp.float32) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    assert_close(out, exact, rtol=TOLERANCE[jnp.bfloat16], name="out vs f32")
    for a, e, n in zip(g, g_exact, "qkv"):
        assert a.dtype == jnp.bfloat16
        assert_close(a, e, rtol=3 * TOLERANCE[jnp.bfloat16], name=f"d{n}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stripes(masks.Mask):
    """A structural mask flash's MaskPlan doesn't know: keys at an even distance ≤ ``reach``
    (pure index arithmetic, evaluated in-kernel through ``tile``)."""

    reach: int = dataclasses.field(metadata=dict(static=True))

    def tile(self, q_idx, kv_idx, T, S):
        d = masks.query_positions(q_idx, T, S)[:, None] - kv_idx[None, :]
        return ((jnp.abs(d) <= self.reach) & (d % 2 == 0))[None, None]

    def block_summary(self, T, S, block_q, block_kv):
        return masks.SlidingWindow(self.reach, self.reach).block_summary(T, S, block_q, block_kv).clip(max=1)


@pytest.mark.slow
def test_structural_mask_and_segments():
    """A structural fine mask (``tile`` called in-kernel) AND packed segments (flash's data path)."""
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=2, T=T, S=S, Hq=4, Hkv=1, D=16)
    ids_q = jnp.sort(jax.random.randint(KEY, (2, T), 0, 3), axis=1)
    ids_k = jnp.sort(jax.random.randint(jax.random.PRNGKey(4), (2, S), 0, 3), axis=1)
    mask = Stripes(12) & masks.Segments(ids_q, ids_k)
    plan, _, structural = common.split_fine_mask(mask, T, S, 48, 48)
    assert plan.kind == "segments" and isinstance(structural, Stripes)
    blocks = from_block_mask(random_block_mask((1, 4, NQ, NK), 0.8, seed=3) & allowed_blocks(mask, T, S, 16, 16),
                             BLOCK, BLOCK)
    check(functools.partial(block_sparse_attention_pallas, blocks=blocks, mask=mask),
          functools.partial(reference, blocks=blocks, mask=mask), (q, k, v))


@pytest.mark.slow
@pytest.mark.parametrize("Hq,Hkv,bq,bk", [(6, 1, 16, 32), (2, 2, 32, 16)])
def test_mqa_mha_and_unequal_blocks(Hq, Hkv, bq, bk):
    q, k, v = random_qkv(jax.random.PRNGKey(5), B=1, T=50, S=40, Hq=Hq, Hkv=Hkv, D=16)
    nq, nk = -(-50 // bq), -(-40 // bk)
    blocks = from_block_mask(random_block_mask((1, Hq, nq, nk), 0.6, seed=5), bq, bk)
    mask = masks.ChunkedCausal(24) | masks.Explicit((jnp.arange(40) < 3)[None, :])
    check(functools.partial(block_sparse_attention_pallas, blocks=blocks, mask=mask),
          functools.partial(reference, blocks=blocks, mask=mask), (q, k, v))


# ------------------------------------------------------------------------------- TPU kernel (interpret)


@pytest.mark.slow
def test_tpu_interpret_forward_and_backward():
    """The Mosaic kernels (scalar-prefetch lists, slot grid axis) in TPU interpret mode: static
    per-head lists with an empty row, GQA, ragged T/S, causal, lse."""
    q, k, v = random_qkv(jax.random.PRNGKey(6), B=1, T=T, S=S, Hq=4, Hkv=2, D=16)
    bm = random_block_mask((1, 4, NQ, NK), 0.6, seed=6)
    bm[0, 1, 2] = False
    blocks = from_block_mask(bm, BLOCK, BLOCK)
    options = dict(blocks=blocks, mask=masks.Causal(), return_lse=True)
    check(functools.partial(block_sparse_attention_pallas, backend="tpu", interpret=True, **options),
          functools.partial(reference, **options), (q, k, v))


@pytest.mark.slow
def test_tpu_interpret_dynamic_lists_structural_mask():
    q, k, v = random_qkv(jax.random.PRNGKey(7), B=1, T=T, S=S, Hq=4, Hkv=2, D=16)

    def run(attention, **kw):
        return lambda q, k, v: attention(q, k, v, _top_blocks(q, k), mask=Stripes(9), **kw)

    check(run(block_sparse_attention_pallas, backend="tpu", interpret=True), run(reference), (q, k, v))


# ------------------------------------------------------------------------------- lowering, errors, GPU


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_hardware(platform):
    """Forward and backward lower to Triton / Mosaic (cross-lowering from the CPU host; no run),
    with a planned (Causal) and a structural (Stripes, ``tile`` in-kernel) fine mask."""
    q, k, v = random_qkv(KEY, B=1, T=128, Hq=4, Hkv=2, D=64, dtype=jnp.bfloat16)
    block = 64 if platform == "cuda" else 128
    blocks = from_block_mask(np.tril(np.ones((128 // block, 128 // block), bool)), block, block)
    backend = "gpu" if platform == "cuda" else "tpu"

    def loss(q, k, v):
        out = block_sparse_attention_pallas(q, k, v, blocks, mask=masks.Causal() & Stripes(100), backend=backend,
                                            interpret=False)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
    for kernel in ("fwd", "dq", "dkdv"):
        assert f"block_sparse_{'tpu_' if platform == 'tpu' else ''}{kernel}" in text


def test_unsupported_requests_raise_not_implemented():
    q, k, v = random_qkv(KEY, B=1, T=32, Hq=2, D=16)
    blocks = from_block_mask(np.ones((2, 2), bool), 16, 16)

    class Unregistered(masks.Mask):
        def tile(self, q_idx, kv_idx, T, S):
            return (q_idx[:, None] >= kv_idx[None, :])[None, None]

    for mask in (Unregistered(), blocks, masks.Causal() & blocks):
        with pytest.raises(NotImplementedError, match="can't evaluate fine mask"):
            block_sparse_attention_pallas(q, k, v, blocks, mask=mask)
    odd = from_block_mask(np.ones((4, 4), bool), 8, 8)
    with pytest.raises(NotImplementedError, match="powers of two"):
        block_sparse_attention_pallas(q, k, v, odd, backend="gpu", interpret=False)
    with pytest.raises(NotImplementedError, match="multiples of 8"):
        block_sparse_attention_pallas(q, k, v, from_block_mask(np.ones((3, 3), bool), 12, 12), backend="tpu")
    with pytest.raises(ValueError, match="BlockSparse.indices"):
        block_sparse_attention_pallas(q, k, v, BlockSparse(odd.indices[:, :, :2], odd.counts[:, :, :2], 8, 8, 4))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU for the real Triton kernels")
def test_triton_kernels_on_gpu():
    """Compiled Triton kernels at GPU-sized tiles, bf16 vs the float32 reference: static lists with
    a causal fine mask and dynamic (top-k) lists with a sliding window and soft cap."""
    q, k, v = random_qkv(KEY, B=2, T=300, S=300, Hq=8, Hkv=2, D=64, dtype=jnp.bfloat16)
    exact = tuple(x.astype(jnp.float32) for x in (q, k, v))
    n = -(-300 // 64)
    static = from_block_mask(random_block_mask((2, 8, n, n), 0.5, seed=8) & allowed_blocks(masks.Causal(), 300, 300,
                                                                                          64, 64), 64, 64)

    def dynamic(q, k):
        scores = jax.random.uniform(jax.random.PRNGKey(9), (2, 8, n, n))
        _, top = jax.lax.top_k(scores, 3)
        bm = jax.nn.one_hot(top, n, dtype=jnp.int32).sum(-2) > 0
        return from_block_mask(bm, 64, 64, max_blocks=3)

    cases = [(lambda q, k: static, dict(mask=masks.Causal())),
             (dynamic, dict(mask=masks.SlidingWindow(100, 20), logits_soft_cap=20.0, return_lse=True))]
    for select, options in cases:
        def run(attention, **kw):
            return lambda q, k, v: attention(q, k, v, select(q, k), **options, **kw)
        out, g = out_and_grads(run(block_sparse_attention_pallas, backend="gpu"), (q, k, v))
        out_e, g_e = out_and_grads(run(reference), exact)
        for name, a, e in zip(("out", "lse"), jax.tree.leaves(out), jax.tree.leaves(out_e)):
            finite = np.isfinite(np.asarray(e))
            assert_close(jnp.where(finite, a, 0), jnp.where(finite, e, 0), rtol=TOLERANCE[jnp.bfloat16], name=name)
        for a, e, name in zip(g, g_e, "qkv"):
            assert_close(a, e, rtol=3 * TOLERANCE[jnp.bfloat16], name=f"d{name}")
