"""Window, shifted-window and grid attention (Swin, MaxViT, CrossFormer) against independent constructions.

The shifted windows are checked against Swin's own recipe written out here (pad, ``torch.roll``-style cyclic
shift, window partition, the ``img_mask`` region count and ``attn_mask``, attention per window, reverse shift:
microsoft/Swin-Transformer ``SwinTransformerBlock``), and every op against a dense masked softmax whose mask is
built from pixel coordinates in this file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.vision.window import (Windows, grid_attention, grid_attention_reference, grid_merge, grid_partition,
                                   relative_position_bias, relative_position_index, window_attention,
                                   window_attention_reference, window_grid, window_merge, window_partition,
                                   window_valid)
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


def test_grid_partition_groups_pixels_an_interval_apart_and_merge_inverts_it():
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    (ih, iw), (gh, gw) = (2, 3), (3, 3)                       # padded to 6 x 9
    groups = np.asarray(grid_partition(jnp.asarray(x), (ih, iw), (gh, gw)))
    padded = np.zeros((2, 6, 9, 3), np.float32)
    padded[:, :5, :7] = x
    for b in range(2):
        for r in range(ih):
            for s in range(iw):
                expected = [padded[b, m * ih + r, n * iw + s] for m in range(gh) for n in range(gw)]
                np.testing.assert_array_equal(groups[(b * ih + r) * iw + s], expected)
    np.testing.assert_array_equal(np.asarray(grid_merge(jnp.asarray(groups), (ih, iw), (gh, gw), 5, 7)), x)


def test_relative_position_index_is_swins():
    """Swin's construction: coords stacked from a meshgrid, pairwise differences shifted to start at 0, the row
    offset multiplied by 2·ww − 1."""
    wh, ww = 2, 3
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    relative[:, :, 0] += wh - 1
    relative[:, :, 1] += ww - 1
    relative[:, :, 0] *= 2 * ww - 1
    np.testing.assert_array_equal(relative_position_index((wh, ww)), relative.sum(-1))
    table = np.arange(3 * 5 * 2, dtype=np.float32).reshape(15, 2)
    np.testing.assert_array_equal(relative_position_bias(jnp.asarray(table), (wh, ww)),
                                  table[relative.sum(-1)].transpose(2, 0, 1))


def swin_recipe(q, k, v, wh, ww, sh, sw, table):
    """Swin's shifted-window attention, step by step as its block does it; padded keys masked."""
    B, H, W, heads, D = q.shape
    hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
    pad = ((0, 0), (0, hp - H), (0, wp - W), (0, 0), (0, 0))
    q, k, v = (jnp.roll(jnp.pad(a, pad), (-sh, -sw), axis=(1, 2)) for a in (q, k, v))
    img_mask = np.zeros((hp, wp))
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh if sh else None), slice(-sh if sh else hp, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw if sw else None), slice(-sw if sw else wp, None)):
            img_mask[hs, ws] = cnt
            cnt += 1
    real = np.zeros((hp, wp), bool)
    real[:H, :W] = True
    real = np.roll(real, (-sh, -sw), axis=(0, 1))
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    dy, dx = coords[0][:, None] - coords[0][None, :] + wh - 1, coords[1][:, None] - coords[1][None, :] + ww - 1
    bias = table[dy * (2 * ww - 1) + dx].transpose(2, 0, 1)
    out = jnp.zeros(q.shape[:4] + v.shape[-1:], jnp.float32)
    for i in range(0, hp, wh):
        for j in range(0, wp, ww):
            qs, ks, vs = (a[:, i:i + wh, j:j + ww].reshape(B, wh * ww, heads, -1) for a in (q, k, v))
            region = img_mask[i:i + wh, j:j + ww].reshape(-1)
            allowed = (region[:, None] == region[None, :]) & real[i:i + wh, j:j + ww].reshape(-1)[None, :]
            logits = jnp.einsum("bthd,bshd->bhts", qs, ks, precision="highest") / np.sqrt(D) + bias
            weights = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
            o = jnp.einsum("bhts,bshd->bthd", weights, vs, precision="highest")
            out = out.at[:, i:i + wh, j:j + ww].set(o.reshape(B, wh, ww, heads, -1))
    return jnp.roll(out, (sh, sw), axis=(1, 2))[:, :H, :W]


def inputs(shape, dv=3, seed=0, window=(3, 3)):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=shape[:4] + (dv,)), jnp.float32)
    wh, ww = window
    table = jnp.asarray(rng.normal(size=((2 * wh - 1) * (2 * ww - 1), shape[3])), jnp.float32)
    return q, k, v, table


@pytest.mark.parametrize("hw, window, shift", [((6, 6), (3, 3), (1, 1)), ((7, 11), (4, 4), (2, 1)),
                                               ((5, 7), (2, 3), (0, 0))])
def test_shifted_windows_equal_swins_roll_and_mask_recipe(hw, window, shift):
    q, k, v, table = inputs((2, *hw, 2, 4), window=window)
    recipe = jax.jit(swin_recipe, static_argnums=(3, 4, 5, 6))(q, k, v, *window, *shift, table)
    reference = jax.jit(lambda *a: window_attention_reference(*a[:3], window_size=window, shift_size=shift,
                                                              relative_bias_table=a[3]))(q, k, v, table)
    assert_close(reference, recipe, rtol=1e-5, name="dense reference vs Swin's recipe")


def loss_and_grads(fn, q, k, v, table):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2, 3)))(q, k, v, table)


@pytest.mark.parametrize("hw, window, shift", [((7, 11), (4, 4), (2, 1))])
def test_window_attention_equals_the_dense_reference_forward_and_gradients(hw, window, shift):
    q, k, v, table = inputs((2, *hw, 2, 4), window=window)
    kw = dict(window_size=window, shift_size=shift)
    fast = loss_and_grads(lambda q, k, v, t: window_attention(q, k, v, relative_bias_table=t, **kw), q, k, v, table)
    dense = loss_and_grads(lambda q, k, v, t: window_attention_reference(q, k, v, relative_bias_table=t, **kw),
                           q, k, v, table)
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dtable"), (fast[0], *fast[1]), (dense[0], *dense[1])):
        assert_close(a, b, rtol=1e-5, name=name)


def dense_grid_by_coordinates(q, k, v, ih, iw, table, gw):
    """Grid attention as a dense softmax masked by ``y ≡ y' (mod ih)``, ``x ≡ x' (mod iw)``, with the relative
    bias of the in-group offsets ``(y // ih − y' // ih, x // iw − x' // iw)`` in a table for groups ``gw`` wide."""
    B, H, W, heads, D = q.shape
    y, x = np.divmod(np.arange(H * W), W)
    same = (y[:, None] % ih == y[None, :] % ih) & (x[:, None] % iw == x[None, :] % iw)
    gh = -(-H // ih)
    dy = y[:, None] // ih - y[None, :] // ih + gh - 1
    dx = x[:, None] // iw - x[None, :] // iw + gw - 1
    bias = table[dy * (2 * gw - 1) + dx].transpose(2, 0, 1)
    flat = [a.reshape(B, H * W, heads, -1) for a in (q, k, v)]
    logits = jnp.einsum("bthd,bshd->bhts", flat[0], flat[1], precision="highest") / np.sqrt(D) + bias
    weights = jax.nn.softmax(jnp.where(same, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, flat[2], precision="highest").reshape(B, H, W, heads, -1)


@pytest.mark.parametrize("hw, kw, interval, group", [((6, 6), dict(grid_size=3), (2, 2), (3, 3)),
                                                     ((5, 7), dict(grid_size=(2, 3)), (3, 3), (2, 3)),
                                                     ((5, 7), dict(interval=(2, 3)), (2, 3), (3, 3))])
def test_grid_attention_equals_a_coordinate_mask_forward_and_gradients(hw, kw, interval, group):
    q, k, v, table = inputs((2, *hw, 2, 4), window=group)
    dense = jax.jit(dense_grid_by_coordinates, static_argnums=(3, 4, 6))(q, k, v, *interval, table, group[1])
    fast = jax.jit(lambda q, k, v, t: grid_attention(q, k, v, relative_bias_table=t, **kw))
    assert_close(fast(q, k, v, table), dense, rtol=1e-5, name="grid attention")
    grads = loss_and_grads(lambda q, k, v, t: grid_attention(q, k, v, relative_bias_table=t, **kw), q, k, v, table)
    reference = loss_and_grads(lambda q, k, v, t: grid_attention_reference(q, k, v, relative_bias_table=t, **kw),
                               q, k, v, table)
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), grads[1], reference[1]):
        assert_close(a, b, rtol=1e-5, name=name)


def test_bf16_is_finite_and_keeps_the_dtype():
    q, k, v, table = inputs((1, 5, 7, 2, 4), dv=4)
    q, k, v = (10 * a.astype(jnp.bfloat16) for a in (q, k, v))
    out = jax.jit(lambda q, k, v: window_attention(q, k, v, window_size=3, shift_size=1,
                                                   relative_bias_table=table))(q, k, v)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


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
    with pytest.raises(ValueError, match=r"relative_bias_table must have shape \[\(2·wh − 1\)·\(2·ww − 1\), heads\] = \[25"):
        relative_position_bias(jnp.ones((2, 3, 3)), 3)
    q = jnp.ones((2, 6, 6, 2, 4))
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\]"):
        window_attention(q[0], q, q, window_size=3)
    with pytest.raises(ValueError, match=r"bias must have shape \[heads, wh·ww, wh·ww\] = \[2, 9, 9\]"):
        window_attention(q, q, q, window_size=3, bias=jnp.ones((2, 4, 4)))
    with pytest.raises(ValueError, match=r"shift_size must be smaller than window_size"):
        window_attention(q, q, q, window_size=3, shift_size=3)
    with pytest.raises(ValueError, match=r"shift_size must be a non-negative int"):
        window_attention(q, q, q, window_size=3, shift_size=-1)
    with pytest.raises(ValueError, match=r"relative_bias_table must have shape \[\(2·wh − 1\)·\(2·ww − 1\), heads=2\]"):
        window_attention(q, q, q, window_size=3, relative_bias_table=jnp.ones((25, 3)))
    with pytest.raises(ValueError, match="give exactly one of interval and grid_size"):
        grid_attention(q, q, q, interval=2, grid_size=3)
    with pytest.raises(ValueError, match="grid_size must be a positive int"):
        grid_attention(q, q, q, grid_size=0)


@pytest.mark.parametrize("config", [Windows(window_size=3, shift_size=1, grid=(5, 7)),
                                    Windows(window_size=(2, 3), partition="grid", grid=(5, 7))])
def test_the_registered_mechanism_runs_the_op_on_row_major_tokens(config):
    q, k, v, _ = inputs((2, 5, 7, 2, 4))
    tokens = [a.reshape(2, 35, 2, -1) for a in (q, k, v)]
    out = jax.jit(lambda q, k, v: attnjax.attention(q, k, v, mechanism=config, implementation="xla"))(*tokens)
    if config.partition == "grid":
        expected = grid_attention_reference(q, k, v, grid_size=config.window_size)
    else:
        expected = window_attention_reference(q, k, v, window_size=3, shift_size=1)
    assert_close(out.reshape(expected.shape), expected, rtol=1e-5, name=config.partition)
    with pytest.raises(NotImplementedError):
        attnjax.attention(tokens[0], tokens[1][:, :, :1], tokens[2][:, :, :1], mechanism=config)
