"""BiFormer bi-level routing attention (catalog B8): routing rule vs brute force, engine paths vs the
paper-equation reference, LCE, padding of grids the regions don't tile, errors."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.blocked.lists import to_block_mask
from attnjax.sparse.biformer import (Biformer, biformer_attention, biformer_attention_reference, lce_reference,
                                     local_context_enhancement, region_layout, routed_token_mask)
from attnjax.sparse.engine import DenseSelectionWarning
from tests.helpers import assert_close, numpy_rng, random_qkv

KEY = jax.random.PRNGKey(0)
GRID, REGION = (5, 7), (2, 3)  # regions don't tile the grid: 3 x 3 regions, the last row and column partial
N = GRID[0] * GRID[1]


def grid_regions(grid, region):
    """Brute force: the row-major token ids of each region, regions row-major, from grid coordinates."""
    (H, W), (rh, rw) = grid, region
    return [[y * W + x for y in range(a * rh, min(H, (a + 1) * rh)) for x in range(b * rw, min(W, (b + 1) * rw))]
            for a in range(math.ceil(H / rh)) for b in range(math.ceil(W / rw))]


def routing_brute_force(q, k, groups, top_k, per_head, allowed=None):
    """The routing rule as a loop: region means, affinity summed over heads (or per head), top-k (ties: lower id).

    ``groups``: the token ids of each query region (and key region); ``allowed[i][j]``: may region i route to j.
    Returns bool ``[B, Hq or 1, R, R]``.
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, _, Hq, _ = q.shape
    G = Hq // k.shape[2]
    R = len(groups)
    out = np.zeros((B, Hq if per_head else 1, R, R), bool)
    for b in range(B):
        qm = [q[b, g].mean(0) for g in groups]  # [Hq, D] per region
        km = [np.repeat(k[b, g].mean(0), G, axis=0) for g in groups]
        for i in range(R):
            per = np.array([[qm[i][h] @ km[j][h] for j in range(R)] for h in range(Hq)])  # [Hq, R]
            for h, scores in enumerate(per if per_head else per.sum(0, keepdims=True)):
                cands = [j for j in range(R) if allowed is None or allowed[i][j]]
                ranked = sorted(cands, key=lambda j: (-scores[j], j))
                out[b, h, i, ranked[:top_k]] = True
    return out


@functools.lru_cache(maxsize=None)
def _inputs(seed, Hq=4, Hkv=2, D=4, dtype=jnp.float32):
    return random_qkv(jax.random.PRNGKey(seed), B=2, T=N, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype)


def assert_same_outputs_and_grads(fast, ref, args, names):
    """Outputs and the gradients of ``sum(out · w)`` (fixed random ``w``) with respect to every argument, one
    compile per function."""
    w = jax.random.normal(jax.random.PRNGKey(123), jax.eval_shape(ref, *args).shape)

    def value_and_grads(fn):
        def loss(*a):
            out = fn(*a)
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
        return out, g

    (out_f, g_f), (out_r, g_r) = value_and_grads(fast), value_and_grads(ref)
    assert_close(out_f, out_r, name="out")
    for a, e, name in zip(g_f, g_r, names):
        assert_close(a, e, name=f"d{name}")


def _region_order(x, grid=GRID, region=REGION):
    perm, _ = region_layout(grid, region)
    return jnp.take(x, jnp.asarray(perm), axis=1, mode="fill", fill_value=0)


# ----------------------------------------------------------------------------- layout and routing rule

@pytest.mark.parametrize("grid,region", [(GRID, REGION), ((4, 6), (2, 3)), ((3, 3), (4, 2))])
def test_region_layout_puts_each_region_in_one_block(grid, region):
    perm, counts = region_layout(grid, region)
    groups = grid_regions(grid, region)
    P = region[0] * region[1]
    assert perm.shape == (len(groups) * P,)
    np.testing.assert_array_equal(np.sort(perm[perm < grid[0] * grid[1]]), np.arange(grid[0] * grid[1]))
    for r, g in enumerate(groups):
        block = perm[r * P:(r + 1) * P]
        assert sorted(block[block < grid[0] * grid[1]]) == sorted(g)
        assert counts[r] == len(g)


@pytest.mark.parametrize("per_head", [False, True])
def test_grid_lists_equal_brute_force_routing(per_head):
    """Three seeds, GQA, a grid the regions don't tile: the selector's lists are the loop's top-k regions."""
    groups = grid_regions(GRID, REGION)
    sel = Biformer(grid=GRID, region=REGION, top_k=3, per_head=per_head)
    select = jax.jit(lambda q, k: to_block_mask(sel.select(_region_order(q), _region_order(k))))
    for seed in range(3):
        q, k, _ = _inputs(seed)
        expected = routing_brute_force(q, k, groups, 3, per_head)
        np.testing.assert_array_equal(np.asarray(select(q, k)), expected, err_msg=f"seed {seed}")


def test_sequence_lists_equal_brute_force_under_a_causal_mask():
    """``grid=None``: regions are the 1-D tiles (a short last one); the top-k runs over the blocks Causal allows."""
    T, block = 37, 8
    q, k, _ = random_qkv(KEY, B=2, T=T, Hq=4, Hkv=2, D=4)
    groups = [list(range(s, min(T, s + block))) for s in range(0, T, block)]
    allowed = [[j <= i for j in range(len(groups))] for i in range(len(groups))]
    sel = Biformer(block_q=block, block_kv=block, top_k=2)
    got = jax.jit(lambda q, k: to_block_mask(sel.select(q, k, mask=masks.Causal())))(q, k)
    np.testing.assert_array_equal(np.asarray(got), routing_brute_force(q, k, groups, 2, False, allowed))


def test_own_region_is_not_forced_in():
    """As the official ``torch.topk`` routing: a region whose own affinity ranks low does not see itself."""
    H, W = 2, 4  # two 2x2 regions
    q = np.zeros((1, 8, 1, 2), np.float32)
    k = np.zeros((1, 8, 1, 2), np.float32)
    q[0, :, 0, 0] = 1.0                          # every query points along e0
    k[0, [0, 1, 4, 5], 0, 0] = [-1, -1, -1, -1]  # region 0's keys point away (grid cols 0-1 of both rows)
    k[0, [2, 3, 6, 7], 0, 0] = [1, 1, 1, 1]      # region 1's keys point along e0
    q, k = jnp.asarray(q), jnp.asarray(k)
    sel = Biformer(grid=(H, W), region=(2, 2), top_k=1)
    lists = jax.jit(lambda q, k: to_block_mask(sel.select(_region_order(q, (H, W), (2, 2)),
                                                          _region_order(k, (H, W), (2, 2)))))(q, k)
    np.testing.assert_array_equal(np.asarray(lists)[0, 0], [[False, True], [False, True]])


def test_routed_token_mask_is_the_brute_force_routing_per_token_and_dense_softmax_under_it_is_the_reference():
    q, k, v = _inputs(0)
    groups = grid_regions(GRID, REGION)
    regions = routing_brute_force(q, k, groups, 3, False)
    region_of = np.zeros(N, int)
    for r, g in enumerate(groups):
        region_of[g] = r
    def both(q, k, v):
        mask = routed_token_mask(q, k, grid=GRID, region=REGION, top_k=3)
        return mask, (aj.attention(q, k, v, mask=masks.Explicit(mask), implementation="reference"),
                      biformer_attention_reference(q, k, v, grid=GRID, region=REGION, top_k=3))

    mask, (dense, ref) = jax.jit(both)(q, k, v)
    np.testing.assert_array_equal(np.asarray(mask), regions[:, :, region_of][:, :, :, region_of])
    assert_close(dense, ref)


# ----------------------------------------------------------------------------- engine paths vs the reference

def _fns(impl, top_k=3, per_head=False):
    def fast(q, k, v):
        return aj.attention(q, k, v, mechanism=Biformer(grid=GRID, region=REGION, top_k=top_k, per_head=per_head),
                            implementation=impl)

    def ref(q, k, v):
        return biformer_attention_reference(q, k, v, grid=GRID, region=REGION, top_k=top_k, per_head=per_head)
    return fast, ref


@pytest.mark.parametrize("impl", ["xla", pytest.param("reference", marks=pytest.mark.slow),
                                  pytest.param("pallas", marks=pytest.mark.slow)])
def test_engine_paths_match_the_equation_reference_forward_and_grads(impl):
    """Padded 5x7 grid, 2x3 regions, GQA (4 query / 2 KV heads): the engine (dense softmax under the routed
    mask for "reference", gathered tiles for "xla", the kernel for "pallas") equals Eqs. (2)-(5) gathered per region."""
    q, k, v = _inputs(0)
    fast, ref = _fns(impl)
    assert_same_outputs_and_grads(fast, ref, (q, k, v), ["q", "k", "v"])


def test_pallas_forward_on_a_padded_grid():
    q, k, v = _inputs(0)
    fast, ref = _fns("pallas", per_head=True)
    assert_close(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v))


def test_regions_that_tile_the_grid_use_the_plain_permutation():
    grid, region = (4, 6), (2, 3)
    q, k, v = random_qkv(KEY, B=1, T=24, Hq=2, D=4)
    sel = Biformer(grid=grid, region=region, top_k=2)
    assert np.all(sel.token_permutation(q, k) < 24)
    out, lse, ref = jax.jit(lambda q, k, v: (
        *aj.attention(q, k, v, mechanism=sel, implementation="xla", return_lse=True),
        biformer_attention_reference(q, k, v, grid=grid, region=region, top_k=2)))(q, k, v)
    assert_close(out, ref)
    assert lse.shape == (1, 24, 2) and np.all(np.isfinite(np.asarray(lse)))


def test_bf16_is_finite_and_keeps_dtype():
    q, k, v = _inputs(0, dtype=jnp.bfloat16)
    fast, ref = _fns("xla")
    out = jax.jit(fast)(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, jax.jit(ref)(q, k, v), rtol=2e-2)


# ----------------------------------------------------------------------------- LCE and the functional core

def test_lce_equals_a_numpy_depthwise_convolution():
    v = jnp.asarray(numpy_rng(KEY).standard_normal((1, N, 2, 3)), jnp.float32)
    kernel = jnp.asarray(numpy_rng(jax.random.PRNGKey(1)).standard_normal((3, 5, 6)), jnp.float32)
    bias = jnp.arange(6, dtype=jnp.float32)
    img = np.pad(np.asarray(v).reshape(*GRID, 6), ((1, 1), (2, 2), (0, 0)))
    expected = np.zeros((*GRID, 6))
    for y in range(GRID[0]):
        for x in range(GRID[1]):
            expected[y, x] = (img[y:y + 3, x:x + 5] * np.asarray(kernel)).sum((0, 1)) + np.asarray(bias)
    expected = expected.reshape(1, N, 2, 3)
    naive, fast = jax.jit(lambda v, w, b: (lce_reference(v, GRID, w, b), local_context_enhancement(v, GRID, w, b)))(
        v, kernel, bias)
    assert_close(naive, expected)
    assert_close(fast, expected)


def test_functional_core_with_lce_matches_the_reference_forward_and_grads():
    q, k, v = _inputs(0)
    rng = numpy_rng(jax.random.PRNGKey(2))
    kernel = jnp.asarray(rng.standard_normal((5, 5, 8)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(8), jnp.float32)
    kw = dict(grid=GRID, region=REGION, top_k=3, scale=0.3)

    def fast(q, k, v, w, b):
        return biformer_attention(q, k, v, lce_kernel=w, lce_bias=b, implementation="xla", **kw)

    def ref(q, k, v, w, b):
        return biformer_attention_reference(q, k, v, lce_kernel=w, lce_bias=b, **kw)

    args = (q, k, v, kernel, bias)
    assert_same_outputs_and_grads(fast, ref, args, ["q", "k", "v", "lce_kernel", "lce_bias"])


# ----------------------------------------------------------------------------- dense configs and errors

def test_top_k_covering_every_region_warns_and_is_dense_attention():
    q, k, v = random_qkv(KEY, B=1, T=24, Hq=2, D=4)
    sel = Biformer(grid=(4, 6), region=(2, 3), top_k=9)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        out = jax.jit(lambda q, k, v: aj.attention(q, k, v, mechanism=sel, implementation="reference"))(q, k, v)
    assert any(issubclass(w.category, DenseSelectionWarning) for w in log)
    assert_close(out, jax.jit(aj.attention)(q, k, v))
    assert not Biformer(grid=(4, 6), region=(2, 3), top_k=3).selects_every_block(24, 24, 2)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: aj.attention(q, k, v, mechanism=Biformer(grid=(5, 6), region=(2, 3))), ValueError,
     r"grid \(5, 6\) needs T = S = 30, got T=35"),
    (lambda q, k, v: Biformer(grid=(5, 7)), ValueError, r"needs region=\(rh, rw\)"),
    (lambda q, k, v: Biformer(region=(2, 2)), ValueError, "needs a grid"),
    (lambda q, k, v: Biformer(grid=(5, 7), region=(2, 0)), ValueError, r"region\[1\] must be a positive int"),
    (lambda q, k, v: Biformer(grid=(5, 7, 1), region=(2, 2)), ValueError, r"grid must be \(height, width\)"),
    (lambda q, k, v: Biformer(grid=(5, 7), region=(2, 3), block_q=8), ValueError, "blocks of rh·rw = 6"),
    (lambda q, k, v: Biformer(top_k=0), ValueError, "top_k must be a positive int"),
    (lambda q, k, v: Biformer(grid=GRID, region=REGION).select(q, k), ValueError,
     r"T = S = 54 .* got q \[2, 35, 4, 4\]"),
    (lambda q, k, v: biformer_attention(q, k, v, grid=GRID, region=REGION, lce_kernel=jnp.zeros((5, 5, 4))),
     ValueError, r"lce_kernel must be \[kh, kw, C\] .* C = Hkv·Dv = 8 for v \[2, 35, 2, 4\]"),
    (lambda q, k, v: biformer_attention(q, k, v, grid=GRID, region=REGION, lce_kernel=jnp.zeros((4, 5, 8))),
     ValueError, "odd kh, kw"),
    (lambda q, k, v: biformer_attention(q, k, v, grid=GRID, region=REGION, lce_kernel=jnp.zeros((5, 5, 8)),
                                        lce_bias=jnp.zeros(4)), ValueError, r"lce_bias must be \[C\] = \[8\]"),
    (lambda q, k, v: biformer_attention_reference(q[:, :, :3], k, v, grid=GRID, region=REGION), ValueError,
     r"multiple of kv heads"),
    (lambda q, k, v: aj.attention(q, k, v, mechanism=Biformer(grid=GRID, region=REGION), mask=masks.Causal()),
     NotImplementedError, "fine mask"),
])
def test_bad_input_raises_naming_the_argument(call, error, match):
    q, k, v = _inputs(0)
    with pytest.raises(error, match=match):
        call(q, k, v)
