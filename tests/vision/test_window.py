"""Window partition / merge and window attention against explicit loops over the windows (Swin, sec. 3.2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.window import (relative_position_bias, window_attention, window_grid, window_merge,
                                   window_partition, window_valid)
from tests.helpers import assert_close


def windows_by_loop(x, wh, ww):
    """Each window of the zero-padded map, batch-major then row-major over windows, tokens row-major."""
    B, H, W, C = x.shape
    nh, nw = -(-H // wh), -(-W // ww)
    padded = np.zeros((B, nh * wh, nw * ww, C), x.dtype)
    padded[:, :H, :W] = x
    return np.stack([padded[b, i * wh:(i + 1) * wh, j * ww:(j + 1) * ww].reshape(wh * ww, C)
                     for b in range(B) for i in range(nh) for j in range(nw)])


@pytest.mark.parametrize("shape, window", [((2, 6, 6, 3), 3), ((2, 5, 7, 3), 3), ((1, 5, 7, 2), (2, 4)),
                                           ((1, 4, 4, 2), (4, 4))])
def test_partition_matches_a_loop_and_merge_inverts_it(shape, window):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    wh, ww = (window, window) if isinstance(window, int) else window
    parts = window_partition(jnp.asarray(x), window)
    nh, nw = window_grid(shape[1], shape[2], window)
    assert parts.shape == (shape[0] * nh * nw, wh * ww, shape[3])
    np.testing.assert_array_equal(np.asarray(parts), windows_by_loop(x, wh, ww))
    np.testing.assert_array_equal(np.asarray(window_merge(parts, window, shape[1], shape[2])), x)
    valid = window_valid(shape[1], shape[2], window)
    ones = windows_by_loop(np.ones(shape[:3] + (1,), np.float32), wh, ww)[:nh * nw, :, 0]
    np.testing.assert_array_equal(valid, ones == 1)


def test_relative_position_bias_indexes_query_minus_key():
    table = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)  # window 2 x 3
    bias = np.asarray(relative_position_bias(jnp.asarray(table), (2, 3)))
    for i in range(6):
        for j in range(6):
            (yi, xi), (yj, xj) = divmod(i, 3), divmod(j, 3)
            assert bias[1, i, j] == table[1, yi - yj + 1, xi - xj + 2]


def window_attention_by_loop(q, k, v, wh, ww, bias):
    """Softmax attention on each window's real pixels (border windows cropped), one window at a time."""
    B, H, W, heads, D = q.shape
    out = jnp.zeros(v.shape, jnp.float32)
    for i0 in range(0, H, wh):
        for j0 in range(0, W, ww):
            rows, cols = range(i0, min(i0 + wh, H)), range(j0, min(j0 + ww, W))
            # position of each real pixel inside the full window, to pick its relative position bias
            idx = np.array([(r - i0) * ww + (c - j0) for r in rows for c in cols])
            qs, ks, vs = (a[:, i0:i0 + wh, j0:j0 + ww].reshape(B, len(idx), heads, -1) for a in (q, k, v))
            logits = jnp.einsum("bthd,bshd->bhts", qs, ks, precision="highest") / np.sqrt(D)
            if bias is not None:
                logits = logits + bias[:, idx][:, :, idx]
            o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), vs, precision="highest")
            out = out.at[:, i0:i0 + wh, j0:j0 + ww].set(o.reshape(B, len(rows), len(cols), heads, -1))
    return out


def test_window_attention_equals_a_loop_over_windows():
    """A 5x5 map in 2x3 windows: border windows padded on both axes, a relative position bias, Dv != D."""
    hw, (wh, ww) = (5, 5), (2, 3)
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(2, *hw, 2, 4)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(2, *hw, 2, 3)), jnp.float32)
    bias = relative_position_bias(jnp.asarray(rng.normal(size=(2, 2 * wh - 1, 2 * ww - 1)), jnp.float32), (wh, ww))
    out = jax.jit(lambda q, k, v, b: window_attention(q, k, v, (wh, ww), bias=b))(q, k, v, bias)
    assert out.shape == (2, *hw, 2, 3)
    expected = jax.jit(window_attention_by_loop, static_argnums=(3, 4))(q, k, v, wh, ww, bias)
    assert_close(out, expected, rtol=1e-5, name="window attention")


def test_bad_inputs_name_the_argument():
    x = jnp.ones((2, 6, 6, 4))
    with pytest.raises(ValueError, match="window must be a positive int or a pair"):
        window_partition(x, 0)
    with pytest.raises(ValueError, match="window must be a positive int or a pair"):
        window_partition(x, (2, 3, 4))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, channels\], got a float32\[6, 6, 4\]"):
        window_partition(x[0], 3)
    with pytest.raises(ValueError, match=r"windows must have shape \[B·4, 9, C\] for a 6x6 map in 3x3 windows"):
        window_merge(jnp.ones((8, 8, 4)), 3, 6, 6)
    with pytest.raises(ValueError, match=r"table must have shape \[heads, 5, 5\] for a 3x3 window"):
        relative_position_bias(jnp.ones((2, 3, 3)), 3)
    q = jnp.ones((2, 6, 6, 2, 4))
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\]"):
        window_attention(q[0], q, q, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \[heads, wh·ww, wh·ww\] = \[2, 9, 9\]"):
        window_attention(q, q, q, 3, bias=jnp.ones((2, 4, 4)))
