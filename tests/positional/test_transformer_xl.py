"""Transformer-XL's relative position term (Dai et al. 2019, §3.3) as a bias rule that reads the queries:
sinusoids, tiles against the dense equation, the blocked and API paths against the dense reference,
forward and gradients (q, k, v, W_R, u, v), decode offsets, bf16, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.blocked import flash_attention_xla
from attnjax.positional.transformer_xl import (PreparedTransformerXLBias, TransformerXLBias, relative_sinusoids,
                                              transformer_xl_logits_reference)
from attnjax.softmax.softmax import softmax_attention_reference
from tests.helpers import assert_close


def test_sinusoids_are_vaswanis_in_transformer_xl_order():
    offsets = np.array([-5, 0, 3, 40])
    got = np.asarray(relative_sinusoids(jnp.asarray(offsets), 6, max_wavelength=100.0))
    for o, row in zip(offsets, got):
        freqs = [100.0 ** (-2 * f / 6) for f in range(3)]
        np.testing.assert_allclose(row, [math.sin(o * w) for w in freqs] + [math.cos(o * w) for w in freqs],
                                   atol=2e-6)
    with pytest.raises(ValueError, match="positive even"):
        relative_sinusoids(jnp.arange(3), 5)


def _params(Hq, Hw, D=8, d_r=12, seed=3):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (0.3 * jax.random.normal(ks[0], (Hw, d_r, D)), jax.random.normal(ks[1], (Hq, D)),
            jax.random.normal(ks[2], (Hq, D)))


def _qkv(T, S, Hq, Hkv, D=8, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    return tuple(jax.random.normal(key, (2, n, h, D), dtype) for key, n, h in zip(ks, (T, S, S), (Hq, Hkv, Hkv)))


def test_tiles_equal_dai_et_al_terms_b_plus_d_bottom_right_aligned():
    T, S, Hq = 7, 12, 3
    q, k, _ = _qkv(T, S, Hq, Hq)
    w_r, v, u = _params(Hq, 1)  # one W_R shared by the heads
    spans = ((slice(2, 5), slice(3, 9)), (slice(6, 7), slice(0, 12)), (slice(0, 7), slice(11, 12)))

    @jax.jit
    def tiles(q, k, w_r, v, u):
        rule = TransformerXLBias(w_r, v, u, scale=0.5)
        qh = rule.content_queries(q).transpose(0, 2, 1, 3)
        whole = rule.query_tile(qh, jnp.arange(T), jnp.arange(S), T, S)
        parts = [rule.query_tile(qh[:, :, rows], jnp.arange(T)[rows], jnp.arange(S)[cols], T, S) for rows, cols in spans]
        dense = transformer_xl_logits_reference(q, k, w_r, v, u, scale=0.5)
        return whole, parts, dense - 0.5 * jnp.einsum("bthd,bshd->bhts", q + u, k)

    whole, parts, dense_position_terms = tiles(q, k, w_r, v, u)
    assert_close(whole, dense_position_terms, atol=1e-5)
    # one pair by hand: (q_i + v)·W_R R_(i+S-T-j), scaled
    i, j, h = 2, 9, 1
    r = np.asarray(relative_sinusoids(jnp.asarray(i + S - T - j), 12), np.float64)
    want = 0.5 * np.dot(np.asarray(q[0, i, h] + v[h], np.float64), r @ np.asarray(w_r[0], np.float64))
    np.testing.assert_allclose(float(whole[0, h, i, j]), want, rtol=1e-5)
    for (rows, cols), part in zip(spans, parts):
        assert_close(part, whole[:, :, rows, cols], atol=1e-5)


def test_a_tile_of_two_row_chunks_equals_the_dense_terms_with_gradients():
    """A 256-row tile is scored in chunks of 128 rows (``chunked_relative_logits``), each against its own window of
    offsets: the tile and its gradients (q, W_R, v, u) equal the dense position terms'."""
    T, S, Hq = 256, 40, 2
    q = _qkv(T, S, Hq, Hq)[0][:1]
    w_r, v, u = _params(Hq, Hq)
    weights = jax.random.normal(jax.random.PRNGKey(7), (1, Hq, T, S))

    def tile(q, w_r, v, u):
        rule = TransformerXLBias(w_r, v, u)
        return jnp.sum(weights * rule.query_tile(rule.content_queries(q).transpose(0, 2, 1, 3), jnp.arange(T),
                                                 jnp.arange(S), T, S))

    def dense(q, w_r, v, u):
        zero_keys = jnp.zeros((1, S, Hq, q.shape[-1]))
        return jnp.sum(weights * transformer_xl_logits_reference(q, zero_keys, w_r, v, u))

    both = jax.jit(lambda *a: (jax.value_and_grad(tile, argnums=(0, 1, 2, 3))(*a),
                               jax.value_and_grad(dense, argnums=(0, 1, 2, 3))(*a)))
    (got, dgot), (want, dwant) = both(q, w_r, v, u)
    assert_close(got, want, rtol=1e-5)
    for g, w, name in zip(dgot, dwant, ("q", "w_r", "v", "u")):
        assert_close(g, w, atol=1e-4, rtol=1e-4, name=name)


def _grads(fn, q, k, vals, w_r, v, u, mask, scale):
    def loss(q, k, vals, w_r, v, u):
        return jnp.sum(jnp.sin(fn(q, k, vals, w_r, v, u, mask=mask, scale=scale)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(q, k, vals, w_r, v, u)


def _reference(q, k, vals, w_r, v, u, *, mask, scale):
    logits = transformer_xl_logits_reference(q, k, w_r, v, u, scale=scale)
    return softmax_attention_reference(jnp.zeros_like(q), k, vals, bias=logits, mask=mask)


def _fast(path):
    def run(q, k, vals, w_r, v, u, *, mask, scale):
        rule = TransformerXLBias(w_r, v, u, scale=scale)
        return path(rule.content_queries(q), k, vals, bias=rule, mask=mask, scale=scale)
    return run


PATHS = {"blocked": lambda *a, **kw: flash_attention_xla(*a, block_q=4, block_kv=8, **kw),
         "api_xla": lambda *a, **kw: aj.attention(*a, implementation="xla", **kw)}


@pytest.mark.parametrize("causal", [True, False])
def test_paths_equal_the_dense_reference_forward_and_gradients(causal):
    if causal:  # odd length, GQA, the engine's default scale
        T, S, Hq, Hkv, mask, scale = 13, 13, 4, 2, aj.masks.Causal(), None
    else:  # T != S (bottom-right), odd lengths, an explicit scale
        T, S, Hq, Hkv, mask, scale = 7, 19, 2, 2, None, 0.3
    q, k, vals = _qkv(T, S, Hq, Hkv)
    params = _params(Hq, Hq)
    want = _grads(_reference, q, k, vals, *params, mask, scale)
    for name, path in PATHS.items() if causal else [("blocked", PATHS["blocked"])]:
        got = _grads(_fast(path), q, k, vals, *params, mask, scale)
        assert_close(got[0], want[0], rtol=1e-5, name=f"{name} loss")
        for arg, g, w in zip(("q", "k", "v", "w_r", "pos_v", "u"), got[1], want[1]):
            assert float(jnp.abs(w).max()) > 0
            assert_close(g, w, atol=3e-5, rtol=3e-5, name=f"{name} d{arg}")


def test_prepared_rule_slices_what_each_tile_would_compute():
    """``prepare`` builds ``scale·W_R R_o`` once for every offset of the padded extent; its tiles (padding rows and
    columns included, and a decode step's ``query_offset``) equal the per-tile rule's, and a tile beyond the
    extent is NaN rather than shifted."""
    w_r, v, u = _params(2, 2)
    q = _qkv(11, 11, 2, 2)[0].transpose(0, 2, 1, 3)
    q = jnp.concatenate([q, q[:, :, :1]], axis=2)  # 12 rows: row 11 is padding
    cases = [(None, 11, 11, [(0, 4, 4, 12), (8, 12, 8, 16), (4, 8, 0, 16)]),
             (jnp.asarray(5), 2, 16, [(0, 2, 0, 16), (0, 2, 8, 16)])]
    for offset, T, S, tiles in cases:
        @jax.jit
        def forms(q, offset):
            rule = TransformerXLBias(w_r, v, u, scale=0.7, query_offset=offset)
            prepared = rule.prepare(T, S, 12, 16)
            out = []
            for a, b, c, d in tiles:
                args = (q[:, :, a:b], jnp.arange(a, b), jnp.arange(c, d), T, S)
                local = prepared.for_tile(*args[1:])
                out.append((rule.query_tile(*args), prepared.query_tile(*args), local.query_tile(*args), local.table))
            return prepared, out

        prepared, out = forms(q, offset)
        assert isinstance(prepared, PreparedTransformerXLBias) and prepared.table.shape == (2, 12 + 16 - 1, 8)
        for (a, b, c, d), (want, got, local, window) in zip(tiles, out):
            assert_close(got, want, atol=1e-5, name=f"tile {(a, b, c, d)}")
            assert_close(local, want, atol=1e-5, name=f"restricted tile {(a, b, c, d)}")
            assert window.shape == (2, (b - a) + (d - c) - 1, 8)
    beyond = jax.jit(lambda q: TransformerXLBias(w_r, v).prepare(11, 11).query_tile(q, jnp.arange(8, 12), jnp.arange(4),
                                                                                    11, 11))(q[:, :, 8:12])
    assert bool(jnp.isnan(beyond).all())


def test_prepared_blocked_path_equals_the_reference_at_an_odd_length_with_two_row_chunks():
    """The blocked path prepares the rule once per call: 256-row query tiles (two 128-row chunks, the second tile
    mostly padding) and 64-wide key tiles at an odd length equal the dense reference, forward and gradients to
    q, k, v, W_R, v and u."""
    T = 261
    q, k, vals = _qkv(T, T, 2, 1)
    params = _params(2, 1)
    want = _grads(_reference, q, k, vals, *params, aj.masks.Causal(), None)
    blocked = _fast(lambda *a, **kw: flash_attention_xla(*a, block_q=256, block_kv=64, **kw))
    got = _grads(blocked, q, k, vals, *params, aj.masks.Causal(), None)
    assert_close(got[0], want[0], rtol=1e-5, name="loss")
    for arg, g, w in zip(("q", "k", "v", "w_r", "pos_v", "u"), got[1], want[1]):
        assert_close(g, w, atol=5e-5, rtol=5e-5, name=f"d{arg}")


def test_query_offset_places_a_decode_step_in_a_partly_filled_cache():
    T, max_len = 6, 10
    q = _qkv(T, T, 2, 2)[0]
    w_r, v, u = _params(2, 2)
    qh = q.transpose(0, 2, 1, 3)
    parallel = jax.jit(lambda qh: TransformerXLBias(w_r, v, u).query_tile(qh, jnp.arange(T), jnp.arange(T), T, T))(qh)

    @jax.jit
    def step(q_t, length):
        return TransformerXLBias(w_r, v, u, query_offset=length).query_tile(q_t, jnp.arange(1), jnp.arange(max_len),
                                                                              1, max_len)

    for length in (0, 3, 5):
        row = step(qh[:, :, length:length + 1], jnp.asarray(length))
        assert_close(row[:, :, 0, :length + 1], parallel[:, :, length, :length + 1], atol=1e-5)


def test_bf16_is_finite_through_the_api():
    q, k, vals = _qkv(9, 9, 2, 2, dtype=jnp.bfloat16)
    w_r, v, u = (x.astype(jnp.bfloat16) for x in _params(2, 2))

    @jax.jit
    def run(q, k, vals, w_r, v, u):
        rule = TransformerXLBias(w_r, v, u)
        return aj.attention(rule.content_queries(q), k, vals, bias=rule, mask=aj.masks.Causal(), implementation="xla")

    out = run(q, k, vals, w_r, v, u)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_bad_rules_are_refused():
    q = jnp.zeros((1, 4, 2, 8))
    w_r, v, _ = _params(2, 2)
    with pytest.raises(ValueError, match=r"w_r has shape \(3, 12, 8\)"):
        aj.attention(q, q, q, bias=TransformerXLBias(jnp.zeros((3, 12, 8)), v))
    with pytest.raises(ValueError, match="must be even"):
        aj.attention(q, q, q, bias=TransformerXLBias(jnp.zeros((2, 5, 8)), v))
    with pytest.raises(ValueError, match=r"u has shape \(2, 4\)"):
        aj.attention(q, q, q, bias=TransformerXLBias(w_r, v, jnp.zeros((2, 4))))
    with pytest.raises(TypeError, match="float"):
        aj.attention(q, q, q, bias=TransformerXLBias(w_r, jnp.zeros((2, 8), jnp.int32)))
    with pytest.raises(ValueError, match="expected head dim D = 4"):
        q4 = jnp.zeros((1, 4, 2, 4))
        aj.attention(q4, q4, q4, bias=TransformerXLBias(w_r, v), implementation="xla")
    with pytest.raises(NotImplementedError, match="reads the queries"):
        TransformerXLBias(w_r, v).dense(4, 4)


def test_non_contiguous_indices_give_nan_not_wrong_logits():
    w_r, v, _ = _params(2, 2)
    tile = jax.jit(lambda q, rows: TransformerXLBias(w_r, v).query_tile(q, rows, jnp.arange(4), 5, 5))(
        jnp.ones((1, 2, 3, 8)), jnp.array([0, 2, 4]))
    assert bool(jnp.isnan(tile).all())
