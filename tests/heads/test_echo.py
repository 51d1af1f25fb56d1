"""EchoAtt (attnjax.heads.echo): reusing an earlier layer's attention map tile by tile equals multiplying the
stored map, forward and gradients (through the earlier layer's lse too); the blockwise layer similarity equals
the dense maps'; grouping into shared blocks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import attention, masks
from attnjax.analysis import attention_similarity_of_maps
from attnjax.heads.echo import (attention_probabilities, echo_attention, echo_attention_reference, echo_groups,
                                layer_similarity)
from tests.helpers import assert_close, random_qkv


def normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def test_stored_probabilities_are_the_softmax_map():
    q, k, _ = random_qkv(jax.random.key(0), B=1, T=5, S=7, Hq=4, Hkv=2, D=8)
    p = jax.jit(lambda q, k: attention_probabilities(q, k, mask=masks.Causal()))(q, k)
    kr = np.repeat(np.asarray(k), 2, axis=2)
    s = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), kr) / np.sqrt(8)
    s = np.where(np.tril(np.ones((5, 7), bool), k=2), s, -np.inf)  # bottom-right: query t sees keys <= t + 2
    e = np.exp(s - s.max(-1, keepdims=True))
    assert_close(p, e / e.sum(-1, keepdims=True), atol=1e-6, name="map")
    assert_close(p.sum(-1), np.ones((1, 4, 5)), atol=1e-6, name="rows")


def forward_and_grads(fn, args):
    w = normal(99, jax.eval_shape(fn, *args).shape)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return out, g


def test_reuse_with_the_earlier_layers_lse_equals_the_stored_map():
    """Layer e computes attention (and its lse); layer l applies that map to its own values: tile by tile with
    e's lse and from the stored map agree, forward and in the gradients of q_e, k_e, v_e (through lse) and v_l.
    Causal, odd T, GQA, blocks of 4."""
    mask = masks.Causal()
    q, k, v_e = random_qkv(jax.random.key(1), B=2, T=13, Hq=4, Hkv=2, D=8)
    v_l = normal(2, v_e.shape)

    def with_lse(q, k, v_e, v_l):
        out_e, lse = attention(q, k, v_e, mask=mask, return_lse=True)
        return out_e + echo_attention(q, k, v_l, lse=lse, mask=mask, block_q=4, block_kv=4)

    def stored(q, k, v_e, v_l):
        p = attention_probabilities(q, k, mask=mask)
        return echo_attention_reference(p, v_e) + echo_attention_reference(p, v_l)

    args = (q, k, v_e, v_l)
    expected, g_ref = forward_and_grads(stored, args)
    out, g = forward_and_grads(with_lse, args)
    assert_close(out, expected, name="out")
    for name, a, e in zip(["q_e", "k_e", "v_e", "v_l"], g, g_ref):
        assert_close(a, e, name=f"d{name}")


def test_reuse_across_lengths_forward():
    """T = 6 queries over S = 11 keys, bidirectional, with the anchor's lse and with the online softmax (which is
    ``attnjax.attention`` itself)."""
    q, k, v = random_qkv(jax.random.key(8), B=1, T=6, S=11, Hq=4, Hkv=2, D=8)

    def paths(q, k, v):
        _, lse = attention(q, k, v, return_lse=True)
        return (echo_attention(q, k, 2 * v, lse=lse, block_q=4, block_kv=4), echo_attention(q, k, 2 * v),
                echo_attention_reference(attention_probabilities(q, k), 2 * v))

    with_lse, online, expected = jax.jit(paths)(q, k, v)
    assert_close(with_lse, expected, name="with lse")
    assert_close(online, expected, name="online")


def test_lse_path_is_exp_of_logits_minus_the_given_lse_and_its_lse_gradient():
    """With an lse that is not this map's own, the pass is Σ_j exp(s_ij − lse_i) v_j (unnormalized), and its
    custom VJP gives the gradients of that formula, lse included."""
    q, k, v = random_qkv(jax.random.key(3), B=1, T=9, Hq=2, D=8)
    lse = normal(4, (1, 9, 2)) + 3.0

    def formula(q, k, v, lse):
        s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
        p = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), jnp.exp(s - lse.transpose(0, 2, 1)[..., None]), 0.0)
        return jnp.einsum("bhts,bshd->bthd", p, v)

    out, g = forward_and_grads(lambda *a: echo_attention(*a[:3], lse=a[3], mask=masks.Causal(), block_q=4,
                                                         block_kv=4), (q, k, v, lse))
    ref, g_ref = forward_and_grads(formula, (q, k, v, lse))
    assert_close(out, ref, name="out")
    for name, a, e in zip(["q", "k", "v", "lse"], g, g_ref):
        assert_close(a, e, name=f"d{name}")


def test_bf16_is_finite_and_errors():
    q, k, v = random_qkv(jax.random.key(5), B=1, T=6, Hq=2, D=8, dtype=jnp.bfloat16)
    lse = jnp.zeros((1, 6, 2), jnp.float32) + 1.0
    out = jax.jit(lambda q, k, v, l: echo_attention(q, k, v, lse=l, mask=masks.Causal(), block_q=4))(q, k, v, lse)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    with pytest.raises(ValueError, match=r"lse must be \[B, T, Hq\]"):
        echo_attention(q, k, v, lse=lse[..., :1])
    with pytest.raises(NotImplementedError, match="blocked 'xla' pass"):
        echo_attention(q, k, v, lse=lse, implementation="reference")
    with pytest.raises(ValueError, match="probabilities must be"):
        echo_attention_reference(jnp.ones((1, 2, 6)), v)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        echo_attention_reference(jnp.ones((1, 2, 6, 5)), v)


def layers(T=11, S=11, L=3):
    """L layers' (q, k) over the same tokens; layer 1 is layer 0 with sharper queries (similar maps), layer 2
    has its own keys and a different head dim and KV head count."""
    q0, k0, _ = random_qkv(jax.random.key(6), B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    q2, k2, _ = random_qkv(jax.random.key(7), B=2, T=T, S=S, Hq=4, Hkv=4, D=4)
    return [q0, 1.5 * q0, q2][:L], [k0, k0, k2][:L]


def dense_js_similarity(p1, p2):
    """1 − JS/ln 2 per row, averaged over rows where both maps are non-empty (NumPy)."""
    p1, p2 = np.asarray(p1, np.float64), np.asarray(p2, np.float64)
    m = (p1 + p2) / 2

    def kl(a):
        return np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / np.where(m > 0, m, 1)), 0), -1)

    return (1 - (kl(p1) + kl(p2)) / 2 / np.log(2)).mean(-1)


@pytest.mark.parametrize("metric, per_row", [("cosine", False), ("cosine", True), ("js", False)])
def test_layer_similarity_blockwise_equals_the_dense_maps(metric, per_row):
    qs, ks = layers()
    sim = jax.jit(lambda qs, ks: layer_similarity(qs, ks, mask=masks.Causal(), metric=metric, per_row=per_row,
                                                  block_q=4))(qs, ks)
    maps = jax.jit(lambda qs, ks: jnp.stack([attention_probabilities(q, k, mask=masks.Causal())
                                             for q, k in zip(qs, ks)]))(qs, ks)
    assert sim.shape == (3, 3, 2, 4)
    if metric == "cosine":
        expected = jax.jit(lambda m: attention_similarity_of_maps(m[:, None], m[None], per_row=per_row))(maps)
    else:
        expected = np.stack([np.stack([dense_js_similarity(a, b) for b in maps]) for a in maps])
    assert_close(sim, expected, atol=2e-6, name="similarity")
    assert_close(jnp.diagonal(sim), jnp.ones((2, 4, 3)), atol=2e-6, name="diagonal")
    mean = np.asarray(sim.mean((2, 3)))
    assert mean[0, 1] > mean[0, 2] and mean[0, 1] > mean[1, 2]


def test_echo_groups_and_similarity_errors():
    sim = np.array([[1.0, 0.9, 0.8, 0.2, 0.1],
                    [0.9, 1.0, 0.9, 0.3, 0.2],
                    [0.8, 0.9, 1.0, 0.5, 0.4],
                    [0.2, 0.3, 0.5, 1.0, 0.95],
                    [0.1, 0.2, 0.4, 0.95, 1.0]])
    assert echo_groups(sim, 0.75) == ((0, 1, 2), (3, 4))
    assert echo_groups(sim, 0.85) == ((0, 1), (2,), (3, 4))
    assert echo_groups(sim, 0.75, max_size=2) == ((0, 1), (2,), (3, 4))
    assert echo_groups(np.repeat(sim[..., None], 3, -1), 0.99) == ((0,), (1,), (2,), (3,), (4,))
    qs, ks = layers(T=4, S=4, L=2)
    with pytest.raises(ValueError, match="same .* number of layers"):
        layer_similarity(qs, ks[:1])
    with pytest.raises(ValueError, match="metric must be one of"):
        layer_similarity(qs, ks, metric="kl")
    with pytest.raises(ValueError, match="layer 1: .* must share"):
        layer_similarity([qs[0], qs[1][:, :3]], ks)
    with pytest.raises(ValueError, match=r"similarity must be \[L, L"):
        echo_groups(np.ones((3, 2)), 0.5)
