"""A selector whose config lists every allowed block at the given lengths says so: ``DenseSelectionWarning``.

The rule (``BlockSelector.selects_every_block``, static) is checked against brute force: run the
selector on random q, k over a small grid of lengths, block sizes, masks and configs, and ask whether
its lists hold every block the mask allows. For selectors whose lists follow from the config (the
static patterns, MoA) or from a top-k of the allowed blocks (MoBA, Seer's top-k, PARO) the warning
comes iff the lists are whole; for threshold selectors (XAttention, VMoBA, Seer's threshold) whether
everything is kept depends on the data, so a warning must imply whole lists.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.sparse import (S2, DenseSelectionWarning, Dilated, MoA, Moba, Paro, Power, Radial, Seer, SparseWindow,
                            Streaming, Vmoba, XAttention, allowed_blocks, to_block_mask)
from attnjax.sparse.engine import warn_if_dense
from tests.helpers import random_qkv

H = 2
SHAPES = [(16, 16), (40, 40), (24, 40)]  # (T, S); T < S is bottom-right aligned
BLOCKS = [(8, 8), (8, 16)]
MASKS = [None, masks.Causal(), masks.SlidingWindow(12, 0)]
CROSS = (24, 40)

STATIC = {
    "sparse_window": lambda bq, bk: [SparseWindow(window_blocks=w, block_q=bq, block_kv=bk) for w in (0, 1, 3)],
    "dilated": lambda bq, bk: [Dilated(span_blocks=s, dilation=r, block_q=bq, block_kv=bk)
                               for s, r in ((2, 1), (4, 2), (1, 1))],
    "streaming": lambda bq, bk: [Streaming(sink_blocks=n, window_blocks=w, block_q=bq, block_kv=bk)
                                 for n, w in ((1, 1), (1, 3), (0, 2))],
    "power": lambda bq, bk: [Power(window_blocks=w, block_q=bq, block_kv=bk) for w in (0, 1, 2)],
    "radial": lambda bq, bk: [Radial(frame_shape=f, sink_frames=n, block_q=bq, block_kv=bk)
                              for f, n in (((2, 2), 0), ((2, 4), 1))],
    "s2": lambda bq, bk: [S2(num_shards=n, window_blocks=w, block_q=bq, block_kv=bk)
                          for n, w in ((2, 0), (2, 1), (1, 0))],
    "moa": lambda bq, bk: [MoA(block_q=bq, block_kv=bk, alphas=(a,), betas=(b,), sink=8)
                           for a, b in ((8.0, 0.0), (16.0, 0.25), (40.0, 0.0))],
}
# Selectors that score q and k: each (lengths, blocks, mask) group compiles once, so their grids are smaller.
TOP_K = {
    "moba": ([(40, 40), CROSS], MASKS, lambda bq, bk: [Moba(block_q=bq, block_kv=bk, top_k=t) for t in (2, 3, 5)]),
    "seer": ([(40, 40)], MASKS[1:], lambda bq, bk: [Seer(block_q=bq, block_kv=bk, top_k=t) for t in (2, 3)]),
    "paro": ([CROSS], MASKS[1:], lambda bq, bk: [Paro(block_q=bq, block_kv=bk, density=d) for d in (0.5, 1.0)]),
}
THRESHOLD = {
    "xattention": lambda bq, bk: [XAttention(block_q=bq, block_kv=bk, stride=4, threshold=t, max_blocks=m)
                                  for t, m in ((0.5, None), (1.0, 1))],
    "vmoba": lambda bq, bk: [Vmoba(block_q=bq, block_kv=bk, threshold=0.25)],
    "seer_threshold": lambda bq, bk: [Seer(block_q=bq, block_kv=bk, top_k=3, threshold=0.5)],
}


@functools.lru_cache(maxsize=None)
def _qk(T, S):
    q, k, _ = random_qkv(jax.random.PRNGKey(T * 100 + S), B=1, T=T, S=S, Hq=H, Hkv=H, D=4)
    return q, k


def _covers_allowed(configs, T, S, mask, compiled=False) -> list:
    """Brute force, per config: do the selector's lists, on random q and k, hold every block the mask allows?"""
    def listed(q, k):
        return [to_block_mask(c.select(q, k, mask=mask)) for c in configs]

    q, k = _qk(T, S)
    blocks = jax.jit(listed)(q, k) if compiled else listed(q, k)
    return [bool(np.all(np.asarray(b) | ~allowed_blocks(mask, T, S, c.block_q, c.block_kv)))
            for c, b in zip(configs, blocks)]


def _warns(config, T, S, mask) -> bool:
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        warn_if_dense(config, T, S, H, mask)
    return any(issubclass(w.category, DenseSelectionWarning) for w in log)


def _check_iff(groups):
    """``groups`` of ``(configs, T, S, mask, compiled)``: the warning comes iff the lists are whole,
    and the grid holds both outcomes."""
    outcomes = set()
    for configs, T, S, mask, compiled in groups:
        for config, covered in zip(configs, _covers_allowed(configs, T, S, mask, compiled)):
            assert _warns(config, T, S, mask) == covered, (config, T, S, mask, covered)
            outcomes.add(covered)
    assert outcomes == {True, False}, "the grid must hold dense and sparse cases"


@pytest.mark.parametrize("name", list(STATIC))
def test_static_patterns_warn_iff_the_lists_hold_every_allowed_block(name):
    _check_iff((STATIC[name](bq, bk), T, S, mask, False) for T, S in SHAPES for bq, bk in BLOCKS for mask in MASKS)


@pytest.mark.parametrize("name", list(TOP_K))
def test_top_k_selectors_warn_iff_the_lists_hold_every_allowed_block(name):
    shapes, masks_, factory = TOP_K[name]
    _check_iff((factory(8, 8), T, S, mask, True) for T, S in shapes for mask in masks_)


@pytest.mark.parametrize("name", list(THRESHOLD))
def test_threshold_selectors_warn_only_when_the_lists_are_whole(name):
    warned = 0
    for T, S in SHAPES:
        for bq, bk in BLOCKS:
            for mask in MASKS[:2]:
                for config in THRESHOLD[name](bq, bk):
                    if _warns(config, T, S, mask):
                        warned += 1
                        assert _covers_allowed([config], T, S, mask, True) == [True], (config, T, S, mask)
    assert warned, f"the grid of {name} must hold a case that is dense by its config"


def test_a_data_mask_counts_as_allowing_every_block():
    """The blocks a data mask allows are unknown at trace time: a top-k must fit every block."""
    segments = masks.Segments(jnp.zeros((1, 48), jnp.int32), jnp.zeros((1, 48), jnp.int32))
    window = masks.SlidingWindow(8, 0)  # a query block of 8 sees at most 2 key blocks of 8
    assert _warns(Moba(block_q=8, block_kv=8, top_k=2), 48, 48, window)
    assert not _warns(Moba(block_q=8, block_kv=8, top_k=2), 48, 48, window & segments)
    assert _warns(Moba(block_q=8, block_kv=8, top_k=6), 48, 48, window & segments)


def _run(config, T, mask=masks.Causal()):
    """Trace ``attnjax.attention`` (as jit does, without compiling): the warning comes at trace time."""
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=1, T=T, S=T, Hq=H, Hkv=H, D=4)
    return jax.eval_shape(lambda q, k, v: attnjax.attention(q, k, v, mechanism=config, mask=mask), q, k, v)


def test_attention_warns_once_per_configuration_at_trace_time():
    dense = Moba(block_q=8, block_kv=8, top_k=3)
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("default")
        for T in (24, 24, 17, 24):  # nk = 3 at both lengths: every causal block fits in the top 3
            _run(dense, T)
        _run(Moba(block_q=8, block_kv=8, top_k=2), 24)  # a query block sees up to 3 blocks: sparse
    messages = [str(w.message) for w in log if issubclass(w.category, DenseSelectionWarning)]
    assert len(messages) == 2, messages
    assert messages[0].startswith("mechanism 'moba' selects every block at T=24, S=24, mask=Causal() "
                                  "(block_q=8, block_kv=8, top_k=3, query_pool='mean', granularity='block'): this is "
                                  "dense softmax")
    assert "T=17, S=17" in messages[1]


def test_the_warning_class_filters_it():
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=DenseSelectionWarning)
        _run(SparseWindow(window_blocks=8, block_q=8, block_kv=8), 16)
    assert not log
    assert issubclass(DenseSelectionWarning, UserWarning)
