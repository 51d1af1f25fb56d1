"""PAROAttention (catalog B6): the paper's permutation rule (Sec. 4.1, Eq. 1-3: share of sparse tiles +
tile incoherence) against a NumPy brute force over the six orders, and the INT8/INT4 block quantizer and quantized attention
against bounds derived from the quantizer's step."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.sparse.paro import (AXIS_ORDERS, choose_permutation, combine_metrics, int_max, paro_metrics,
                                 quantize_symmetric, quantized_attention_reference, tile_statistics)
from attnjax.softmax.softmax import softmax_attention_reference
from tests.helpers import assert_close, numpy_rng, random_qkv

KEY = jax.random.PRNGKey(0)
SLOW = pytest.mark.slow
GRID = (2, 3, 4)  # 24 tokens


# ----------------------------------------------------------------------------- the permutation rule

def paro_rule_brute_force(q, k, grid, block_q, block_kv, alpha, eps, sigma):
    """Eq. 1-3 of Zhao et al. 2025 (Sec. 4.1) by loops over the six orders, the heads and the tiles of the
    dense softmax map (float64), with the sparsity cost 1 - M_sparse in Eq. 3 (paro.combine_metrics)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    sparse = np.zeros((6, Hkv))
    quant = np.zeros((6, Hkv))
    for c, order in enumerate(AXIS_ORDERS):
        perm = np.arange(N).reshape(grid).transpose(order).ravel()
        for h in range(Hq):
            ms, mq = [], []
            for b in range(B):
                s = q[b, perm, h] @ k[b, perm, h // G].T / np.sqrt(D)
                p = np.exp(s - s.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                tiles = [p[i:i + block_q, n:n + block_kv] for i in range(0, N, block_q) for n in range(0, N, block_kv)]
                ms.append(np.mean([np.sum(np.abs(t) < eps) >= sigma * t.size for t in tiles]))
                mq.append(np.mean([np.abs(t).max() / np.abs(t).mean() if t.sum() > 0 else 1.0 for t in tiles]))
            sparse[c, h // G] += np.mean(ms) / G
            quant[c, h // G] += np.mean(mq) / G

    cost = 1.0 - sparse
    score = alpha * cost / cost.sum(0) + (1 - alpha) * quant / quant.sum(0)
    return score.argmin(0), score


def local_qk(grid, axes_per_head, noise, rng):
    """Head h attends along axis ``axes_per_head[h]`` of the grid (q = k = one-hot of the line id) plus noise."""
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), -1)
    heads = []
    for axis in axes_per_head:
        rest = [a for a in range(3) if a != axis]
        line = coords[:, rest[0]] * grid[rest[1]] + coords[:, rest[1]]
        heads.append(6.0 * np.eye(16)[line])
    x = np.stack(heads, 1)[None]
    q = x + noise * rng.standard_normal(x.shape)
    k = x + noise * rng.standard_normal(x.shape)
    return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


@pytest.mark.parametrize("alpha", [pytest.param(0.0, marks=SLOW), 0.5, pytest.param(1.0, marks=SLOW)])
def test_paro_rule_equals_brute_force_over_the_six_orders(alpha):
    """Random heads (GQA 4:2, tiles 5x4 with short last tiles) and structured heads: same scores and argmin.
    sigma = 0.75 makes sigma·(tile size) exact in float32 and float64 (tiles of 20 and 16 entries)."""
    rng = numpy_rng(KEY)
    q_loc, k_loc = local_qk(GRID, (2, 0), 0.5, rng)
    q_rnd, k_rnd, _ = random_qkv(KEY, B=1, T=24, Hq=2, Hkv=2, D=16)
    q = jnp.concatenate([q_loc, q_rnd], 2)
    k = jnp.concatenate([k_loc, k_rnd], 2)  # 4 query heads over 4 KV heads
    q = jnp.concatenate([q, q[:, :, ::-1]], 2)  # 8 query heads, GQA group 2
    orders, scores = jax.jit(lambda q, k: choose_permutation(q, k, GRID, 5, 4, rule="paro", alpha=alpha,
                                                             eps=0.02, sigma=0.75))(q, k)
    want_orders, want_scores = paro_rule_brute_force(q, k, GRID, 5, 4, alpha, 0.02, 0.75)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(orders), want_orders)


def test_paro_metrics_extremes():
    """Batch 0, a uniform map (every entry 1/12 > eps): no tile is sparse, every tile has Ψ = 1. Batch 1, each
    token attends only to itself: the 6 off-diagonal tiles are all below eps (sparse, Ψ = 1 for an all-zero
    tile); a diagonal tile has 12 of 16 entries below eps (75% < sigma = 90%) and max 1, mean 1/4 (Ψ = 4)."""
    x = jnp.stack([jnp.zeros((12, 12)), 40.0 * jnp.eye(12)])[:, :, None, :]
    m_sparse, m_quant = jax.jit(lambda x: paro_metrics(x, x, 4, 4))(x)
    assert_close(m_sparse, jnp.asarray([[0.0], [6 / 9]]), atol=1e-6)
    assert_close(m_quant, jnp.asarray([[1.0], [(3 * 4.0 + 6 * 1.0) / 9]]), atol=1e-4)
    m_sparse, _ = jax.jit(lambda x: paro_metrics(x, x, 4, 4, sigma=0.75))(x)
    assert_close(m_sparse, jnp.asarray([[0.0], [1.0]]), atol=1e-6)


def test_tile_statistics_equal_the_dense_map():
    """Counts below eps, maxima and sums per tile against the dense softmax map, GQA 4:2 and short tiles."""
    q, k, _ = random_qkv(KEY, B=2, T=11, S=13, Hq=4, Hkv=2, D=8)
    small, peak, total = jax.jit(lambda q, k: tile_statistics(q, k, 4, 5, eps=0.05))(q, k)
    p = np.asarray(jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, 2)) / np.sqrt(8), -1))
    for i, n in itertools.product(range(3), range(3)):
        t = p[:, :, 4 * i:4 * i + 4, 5 * n:5 * n + 5]
        np.testing.assert_array_equal(np.asarray(small[..., i, n]), (t < 0.05).sum((-2, -1)))
        np.testing.assert_allclose(np.asarray(peak[..., i, n]), t.max((-2, -1)), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(total[..., i, n]), t.sum((-2, -1)), rtol=1e-5)
    m_sparse, m_quant = jax.jit(lambda q, k: paro_metrics(q, k, 4, 5))(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert np.all(np.isfinite(np.asarray(m_sparse))) and np.all(np.asarray(m_quant) >= 1.0)


def test_combine_metrics_prefers_more_sparse_tiles_and_lower_incoherence():
    """Eq. 3 with the sparsity cost 1 - M_sparse: each term divided by its sum over the candidates."""
    m_sparse = jnp.asarray([0.8, 0.2, 0.5])
    m_quant = jnp.asarray([2.0, 2.0, 1.0])
    score = combine_metrics(m_sparse, m_quant, alpha=1.0)
    assert_close(score, jnp.asarray([0.2, 0.8, 0.5]) / 1.5, atol=1e-6)
    assert int(jnp.argmin(score)) == 0
    assert int(jnp.argmin(combine_metrics(m_sparse, m_quant, alpha=0.0))) == 2
    assert_close(combine_metrics(jnp.ones(3), jnp.ones(3), alpha=0.5), jnp.full(3, 0.5 / 3), atol=1e-6)


@SLOW
def test_paro_rule_puts_the_local_axis_innermost():
    """Head 0 is local along width, head 1 along frames: PARO's rule picks orders ending in those axes,
    which are best on both criteria (most sparse tiles, lowest incoherence)."""
    grid = (4, 4, 4)
    q, k = local_qk(grid, (2, 0), 0.0, numpy_rng(KEY))
    orders, scores = jax.jit(lambda q, k: choose_permutation(q, k, grid, 4, rule="paro"))(q, k)
    orders = np.asarray(orders)
    assert AXIS_ORDERS[orders[0]][-1] == 2 and AXIS_ORDERS[orders[1]][-1] == 0, orders
    for alpha in (0.0, 1.0):
        _, one = jax.jit(lambda q, k: choose_permutation(q, k, grid, 4, rule="paro", alpha=alpha))(q, k)
        assert np.all(np.asarray(one)[orders, [0, 1]] == np.asarray(one).min(0))


def test_choose_permutation_errors():
    q = jnp.zeros((1, 24, 1, 4))
    with pytest.raises(ValueError, match="rule"):
        choose_permutation(q, q, GRID, 4, rule="mass")
    with pytest.raises(ValueError, match="alpha"):
        choose_permutation(q, q, GRID, 4, rule="paro", alpha=1.5)
    with pytest.raises(ValueError, match="T = S = 24"):
        choose_permutation(q[:, :20], q[:, :20], GRID, 4, rule="paro")
    with pytest.raises(ValueError, match="eps"):
        choose_permutation(q, q, GRID, 4, rule="paro", eps=0.0)
    with pytest.raises(ValueError, match="sigma"):
        paro_metrics(q, q, 4, 4, sigma=1.5)
    with pytest.raises(ValueError, match="block_kv"):
        tile_statistics(q, q, 4, 0, eps=0.1)


# ----------------------------------------------------------------------------- the block quantizer

@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantizer_round_trips_representable_inputs(bits):
    """x = q·s with integer q in [-L, L] reaching ±L in each block and a power-of-two s: exact."""
    L = int_max(bits)
    rng = numpy_rng(KEY)
    q_int = rng.integers(-L, L + 1, size=(3, 4, 8)).astype(np.int8)
    q_int[:, :, 0] = L * rng.choice([-1, 1], size=(3, 4))
    s = 2.0 ** rng.integers(-6, 3, size=(3, 4, 1))
    x = jnp.asarray(q_int * s, jnp.float32)
    got_q, got_s = jax.jit(lambda x: quantize_symmetric(x, (2,), bits))(x)
    np.testing.assert_array_equal(np.asarray(got_q), q_int)
    np.testing.assert_array_equal(np.asarray(got_s), s.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got_q * got_s), np.asarray(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantizer_error_is_at_most_half_a_step(bits):
    x = jnp.asarray(numpy_rng(KEY).standard_normal((5, 6, 16)) * 3, jnp.float32)
    q_int, s = quantize_symmetric(x, (0, 2), bits)
    assert s.shape == (1, 6, 1) and q_int.dtype == jnp.int8
    assert int(jnp.abs(q_int).max()) == int_max(bits)
    assert bool(jnp.all(jnp.abs(q_int * s - x) <= s / 2 * (1 + 1e-6)))
    zero_q, zero_s = quantize_symmetric(jnp.zeros((2, 3)), (1,), bits)
    assert not zero_q.any() and bool(jnp.all(zero_s == 1.0))


# ----------------------------------------------------------------------------- quantized attention

def _blocks(x, block, axis):
    n = -(-x.shape[axis] // block)
    return [np.take(x, np.arange(i * block, min((i + 1) * block, x.shape[axis])), axis=axis) for i in range(n)]


def _step(x, bits, axes):
    """The quantizer step max|x| / L over ``axes`` (NumPy), 1 for an all-zero block."""
    amax = np.abs(x).max(axis=axes, keepdims=True)
    return np.where(amax > 0, amax / int_max(bits), 1.0)


@pytest.mark.parametrize("bits", [pytest.param(8, marks=SLOW), 4])
def test_qk_quantization_error_within_derived_bound(bits):
    """QK in INT``bits``, PV in float. Each logit moves by at most
    ``ε_t = scale·max_s Σ_d (|q_td|·σ_k/2 + |k̃_sd|·σ_q/2 + σ_q·σ_k/4)`` (σ: the blocks' steps, k̃: smoothed K),
    so every weight moves by a factor in ``[e^{-2ε}, e^{2ε}]`` and ``|o' − o| ≤ (e^{2ε_t} − 1)·max_s |v_s|``
    per row and channel."""
    B, T, H, D, bq, bk = 1, 21, 2, 8, 8, 4
    q, k, v = random_qkv(KEY, B=B, T=T, Hq=H, Hkv=H, D=D)
    out = jax.jit(lambda q, k, v: quantized_attention_reference(q, k, v, block_q=bq, block_kv=bk, qk_bits=bits,
                                                                pv_bits=None))(q, k, v)
    exact = softmax_attention_reference(q, k, v)
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    kn = kn - kn.mean(1, keepdims=True)
    sig_q = np.concatenate([np.broadcast_to(_step(b, bits, (1, 3)), b.shape[:3] + (1,)) for b in _blocks(qn, bq, 1)], 1)
    sig_k = np.concatenate([np.broadcast_to(_step(b, bits, (1, 3)), b.shape[:3] + (1,)) for b in _blocks(kn, bk, 1)], 1)
    eps = (np.einsum("bthd,bsh->bhts", np.abs(qn), sig_k[..., 0]) / 2
           + np.einsum("bshd,bth->bhts", np.abs(kn), sig_q[..., 0]) / 2
           + D * sig_q[..., 0].transpose(0, 2, 1)[..., None] * sig_k[..., 0].transpose(0, 2, 1)[:, :, None] / 4)
    eps = eps.max(-1) / np.sqrt(D)  # [B, H, T]
    bound = np.expm1(2 * eps).transpose(0, 2, 1)[..., None] * np.abs(vn).max(1, keepdims=True)
    err = np.abs(np.asarray(out, np.float64) - np.asarray(exact, np.float64))
    assert np.all(err <= bound + 1e-5), float((err - bound).max())
    assert err.max() > 1e-4  # really quantized


@pytest.mark.parametrize("bits", [pytest.param(8, marks=SLOW), 4])
def test_pv_quantization_error_within_derived_bound(bits):
    """QK in float, PV in INT``bits``: with ``p̂ = p + e`` (``|e| ≤ σ_p/2`` per tile) and ``v̂ = v + f``
    (``|f| ≤ σ_v/2`` per key block and channel), ``o' − o = Σ p̂ f / Σ p̂ + Σ e (v − o) / Σ p̂``, so
    ``|o' − o| ≤ max σ_v/2 + (Σ_s σ_p(s)/2)·max_s |v_s − o| / Σ p̂``."""
    B, T, H, D, bq, bk = 1, 21, 2, 8, 8, 4
    q, k, v = random_qkv(KEY, B=B, T=T, Hq=H, Hkv=H, D=D)
    out = jax.jit(lambda q, k, v: quantized_attention_reference(q, k, v, block_q=bq, block_kv=bk, qk_bits=None,
                                                                pv_bits=bits))(q, k, v)
    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", qn, kn - kn.mean(1, keepdims=True)) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))  # unnormalized, max 1 per row
    o = np.einsum("bhts,bshd->bthd", p, vn) / p.sum(-1)[..., None].transpose(0, 2, 1, 3)
    sig_p = np.zeros_like(p)
    for i, n in itertools.product(range(0, T, bq), range(0, T, bk)):
        sig_p[..., i:i + bq, n:n + bk] = _step(p[..., i:i + bq, n:n + bk], bits, (2, 3))
    sig_v = np.concatenate([np.broadcast_to(_step(b, bits, (1,)), b.shape) for b in _blocks(vn, bk, 1)], 1)
    p_hat = np.round(p / sig_p) * sig_p
    spread = np.abs(vn[:, None] - o[:, :, None]).max(2)  # [B, T, H, D]: max_s |v_s − o_t|
    bound = (sig_v.max(1, keepdims=True) / 2
             + (sig_p.sum(-1) / 2 / p_hat.sum(-1)).transpose(0, 2, 1)[..., None] * spread)
    err = np.abs(np.asarray(out, np.float64) - o)
    assert np.all(err <= bound + 1e-5), float((err - bound).max())
    assert err.max() > 1e-4


@pytest.mark.parametrize("qk_bits,pv_bits,limit", [pytest.param(8, 8, 2e-2, marks=SLOW), (8, 4, 0.33),
                                                    pytest.param(4, 4, 0.42, marks=SLOW)])
def test_quantized_attention_relative_error(qk_bits, pv_bits, limit):
    """Relative RMS error on Gaussian q, k, v (T = 64, 16-token blocks), measured over three seeds:
    INT8/INT8 1.4-1.7e-2, INT8 QK + INT4 PV 0.25-0.29, INT4/INT4 0.32-0.36. INT4 P·V on a near-uniform
    random map keeps about one level per entry; PARO applies it after reordering makes tiles coherent."""
    q, k, v = random_qkv(KEY, B=2, T=64, Hq=4, Hkv=2, D=16)
    out = jax.jit(lambda q, k, v: quantized_attention_reference(q, k, v, block_q=16, block_kv=16, qk_bits=qk_bits,
                                                                pv_bits=pv_bits))(q, k, v)
    ref = softmax_attention_reference(q, k, v)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 1e-4 < rel < limit, rel


def test_quantized_attention_bits_errors():
    q, k, v = random_qkv(KEY, B=1, T=8, Hq=1, D=4)
    with pytest.raises(ValueError, match="qk_bits"):
        quantized_attention_reference(q, k, v, qk_bits=2)
    with pytest.raises(ValueError, match="pv_bits"):
        quantized_attention_reference(q, k, v, pv_bits=16)
