"""LongHeads (catalog B16): selection rule against a brute-force loop, engine vs reference, decode on a KV cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.blocked.lists import to_block_mask
from attnjax.sparse.longheads import (LongHeads, chunk_representations, longheads_decode, longheads_mask,
                                      longheads_reference)
from tests.helpers import assert_close, outputs_and_grads, random_qkv

CHUNK, BLOCK_Q, TOP_K, LOCAL = 4, 8, 4, 2
T = 37  # not a multiple of the chunk nor of the query block


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def longheads_brute_force(q, k, v, representation, granularity, causal):
    """The rule with loops (float64): chunk representations, relevance, forced + top-k chunks.

    Returns bool ``[B, Hq, rows, nk]``: rows are query tokens (token granularity) or query blocks."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T_, Hq, D = q.shape
    G = Hq // k.shape[2]
    nk = math.ceil(T_ / CHUNK)
    reps = np.zeros((B, Hq, nk, D))
    for b in range(B):
        for h in range(Hq):
            for n in range(nk):
                idx = range(n * CHUNK, min((n + 1) * CHUNK, T_))
                keys, vals = k[b, idx, h // G], v[b, idx, h // G]
                if representation == "query":
                    u = q[b, idx, h].mean(0)
                else:
                    u = np.mean([_softmax(keys @ q[b, t, h] / math.sqrt(D)) @ vals for t in idx], axis=0)
                reps[b, h, n] = _softmax(keys @ u / math.sqrt(D)) @ keys
    rel = np.einsum("bthd,bhnd->bhtn", q, reps)

    def forced(t):
        own = t // CHUNK
        return {0} | {n for n in range(nk) if own - LOCAL < n <= own}

    def allowed(t):
        return {n for n in range(nk) if not causal or n * CHUNK <= t}

    rows = [[t] for t in range(T_)] if granularity == "token" else \
        [list(range(i, min(i + BLOCK_Q, T_))) for i in range(0, T_, BLOCK_Q)]
    keep = TOP_K if granularity == "token" else max(TOP_K, max(len(set().union(*map(forced, r))) for r in rows))
    out = np.zeros((B, Hq, len(rows), nk), bool)
    for b in range(B):
        for h in range(Hq):
            for i, r in enumerate(rows):
                ok = set().union(*map(allowed, r))
                fixed = set().union(*map(forced, r)) & ok
                score = rel[b, h, r].mean(0)
                others = sorted(ok - fixed, key=lambda n: (-score[n], n))
                out[b, h, i, sorted(fixed) + others[:min(keep, nk) - len(fixed)]] = True
    return out


def _inputs(seed=0, T=T, Hq=4, Hkv=2):
    return random_qkv(jax.random.PRNGKey(seed), B=2, T=T, Hq=Hq, Hkv=Hkv, D=8)


def _selector(representation, granularity):
    return LongHeads(block_q=BLOCK_Q, block_kv=CHUNK, top_k=TOP_K, local_chunks=LOCAL, representation=representation,
                     granularity=granularity)


@pytest.mark.parametrize("representation,granularity,causal", [
    ("query", "token", True),
    ("attention", "block", True),
    pytest.param("attention", "token", False, marks=pytest.mark.slow),
    pytest.param("query", "block", False, marks=pytest.mark.slow),
])
def test_selection_equals_brute_force_rule(representation, granularity, causal):
    """The selector's choice (token: the fine mask's rows; block: the lists) and the reference's dense
    mask both equal the looped rule; causal choices never start after the query."""
    q, k, v = _inputs()
    sel, mask = _selector(representation, granularity), (masks.Causal() if causal else None)
    expected = longheads_brute_force(q, k, v, representation, granularity, causal)

    @jax.jit
    def run(q, k, v):
        chosen = sel.token_blocks(q, k, v, mask=mask).dense(T, T) if granularity == "token" else \
            to_block_mask(sel.select(q, k, v=v, mask=mask))
        dense = longheads_mask(q, k, v, chunk=CHUNK, top_k=TOP_K, local_chunks=LOCAL, representation=representation,
                               granularity=granularity, block_q=BLOCK_Q, mask=mask)
        return chosen, dense

    chosen, dense = (np.asarray(x) for x in run(q, k, v))
    token_rows = expected if granularity == "token" else expected.repeat(BLOCK_Q, 2)[:, :, :T]
    token_mask = token_rows.repeat(CHUNK, -1)[..., :T] & (np.tril(np.ones((T, T), bool)) if causal else True)
    np.testing.assert_array_equal(dense, token_mask)
    np.testing.assert_array_equal(chosen, expected.repeat(CHUNK, -1)[..., :T] if granularity == "token" else expected)
    nk = expected.shape[-1]
    assert expected.sum(-1).max() < nk and (expected[..., 0]).all()  # sparse, and the first chunk always kept
    if causal:
        last_row = np.arange(expected.shape[2]) if granularity == "token" else \
            np.minimum(np.arange(expected.shape[2]) * BLOCK_Q + BLOCK_Q, T) - 1
        starts = np.arange(nk) * CHUNK
        assert not (expected & (starts[None, :] > last_row[:, None])).any()


@pytest.mark.parametrize("granularity", ["token", pytest.param("block", marks=pytest.mark.slow)])
def test_engine_equals_reference_forward_and_gradients(granularity):
    """xla engine (GQA, causal, odd length) == dense reference under the chunk mask, values and grads."""
    q, k, v = _inputs(1)
    sel, mask = _selector("query", granularity), masks.Causal()

    def engine(q, k, v):
        return aj.attention(q, k, v, mechanism=sel, mask=mask, implementation="xla")

    def reference(q, k, v):
        return longheads_reference(q, k, v, chunk=CHUNK, top_k=TOP_K, local_chunks=LOCAL, granularity=granularity,
                                   block_q=BLOCK_Q, mask=mask)

    (out, grads), (expected, expected_grads) = (outputs_and_grads(fn, (q, k, v), (0, 1, 2))
                                                for fn in (engine, reference))
    assert_close(out, expected)
    for n, a, e in zip("qkv", grads, expected_grads):
        assert_close(a, e, name=f"d{n}")


def test_decode_on_a_kv_cache_equals_the_reference_last_row():
    """One token against a cache of 40 slots holding 37 and 30 tokens (garbage after): the last row of
    the token-granular causal reference on each prefix."""
    q, k, v = _inputs(2, T=40)
    lengths = np.array([37, 30])
    reps = chunk_representations(q, k, v, chunk=CHUNK)
    q_t = jnp.stack([q[b, n - 1] for b, n in enumerate(lengths)])[:, None]
    decode = jax.jit(lambda q_t, n: longheads_decode(q_t, k, v, reps, n, chunk=CHUNK, top_k=TOP_K, local_chunks=LOCAL))
    out = decode(q_t, jnp.asarray(lengths))
    reference = jax.jit(lambda q, k, v: longheads_reference(q, k, v, chunk=CHUNK, top_k=TOP_K, local_chunks=LOCAL,
                                                            mask=masks.Causal()))
    for b, n in enumerate(lengths):
        assert_close(out[b], reference(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n])[0, -1:])
    # fewer chunks than top_k: dense causal attention over the prefix
    short = decode(q[:, 5:6], jnp.asarray([6, 6]))
    assert_close(short, jax.jit(lambda q, k, v: aj.attention(q, k, v, mask=masks.Causal()))(q[:, 5:6], k[:, :6],
                                                                                            v[:, :6]))


def test_bf16_and_block_granularity_last_row_decodes():
    """bf16 runs finite; with one query in the last block (T = 8·4 + 1), the block rule's last row is the decode."""
    q, k, v = _inputs(3, T=33)
    sel = _selector("query", "block")

    @jax.jit
    def run(q, k, v):
        half = aj.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mechanism=sel, mask=masks.Causal())
        full = aj.attention(q, k, v, mechanism=sel, mask=masks.Causal(), implementation="reference")
        step = longheads_decode(q[:, -1:], k, v, chunk_representations(q, k, chunk=CHUNK), 33, chunk=CHUNK,
                                top_k=TOP_K, local_chunks=LOCAL)
        return half, full, step

    half, full, step = run(q, k, v)
    assert half.dtype == jnp.bfloat16 and bool(jnp.isfinite(half).all())
    assert_close(step, full[:, -1:])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="top_k"):
        LongHeads(top_k=2, local_chunks=2)
    with pytest.raises(ValueError, match="representation"):
        LongHeads(representation="mean")
    with pytest.raises(ValueError, match="granularity"):
        LongHeads(granularity="row")
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=1, T=12, S=16, Hq=2, Hkv=1, D=8)
    with pytest.raises(NotImplementedError, match="self-attention"):
        _selector("query", "token").select(q, k)
    with pytest.raises(ValueError, match="needs v"):
        _selector("attention", "block").select(k, k)
    reps = chunk_representations(k, k, chunk=CHUNK)
    with pytest.raises(ValueError, match="one query token"):
        longheads_decode(q, k, v, reps, 16, chunk=CHUNK)
    with pytest.raises(ValueError, match="chunk_reps"):
        longheads_decode(q[:, :1], k, v, reps[:, :2], 16, chunk=CHUNK)
