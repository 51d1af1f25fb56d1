"""URPE (Luo et al. 2022, §4): the Toeplitz weight against its definition, the reference against the
equation, the blocked path against the reference (outputs and gradients of q, k, v, c and a T5 table)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.positional.t5 import T5Bias
from attnjax.relative.urpe import (URPE, toeplitz_dense, toeplitz_index, toeplitz_tile, urpe_attention,
                                   urpe_attention_reference)
from attnjax.softmax.softmax import softmax_attention_reference
from tests.helpers import assert_close


def defined_c(c: np.ndarray, T: int, S: int, bidirectional: bool, start: int) -> np.ndarray:
    """``C[h, i, j] = c[i − j, h]`` by a loop: query ``i`` at position ``start + i``, offsets clipped to the table."""
    n, H = c.shape
    out = np.zeros((H, T, S), np.float32)
    for i in range(T):
        for j in range(S):
            delta = start + i - j
            R = (n - 1) // 2 if bidirectional else n - 1
            row = min(max(delta, -R), R) + R if bidirectional else min(max(delta, 0), R)
            out[:, i, j] = c[row]
    return out


@pytest.mark.parametrize("bidirectional,n", [(True, 7), (False, 5)])
def test_toeplitz_weight_equals_its_definition(bidirectional, n):
    c = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (n, 3)))
    T, S = 6, 11
    dense = np.asarray(toeplitz_dense(c, T, S, bidirectional=bidirectional))
    np.testing.assert_array_equal(dense[0], defined_c(c, T, S, bidirectional, start=S - T))
    shifted = np.asarray(toeplitz_dense(c, T, S, bidirectional=bidirectional, query_offset=jnp.asarray(2)))
    np.testing.assert_array_equal(shifted[0], defined_c(c, T, S, bidirectional, start=2))
    tile = toeplitz_tile(c, jnp.arange(2, 5), jnp.arange(3, 10), T, S, bidirectional=bidirectional)
    np.testing.assert_array_equal(np.asarray(tile), dense[:, :, 2:5, 3:10])
    index = np.asarray(toeplitz_index(jnp.arange(T), jnp.arange(S), T, S, n, bidirectional=bidirectional))
    assert index.min() == 0 and index.max() == n - 1  # both clipped ends are reached at these lengths


def _inputs(B, T, S, Hq, Hkv, D=8, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    return (jax.random.normal(ks[0], (B, T, Hq, D), dtype), jax.random.normal(ks[1], (B, S, Hkv, D), dtype),
            jax.random.normal(ks[2], (B, S, Hkv, D), dtype))


def test_reference_is_the_equation():
    """``(softmax(q·kᵀ/√D + B) ⊙ C)·v`` written out with jax.nn.softmax, the explicit bias and a looped C."""
    q, k, v = _inputs(1, 5, 8, 2, 2)
    c = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (7, 2)))
    bias = jax.random.normal(jax.random.PRNGKey(3), (1, 2, 5, 8))
    got = jax.jit(lambda q, k, v: urpe_attention_reference(q, k, v, c, bias=bias, bidirectional=True))(q, k, v)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8) + bias
    weights = jax.nn.softmax(logits, axis=-1) * defined_c(c, 5, 8, True, start=3)[None]
    assert_close(got, jnp.einsum("bhts,bshd->bthd", weights, v), rtol=1e-6)

    @jax.jit
    def causal(q, k, v):
        ones, doubled = (urpe_attention_reference(q, k, v, x * jnp.ones((3, 1)), bias=bias, mask=aj.masks.Causal())
                         for x in (1.0, 2.0))
        return ones, doubled, softmax_attention_reference(q, k, v, bias=bias, mask=aj.masks.Causal())

    ones, doubled, softmax = causal(q, k, v)
    assert_close(ones, softmax, rtol=1e-6)
    assert_close(doubled, 2 * ones, rtol=1e-6)  # post-softmax: the rows are not renormalized


CASES = {
    # name: (T, S, Hq, Hkv, bidirectional, causal, table rows, T5 table, soft cap + lse)
    "bidirectional-cross-gqa-t5": (11, 19, 4, 2, True, False, 9, True, False),
    "causal-ragged-capped-lse": (13, 13, 2, 2, False, True, 6, False, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_path_equals_the_reference_with_gradients(name):
    """Through ``attnjax.attention(mechanism=URPE(c=c))``: tiles of 4 x 8 over lengths that are not multiples."""
    T, S, Hq, Hkv, bidirectional, causal, n, with_table, extras = CASES[name]
    q, k, v = _inputs(2, T, S, Hq, Hkv)
    c = 1.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(4), (n, Hq))
    table = jax.random.normal(jax.random.PRNGKey(5), (8, Hq))
    mask = aj.masks.Causal() if causal else None

    def loss(implementation):
        def f(q, k, v, c, table):
            bias = T5Bias(table, bidirectional=bidirectional, max_distance=16) if with_table else None
            result = aj.attention(q, k, v, mechanism=URPE(c=c, bidirectional=bidirectional, block_q=4, block_kv=8),
                                  mask=mask, bias=bias, logits_soft_cap=5.0 if extras else None, return_lse=extras,
                                  implementation=implementation)
            out, lse = result if extras else (result, jnp.zeros(()))
            return jnp.sum(out * jnp.cos(out)) + 0.3 * jnp.sum(lse), out
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, c, table)

    (grads, out), (want_grads, want) = loss("xla"), loss("reference")
    assert_close(out, want, rtol=1e-5)
    for name_, g, w in zip("q k v c table".split(), grads, want_grads):
        assert_close(g, w, atol=2e-5, rtol=2e-5, name=f"d{name_}")
    assert float(jnp.abs(want_grads[3]).min()) > 0  # every offset of c is used at these lengths
    assert float(jnp.abs(want_grads[4]).max()) > 0 or not with_table


def test_bf16_is_finite_and_a_decode_step_reads_its_query_offset():
    q, k, v = _inputs(1, 9, 9, 2, 1)
    c = jnp.linspace(0.5, 1.5, 5)[:, None]
    bf16 = jax.jit(lambda q, k, v: urpe_attention(q, k, v, c.astype(jnp.bfloat16), mask=aj.masks.Causal(),
                                                  bidirectional=False, block_q=4, block_kv=4))
    out = bf16(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    parallel = urpe_attention_reference(q, k, v, c, mask=aj.masks.Causal(), bidirectional=False)
    cache_k, cache_v = (jnp.zeros((1, 12, 1, 8)).at[:, :9].set(x) for x in (k, v))  # 12 slots, 5 filled
    step = jax.jit(lambda offset: urpe_attention(
        q[:, 4:5], cache_k, cache_v, c, mask=aj.masks.Explicit((jnp.arange(12) <= offset)[None, None, None, :]),
        bidirectional=False, query_offset=offset, block_q=4, block_kv=4))(jnp.asarray(4))
    assert_close(step[:, 0], parallel[:, 4], rtol=1e-5)


def test_bad_tables_and_requests_are_refused():
    q, k, v = _inputs(1, 4, 4, 2, 2)
    with pytest.raises(ValueError, match=r"URPE table c has shape \(5, 3\)"):
        urpe_attention(q, k, v, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="odd number"):
        urpe_attention_reference(q, k, v, jnp.ones((4, 2)))
    with pytest.raises(TypeError, match="float"):
        aj.attention(q, k, v, mechanism=URPE(c=jnp.ones((5, 2), jnp.int32)))
    with pytest.raises(NotImplementedError, match="sinks"):
        aj.attention(q, k, v, mechanism=URPE(), sinks=jnp.zeros(2))
