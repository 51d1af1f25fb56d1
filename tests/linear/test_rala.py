"""RALA: the right-product path against the quadratic reference (forward, gradients), the reference against the
official code's steps, RAVLT's rotary tables, bf16, errors."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.linear.rala import RALA, rala, rala_reference, rala_rotary, theta_shift
from tests.helpers import assert_close, grads, random_qkv

rala_module = importlib.import_module("attnjax.linear.rala")

KEY = jax.random.PRNGKey(0)


def official_rope(height, width, head_dim):
    """The official ``RoPE.forward`` in NumPy: angle repeated per pair, rows then columns along the features."""
    angle = np.repeat(1.0 / 10000 ** np.linspace(0, 1, head_dim // 4), 2)
    sin_h, cos_h = np.sin(np.arange(height)[:, None] * angle), np.cos(np.arange(height)[:, None] * angle)
    sin_w, cos_w = np.sin(np.arange(width)[:, None] * angle), np.cos(np.arange(width)[:, None] * angle)
    sin = np.concatenate([np.repeat(sin_h[:, None], width, 1), np.repeat(sin_w[None], height, 0)], -1)
    cos = np.concatenate([np.repeat(cos_h[:, None], width, 1), np.repeat(cos_w[None], height, 0)], -1)
    return sin.reshape(height * width, head_dim), cos.reshape(height * width, head_dim)


def official_rala(q, k, v, sin, cos):
    """``GateLinearAttentionNoSilu``'s attention steps for one head, float64: ``q, k, v [N, D]``."""
    def rotate_every_two(x):
        return np.stack([-x[:, 1::2], x[:, 0::2]], -1).reshape(x.shape)

    def theta(x):
        return x * cos + rotate_every_two(x) * sin

    n, d = q.shape
    elu1 = lambda x: np.where(x > 0, x, np.expm1(x)) + 1.0
    q, k = elu1(q), elu1(k)
    eff = d ** -0.5 * q.mean(0, keepdims=True) @ k.T                            # [1, N]
    eff = (np.exp(eff - eff.max()) / np.exp(eff - eff.max()).sum()).T           # [N, 1]
    k = k * eff * n
    q_rope, k_rope = theta(q), theta(k)
    z = 1 / (q @ k.mean(0, keepdims=True).T + 1e-6)
    kv = (k_rope.T * n ** -0.5) @ (v * n ** -0.5)
    return q_rope @ kv * z


def test_xla_equals_the_reference_forward_and_gradients(monkeypatch):
    """GQA (4 query heads over 2 KV heads), Dv != D, an odd 3x5 grid with the rotary tables, in blocks of 4 tokens
    (the last one padded; cross attention without them, T != S, is in the registry conformance suite, gradients
    included)."""
    monkeypatch.setattr(rala_module, "BLOCK", 4)
    q, k, v = random_qkv(KEY, B=2, T=15, Hq=4, Hkv=2, D=8, Dv=6)
    tables = rala_rotary(3, 5, 8)
    ref = lambda *a: rala_reference(*a, rotary=tables)
    fast = lambda *a: rala(*a, rotary=tables, implementation="xla")
    assert_close(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v), rtol=2e-5, name="out")
    for name, g, e in zip("qkv", grads(fast, (q, k, v), (0, 1, 2)), grads(ref, (q, k, v), (0, 1, 2))):
        assert_close(g, e, rtol=2e-5, name=f"d{name}")


def test_reference_is_the_official_code():
    """Per head, the official steps (``k ← N·α·φ(k)``, RoPE after the weighting, ``z`` from un-rotated features,
    the buffer over ``√N·√N``) on a 3x4 grid, against ``rala_reference`` and the fast path."""
    q, k, v = random_qkv(KEY, B=1, T=12, Hq=2, D=8, Dv=8)
    sin, cos = official_rope(3, 4, 8)
    expected = np.stack([official_rala(*(np.asarray(x[0, :, h], np.float64) for x in (q, k, v)), sin, cos)
                         for h in range(2)], axis=1)
    tables = rala_rotary(3, 4, 8)
    for name, path in (("reference", rala_reference), ("xla", rala)):
        assert_close(jax.jit(lambda *a: path(*a, rotary=tables))(q, k, v)[0], expected, rtol=1e-5, name=name)


def test_rotary_tables_are_the_official_ropes():
    sin, cos = rala_rotary(3, 5, 8)
    expected_sin, expected_cos = official_rope(3, 5, 8)
    assert_close(sin, expected_sin, rtol=1e-6, name="sin")
    assert_close(cos, expected_cos, rtol=1e-6, name="cos")
    x = jax.random.normal(KEY, (1, 15, 2, 8))
    rotated = theta_shift(x, (sin, cos))
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_weights_make_the_map_query_dependent():
    """Keys of equal feature vectors get equal weights, so RALA reduces to plain normalized linear attention there;
    with distinct keys the mean-query weights change the output."""
    q, k, v = random_qkv(KEY, B=1, T=9, Hq=1, D=4)
    call = jax.jit(rala)
    same = jnp.broadcast_to(k[:, :1], k.shape)
    plain = jnp.broadcast_to(jnp.mean(v, axis=1, keepdims=True), v.shape)   # equal keys: the mean value
    assert_close(call(q, same, v), plain, rtol=1e-5, name="equal keys")
    fq, fk = np.asarray(jax.nn.elu(q) + 1), np.asarray(jax.nn.elu(k) + 1)
    scores = np.einsum("bthd,bshd->bhts", fq, fk)
    linear = np.einsum("bhts,bshd->bthd", scores / scores.sum(-1, keepdims=True), np.asarray(v))
    assert float(np.max(np.abs(np.asarray(call(q, k, v)) - linear))) > 1e-3


def test_bfloat16_is_finite_and_close():
    q, k, v = random_qkv(KEY, B=1, T=15, Hq=2, D=8, dtype=jnp.bfloat16)
    tables = rala_rotary(3, 5, 8)
    out = jax.jit(lambda *a: rala(*a, rotary=tables))(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    expected = jax.jit(lambda *a: rala_reference(*a, rotary=tables))(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert_close(out, expected, rtol=2e-2, name="bf16")


def test_registry_entry(monkeypatch):
    """Cross attention (T != S) with blocks of 4 tokens: two query blocks, three key blocks."""
    monkeypatch.setattr(rala_module, "BLOCK", 4)
    q, k, v = random_qkv(KEY, B=1, T=5, S=9, Hq=4, Hkv=2, D=4)
    out = jax.jit(lambda *a: aj.attention(*a, mechanism=RALA(), scale=0.3, implementation="xla"))(q, k, v)
    assert_close(out, jax.jit(lambda *a: rala_reference(*a, scale=0.3))(q, k, v), rtol=2e-5, name="registry")
    with pytest.raises(NotImplementedError, match="mask"):
        aj.attention(q, k, v, mechanism="rala", mask=aj.masks.Causal())


def test_errors_name_the_argument():
    q, k, v = random_qkv(KEY, B=1, T=6, S=8, Hq=2, D=4)
    with pytest.raises(ValueError, match="rotary needs as many queries as keys"):
        rala(q, k, v, rotary=rala_rotary(2, 3, 4))
    q, k, v = random_qkv(KEY, B=1, T=6, Hq=2, D=4)
    with pytest.raises(ValueError, match=r"rotary must be \(sin, cos\), each of shape \[N, head_dim\] = \[6, 4\]"):
        rala(q, k, v, rotary=rala_rotary(2, 2, 4))
    with pytest.raises(ValueError, match="head_dim must be a multiple of 4"):
        rala_rotary(2, 3, 6)
    with pytest.raises(ValueError, match="q heads"):
        rala(*random_qkv(KEY, B=1, T=6, Hq=3, Hkv=2, D=4))
    with pytest.raises(ValueError, match="scale must be a scalar"):
        rala(q, k, v, scale=jnp.ones(2))
    with pytest.raises(NotImplementedError, match="RALA has no 'pallas'"):
        rala(q, k, v, implementation="pallas")
