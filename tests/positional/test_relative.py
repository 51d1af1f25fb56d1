"""Music Transformer / Shaw relative embeddings: explicit logits vs a brute-force loop vs the skewing trick vs the
per-tile rule (``RelativeEmbeddingBias.query_tile``), and the blocked paths vs the dense reference, forward and
gradients of q, k, v and the embeddings (the first user of the engine's ``Bias.reads_queries``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.blocked import flash_attention_xla
from attnjax.positional.relative import (ROW_CHUNK, RelativeEmbeddingBias, relative_embedding_index,
                                         relative_logits_reference, relative_logits_skewed, relative_max_distance, skew)
from attnjax.softmax.softmax import softmax_attention_reference
from tests.helpers import assert_close


def brute_force(q, embeddings, causal, num_keys, query_offset):
    """Shaw et al. eq. 5's ``q_i·w_clip(j − p_i, k)`` pair by pair, in NumPy (float64)."""
    q, table = np.asarray(q, np.float64), np.asarray(embeddings, np.float64)
    B, T, H, _ = q.shape
    k = (table.shape[0] - 1) if causal else (table.shape[0] - 1) // 2
    table = np.repeat(table[:, None], H, 1) if table.ndim == 2 else table
    start = num_keys - T if query_offset is None else query_offset
    out = np.zeros((B, H, T, num_keys))
    for i in range(T):
        for j in range(num_keys):
            offset = j - (start + i)
            if causal and offset > 0:
                continue
            row = min(max(offset, -k), 0 if causal else k) + k
            out[:, :, i, j] = np.einsum("bhd,hd->bh", q[:, i], table[row])
    return out


CASES = [  # causal, T, S, query_offset, embeddings shape (k = 3 causal, 2 bidirectional: offsets are clipped;
    (True, 7, 7, None, (4, 3, 8)),  # tables with a row per offset are in the tests of larger tiles below)
    (True, 11, 5, None, (4, 8)),
    (True, 1, 9, 4, (4, 3, 8)),
    (False, 5, 11, None, (5, 3, 8)),
    (False, 3, 9, 7, (5, 8)),
]


@pytest.mark.parametrize("causal,T,S,query_offset,shape", CASES)
def test_explicit_skewed_and_tiled_logits_equal_the_pairwise_definition(causal, T, S, query_offset, shape):
    q = jax.random.normal(jax.random.PRNGKey(0), (2, T, 3, 8))
    table = jax.random.normal(jax.random.PRNGKey(1), shape)
    offset = None if query_offset is None else jnp.asarray(query_offset)
    bias = RelativeEmbeddingBias(table, causal=causal, scale=0.5, query_offset=offset)
    lo, hi, c0, c1 = min(1, T - 1), min(4, T), 1, min(6, S)  # an inner tile: rows [lo, hi), columns [c0, c1)

    @jax.jit
    def forms(q, table, offset):
        kwargs = dict(causal=causal, num_keys=S, query_offset=offset)
        rule = RelativeEmbeddingBias(table, causal=causal, scale=0.5, query_offset=offset)
        qh = q.transpose(0, 2, 1, 3)
        return (relative_logits_reference(q, table, **kwargs), relative_logits_skewed(q, table, **kwargs),
                rule.query_tile(qh, jnp.arange(T), jnp.arange(S), T, S),
                rule.query_tile(qh[:, :, lo:hi], jnp.arange(lo, hi), jnp.arange(c0, c1), T, S))

    want = brute_force(q, table, causal, S, query_offset)
    explicit, skewed, whole, tile = forms(q, table, offset)
    assert_close(explicit, want, atol=1e-5, name="explicit")
    assert_close(skewed, want, atol=1e-5, name="skewed")
    assert_close(whole, 0.5 * want, atol=1e-5, name="rule, one tile")
    assert_close(tile, 0.5 * want[:, :, lo:hi, c0:c1], atol=1e-5, name="rule, inner tile")
    assert bias.max_distance == relative_max_distance(shape[0], causal=causal)


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_tiles_of_many_rows_and_beyond_the_clipping_distance(causal):
    """A 256-row tile is skewed in chunks of ``ROW_CHUNK`` rows; a tile whose offsets all clip to ``±k`` is one
    row of ``q·E``. Both tables: more rows than a chunk's window (multiplied row by row) and fewer (gathered)."""
    T = S = 288
    q = jax.random.normal(jax.random.PRNGKey(6), (1, T, 2, 4))
    tiles = [(0, 256, 16, 32), (256, 288, 0, 16), (0, 32, 256, 288), (1, 2, 0, 288)]

    @jax.jit
    def run(q, table):
        rule = RelativeEmbeddingBias(table, causal=causal, scale=1.0)
        qh = q.transpose(0, 2, 1, 3)
        return relative_logits_reference(q, table, causal=causal), [
            rule.query_tile(qh[:, :, a:b], jnp.arange(a, b), jnp.arange(c, d), T, S) for a, b, c, d in tiles]

    assert ROW_CHUNK == 128  # the first tile is two chunks, whose windows hold 128 + 16 - 1 = 143 offsets
    for k in (200, 8):  # k = 200: more rows than 143 and a tile beyond -k; k = 8: fewer rows, tiles beyond -k and +k
        table = jax.random.normal(jax.random.PRNGKey(k), (k + 1 if causal else 2 * k + 1, 2, 4))
        want, got = run(q, table)
        for (a, b, c, d), tile in zip(tiles, got):
            assert_close(tile, want[:, :, a:b, c:d], atol=1e-5, name=f"k={k} tile {(a, b, c, d)}")


def test_skewing_is_music_transformers_pad_reshape_slice():
    """Huang et al. §3.4 / tensor2tensor's ``_relative_position_to_absolute_position_masked``: pad a column on
    the left of ``Q·E_rᵀ [L, L]`` (E_r for offsets −L+1 … 0), reshape to ``[L + 1, L]``, drop the first row."""
    L = 6
    q = jax.random.normal(jax.random.PRNGKey(2), (1, L, 2, 4))
    table = jax.random.normal(jax.random.PRNGKey(3), (L, 2, 4))
    qe = jnp.einsum("bihd,rhd->bhir", q, table)
    paper = jnp.pad(qe, [(0, 0), (0, 0), (0, 0), (1, 0)]).reshape(1, 2, L + 1, L)[:, :, 1:]
    lower = np.tril(np.ones((L, L), bool))
    assert_close(jnp.where(lower, paper, 0.0), relative_logits_reference(q, table, causal=True), atol=1e-5)
    assert_close(skew(qe, L), paper, atol=0, rtol=0)


def test_embedding_rows_clip_offsets():
    offsets = jnp.arange(-6, 7)
    np.testing.assert_array_equal(relative_embedding_index(offsets, causal=True, max_distance=3),
                                  np.clip(np.arange(-6, 7), -3, 0) + 3)
    np.testing.assert_array_equal(relative_embedding_index(offsets, causal=False, max_distance=3),
                                  np.clip(np.arange(-6, 7), -3, 3) + 3)
    assert relative_max_distance(4, causal=True) == 3 and relative_max_distance(7, causal=False) == 3


def test_skewed_form_holds_no_pairwise_embeddings():
    """The skewed logits never hold a ``[T, S, D]`` gather; the explicit reference does (so the check can fail)."""
    T, D = 32, 16
    q, table = jnp.zeros((1, T, 1, D)), jnp.zeros((T, 1, D))

    def largest(fn):
        jaxpr = jax.make_jaxpr(lambda q, e: fn(q, e, causal=True))(q, table).jaxpr
        return max(int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars)

    assert largest(relative_logits_reference) >= T * T * D
    assert largest(relative_logits_skewed) <= T * (T + 1)


def _inputs(T, S, Hq, Hkv, shape, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(4), 4)
    q = jax.random.normal(ks[0], (2, T, Hq, 8), dtype)
    k = jax.random.normal(ks[1], (2, S, Hkv, 8), dtype)
    v = jax.random.normal(ks[2], (2, S, Hkv, 8), dtype)
    return q, k, v, 0.5 * jax.random.normal(ks[3], shape, dtype)


def _dense(q, k, v, table, *, causal, mask, scale):
    """The reference: softmax attention with ``scale·S_rel`` from the explicit logits added as an array bias."""
    logits = relative_logits_reference(q, table, causal=causal, num_keys=k.shape[1])
    return softmax_attention_reference(q, k, v, bias=scale * logits, mask=mask, scale=scale)


@pytest.mark.parametrize("causal", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_blocked_paths_equal_the_dense_reference_with_gradients_of_q_k_v_and_embeddings(causal):
    # GQA (4 query heads on 2 KV heads), T != S and neither a multiple of the 8x8 tiles. Causal: per-head tables
    # at the default scale, a row per offset (k = 26: 8x8 tiles multiply rows, the one-tile api call gathers);
    # bidirectional: one shared table, scale 0.3, offsets clipped at k = 5 (gathers, and tiles beyond -k and +k).
    T, S = 19, 27
    shape, scale = ((27, 4, 8), 8 ** -0.5) if causal else ((11, 8), 0.3)
    q, k, v, table = _inputs(T, S, 4, 2, shape)
    mask = aj.masks.Causal() if causal else None

    def rule(table):
        return RelativeEmbeddingBias(table, causal=causal, scale=None if causal else scale)

    paths = {
        "dense": lambda q, k, v, t: _dense(q, k, v, t, causal=causal, mask=mask, scale=scale),
        "flash_xla": lambda q, k, v, t: flash_attention_xla(q, k, v, bias=rule(t), mask=mask,
                                                            scale=None if causal else scale, block_q=8, block_kv=8),
        "api_xla": lambda q, k, v, t: aj.attention(q, k, v, bias=rule(t), mask=mask, scale=None if causal else scale,
                                                   implementation="xla"),
    }
    w = jax.random.normal(jax.random.PRNGKey(5), (2, T, 4, 8))

    @jax.jit
    def run(q, k, v, table):
        def out_and_grads(fn):
            out, pull = jax.vjp(fn, q, k, v, table)
            return out, pull(w)
        return {name: out_and_grads(fn) for name, fn in paths.items()}

    results = run(q, k, v, table)
    (want, want_grads) = results.pop("dense")
    assert float(jnp.abs(want_grads[3]).min()) > 0  # every embedding row (and head) is used and learns
    for name, (got, got_grads) in results.items():
        assert_close(got, want, rtol=1e-5, name=name)
        for arg, g, e in zip("qkvE", got_grads, want_grads):
            assert_close(g, e, atol=2e-5, rtol=2e-5, name=f"{name} d{arg}")


def test_reference_path_serves_the_rule_and_bf16_is_finite():
    q, k, v, table = _inputs(9, 13, 2, 2, (5, 2, 8), jnp.bfloat16)
    mask = aj.masks.Causal()

    @jax.jit
    def run(q, k, v, table):
        def loss(impl):
            return lambda *a: jnp.sum(aj.attention(*a[:3], bias=RelativeEmbeddingBias(a[3]), mask=mask,
                                                   implementation=impl).astype(jnp.float32))
        return [jax.value_and_grad(loss(impl), argnums=(0, 1, 2, 3))(q, k, v, table) for impl in ("reference", "xla")]

    (ref, ref_grads), (xla, xla_grads) = run(q, k, v, table)
    assert_close(xla, ref, rtol=2e-2)
    for g, e in zip(xla_grads, ref_grads):
        assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())
        assert_close(g, e, rtol=5e-2, atol=5e-2)


def test_bad_shapes_and_unserved_requests_are_refused():
    q = jnp.zeros((1, 5, 2, 8))
    with pytest.raises(ValueError, match=r"embeddings have shape \(4, 3, 8\)"):
        relative_logits_reference(q, jnp.zeros((4, 3, 8)), causal=True)
    with pytest.raises(ValueError, match=r"embeddings have shape \(4, 6\), expected \[R, D\] = \[R, 8\]"):
        relative_logits_skewed(q, jnp.zeros((4, 6)), causal=True)
    with pytest.raises(ValueError, match="embeddings have 4 rows, expected 2k \\+ 1, odd"):
        relative_logits_skewed(q, jnp.zeros((4, 8)), causal=False)
    with pytest.raises(ValueError, match="q must be rank 4"):
        relative_logits_reference(q[0], jnp.zeros((4, 8)), causal=True)
    with pytest.raises(ValueError, match="num_keys must be a positive int"):
        relative_logits_skewed(q, jnp.zeros((4, 8)), causal=True, num_keys=0)
    with pytest.raises(TypeError, match="embeddings must be a float array"):
        relative_logits_reference(q, jnp.zeros((4, 8), jnp.int32), causal=True)
    with pytest.raises(ValueError, match="skew needs num_keys <= M"):
        skew(jnp.zeros((3, 4)), 5)
    with pytest.raises(ValueError, match=r"RelativeEmbeddingBias embeddings have shape \(4, 3, 8\)"):
        aj.attention(q, q, q, bias=RelativeEmbeddingBias(jnp.zeros((4, 3, 8))))
    with pytest.raises(ValueError, match="embeddings have 4 rows"):
        aj.attention(q, q, q, bias=RelativeEmbeddingBias(jnp.zeros((4, 8)), causal=False))
    with pytest.raises(ValueError, match=r"embeddings have shape \(4, 6\)"):
        aj.attention(q, q, q, bias=RelativeEmbeddingBias(jnp.zeros((4, 6))), implementation="xla")
    with pytest.raises(TypeError, match="float"):
        aj.attention(q, q, q, bias=RelativeEmbeddingBias(jnp.zeros((4, 8), jnp.int32)))
    with pytest.raises(NotImplementedError, match="reads the queries"):
        RelativeEmbeddingBias(jnp.zeros((4, 8))).dense(5, 5)
    with pytest.raises(NotImplementedError):
        aj.attention(q, q, q, bias=RelativeEmbeddingBias(jnp.zeros((4, 8))), implementation="pallas")
