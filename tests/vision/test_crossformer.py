"""CrossFormer's LSDA, DPB offsets and cross-scale embedding against masks built from coordinates, the official
code's grouping recipe and NumPy convolution loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.crossformer import (cross_scale_channels, cross_scale_embedding, lsda_attention,
                                        lsda_attention_reference, lsda_group, relative_offsets)
from tests.helpers import assert_close, assert_grads_close


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def test_relative_offsets_list_the_group_offsets_in_table_order():
    offsets = relative_offsets((2, 3))
    assert offsets.shape == (3 * 5, 2) and offsets.dtype == np.float32
    for dy in range(-1, 2):
        for dx in range(-2, 3):
            assert tuple(offsets[(dy + 1) * 5 + dx + 2]) == (dy, dx)


def coordinate_mask_and_slots(H, W, long_distance, g, i):
    """Boolean [T, T] 'same group' mask and each pixel's (row, column) in its group, from coordinates only.

    SDA: pixels in the same g x g window, slot (y mod g, x mod g). LDA: pixels with equal (y mod i, x mod i),
    slot (y // i, x // i)."""
    y, x = np.divmod(np.arange(H * W), W)
    if long_distance:
        key, slot = np.stack([y % i[0], x % i[1]], -1), np.stack([y // i[0], x // i[1]], -1)
    else:
        key, slot = np.stack([y // g[0], x // g[1]], -1), np.stack([y % g[0], x % g[1]], -1)
    return (key[:, None] == key[None, :]).all(-1), slot


def dense_lsda(q, k, v, table, mask, slot, group):
    """Softmax over all H*W keys with the mask, plus table[(dy + Gh - 1)(2Gw - 1) + dx + Gw - 1] per pair."""
    B, H, W, heads, D = q.shape
    gh, gw = group
    qf, kf, vf = (a.reshape(B, H * W, heads, a.shape[-1]) for a in (q, k, v))
    logits = jnp.einsum("bthd,bshd->bhts", qf, kf, precision="highest") / np.sqrt(D)
    d = slot[:, None, :] - slot[None, :, :]
    logits = logits + jnp.moveaxis(table[(d[..., 0] + gh - 1) * (2 * gw - 1) + d[..., 1] + gw - 1], -1, 0)
    logits = jnp.where(mask, logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", p, vf, precision="highest").reshape(B, H, W, heads, -1)


@pytest.mark.parametrize("long_distance, g, i", [(False, (3, 3), (2, 2)), (True, (3, 3), (2, 3))])
def test_lsda_equals_a_dense_masked_softmax_forward_and_gradients(long_distance, g, i):
    """A 5x7 map (not a multiple of the group nor of the interval), Dv != D, a DPB table per head."""
    H, W = 5, 7
    group = lsda_group(H, W, long_distance=long_distance, group_size=g, interval=i)
    assert group == ((-(-H // i[0]), -(-W // i[1])) if long_distance else g)
    q, k, v = normal((2, H, W, 2, 4), 0), normal((2, H, W, 2, 4), 1), normal((2, H, W, 2, 3), 2)
    table = normal(((2 * group[0] - 1) * (2 * group[1] - 1), 2), 3)
    mask, slot = coordinate_mask_and_slots(H, W, long_distance, g, i)

    def fast(q, k, v, t):
        return lsda_attention(q, k, v, long_distance=long_distance, group_size=g, interval=i, position_table=t)

    def expected(q, k, v, t):
        return dense_lsda(q, k, v, t, mask, slot, group)

    args = (q, k, v, table)
    assert_close(jax.jit(fast)(*args), jax.jit(expected)(*args), rtol=1e-5, name="lsda")
    reference = jax.jit(lambda *a: lsda_attention_reference(*a[:3], long_distance=long_distance, group_size=g,
                                                             interval=i, position_table=a[3]))
    assert_close(reference(*args), jax.jit(expected)(*args), rtol=1e-5, name="lsda reference")
    assert_grads_close(fast, expected, args, argnums=range(4), rtol=1e-5, names=["q", "k", "v", "table"])


def test_lda_groups_as_the_official_code_on_a_map_of_interval_times_group():
    """ICLR code: x.reshape(B, G, H//G, G, W//G, C).permute(0, 2, 4, 1, 3, 5) groups G x G embeddings I = H/G apart,
    in row-major order inside the group, with the relative position bias of that order."""
    G, I, heads, D = 3, 2, 2, 4
    H = W = G * I
    q, k, v = (normal((1, H, W, heads, D), s) for s in range(3))
    table = normal(((2 * G - 1) ** 2, heads), 3)
    out = jax.jit(lambda *a: lsda_attention(*a[:3], long_distance=True, interval=I, position_table=a[3]))(
        q, k, v, table)

    def official_groups(a):
        return a.reshape(1, G, H // G, G, W // G, heads, D).transpose(0, 2, 4, 1, 3, 5, 6).reshape(-1, G * G, heads, D)

    yy, xx = np.divmod(np.arange(G * G), G)
    index = (yy[:, None] - yy[None, :] + G - 1) * (2 * G - 1) + xx[:, None] - xx[None, :] + G - 1
    qg, kg, vg = (official_groups(a) for a in (q, k, v))
    logits = jnp.einsum("gthd,gshd->ghts", qg, kg, precision="highest") / np.sqrt(D)
    logits = logits + jnp.moveaxis(table[index], -1, 0)
    og = jnp.einsum("ghts,gshd->gthd", jax.nn.softmax(logits, -1), vg, precision="highest")
    expected = og.reshape(1, H // G, W // G, G, G, heads, D).transpose(0, 3, 1, 4, 2, 5, 6).reshape(out.shape)
    assert_close(out, expected, rtol=1e-5, name="official LDA grouping")


def test_cross_scale_channels_follow_the_paper_table():
    assert cross_scale_channels(96, 4) == (48, 24, 12, 12)
    assert cross_scale_channels(192, 2) == (96, 96)
    assert cross_scale_channels(8, 1) == (8,)
    with pytest.raises(ValueError, match=r"out_channels \(20\) must be a multiple of 2\^\(kernels − 1\) = 8"):
        cross_scale_channels(20, 4)


def test_cross_scale_embedding_concatenates_centred_convolutions():
    """Kernels 2, 4, 6 at stride 2 on a 5x7 map: output (i, j) of kernel K sums the K x K patch whose top-left pixel
    is (2i - (K - 2)/2, 2j - (K - 2)/2), zeros outside the map."""
    s, sizes, channels = 2, (2, 4, 6), (4, 2, 2)
    x = normal((2, 5, 7, 3), 0)
    kernels = [normal((K, K, 3, c), 1 + n) for n, (K, c) in enumerate(zip(sizes, channels))]
    biases = [normal((c,), 9 + n) for n, c in enumerate(channels)]
    y = np.asarray(jax.jit(lambda x, ks, bs: cross_scale_embedding(x, ks, bs, stride=s))(x, kernels, biases))
    assert y.shape == (2, 2, 3, 8)
    xn = np.asarray(x)
    start = 0
    for K, c, kernel, bias in zip(sizes, channels, kernels, biases):
        p = (K - s) // 2
        padded = np.pad(xn, ((0, 0), (p, p + K), (p, p + K), (0, 0)))
        for i in range(2):
            for j in range(3):
                patch = padded[:, s * i:s * i + K, s * j:s * j + K]
                expected = np.einsum("brsc,rsco->bo", patch, np.asarray(kernel)) + np.asarray(bias)
                np.testing.assert_allclose(y[:, i, j, start:start + c], expected, rtol=1e-4, atol=1e-4)
        start += c


def test_bf16_is_finite():
    q, k, v = (10 * normal((1, 5, 7, 2, 4), s, jnp.bfloat16) for s in range(3))
    table = normal((5 * 7, 2), 3, jnp.bfloat16)
    out = jax.jit(lambda *a: lsda_attention(*a[:3], long_distance=True, interval=2, position_table=a[3]))(
        q, k, v, table)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def test_bad_inputs_name_the_argument():
    q = jnp.ones((1, 5, 7, 2, 4))
    with pytest.raises(ValueError, match="group must be a positive int or a pair"):
        relative_offsets(0)
    with pytest.raises(ValueError, match="interval must be a positive int or a pair"):
        lsda_attention(q, q, q, long_distance=True, interval=(2, 0))
    with pytest.raises(ValueError, match="group_size must be a positive int or a pair"):
        lsda_group(5, 7, long_distance=False, group_size=-1)
    with pytest.raises(ValueError, match=r"relative_bias_table must have shape .* = \[25, heads\]"):
        lsda_attention(q, q, q, group_size=3, position_table=jnp.ones((24, 2)))
    x = jnp.ones((1, 5, 7, 3))
    with pytest.raises(ValueError, match=r"kernels\[1\] must have shape \[K, K, 3, C_out\] with K >= stride \(2\)"):
        cross_scale_embedding(x, [jnp.ones((2, 2, 3, 4)), jnp.ones((3, 3, 3, 4))], [None, None], stride=2)
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape \[4\]"):
        cross_scale_embedding(x, [jnp.ones((2, 2, 3, 4))], [jnp.ones(3)], stride=2)
    with pytest.raises(ValueError, match="kernels and biases must be non-empty and of one length"):
        cross_scale_embedding(x, [jnp.ones((2, 2, 3, 4))], [], stride=2)
    with pytest.raises(ValueError, match=r"x \(5x7\) must be at least stride \(8\)"):
        cross_scale_embedding(x, [jnp.ones((8, 8, 3, 4))], [None], stride=8)
