"""VAR (Kang et al., ICLR 2025): the sink-dimension test against NumPy; on planted visual and text sinks, the
redistributed maps of both paths against eqs. 3-4 written in NumPy (sink columns scaled by p, the budget spread over
the non-sink image tokens in proportion, other rows and heads untouched, rows summing to 1); xla gradients against
the reference; the model-level use against the functional call; one-token decoding; and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import masks
from attnjax.inference.visual_sinks import (VAR, VisualTokens, sink_dimension_values, sink_tokens,
                                            var_attention_reference, var_attention_xla)
from attnjax.nn.attention import MultiHeadAttention
from tests.helpers import assert_close, assert_grads_close, numpy_rng

B, T, HQ, HKV, D = 2, 12, 2, 1, 8
IMAGE = slice(2, 8)
P, RHO, MIN_MASS = 0.6, 0.5, 0.2


def roles():
    """Tokens 2..7 are the image; token 0 (a BOS-like text sink) and one image token per sequence are sinks."""
    image = np.zeros((B, T), bool)
    image[:, IMAGE] = True
    sinks = np.zeros((B, T), bool)
    sinks[:, 0] = True
    sinks[0, 4] = sinks[1, 6] = True
    return jnp.asarray(image), jnp.asarray(sinks)


def planted_inputs():
    """Head 0 looks at the image and the sinks, head 1 away from the image; one-hot values (the output is the map)."""
    image, sinks = map(np.asarray, roles())
    rng = numpy_rng(jax.random.PRNGKey(0))
    q = rng.standard_normal((B, T, HQ, D)).astype(np.float32) * 0.3
    k = rng.standard_normal((B, T, HKV, D)).astype(np.float32) * 0.3
    k[..., 0] += 2.0 * image[..., None]
    k[..., 1] += 3.0 * sinks[..., None]
    q[:, :, 0, 0] += 2.0
    q[:, :, 0, 1] += 0.8
    q[:, :, 1, 0] -= 6.0
    v = np.broadcast_to(np.eye(T, dtype=np.float32)[None, :, None, :], (B, T, HKV, T))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def numpy_var(q, k, image, sinks):
    """Eqs. 3-4 in float64, row by row. Returns (maps [B, Hq, T, T], softmax maps, redistributed rows [B, Hq, T])."""
    q, k, image, sinks = (np.asarray(a, np.float64 if a.dtype != bool else bool) for a in (q, k, image, sinks))
    maps, plain = np.zeros((B, HQ, T, T)), np.zeros((B, HQ, T, T))
    moved = np.zeros((B, HQ, T), bool)
    for b in range(B):
        img, snk = image[b], sinks[b]
        for h in range(HQ):
            s = q[b, :, h] @ k[b, :, h // (HQ // HKV)].T / np.sqrt(D)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            plain[b, h] = a
            for i in range(T):
                row = a[i].copy()
                vis, vis_rest = row[img].sum(), row[img & ~snk].sum()
                if not img[i] and vis >= MIN_MASS and vis_rest / vis >= RHO:
                    budget = (1 - P) * row[snk].sum()
                    row[img & ~snk] += budget * row[img & ~snk] / vis_rest
                    row[snk] *= P
                    moved[b, h, i] = True
                maps[b, h, i] = row
    return maps, plain, moved


def test_sink_dimension_values_and_sink_tokens_match_numpy():
    rng = numpy_rng(jax.random.PRNGKey(1))
    hidden = rng.standard_normal((B, T, 1024)).astype(np.float32)  # φ <= sqrt(d_model)
    hidden[0, 3, 11] = 400.0
    hidden[1, 0, 40] = -300.0
    hidden[1, 7, 11] = 10.0  # large, but under 20 RMS
    phi = np.abs(hidden[..., [11, 40]]).max(-1) / np.sqrt((hidden.astype(np.float64) ** 2).mean(-1) + 1e-6)
    assert_close(sink_dimension_values(jnp.asarray(hidden), (11, 40)), phi, rtol=1e-6, name="phi")
    expected = np.zeros((B, T), bool)
    expected[0, 3] = expected[1, 0] = True
    np.testing.assert_array_equal(np.asarray(sink_tokens(jnp.asarray(hidden), (11, 40))), expected)


@pytest.mark.parametrize("path", [var_attention_reference, var_attention_xla])
def test_planted_sinks_mass_moves_onto_the_other_image_tokens(path):
    q, k, v = planted_inputs()
    image, sinks = roles()
    expected, plain, moved = numpy_var(q, k, image, sinks)
    assert moved[:, 0, 8:].all() and not moved[:, 1].any() and not moved[:, :, :8].any(), "planted rows"

    options = dict(block_q=4, block_kv=4) if path is var_attention_xla else {}
    run = jax.jit(functools.partial(path, p=P, rho=RHO, min_image_mass=MIN_MASS, mask=masks.Causal(), **options))
    got = np.asarray(run(q, k, v, image=image, sinks=sinks)).transpose(0, 2, 1, 3)  # the maps [B, Hq, T, S]
    assert_close(got, expected, atol=1e-5, name=path.__name__)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got[~moved], plain[~moved], atol=1e-6)  # other rows and head 1 untouched
    snk, img = np.asarray(sinks), np.asarray(image)
    for b in range(B):
        rows_got, rows_plain = got[b, 0, 8:], plain[b, 0, 8:]
        np.testing.assert_allclose(rows_got[:, snk[b]], P * rows_plain[:, snk[b]], atol=1e-6)
        gain = rows_got[:, img[b] & ~snk[b]] / rows_plain[:, img[b] & ~snk[b]]
        np.testing.assert_allclose(gain, gain[:, :1] * np.ones_like(gain), rtol=1e-4)  # in proportion
        assert (gain > 1).all()
        text = ~img[b] & ~snk[b]
        np.testing.assert_allclose(rows_got[:, text], rows_plain[:, text], atol=1e-6)


def test_xla_gradients_match_the_reference():
    q, k, _ = planted_inputs()
    v = jnp.asarray(numpy_rng(jax.random.PRNGKey(2)).standard_normal((B, T, HKV, D)).astype(np.float32))
    image, sinks = roles()
    assert numpy_var(q, k, image, sinks)[2].any(), "no row redistributed"
    options = dict(image=image, sinks=sinks, p=P, rho=RHO, min_image_mass=MIN_MASS, mask=masks.Causal())
    assert_grads_close(functools.partial(var_attention_xla, block_q=4, block_kv=4, **options),
                       functools.partial(var_attention_reference, **options), (q, k, v), argnums=(0, 1, 2),
                       rtol=1e-4, names=("q", "k", "v"))


def test_model_level_use_equals_the_functional_call_and_decoding():
    layer = MultiHeadAttention(16, HQ, num_kv_heads=HKV, mechanism=VAR(rho=0.3, min_image_mass=0.1),
                               rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(3), (B, T, 16)) * 2.0
    image, sinks = roles()
    tokens = VisualTokens(image, sinks, masks.Causal())
    got = nnx.jit(lambda layer, x, m: layer(x, mask=m))(layer, x, tokens)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    attend = jax.jit(lambda q, k, v, m: attnjax.attention(q, k, v, mechanism=layer.mechanism, mask=m,
                                                          implementation="reference"))
    full = attend(q, k, v, tokens)
    assert_close(got, layer.out(full), atol=1e-5, name="layer")
    t = T - 2  # one query against the cache so far gives that row
    step = attend(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], VisualTokens(image[:, :t + 1], sinks[:, :t + 1],
                                                                            masks.Causal()))
    assert_close(step[:, 0], full[:, t], atol=1e-6, name="decode")


def test_errors_name_the_argument():
    q, k, v = planted_inputs()
    image, sinks = roles()
    with pytest.raises(ValueError, match=r"mechanism 'var' needs mask=VisualTokens"):
        attnjax.attention(q, k, v, mechanism=VAR(), mask=masks.Causal())
    with pytest.raises(ValueError, match=r"VisualTokens.image must have shape \[B, S\] = \[2, 12\]"):
        attnjax.attention(q, k, v, mechanism=VAR(), mask=VisualTokens(image[:, :5], sinks))
    with pytest.raises(TypeError, match="VisualTokens.sinks must be a bool"):
        var_attention_reference(q, k, v, image=image, sinks=sinks.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"p \(the fraction of sink attention kept\) must be in \[0, 1\]"):
        VAR(p=1.5)
    with pytest.raises(ValueError, match=r"rho .* must be in \(0, 1\]"):
        VAR(rho=0.0)
    with pytest.raises(ValueError, match=r"sink_dims must be a non-empty sequence of ints in \[0, 16\)"):
        sink_dimension_values(jnp.zeros((1, 3, 16)), (16,))
    with pytest.raises(ValueError, match="hidden must be"):
        sink_tokens(jnp.zeros((3, 16)), (1,))
