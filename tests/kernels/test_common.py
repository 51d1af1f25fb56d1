"""The kernels' shared scaffolding (``pallas_kernels.common``) against plain references.

``mask_plans``: the in-kernel mask plan, evaluated tile by tile, equals the mask's dense matrix
(``attnjax.masks.Mask.dense``); ``statics``: tile-size helpers against brute force; ``refusals``:
the requests the kernels refuse. ``gpu_flash`` and ``tpu_flash`` are tile bodies that run only inside
``pallas_call``: the flash and block-sparse kernel tests (``test_flash_gpu.py``,
``test_flash_tpu.py``, ``test_block_sparse.py``) compare them with the references, forward and
backward.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from pallas_kernels.common import mask_plans, refusals, statics

T, S, TILE = 11, 13, 8
T_PAD = S_PAD = 16
SEGMENT_IDS_Q = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3]])
SEGMENT_IDS_KV = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3]])
EXPLICIT = np.random.default_rng(0).random((2, 1, T, S)) < 0.6

MASKS = {
    "causal": masks.Causal(),
    "window": masks.SlidingWindow(3, 1),
    "left_window": masks.SlidingWindow(4, 0),
    "chunked": masks.ChunkedCausal(4),
    "segments": masks.Segments(SEGMENT_IDS_Q, SEGMENT_IDS_KV),
    "explicit": masks.Explicit(EXPLICIT),
    "causal_and_segments": masks.Causal() & masks.Segments(SEGMENT_IDS_Q, SEGMENT_IDS_KV),
    "window_or_explicit": masks.SlidingWindow(1, 1) | masks.Explicit(EXPLICIT),
}


def _evaluate(plan, data, b: int, h: int) -> np.ndarray:
    """The plan on every ``TILE x TILE`` tile of the padded grid, stitched into ``[T_pad, S_pad]``."""
    out = np.zeros((T_PAD, S_PAD), bool)
    for i in range(T_PAD // TILE):
        for j in range(S_PAD // TILE):
            rows, cols = mask_plans.tile_iotas(i, j, TILE, TILE)
            r, c = slice(i * TILE, (i + 1) * TILE), slice(j * TILE, (j + 1) * TILE)

            def load(kind, slot, r=r, c=c):
                d = data[slot]
                if kind == "segments":
                    bs = min(b, d.q.shape[0] - 1)
                    return d.q[bs, r][:, None], d.kv[bs, c][None, :]
                return d.mask[min(b, d.mask.shape[0] - 1), min(h, d.mask.shape[1] - 1), r, c]

            out[r, c] = np.asarray(mask_plans.eval_mask(plan, rows, cols, T, S, load))
    return out


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_plan_equals_the_dense_mask(name):
    mask = MASKS[name]
    plan, data = mask_plans.plan_mask(mask, T, S, T_PAD, S_PAD)
    dense = np.asarray(mask.dense(T, S))
    for b in range(2):
        expected = dense[min(b, dense.shape[0] - 1), 0]
        np.testing.assert_array_equal(_evaluate(plan, data, b, 0)[:T, :S], expected, err_msg=f"{name}, batch {b}")


class Unplannable(masks.Mask):
    """A mask kind the kernels don't know (its dense matrix is never asked for)."""


def test_mask_plan_refuses_masks_it_cannot_evaluate_in_kernel():
    assert mask_plans.plan_mask(None, T, S, T_PAD, S_PAD) == (None, [])
    with pytest.raises(NotImplementedError, match="in-kernel"):
        mask_plans.plan_mask(Unplannable(), T, S, T_PAD, S_PAD)


def test_next_power_of_2_and_pick_block_match_brute_force():
    for n in range(0, 300):
        assert statics.next_power_of_2(n) == min(p for p in (2 ** e for e in range(10)) if p >= max(n, 1))
    for block in (16, 32, 64, 128):
        for length in range(1, 300, 7):
            picked = statics.pick_block(block, length)
            assert picked & (picked - 1) == 0 and 16 <= picked <= max(block, 16)
            assert picked == max(16, min(block, statics.next_power_of_2(length)))
            assert statics.pick_block(block, length, minimum=8, power_of_two=False) == max(8, min(block, length))
    with pytest.raises(ValueError, match="power of two"):
        statics.pick_block(48, 100)
    with pytest.raises(ValueError, match="positive"):
        statics.pick_block(0, 100)


def test_refusals():
    ok = np.zeros((1, 4, 2, 64), np.float32)
    refusals.refuse_unserved("flash", ok, ok)
    with pytest.raises(NotImplementedError, match="head dims up to 256"):
        refusals.refuse_unserved("flash", np.zeros((1, 4, 2, 320), np.float32), ok)
    with pytest.raises(NotImplementedError, match="float32/bfloat16/float16"):
        refusals.refuse_unserved("flash", ok.astype(np.float64), ok)
    assert jnp.bfloat16 in refusals.DTYPES
