"""MoBA / VMoBA / PAROAttention selectors (catalog B5, B6) and PARO's INT8 attention."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.blocked.lists import to_block_mask
from attnjax.sparse.engine import DenseSelectionWarning
from attnjax.sparse.moba import Moba, Vmoba, threshold_select, vmoba_permutation
from attnjax.sparse.paro import (AXIS_ORDERS, Paro, block_attention_mass, block_concentration, choose_permutation,
                                 grid_permutation, inverse_permutation, permute_tokens,
                                 quantized_attention_reference)
from tests.helpers import assert_close, assert_grads_close, numpy_rng, outputs_and_grads, random_qkv

KEY = jax.random.PRNGKey(0)
GRID = (4, 4, 4)  # 64 tokens


def _blocks_of(x, block):
    n = math.ceil(x.shape[1] / block)
    return [x[:, i * block:(i + 1) * block] for i in range(n)]


# ----------------------------------------------------------------------------- MoBA

def moba_brute_force(q, k, block_q, block_kv, top_k, pool, causal):
    """Per query block: the own key blocks, then the best allowed others by pooled q·mean(K_block)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    nq, nk = math.ceil(T / block_q), math.ceil(S / block_kv)
    means = np.stack([blk.mean(1) for blk in _blocks_of(k, block_kv)], 1)  # [B, nk, Hkv, D]
    own = [{p // block_kv for p in range(i * block_q + S - T, min((i + 1) * block_q, T) + S - T)} for i in range(nq)]
    K = min(nk, max(top_k, max(len(o) for o in own)))
    out = np.zeros((B, Hq, nq, nk), bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(nq):
                rows = range(i * block_q, min((i + 1) * block_q, T))
                gates = np.array([[q[b, t, h] @ means[b, n, h // (Hq // Hkv)] for n in range(nk)] for t in rows])
                gate = gates.mean(0) if pool == "mean" else gates.max(0)
                last = max(rows) + S - T
                allowed = [n for n in range(nk) if not causal or n * block_kv <= last]
                kept = [n for n in own[i] if n in allowed]
                others = sorted((n for n in allowed if n not in own[i]), key=lambda n: -gate[n])
                out[b, h, i, kept + others[:K - len(kept)]] = True
    return out


@pytest.mark.parametrize("pool,T,S,block_q,block_kv,top_k,causal", [
    ("mean", 40, 40, 8, 8, 3, True),   # MoBA's setting: aligned blocks, causal, a short last block
    ("max", 20, 36, 8, 4, 3, False),   # cross lengths: two own key blocks for some query blocks
    pytest.param("max", 40, 40, 8, 8, 3, True, marks=pytest.mark.slow),
    pytest.param("mean", 20, 36, 8, 4, 2, False, marks=pytest.mark.slow),
])
def test_moba_lists_equal_brute_force_top_k(pool, T, S, block_q, block_kv, top_k, causal):
    q, k, _ = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    sel = Moba(block_q=block_q, block_kv=block_kv, top_k=top_k, query_pool=pool)
    mask = masks.Causal() if causal else None
    blocks = jax.jit(lambda q, k: sel.select(q, k, mask=mask))(q, k)
    assert isinstance(blocks.indices, jax.Array)  # dynamic lists
    expected = moba_brute_force(q, k, block_q, block_kv, top_k, pool, causal)
    np.testing.assert_array_equal(np.asarray(to_block_mask(blocks)), expected)


# ----------------------------------------------------------------------------- MoBA per token

def moba_token_brute_force(q, k, block_kv, top_k, causal):
    """Per query token (moba_naive): its own block, then the best earlier (or, non-causal, any other)
    blocks by q_t·mean(K_block), top_k in all. Bool [B, Hq, T, nk]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    nk = math.ceil(S / block_kv)
    means = np.stack([blk.mean(1) for blk in _blocks_of(k, block_kv)], 1)  # [B, nk, Hkv, D]
    out = np.zeros((B, Hq, T, nk), bool)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                p = t + S - T
                gate = means[b, :, h // (Hq // Hkv)] @ q[b, t, h]
                own = p // block_kv
                others = [n for n in range(nk) if n != own and (not causal or n * block_kv <= p)]
                others.sort(key=lambda n: (-gate[n], n))
                out[b, h, t, [own] + others[:min(top_k, nk) - 1]] = True
    return out


MOBA_TOKEN = Moba(block_q=8, block_kv=4, top_k=3, granularity="token")


def _token_case(causal, T=37, S=None):
    q, k, v = random_qkv(jax.random.PRNGKey(6), B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    mask = masks.Causal() if causal else None
    chosen, lists = jax.jit(lambda q, k: (MOBA_TOKEN.token_blocks(q, k, mask=mask),
                                          MOBA_TOKEN.select(q, k, mask=mask)))(q, k)
    return (q, k, v), mask, chosen, lists


@pytest.mark.parametrize("causal,T,S", [(True, 37, None), pytest.param(False, 21, 30, marks=pytest.mark.slow)])
def test_moba_token_mask_equals_brute_force_rule(causal, T, S):
    """The fine mask's rows are the per-token rule; the lists are each query tile's union; the
    block summary never calls a tile with an allowed pair EMPTY; causal rows never see a later block."""
    (q, k, _), _, chosen, lists = _token_case(causal, T, S)
    S = S or T
    expected = moba_token_brute_force(q, k, 4, 3, causal)  # [B, Hq, T, nk]
    dense = np.asarray(chosen.dense(T, S))
    np.testing.assert_array_equal(dense, expected.repeat(4, -1)[..., :S])
    nq = math.ceil(T / 8)
    union = np.stack([expected[:, :, i * 8:(i + 1) * 8].any(2) for i in range(nq)], 2)
    np.testing.assert_array_equal(np.asarray(to_block_mask(lists)), union)
    summary = np.asarray(chosen.block_summary(T, S, 8, 8))
    tiles = np.pad(dense, [(0, 0), (0, 0), (0, -T % 8), (0, -S % 8)]).reshape(2, 4, nq, 8, -1, 8).any((3, 5))
    assert not (tiles & (summary == masks.EMPTY)).any() and (summary != masks.FULL).all()
    if causal:
        ids = np.asarray(chosen.ids)
        assert (ids * 4 <= np.arange(T)[:, None]).all()  # no block starts after the row
        assert (union.sum(-1) > 3).any()  # tokens of a tile disagree: the fine mask matters


def test_moba_token_engine_equals_dense_reference_forward_and_gradients():
    (q, k, v), mask, _, _ = _token_case(True)
    dense = masks.Explicit(jnp.asarray(moba_token_brute_force(q, k, 4, 3, True).repeat(4, -1)[..., :37]))

    def engine(q, k, v):
        return aj.attention(q, k, v, mechanism=MOBA_TOKEN, mask=mask, implementation="xla")

    def reference(q, k, v):
        return softmax_attention_reference(q, k, v, mask=mask & dense)

    (out, grads), (expected, expected_grads) = (outputs_and_grads(fn, (q, k, v), (0, 1, 2))
                                                for fn in (engine, reference))
    assert_close(out, expected)
    assert_close(jax.jit(lambda q, k, v: aj.attention(q, k, v, mechanism=MOBA_TOKEN, mask=mask,
                                                      implementation="reference"))(q, k, v), expected)
    for name, a, e in zip("qkv", grads, expected_grads):
        assert_close(a, e, name=f"d{name}")


def test_moba_token_config_errors():
    with pytest.raises(ValueError, match="granularity"):
        Moba(granularity="row")
    q, k, v = random_qkv(KEY, B=1, T=16, Hq=2, Hkv=2, D=8)
    with pytest.raises(NotImplementedError):  # the kernels don't evaluate the data-dependent fine mask
        jax.eval_shape(lambda q, k, v: aj.attention(q, k, v, mechanism=MOBA_TOKEN, mask=masks.Causal(),
                                                    implementation="pallas"), q, k, v)


# ----------------------------------------------------------------------------- VMoBA

@pytest.mark.parametrize("grid,partition,chunk,cell", [
    ((5, 4, 6), "1d", (2,), (2, 4, 6)),
    ((5, 4, 6), "2d", (2, 3), (5, 2, 3)),
    ((4, 4, 6), "3d", (2, 2, 3), (2, 2, 3)),
    ((4, 4, 6), "3d", (8, 2, 3), (4, 2, 3)),  # a chunk longer than its axis is clipped
])
def test_vmoba_permutation_is_a_bijection_with_contiguous_blocks(grid, partition, chunk, cell):
    perm, P = vmoba_permutation(grid, partition, chunk)
    N = int(np.prod(grid))
    assert P == int(np.prod(cell))
    np.testing.assert_array_equal(np.sort(perm), np.arange(N))
    coords = np.stack(np.unravel_index(perm, grid), -1)  # [N, 3] in permuted order
    cell_of = [tuple(c) for c in coords // np.array(cell)]
    runs = [set(cell_of[i:i + P]) for i in range(0, N, P)]
    assert all(len(r) == 1 for r in runs), "a block mixes partition cells"
    assert len({next(iter(r)) for r in runs}) == len(runs), "a partition cell is split over blocks"


def test_vmoba_partition_must_divide_the_grid_and_fill_whole_tiles():
    with pytest.raises(ValueError, match="must divide the grid"):
        vmoba_permutation((4, 5, 4), "2d", (2, 2))
    with pytest.raises(ValueError, match="multiple of block_q"):
        Vmoba(block_q=16, block_kv=16, grid=GRID, layer_index=2, chunk_3d=(2, 2, 2))
    with pytest.raises(ValueError, match="threshold"):
        Vmoba(threshold=0.0)


def threshold_brute_force(gate, forced, candidates, tau):
    gate = np.asarray(gate, np.float64)
    out = np.zeros(gate.shape, bool)
    for b in range(gate.shape[0]):
        for h in range(gate.shape[1]):
            g, f, c = gate[b, h], forced[b, h], candidates[b, h]
            valid = f | c
            lo, hi = g[valid].min(), g[valid].max()
            z = np.where(valid, (g - lo) / (hi - lo if hi - lo > 1e-6 else 1.0), 0.0)
            kept, acc = f.copy(), z[f].sum()
            for idx in sorted(zip(*np.nonzero(c)), key=lambda ij: -z[ij]):
                if acc >= tau * z.sum():
                    break
                kept[idx], acc = True, acc + z[idx]
            out[b, h] = kept
    return out


def test_threshold_selection_equals_brute_force():
    rng = numpy_rng(KEY)
    gate = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    forced = np.broadcast_to(np.eye(6, 7, dtype=bool), gate.shape)
    candidates = (rng.random(gate.shape) < 0.7) & ~forced
    select = jax.jit(lambda g, tau: threshold_select(g, forced, candidates, tau))
    for tau in (0.2, 0.5, 0.9):  # (τ = 1 makes the last, zero-score pair a float32 rounding tie)
        expected = threshold_brute_force(gate, forced, candidates, tau)
        np.testing.assert_array_equal(np.asarray(select(gate, tau)), expected, err_msg=f"tau={tau}")
        assert expected[~forced].any() and not expected[~forced].all()  # the threshold is doing something


def test_vmoba_select_equals_partition_level_brute_force():
    """3D cubes of 8 tokens = two tiles of 4: gate per cube, own cube, global threshold, then tiles."""
    sel = Vmoba(block_q=4, block_kv=4, grid=GRID, layer_index=5, chunk_3d=(2, 2, 2), threshold=0.4)
    assert sel.partition == "3d"
    q, k, _ = random_qkv(KEY, B=2, T=64, Hq=4, Hkv=2, D=8)
    perm, P = sel.permutation()
    qp, kp = np.asarray(q)[:, perm], np.asarray(k)[:, perm]
    qbar = np.stack([b.mean(1) for b in _blocks_of(qp.astype(np.float64), P)], 2)  # [B, Hq, n, D]
    kbar = np.stack([b.mean(1) for b in _blocks_of(kp.astype(np.float64), P)], 2)  # [B, Hkv, n, D]
    gate = np.einsum("bhid,bhnd->bhin", qbar, np.repeat(kbar, 2, axis=1))
    n = gate.shape[-1]
    forced = np.broadcast_to(np.eye(n, dtype=bool), gate.shape)
    part = threshold_brute_force(gate, forced, ~forced, 0.4)
    expected = part.repeat(P // 4, axis=2).repeat(P // 4, axis=3)
    blocks = jax.jit(lambda q, k: sel.select(q, k))(jnp.asarray(qp), jnp.asarray(kp))
    np.testing.assert_array_equal(np.asarray(to_block_mask(blocks)), expected)


# ----------------------------------------------------------------------------- PARO

def local_qk(grid, axes_per_head, scale=8.0):
    """q = k = scale·onehot(line id): token t attends (almost) only to its line along ``axis``."""
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), -1)
    heads = []
    for axis in axes_per_head:
        rest = [a for a in range(3) if a != axis]
        line = coords[:, rest[0]] * grid[rest[1]] + coords[:, rest[1]]
        heads.append(scale * np.eye(16, dtype=np.float32)[line])
    x = jnp.asarray(np.stack(heads, 1)[None])  # [1, N, H, 16]
    return x, x


def test_paro_chooses_the_order_with_the_local_axis_innermost():
    """Head 0 is local along width, head 1 along frames: each must pick an order ending in its axis."""
    q, k = local_qk(GRID, axes_per_head=(2, 0))
    orders, conc = jax.jit(lambda q, k: choose_permutation(q, k, GRID, 4, density=1 / 16))(q, k)
    orders = np.asarray(orders)
    assert AXIS_ORDERS[orders[0]][-1] == 2 and AXIS_ORDERS[orders[1]][-1] == 0, orders
    chosen = np.asarray(conc)[orders, [0, 1]]
    identity = np.asarray(conc)[0]  # frame-major FHW
    assert np.all(chosen > 0.99)
    assert identity[1] < 0.5  # frame-local head: scattered in frame-major order


def test_block_mass_rows_sum_to_one_and_concentration_is_top_share():
    q, k, _ = random_qkv(KEY, B=1, T=20, S=24, Hq=2, Hkv=1, D=8)
    mass, conc = jax.jit(lambda q, k: (lambda m: (m, block_concentration(m, 0.2)))(
        block_attention_mass(q, k, 8, 8, mask=masks.Causal())))(q, k)
    assert_close(mass.sum(-1), jnp.ones((1, 2, 3)))
    assert_close(conc, np.sort(np.asarray(mass), -1)[..., -1])


def test_paro_select_keeps_the_top_mass_blocks():
    q, k, _ = random_qkv(KEY, B=2, T=40, Hq=4, Hkv=2, D=8)
    sel = Paro(block_q=8, block_kv=8, density=0.4)
    blocks = jax.jit(lambda q, k: sel.select(q, k, mask=masks.Causal()))(q, k)
    s = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, 2)) / np.sqrt(8)
    s = np.where(np.tril(np.ones((40, 40), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mass = p.reshape(2, 4, 5, 8, 5, 8).sum((3, 5))
    mass = np.where(np.tril(np.ones((5, 5), bool)), mass, -1.0)
    top = np.argsort(-mass, -1)[..., :2]
    expected = np.zeros(mass.shape, bool)
    np.put_along_axis(expected, top, True, -1)
    np.testing.assert_array_equal(np.asarray(to_block_mask(blocks)), expected & (mass >= 0))


def test_permutation_helpers_round_trip_per_head():
    x = jnp.asarray(numpy_rng(KEY).standard_normal((2, 64, 3, 5)), jnp.float32)
    perm = np.stack([grid_permutation(GRID, AXIS_ORDERS[i]) for i in (1, 4, 5)])
    y = permute_tokens(x, perm)
    np.testing.assert_array_equal(np.asarray(y[:, :, 1]), np.asarray(x[:, perm[1], 1]))
    np.testing.assert_array_equal(np.asarray(permute_tokens(y, inverse_permutation(perm))), np.asarray(x))


def test_paro_config_errors():
    with pytest.raises(ValueError, match="needs a grid"):
        Paro(orders=(0,))
    with pytest.raises(ValueError, match="density"):
        Paro(density=1.5)
    q, k, v = random_qkv(KEY, B=1, T=64, Hq=2, Hkv=2, D=8)
    with pytest.raises(ValueError, match="one per KV head"):
        aj.attention(q, k, v, mechanism=Paro(block_q=8, block_kv=8, grid=GRID, orders=(0,)), implementation="reference")
    with pytest.raises(NotImplementedError, match="fine mask"):
        aj.attention(q, k, v, mechanism=Paro(block_q=8, block_kv=8, grid=GRID), mask=masks.Causal(),
                     implementation="reference")


# ----------------------------------------------------------------------------- INT8 attention

def _int_dots(jaxpr):
    """Every dot_general of the jaxpr (sub-jaxprs included) with int8 operands, as its output dtype."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and all(v.aval.dtype == jnp.int8 for v in eqn.invars):
            found.append(eqn.outvars[0].aval.dtype)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _int_dots(sub)
    return found


@pytest.mark.parametrize("mask", [None, pytest.param(masks.Causal(), marks=pytest.mark.slow)])
def test_quantized_attention_is_close_to_full_precision(mask):
    """INT8 QK and PV with per-block scales: relative RMS error < 2e-2 (measured 1.4-1.8e-2 unmasked)."""
    q, k, v = random_qkv(KEY, B=2, T=64, S=64, Hq=4, Hkv=2, D=16)

    def both(q, k, v):
        return (quantized_attention_reference(q, k, v, mask=mask, block_q=16, block_kv=16),
                softmax_attention_reference(q, k, v, mask=mask))

    out, ref = jax.jit(both)(q, k, v)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 1e-4 < rel < 2e-2, rel  # quantized (not exact), and close
    assert _int_dots(jax.make_jaxpr(both)(q, k, v).jaxpr) == [jnp.int32, jnp.int32]


# ----------------------------------------------------------------------------- through attnjax.attention

SLOW = pytest.mark.slow
SELECTORS = {
    "moba": (Moba(block_q=8, block_kv=8, top_k=3), masks.Causal()),
    "moba-max-noncausal": (Moba(block_q=16, block_kv=8, top_k=2, query_pool="max"), None),
    "vmoba-seq": (Vmoba(block_q=8, block_kv=8, threshold=0.5), masks.Causal()),
    "vmoba-1d": (Vmoba(block_q=8, block_kv=8, grid=GRID, layer_index=0, chunk_1d=1), None),
    "vmoba-2d": (Vmoba(block_q=8, block_kv=8, grid=GRID, layer_index=1, chunk_2d=(2, 2)), None),
    "vmoba-3d": (Vmoba(block_q=4, block_kv=4, grid=GRID, layer_index=2, chunk_3d=(2, 2, 2)), None),
    "paro-seq": (Paro(block_q=8, block_kv=8, density=0.3), masks.Causal()),
    "paro-orders": (Paro(block_q=8, block_kv=8, grid=GRID, orders=(4, 1), density=0.3), None),
    "paro-chosen": (Paro(block_q=8, block_kv=8, grid=GRID, density=0.3), None),
}
DEFAULT = ("moba", "vmoba-3d", "paro-chosen")


def _cases(names):
    return [n if n in DEFAULT else pytest.param(n, marks=SLOW) for n in names]


def equivalent_dense_mask(sel, q, k, mask):
    """The selector's lists (and the fine mask) as a token mask ``[B, Hq, T, S]`` in the ORIGINAL order."""
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    perm = None if getattr(sel, "grid", None) is None else jnp.broadcast_to(sel.token_permutation(q, k), (Hkv, T))
    if perm is not None:
        q, k = permute_tokens(q, perm.repeat(G, 0)), permute_tokens(k, perm)
    bm = to_block_mask(sel.select(q, k, mask=mask))
    dense = jnp.repeat(jnp.repeat(bm, sel.block_q, 2)[:, :, :T], sel.block_kv, 3)[..., :S]
    dense = jnp.broadcast_to(dense, (B, Hq, T, S))
    if mask is not None:
        dense = dense & mask.dense(T, S)
    if perm is not None:
        inv = inverse_permutation(perm).repeat(G, 0)
        dense = jnp.stack([dense[:, h][:, inv[h]][:, :, inv[h]] for h in range(Hq)], 1)
    return dense


@pytest.mark.parametrize("name", _cases(SELECTORS))
def test_selector_attention_equals_masked_softmax_reference(name):
    """attention(mechanism=selector) == softmax reference under the lists' dense mask (un-permuted)."""
    sel, mask = SELECTORS[name]
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=2, T=64, Hq=4, Hkv=2, D=8)

    @jax.jit
    def both(q, k, v):
        got = aj.attention(q, k, v, mechanism=sel, mask=mask, implementation="reference", return_lse=True)
        dense = equivalent_dense_mask(sel, q, k, mask)
        return got, softmax_attention_reference(q, k, v, mask=masks.Explicit(dense), return_lse=True), dense.mean()

    (out, lse), (ref_out, ref_lse), density = both(q, k, v)
    full = 1.0 if mask is None else float(np.asarray(mask.dense(64, 64)).mean())
    assert 0 < float(density) < full  # really sparse
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vmoba-2d", "paro-chosen"])
def test_permuted_selector_gradients_equal_masked_reference(name):
    sel, _ = SELECTORS[name]
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=1, T=64, Hq=2, Hkv=1, D=8)
    dense = masks.Explicit(jax.jit(lambda q, k: equivalent_dense_mask(sel, q, k, None))(q, k))
    assert_grads_close(jax.jit(lambda q, k, v: aj.attention(q, k, v, mechanism=sel, implementation="reference")),
                       jax.jit(lambda q, k, v: softmax_attention_reference(q, k, v, mask=dense)),
                       (q, k, v), argnums=(0, 1, 2), names="qkv")


def test_default_configs_run_on_odd_lengths():
    """Defaults (64-token blocks) on T = 37, causal, GQA: one block each, so exactly dense attention,
    and each selector says so."""
    q, k, v = random_qkv(KEY, B=1, T=37, Hq=4, Hkv=2, D=8)
    with pytest.warns(DenseSelectionWarning) as record:
        outs = jax.jit(lambda q, k, v: [aj.attention(q, k, v, mechanism=m, mask=masks.Causal())
                                        for m in ("moba", "vmoba", "paro", "softmax")])(q, k, v)
    assert {str(w.message).split("'")[1] for w in record} == {"moba", "vmoba", "paro"}
    for out in outs[:-1]:
        assert_close(out, outs[-1])


@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW) if n != "moba" else n for n in SELECTORS])
def test_xla_path_matches_reference(name):
    sel, mask = SELECTORS[name]
    q, k, v = random_qkv(jax.random.PRNGKey(5), B=2, T=64, Hq=4, Hkv=2, D=8)
    out = jax.jit(lambda q, k, v: [aj.attention(q, k, v, mechanism=sel, mask=mask, implementation=i)
                                   for i in ("xla", "reference")])(q, k, v)
    assert_close(*out)
