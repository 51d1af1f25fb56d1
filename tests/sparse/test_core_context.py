"""CCA-Attention (Chen et al. 2024): access rule by brute force, fused matrix, fast path against reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.api import attention
from attnjax.sparse.core_context import (CoreContext, core_context_access, core_context_attention_reference,
                                         core_context_attention_xla, core_context_matrix)
from tests.helpers import assert_close, assert_grads_close, random_qkv

T, G, W, BQ = 21, 3, 4, 8  # 21 queries: not a multiple of the query tile 8; 7 groups of 3


def _brute_access(T: int, g: int, w: int):
    """Plain loop: query i uses the core token of every complete group that ends at least w tokens before it
    (group c ends at (c+1)g - 1 <= i - w), and every token no such group covers, up to itself."""
    tokens = np.zeros((T, T), bool)
    cores = np.zeros((T, T // g), bool)
    for i in range(T):
        covered = set()
        for c in range(T // g):
            if (c + 1) * g - 1 <= i - w:
                cores[i, c] = True
                covered.update(range(c * g, (c + 1) * g))
        for j in range(i + 1):
            tokens[i, j] = j not in covered
    return tokens, cores


def _public_code_mask(T: int, g: int, w: int):
    """The public code's ``generate_mask`` (``cca_attn.py``) transcribed: 1-based rows, pooled tokens first."""
    tokens = np.zeros((T, T), bool)
    cores = np.zeros((T, T // g), bool)
    for r in range(1, T + 1):
        for p in range(1, T // g + 1):
            cores[r - 1, p - 1] = r > w and (r - w) // g >= p
        pooled = max((r - w) // g * g, 0)
        size = w + max(r - pooled - w, 0)
        for col in range(1, T + 1):
            tokens[r - 1, col - 1] = r >= col > r - size
    return tokens, cores


@pytest.mark.parametrize("T,g,w", [(21, 3, 4), (16, 4, 4), (9, 2, 1), (5, 8, 3), (30, 5, 7)])
def test_access_rule_equals_brute_force(T, g, w):
    acc = core_context_access(T, group_size=g, window=w)
    for tokens, cores in (_brute_access(T, g, w), _public_code_mask(T, g, w)):
        np.testing.assert_array_equal(acc.tokens, tokens)
        np.testing.assert_array_equal(acc.cores, cores)
    assert not np.triu(acc.tokens, 1).any(), "a query sees a later token"
    window = acc.tokens.sum(1)[w - 1:]
    assert window.min() >= w and window.max() <= w + g - 1


def test_fused_matrix_rows_sum_to_one_every_earlier_token_reachable():
    q, k, _ = random_qkv(jax.random.PRNGKey(0), B=1, T=T, Hq=4, Hkv=2, D=4)
    P = np.asarray(jax.jit(lambda q, k: core_context_matrix(q, k, group_size=G, window=W))(q, k))
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    causal = np.tril(np.ones((T, T), bool))
    assert (P[..., causal] > 0).all() and (P[..., ~causal] == 0).all()


def test_reference_equals_a_numpy_loop():
    """One head by a plain loop: core tokens from the group's last query, then one softmax over cores and tokens."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((T, 4)) for _ in range(3))
    s = 0.5
    tokens, cores = _brute_access(T, G, W)
    expected = np.zeros((T, 4))
    for i in range(T):
        logits, vals = [], []
        for c in cores[i].nonzero()[0]:
            idx = np.arange(c * G, (c + 1) * G)
            w = np.exp(s * k[idx] @ q[idx[-1]])
            w /= w.sum()
            logits.append(s * q[i] @ (w @ k[idx]))
            vals.append(w @ v[idx])
        for j in tokens[i].nonzero()[0]:
            logits.append(s * q[i] @ k[j])
            vals.append(v[j])
        p = np.exp(np.array(logits) - max(logits))
        expected[i] = (p / p.sum()) @ np.array(vals)
    ref = jax.jit(lambda q, k, v: core_context_attention_reference(q, k, v, group_size=G, window=W,
                                                                   mask=masks.Causal(), scale=s))
    got = ref(*(jnp.asarray(x[None, :, None], jnp.float32) for x in (q, k, v)))
    assert_close(got[0, :, 0], expected, rtol=1e-5)


@pytest.mark.slow
def test_xla_matches_reference_forward_lse_and_grads_gqa_odd_length():
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=1, T=T, Hq=4, Hkv=2, D=8, Dv=6)
    kw = dict(group_size=G, window=W, mask=masks.Causal())
    out, lse = jax.jit(lambda q, k, v: core_context_attention_xla(q, k, v, block_q=BQ, return_lse=True, **kw))(q, k, v)
    ref, ref_lse = jax.jit(lambda q, k, v: core_context_attention_reference(q, k, v, return_lse=True, **kw))(q, k, v)
    assert_close(out, ref, rtol=1e-5)
    assert_close(lse, ref_lse, rtol=1e-5)
    assert_grads_close(lambda q, k, v: core_context_attention_xla(q, k, v, block_q=BQ, **kw),
                       lambda q, k, v: core_context_attention_reference(q, k, v, **kw), (q, k, v), (0, 1, 2),
                       rtol=1e-4, names=["dq", "dk", "dv"])


def test_later_tokens_do_not_change_earlier_outputs_and_bf16_is_finite():
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=1, T=T, Hq=2, D=4)
    fast = jax.jit(lambda q, k, v: attention(q, k, v, mechanism=CoreContext(group_size=G, window=W, block_q=BQ),
                                             mask=masks.Causal(), implementation="xla"))
    out = fast(q, k, v)
    changed = fast(q.at[:, 12:].set(3.0), k.at[:, 12:].set(9.0), v.at[:, 12:].set(-9.0))
    np.testing.assert_allclose(out[:, :12], changed[:, :12], atol=1e-6)
    low = fast(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert low.dtype == jnp.bfloat16 and bool(jnp.isfinite(low.astype(jnp.float32)).all())


def test_errors_name_the_argument():
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=1, T=9, Hq=2, D=4)
    with pytest.raises(NotImplementedError, match="causal"):
        core_context_attention_xla(q, k, v, group_size=2, window=2)
    with pytest.raises(ValueError, match="one length"):
        core_context_attention_reference(q, k[:, :5], v[:, :5], group_size=2, window=2, mask=masks.Causal())
    with pytest.raises(ValueError, match="group_size"):
        CoreContext(group_size=0)
    with pytest.raises(ValueError, match="window"):
        core_context_access(9, group_size=2, window=-1)
    with pytest.raises(ValueError, match="block_q"):
        CoreContext(block_q=0)
