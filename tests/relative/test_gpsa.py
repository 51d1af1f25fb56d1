"""ConViT's GPSA: the blocked fast path against the dense reference (forward and gradients of q, k, v, the gate and
v_pos), the positional bias rule against the official code's relative indices, the locality initialization."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.positional.gpsa_position import GPSAPositionBias, grid_offsets
from attnjax.relative.gpsa import (gpsa_attention, gpsa_attention_reference, locality_offsets, locality_v_pos)
from tests.helpers import assert_close, assert_grads_close


def inputs(B=2, height=5, width=7, heads=4, D=8, Dv=6, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, height, width, heads, D)), dtype) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, height, width, heads, Dv)), dtype)
    gate = jnp.asarray(rng.normal(size=(heads,)), jnp.float32)
    v_pos = jnp.asarray(0.5 * rng.normal(size=(heads, 3)), jnp.float32)
    return q, k, v, gate, v_pos


def official_rel_indices(size: int) -> np.ndarray:
    """facebookresearch/convit ``GPSA.get_rel_indices`` for a square ``size × size`` grid, in NumPy: ``[N, N, 3]``."""
    ind = np.arange(size)[None, :] - np.arange(size)[:, None]
    indx = np.tile(ind, (size, size))
    indy = np.repeat(np.repeat(ind, size, axis=0), size, axis=1)
    return np.stack([indx, indy, indx ** 2 + indy ** 2], axis=-1).astype(np.float32)


fast_xla = jax.jit(functools.partial(gpsa_attention, implementation="xla"))
reference = jax.jit(gpsa_attention_reference)


def test_fast_path_equals_reference_forward_and_gradients_on_a_5x7_grid():
    """Non-square grid (35 tokens, not a multiple of any tile), Dv != D; gradients of all five inputs."""
    args = inputs()
    assert_close(fast_xla(*args), reference(*args), rtol=1e-5)
    assert_grads_close(fast_xla, reference, args, argnums=range(5), rtol=1e-5,
                       names=["q", "k", "v", "gate", "v_pos"])


def test_reference_is_the_official_formula_with_its_normalization():
    """Eqs. 5-6 written out from the official ``get_attention`` (square grid, its ``rel_indices``)."""
    q, k, v, gate, v_pos = inputs(B=1, height=4, width=4, heads=2, D=4, Dv=4, seed=1)
    qf, kf, vf = (np.asarray(a, np.float64).reshape(1, 16, 2, 4) for a in (q, k, v))

    def softmax(s):
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    patch = softmax(np.einsum("bihd,bjhd->bhij", qf, kf) / 2.0)
    pos = softmax(np.einsum("ijc,hc->hij", official_rel_indices(4), np.asarray(v_pos, np.float64)))[None]
    g = 1 / (1 + np.exp(-np.asarray(gate, np.float64)))[None, :, None, None]
    attn = (1 - g) * patch + g * pos
    attn /= attn.sum(-1, keepdims=True)
    want = np.einsum("bhij,bjhd->bihd", attn, vf).reshape(1, 4, 4, 2, 4)
    assert_close(reference(q, k, v, gate, v_pos), want, rtol=1e-5)


def test_position_rule_tiles_equal_the_offsets_of_the_grid():
    """Square: the official ``rel_indices``; 5x7: a loop over the row-major pixels; a tile equals its dense slice."""
    np.testing.assert_array_equal(np.asarray(grid_offsets(jnp.arange(25), jnp.arange(25), 5)), official_rel_indices(5))
    v_pos = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3)), jnp.float32)
    rule = GPSAPositionBias(v_pos, width=7)
    dense = np.asarray(rule.dense(35, 35))
    want = np.zeros((1, 3, 35, 35))
    for i in range(35):
        for j in range(35):
            dx, dy = j % 7 - i % 7, j // 7 - i // 7
            want[0, :, i, j] = np.asarray(v_pos, np.float64) @ [dx, dy, dx * dx + dy * dy]
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-5)
    assert_close(rule.tile(jnp.arange(3, 9), jnp.arange(10, 31), 35, 35), dense[:, :, 3:9, 10:31])


def test_position_rule_is_positional_self_attention_through_attnjax_attention():
    """ConViT's PSA (eq. 3): softmax(scale·QKᵀ + v_posᵀ r) in the blocked path equals the dense bias, v_pos gradient
    included."""
    q, k, v, _, v_pos = inputs(B=1, heads=2, Dv=8, seed=3)
    q, k, v = (a.reshape(1, 35, 2, 8) for a in (q, k, v))

    def psa(implementation, q, v_pos):
        return aj.attention(q, k, v, bias=GPSAPositionBias(v_pos, width=7), implementation=implementation)

    def dense(q, v_pos):
        return aj.attention(q, k, v, bias=GPSAPositionBias(v_pos, width=7).dense(35, 35), implementation="reference")

    assert_grads_close(functools.partial(psa, "xla"), dense, (q, v_pos), argnums=(0, 1), rtol=1e-5,
                       names=["q", "v_pos"])


def test_bf16_is_finite_and_close_to_float32():
    args = inputs(dtype=jnp.bfloat16)
    out = fast_xla(*args)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, reference(*(a.astype(jnp.float32) for a in args)), rtol=2e-2)


def test_locality_centres_follow_the_official_local_init():
    """Official ``local_init``: head ``h1 + K·h2`` gets weights ``(2(h2 − c), 2(h1 − c), −1)·α``, ``c = (K − 1)/2``."""
    for heads, alpha in ((9, 1.0), (4, 2.5), (5, 1.0), (16, 0.5)):
        K = int(heads ** 0.5)
        c = (K - 1) / 2 if K % 2 == 0 else K // 2
        want = np.zeros((K * K, 3), np.float32)
        for h1 in range(K):
            for h2 in range(K):
                want[h1 + K * h2] = [2 * (h2 - c), 2 * (h1 - c), -1]
        np.testing.assert_array_equal(locality_v_pos(heads, alpha), alpha * want)
        np.testing.assert_array_equal(locality_offsets(heads), want[:, :2] / 2)


def test_bad_inputs_name_the_argument():
    q, k, v, gate, v_pos = inputs(B=1, height=2, width=3)
    with pytest.raises(ValueError, match=r"gate must have shape \[4\]"):
        gpsa_attention(q, k, v, gate[:3], v_pos)
    with pytest.raises(ValueError, match=r"v_pos must have shape \[4, 3\]"):
        gpsa_attention_reference(q, k, v, gate, v_pos[:, :2])
    with pytest.raises(TypeError, match="gate must be a floating-point array"):
        gpsa_attention(q, k, v, jnp.ones(4, jnp.int32), v_pos)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, height, width, heads, head_dim\]"):
        gpsa_attention(q.reshape(1, 6, 4, 8), k, v, gate, v_pos)
    with pytest.raises(ValueError, match="scale must be positive"):
        gpsa_attention(q, k, v, gate, v_pos, scale=-1.0)
    with pytest.raises(ValueError, match="q, k, v must share"):
        gpsa_attention(q, k[:, :1], v, gate, v_pos)
    with pytest.raises(ValueError, match=r"GPSAPositionBias v_pos has shape \(4, 3\), expected \(num_heads, 3\) = "
                                         r"\(2, 3\)"):
        GPSAPositionBias(v_pos, width=3).check(1, 2, 6, 6)
    with pytest.raises(ValueError, match="T == S, a multiple of width=4"):
        GPSAPositionBias(v_pos, width=4).check(1, 4, 6, 6)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        locality_offsets(0)
