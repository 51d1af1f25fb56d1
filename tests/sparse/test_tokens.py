"""Token-sparse engine: sorted buckets and key lists (block union + bitmask, and gathers) against the
dense masked reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.blocked.lists import to_block_mask
from attnjax.sparse.tokens import (ALIGNED_MIN_TILES, GATHER_COST_RATIO, Buckets, KeyBits, KeyLists, TokenSelector,
                                   aligned_bucket_block_lists, bucket_block_lists, bucket_layout, bucket_tiles,
                                   choose_key_path, key_list_blocks, pair_density, routed_attention,
                                   sort_by_bucket, token_sparse_attention)
from tests.helpers import assert_close, random_qkv

B, T, S, HQ, HKV, D = 2, 37, 37, 4, 2, 8
NB = 3
TILES = dict(block_q=8, block_kv=8)
jitted = jax.jit(token_sparse_attention,
                 static_argnames=("mask", "implementation", "return_lse", "block_q", "block_kv", "key_path"))
MASKS = {"none": None, "causal": masks.Causal(), "window": masks.SlidingWindow(9, 0)}


def unbalanced_buckets(seed=0, T=T, S=S):
    """Random buckets where the first 20 queries of every head share bucket 0 (a large bucket)."""
    rng = np.random.default_rng(seed)
    q_ids = rng.integers(0, NB, (B, HQ, T))
    q_ids[..., :20] = 0
    return Buckets(jnp.asarray(q_ids, jnp.int32), jnp.asarray(rng.integers(0, NB, (B, HKV, S)), jnp.int32), NB)


def key_lists(shared: bool, seed=1):
    """Random lists with empty slots (-1, and an id past S) and duplicates; ``shared`` gives one list per head."""
    idx = np.random.default_rng(seed).integers(-1, S, (B, HQ, 1 if shared else T, 6))
    idx[..., 1] = idx[..., 0]
    idx[..., 2] = S + 3
    return KeyLists(jnp.asarray(idx, jnp.int32))


SELECTIONS = {"buckets": unbalanced_buckets(), "lists": key_lists(False), "shared_lists": key_lists(True)}


def loss(impl, selection, mask, q, k, v, key_path="auto"):
    out, lse = token_sparse_attention(q, k, v, selection, mask=mask, implementation=impl, return_lse=True,
                                      key_path=key_path, **TILES)
    return (out ** 2).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum(), (out, lse)


def outputs_and_loss_grads(impl, selection, mask, q, k, v, key_path="auto"):
    """``((out, lse), d loss / d(q, k, v))`` of one path from one compile (forward and gradients together)."""
    grads, outputs = jax.jit(jax.grad(lambda q, k, v: loss(impl, selection, mask, q, k, v, key_path),
                                      argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return outputs, grads


@functools.lru_cache(maxsize=None)
def reference_case(selection_name, mask_name):
    """``(q, k, v), ((out, lse), grads)`` of the reference on the shared inputs, computed once per case."""
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D)
    return (q, k, v), outputs_and_loss_grads("reference", SELECTIONS[selection_name], MASKS[mask_name], q, k, v)


def assert_matches_reference(fast, grads_fast, ref, grads_ref):
    assert_close(fast[0], ref[0], name="out")
    np.testing.assert_array_equal(np.isneginf(fast[1]), np.isneginf(ref[1]))
    finite = np.isfinite(np.asarray(ref[1]))
    assert_close(np.asarray(fast[1])[finite], np.asarray(ref[1])[finite], name="lse")
    for name, g_ref, g_fast in zip("qkv", grads_ref, grads_fast):
        assert_close(g_fast, g_ref, atol=1e-4, name=f"d{name}")


DEFAULT_PAIRS = {("buckets", "causal"), ("lists", "causal"), ("shared_lists", "window")}
"""The (selection, mask) pairs the default suite runs; the others are slow."""


@pytest.mark.parametrize("selection_name,mask_name", [
    pytest.param(sel, m, marks=() if (sel, m) in DEFAULT_PAIRS else pytest.mark.slow)
    for sel in SELECTIONS for m in MASKS])
def test_fast_path_matches_reference_forward_and_gradients(selection_name, mask_name):
    """The ``xla`` path as called by default (key lists: ``key_path="auto"``, both branches compiled)."""
    (q, k, v), (ref, grads_ref) = reference_case(selection_name, mask_name)
    fast, grads_fast = outputs_and_loss_grads("xla", SELECTIONS[selection_name], MASKS[mask_name], q, k, v)
    assert_matches_reference(fast, grads_fast, ref, grads_ref)


DEFAULT_KEY_PATH_CASES = {("blocks", "lists", "causal"), ("blocks", "shared_lists", "none")}


@pytest.mark.parametrize("key_path,selection_name,mask_name", [
    pytest.param(p, sel, m, marks=() if (p, sel, m) in DEFAULT_KEY_PATH_CASES else pytest.mark.slow)
    for p in ("blocks", "gather") for sel in ("lists", "shared_lists") for m in MASKS])
def test_each_key_list_path_matches_reference_forward_and_gradients(key_path, selection_name, mask_name):
    """Block union + bitmask and gathers, forced: GQA, T = 37 (not a multiple of the 8-row tiles),
    duplicates, ``-1`` and an id past ``S`` in every list."""
    (q, k, v), (ref, grads_ref) = reference_case(selection_name, mask_name)
    fast, grads_fast = outputs_and_loss_grads("xla", SELECTIONS[selection_name], MASKS[mask_name], q, k, v,
                                              key_path=key_path)
    assert_matches_reference(fast, grads_fast, ref, grads_ref)


def listed_and_fine(sel, mask, block_kv):
    """``key_list_blocks`` at 8-row tiles in one compile: the listed tiles (bool ``[B, HQ, nq, nk]``), the fine
    mask as a dense ``[Bm, Hm, T, S]`` and whether it is a bare ``KeyBits``."""
    kinds = []

    def run(sel):
        blocks, fine = key_list_blocks(sel, T, S, mask=mask, block_q=8, block_kv=block_kv)
        kinds.append(isinstance(fine, KeyBits))
        return to_block_mask(blocks), fine.dense(T, S)

    listed, dense = jax.jit(run)(sel)
    return np.asarray(listed), np.asarray(dense), kinds[0]


def test_auto_takes_the_block_union_for_local_lists_and_gathers_for_scattered_ones_at_run_time():
    """Two keys per query, 4 × 8 tiles: a dense union would cost more than the gathers, so "auto" decides
    on the actual union (one compile, both branches): local lists (each row's own and previous key)
    take the block path, scattered ones the gathers; both match the reference, forward and gradients."""
    tiles = dict(block_q=4, block_kv=8)
    assert choose_key_path(2, T, S, shared=False, mask=None, **tiles) == "runtime"
    rows = np.arange(T)[:, None]
    local = np.broadcast_to(np.concatenate([rows, rows - 1], -1), (B, HQ, T, 2))
    scattered = np.random.default_rng(5).integers(0, S, (B, HQ, T, 2))
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D)

    def loss_of(impl):
        def f(q, k, v, sel):
            out = token_sparse_attention(q, k, v, sel, implementation=impl, **tiles)
            return (out ** 2).sum(), out
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    auto, reference = loss_of("xla"), loss_of("reference")
    for idx, takes_blocks in ((local, True), (scattered, False)):
        sel = KeyLists(jnp.asarray(idx, jnp.int32))
        blocks, _ = key_list_blocks(sel, T, S, mask=None, **tiles)
        listed = int(blocks.counts.sum()) * 4 * 8
        assert (listed <= GATHER_COST_RATIO * B * HQ * T * 2) == takes_blocks
        (grads, out), (grads_ref, out_ref) = auto(q, k, v, sel), reference(q, k, v, sel)
        assert_close(out, out_ref, name="out")
        for name, g, g_ref in zip("qkv", grads, grads_ref):
            assert_close(g, g_ref, atol=1e-4, name=f"d{name}")


@pytest.mark.parametrize("shared", [False, True])
def test_key_list_blocks_are_the_block_union_and_the_bits_the_exact_selection(shared):
    """Brute force: tile ``(b, h, i)`` lists exactly the key blocks that its rows' allowed, in-range
    keys lie in (cut to the mask's blocks), and the fine mask is ``selection & mask`` pair by pair.
    Key blocks of 8 and 48 (a word of the bitmask spans blocks, and a block spans words)."""
    sel = key_lists(shared, seed=4)
    idx = np.asarray(sel.indices)
    for mask_name, block_kv in (("none", 8), ("causal", 48), ("window", 8)):
        mask = MASKS[mask_name]
        listed, fine_dense, is_bits = listed_and_fine(sel, mask, block_kv)
        allowed = np.ones((T, S), bool) if mask is None else np.asarray(mask.dense(T, S))[0, 0]
        expected_fine = np.zeros((B, HQ, T, S), bool)
        for b in range(B):
            for h in range(HQ):
                for i in range(T):
                    for j in idx[b, h, 0 if shared else i]:
                        if 0 <= j < S:
                            expected_fine[b, h, i, j] = allowed[i, j]
        pad_t, pad_s = -T % 8, -S % block_kv
        expected_union = np.pad(expected_fine, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))
        expected_union = expected_union.reshape(B, HQ, (T + pad_t) // 8, 8, -1, block_kv).any((3, 5))
        if shared:  # one list for every row: the union does not depend on the rows, only the mask's blocks cut it
            rows = np.zeros((B, HQ, 1, S + pad_s), bool)
            rows[..., :S] = np.asarray(sel.dense(1, S))
            blk = rows.reshape(B, HQ, 1, -1, block_kv).any(-1)
            ab = np.pad(allowed, ((0, pad_t), (0, pad_s))).reshape((T + pad_t) // 8, 8, -1, block_kv).any((1, 3))
            expected_union = blk & ab
        np.testing.assert_array_equal(listed, np.broadcast_to(expected_union, listed.shape), err_msg=mask_name)
        assert is_bits == (not shared or mask is None)
        np.testing.assert_array_equal(np.broadcast_to(fine_dense, expected_fine.shape), expected_fine,
                                      err_msg=mask_name)


def test_cross_lengths_use_bottom_right_alignment():
    q, k, v = random_qkv(jax.random.PRNGKey(1), B=B, T=13, S=S, Hq=HQ, Hkv=HKV, D=D)
    sel = Buckets(unbalanced_buckets(T=13).q_ids[..., :13] % NB, unbalanced_buckets().kv_ids, NB)
    args = dict(mask=masks.Causal(), **TILES)
    assert_close(jitted(q, k, v, sel, implementation="xla", **args),
                 jitted(q, k, v, sel, implementation="reference", **args))


def test_bucket_lists_cover_every_selected_pair_and_stop_at_the_causal_frontier():
    """Brute force: in the sorted layout every allowed pair lies in a listed tile, each list is one
    contiguous range, and under ``causal`` its last tile still holds an allowed pair."""
    sel = unbalanced_buckets(seed=3)
    q_order = jnp.argsort(sel.q_ids, axis=-1, stable=True)
    kv_order = jnp.repeat(jnp.argsort(sel.kv_ids, axis=-1, stable=True), HQ // HKV, axis=1)
    q_ids = np.asarray(jnp.take_along_axis(sel.q_ids, q_order, -1))
    kv_ids = np.repeat(np.asarray(jnp.take_along_axis(sel.kv_ids, kv_order[:, ::2], -1)), HQ // HKV, axis=1)
    for causal in (False, True):
        blocks = bucket_block_lists(jnp.asarray(q_ids), jnp.asarray(kv_ids), q_order, kv_order, num_buckets=NB,
                                    causal=causal, S=S, **TILES)
        listed = np.asarray(to_block_mask(blocks))
        qo, ko = np.asarray(q_order), np.asarray(kv_order)
        for b in range(B):
            for h in range(HQ):
                for i in range(T):
                    for j in range(S):
                        allowed = q_ids[b, h, i] == kv_ids[b, h, j] and (not causal or qo[b, h, i] >= ko[b, h, j])
                        assert not allowed or listed[b, h, i // 8, j // 8], (b, h, i, j)
                for t in range(listed.shape[2]):
                    rows = slice(8 * t, min(T, 8 * t + 8))
                    tiles = np.flatnonzero(listed[b, h, t])
                    assert len(tiles) == 0 or tiles.max() - tiles.min() + 1 == len(tiles), "one contiguous range"
                    if causal and listed[b, h, t].any():
                        last = np.flatnonzero(listed[b, h, t]).max()
                        cols = slice(8 * last, min(S, 8 * last + 8))
                        ok = (q_ids[b, h, rows][:, None] == kv_ids[b, h, cols][None, :]) & (
                            qo[b, h, rows][:, None] >= ko[b, h, cols][None, :])
                        assert ok.any(), "the last listed tile holds an allowed pair"


ALIGNED_TILES = dict(block_q=4, block_kv=4)
"""Tiles at which the sorted-bucket path takes the tile-aligned layout (expected buckets of 12 rows: 3 tiles)."""


@pytest.mark.parametrize("mask_name", [pytest.param(m, marks=() if m == "causal" else pytest.mark.slow)
                                       for m in MASKS])
def test_aligned_bucket_path_matches_reference_forward_and_gradients(mask_name):
    """Buckets starting on tile boundaries (4-row tiles): unbalanced buckets (one holds 20+ queries per
    head), GQA, T = 37 (odd), lse and gradients equal the dense masked reference."""
    assert T >= ALIGNED_MIN_TILES * NB * ALIGNED_TILES["block_q"] and S >= ALIGNED_MIN_TILES * NB * 4
    (q, k, v), (ref, grads_ref) = reference_case("buckets", mask_name)
    grads, outputs = jax.jit(jax.grad(
        lambda q, k, v: _aligned_loss(SELECTIONS["buckets"], MASKS[mask_name], q, k, v), argnums=(0, 1, 2),
        has_aux=True))(q, k, v)
    assert_matches_reference(outputs, grads, ref, grads_ref)


def _aligned_loss(selection, mask, q, k, v):
    out, lse = token_sparse_attention(q, k, v, selection, mask=mask, implementation="xla", return_lse=True,
                                      **ALIGNED_TILES)
    return (out ** 2).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum(), (out, lse)


@pytest.mark.slow
def test_aligned_bucket_path_with_more_queries_than_keys_and_empty_rows():
    """Cross lengths (T = 45 > S = 29, bottom-right causal alignment: the first 16 queries see no key) on the
    aligned layout, forward and lse."""
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=B, T=45, S=29, Hq=HQ, Hkv=HKV, D=D)
    sel = Buckets(unbalanced_buckets(T=45).q_ids, unbalanced_buckets(S=29).kv_ids, NB)
    args = dict(mask=masks.Causal(), return_lse=True, block_q=4, block_kv=4)
    out, lse = jitted(q, k, v, sel, implementation="xla", **args)
    ref_out, ref_lse = jitted(q, k, v, sel, implementation="reference", **args)
    assert_close(out, ref_out)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    assert bool(np.isneginf(lse[:, :16]).all())


def test_aligned_layout_starts_buckets_on_tiles_and_lists_cover_every_selected_pair():
    """Brute force on the aligned layout (4-row tiles, GQA, unbalanced buckets): ``src``/``dst`` are inverse,
    every tile's rows lie in one bucket, every allowed pair lies in a listed tile, and under ``causal``
    a list's last tile still holds an allowed pair."""
    sel = unbalanced_buckets(seed=3)
    ql, kl = jax.jit(lambda s: (bucket_layout(s.q_ids, NB, block=4, aligned=True),
                                bucket_layout(s.kv_ids, NB, block=4, aligned=True)))(sel)
    src_q, src_k, dst_q = np.asarray(ql.src), np.asarray(kl.src), np.asarray(ql.dst)
    q_ids, kv_ids = np.asarray(sel.q_ids), np.asarray(sel.kv_ids)
    bucket_q = np.where(src_q >= 0, np.take_along_axis(q_ids, np.maximum(src_q, 0), -1), -1)
    bucket_k = np.where(src_k >= 0, np.take_along_axis(kv_ids, np.maximum(src_k, 0), -1), -1)
    np.testing.assert_array_equal(np.take_along_axis(src_q, dst_q, -1), np.broadcast_to(np.arange(T), dst_q.shape))
    for bucket in (bucket_q, bucket_k):
        tiles = bucket.reshape(*bucket.shape[:2], -1, 4)
        real = np.where(tiles >= 0, tiles, tiles.max(-1, keepdims=True))
        assert (real == real[..., :1]).all(), "one bucket per tile"
    G = HQ // HKV
    for causal in (False, True):
        blocks = aligned_bucket_block_lists(ql, kl, causal=causal, T=T, S=S, block_q=4, block_kv=4,
                                            width=src_k.shape[-1] // 4)
        listed = np.asarray(to_block_mask(blocks))
        for b in range(B):
            for h in range(HQ):
                qb, kb, qo, ko = bucket_q[b, h], bucket_k[b, h // G], src_q[b, h], src_k[b, h // G]
                allowed = (qb[:, None] == kb[None, :]) & (qb[:, None] >= 0)
                if causal:
                    allowed &= qo[:, None] >= ko[None, :]
                tile_allowed = allowed.reshape(len(qb) // 4, 4, len(kb) // 4, 4).any((1, 3))
                assert not (tile_allowed & ~listed[b, h]).any(), (b, h, causal)
                for t in np.flatnonzero(listed[b, h].any(-1)):
                    assert tile_allowed[t, np.flatnonzero(listed[b, h, t]).max()], "the last listed tile is used"


def test_bucket_sort_falls_back_to_argsort_when_the_key_overflows():
    """``id·L + position`` would pass int32 for 2**26 buckets at L = 37: the stable argsort gives the same order."""
    ids = unbalanced_buckets().q_ids
    for got, want in zip(sort_by_bucket(ids, 2 ** 26), sort_by_bucket(ids, NB)):
        np.testing.assert_array_equal(got, want)


def test_bucket_tiles_grow_with_the_expected_bucket():
    assert bucket_tiles(4096, 8) == (128, 64) and bucket_tiles(8192, 8) == (256, 64)
    assert bucket_tiles(T, NB) == (64, 64) and bucket_tiles(1 << 20, 8) == (256, 64)


def test_rows_without_keys_are_zero_and_bf16_is_finite():
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D, dtype=jnp.bfloat16)
    sel = Buckets(jnp.full((B, HQ, T), 2, jnp.int32).at[..., :5].set(0), jnp.ones((B, HKV, S), jnp.int32), NB)
    for tiles in (TILES, ALIGNED_TILES):
        out = jitted(q, k, v, sel, implementation="xla", **tiles)
        assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
        assert float(jnp.abs(out.astype(jnp.float32)).max()) == 0.0
    lists = KeyLists(jnp.full((B, HQ, T, 3), -1, jnp.int32))
    assert float(jnp.abs(jitted(q, k, v, lists, implementation="xla")).max()) == 0.0
    lists = KeyLists(jnp.full((B, HQ, T, 3), -1, jnp.int32).at[..., 8:, 0].set(2))  # the first 8 rows see nothing
    out = jitted(q, k, v, lists, implementation="xla", key_path="blocks", **TILES)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    assert float(jnp.abs(out[:, :8].astype(jnp.float32)).max()) == 0.0 and float(jnp.abs(out[:, 8:]).min()) > 0


def test_bad_selections_raise_naming_the_argument():
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D)
    with pytest.raises(ValueError, match=r"Buckets.q_ids has shape \(2, 4, 36\)"):
        token_sparse_attention(q, k, v, Buckets(jnp.zeros((B, HQ, T - 1), jnp.int32),
                                                jnp.zeros((B, HKV, S), jnp.int32), NB))
    with pytest.raises(TypeError, match="Buckets.kv_ids must be integers"):
        token_sparse_attention(q, k, v, Buckets(jnp.zeros((B, HQ, T), jnp.int32), jnp.zeros((B, HKV, S)), NB))
    with pytest.raises(ValueError, match=r"KeyLists.indices has shape \(2, 2, 37, 3\)"):
        token_sparse_attention(q, k, v, KeyLists(jnp.zeros((B, HKV, T, 3), jnp.int32)))
    with pytest.raises(TypeError, match="selection must be"):
        token_sparse_attention(q, k, v, jnp.zeros((B, HQ, T, S), bool))
    with pytest.raises(ValueError, match="key_path must be one of"):
        token_sparse_attention(q, k, v, key_lists(False), key_path="blocky")


@dataclasses.dataclass(frozen=True)
class _LocalHalves(TokenSelector):
    """A toy selector: bucket = which half of the sequence a token lies in."""

    name = "local_halves"
    paper = "test"
    block_q: int = 8
    block_kv: int = 8

    def select(self, q, k, *, mask=None):
        halves = lambda x: jnp.broadcast_to((jnp.arange(x.shape[1]) * 2 // x.shape[1]).astype(jnp.int32),
                                            (x.shape[0], x.shape[2], x.shape[1]))
        return Buckets(halves(q), halves(k), 2)


@pytest.mark.slow
def test_token_selector_paths_agree():
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D)
    sel = _LocalHalves()
    fast = routed_attention(sel, "xla", q, k, v, mask=masks.Causal())
    assert_close(fast, routed_attention(sel, "reference", q, k, v, mask=masks.Causal()))
    assert set(sel.implementations()) == {"reference", "xla"}


@pytest.mark.parametrize("selection_name", list(SELECTIONS))
def test_pair_density_counts_the_dense_selection(selection_name):
    sel = SELECTIONS[selection_name]
    for causal in (False, True):
        allowed = np.asarray(sel.dense(T, S))
        if causal:
            allowed = allowed & np.tril(np.ones((T, S), bool))
        dense = T * (T + 1) / 2 if causal else T * S
        assert pair_density(sel, T, S, causal=causal) == pytest.approx(allowed.sum((-2, -1)).mean() / dense)
