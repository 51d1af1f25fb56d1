"""DCAL's GLCA and PWCA (Zhu et al. 2022, sec. 3.2-3.3): the top-R selection against a NumPy rollout and argsort,
GLCA against the rows of a dense softmax over all tokens, PWCA against an einsum softmax over both images' keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.dcal import (cls_rollout_scores, global_local_cross_attention,
                                 global_local_cross_attention_reference, local_query_count, local_query_positions,
                                 pairwise_cross_attention, pairwise_cross_attention_reference, select_top_r)
from tests.helpers import assert_close, assert_grads_close, grads, random_qkv


def softmax_maps(seed, L=3, B=2, H=2, T=21):
    logits = np.random.default_rng(seed).normal(size=(L, B, H, T, T)) * 3
    maps = np.exp(logits - logits.max(-1, keepdims=True))
    return (maps / maps.sum(-1, keepdims=True)).astype(np.float32)


def numpy_positions(maps, ratio):
    """DCAL eq. for Ŝ: S̄ = 0.5·mean_h S + 0.5·E, Ŝ = S̄_L ··· S̄_1; rank row 0 over the patches (stable argsort)."""
    L, B, _, T, _ = maps.shape
    positions = []
    for b in range(B):
        rollout = np.eye(T)
        for layer in range(L):
            rollout = (0.5 * maps[layer, b].astype(np.float64).mean(0) + 0.5 * np.eye(T)) @ rollout
        order = np.argsort(-rollout[0, 1:], kind="stable")[:int(ratio * (T - 1) + 1e-9) or 1]
        positions.append(np.concatenate([[0], order + 1]))
    return np.stack(positions)


def dense_attention(q, k, v):
    """softmax(q kᵀ/√D) v over all keys, K/V heads repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


def test_local_query_count_is_a_floored_ratio():
    assert local_query_count(784) == 78                   # the paper's 448x448 FGVC input, R = 10 %
    assert local_query_count(128, 0.3) == 38              # a 256x128 Re-ID input, R = 30 %
    assert local_query_count(20) == 2 and local_query_count(5) == 1 and local_query_count(10, 1.0) == 10


def test_top_r_selection_equals_numpy_argsort():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 17)).astype(np.float32)
    scores[1, [2, 5, 9]] = scores[1].max() + 1.0          # a three-way tie: the lower index first
    for r in (1, 4, 17):
        top = np.asarray(jax.jit(select_top_r, static_argnums=1)(jnp.asarray(scores), r))
        np.testing.assert_array_equal(top, np.argsort(-scores, axis=1, kind="stable")[:, :r])


def test_local_query_positions_equal_a_numpy_rollout_and_argsort():
    """R = 30 % of 20 patches; the maps as one array and as a list of layers."""
    maps = softmax_maps(3)
    positions, without_cls = (np.asarray(p) for p in jax.jit(lambda m: (
        local_query_positions(m, 0.3), local_query_positions(list(m), 0.3, keep_cls=False)))(jnp.asarray(maps)))
    np.testing.assert_array_equal(positions, numpy_positions(maps, 0.3))
    assert positions.shape == (2, 1 + 6)
    np.testing.assert_array_equal(without_cls, positions[:, 1:])


def test_glca_equals_rows_of_dense_attention_forward_and_gradients():
    """GQA (4 query heads, 2 kv heads), Dv != D; unselected queries get no gradient, the maps none either."""
    q, k, v = random_qkv(jax.random.key(0), B=2, T=21, Hq=4, Hkv=2, D=4, Dv=6)
    maps = jnp.asarray(softmax_maps(1))
    positions = local_query_positions(maps, 0.1)
    rows = np.asarray(positions)

    def fast(q, k, v):
        return global_local_cross_attention(q, k, v, positions)

    def reference(q, k, v):
        return dense_attention(q, k, v)[np.arange(2)[:, None], rows]

    out, expected, library = jax.jit(lambda *a: (fast(*a), reference(*a),
                                                 global_local_cross_attention_reference(*a, positions)))(q, k, v)
    assert out.shape == (2, 3, 4, 6)
    assert_close(out, expected, rtol=1e-5, name="GLCA")
    assert_close(library, expected, rtol=1e-5, name="library reference")
    grads_fast, grads_reference = grads(fast, (q, k, v), (0, 1, 2)), grads(reference, (q, k, v), (0, 1, 2))
    for g, g_ref, name in zip(grads_fast, grads_reference, "qkv"):
        assert_close(g, g_ref, rtol=1e-5, name=f"d{name}")
    dq = np.asarray(grads_fast[0])
    unselected = np.ones((2, 21), bool)
    unselected[np.arange(2)[:, None], rows] = False
    assert np.all(dq[unselected] == 0) and np.all(np.any(dq[~unselected] != 0, axis=(-2, -1)))
    dmaps = grads(lambda m: global_local_cross_attention(q, k, v, local_query_positions(m, 0.1)), (maps,), (0,))[0]
    np.testing.assert_array_equal(np.asarray(dmaps), 0.0)


def test_pwca_equals_one_softmax_over_both_images_forward_and_gradients():
    """Image 1 has 9 tokens, the distractor 7; GQA; without a distractor PWCA is self-attention."""
    q, k, v = random_qkv(jax.random.key(1), B=2, T=9, Hq=4, Hkv=2, D=4, Dv=6)
    _, k2, v2 = random_qkv(jax.random.key(2), B=2, T=7, Hq=4, Hkv=2, D=4, Dv=6)

    def reference(q, k, v, k2, v2):
        return dense_attention(q, jnp.concatenate([k, k2], 1), jnp.concatenate([v, v2], 1))

    out, expected, library, alone, alone_expected = jax.jit(lambda *a: (
        pairwise_cross_attention(*a), reference(*a), pairwise_cross_attention_reference(*a),
        pairwise_cross_attention(*a[:3]), dense_attention(*a[:3])))(q, k, v, k2, v2)
    assert_close(out, expected, rtol=1e-5, name="PWCA")
    assert_close(library, expected, rtol=1e-5, name="library reference")
    assert_close(alone, alone_expected, rtol=1e-5, name="without a distractor: self-attention")
    assert_grads_close(pairwise_cross_attention, reference, (q, k, v, k2, v2), argnums=range(5), rtol=1e-5,
                       names=["q", "k", "v", "k2", "v2"])


def test_bf16_is_finite():
    q, k, v = random_qkv(jax.random.key(3), B=1, T=11, Hq=2, D=4, dtype=jnp.bfloat16)
    positions = jnp.array([[0, 4, 7]], jnp.int32)
    out = jax.jit(lambda q, k, v: (global_local_cross_attention(30 * q, k, v, positions),
                                   pairwise_cross_attention(30 * q, k, v, k[:, ::-1], v[:, ::-1])))(q, k, v)
    for o in out:
        assert o.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(o, np.float32)))


def test_bad_inputs_name_the_argument():
    q, k, v = random_qkv(jax.random.key(4), B=2, T=6, Hq=2, D=4)
    with pytest.raises(ValueError, match="ratio must be a number in \\(0, 1\\], got 0"):
        local_query_count(10, 0)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 5\], got 6"):
        select_top_r(jnp.ones((2, 5)), 6)
    with pytest.raises(ValueError, match=r"positions must be integer indices \[batch, R\] = \[2, R\]"):
        global_local_cross_attention(q, k, v, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="k2 and v2 must be given together"):
        pairwise_cross_attention(q, k, v, k2=k)
    with pytest.raises(ValueError, match="v2 must have shape"):
        pairwise_cross_attention(q, k, v, k, v[:, :, :1])
    with pytest.raises(ValueError, match="maps must cover a class token and at least one patch"):
        cls_rollout_scores(jnp.ones((1, 2, 2, 1, 1)))
