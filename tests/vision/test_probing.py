"""Efficient probing (Psomas et al. 2025, Fig. 1) against a NumPy loop over the queries, forward and gradients, with
padded token sets; and its equivalence with a multi-head cross-attention probe whose projections it absorbs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.probing import (efficient_probing, efficient_probing_pooled, efficient_probing_reference,
                                    efficient_probing_weights)
from tests.helpers import assert_close, assert_grads_close

B, N, D, M, DOUT = 3, 11, 8, 4, 8
VALID = np.ones((B, N), bool)
VALID[1, 7:] = False          # a padded set
VALID[2, :] = False           # no token at all: pools to 0


def inputs(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x, queries, w_v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((B, N, D), (M, D), (D, DOUT)))
    return x, queries, w_v


def numpy_probe(x, queries, w_v, valid):
    """y_j = Σ_n softmax_n(q_j·x_n/√D) (x_n W_v)[j-th block], query by query, over the valid tokens."""
    x, queries, w_v = (np.asarray(a, np.float64) for a in (x, queries, w_v))
    block = DOUT // M
    out = np.zeros((B, DOUT))
    for b in range(B):
        idx = np.flatnonzero(valid[b])
        if idx.size == 0:
            continue
        v = x[b, idx] @ w_v
        for j in range(M):
            s = x[b, idx] @ queries[j] / np.sqrt(D)
            a = np.exp(s - s.max())
            a /= a.sum()
            out[b, j * block:(j + 1) * block] = a @ v[:, j * block:(j + 1) * block]
    return out


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_forward_equals_the_query_loop_with_padding(implementation):
    x, queries, w_v = inputs()
    valid = jnp.asarray(VALID)
    fn = jax.jit(lambda x, q, w: efficient_probing(x, q, w, valid=valid, implementation=implementation))
    assert_close(fn(x, queries, w_v), numpy_probe(x, queries, w_v, VALID), name=implementation)


def test_gradients_of_both_paths_equal_the_reference():
    x, queries, w_v = inputs(1)
    valid = jnp.asarray(VALID)

    def fast(x, q, w):
        return efficient_probing_pooled(x, q, w, valid=valid)

    def plain(x, q, w):
        """The probe written directly in the test: masked softmax by where, then the block-sliced values."""
        s = jnp.einsum("md,bnd->bmn", q, x, precision=jax.lax.Precision.HIGHEST) / np.sqrt(D)
        s = jnp.where(valid[:, None, :], s, -1e30)
        a = jnp.exp(s - s.max(-1, keepdims=True)) * valid[:, None, :]
        a = a / jnp.maximum(a.sum(-1, keepdims=True), 1e-30)
        v = (x @ w).reshape(B, N, M, DOUT // M)
        return jnp.einsum("bmn,bnmc->bmc", a, v, precision=jax.lax.Precision.HIGHEST).reshape(B, DOUT)

    assert_close(jax.jit(plain)(x, queries, w_v), numpy_probe(x, queries, w_v, VALID), name="plain")
    for fn in (fast, lambda x, q, w: efficient_probing_reference(x, q, w, valid=valid)):
        assert_grads_close(fn, plain, (x, queries, w_v), argnums=(0, 1, 2), names=["x", "queries", "w_v"])


def test_equals_a_multi_head_cross_attention_probe_with_absorbed_projections():
    """MHCA with M heads of width d_h and one learned query u: head j's logit uᵀ W_q^jᵀ W_k^j x / √d_h equals
    EP's q_jᵀ x / √D with q_j = √(D/d_h) W_k^jᵀ W_q^j u; the head outputs a_j W_v^j x are EP's blocks (W_o is left
    to the classifier)."""
    rng = np.random.default_rng(5)
    d_h = 3
    x, _, w_v = inputs(2)
    u = rng.standard_normal(D)
    w_q, w_k = rng.standard_normal((M, d_h, D)), rng.standard_normal((M, d_h, D))
    xs = np.asarray(x, np.float64)
    heads = []
    for j in range(M):
        s = np.einsum("bnd,ed,e->bn", xs, w_k[j], w_q[j] @ u) / np.sqrt(d_h)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        heads.append(np.einsum("bn,bnc->bc", a, xs @ np.asarray(w_v)[:, j * 2:(j + 1) * 2]))
    mhca = np.concatenate(heads, axis=-1)
    queries = jnp.asarray(np.stack([np.sqrt(D / d_h) * w_k[j].T @ (w_q[j] @ u) for j in range(M)]), jnp.float32)
    assert_close(jax.jit(efficient_probing)(x, queries, w_v), mhca, name="EP vs MHCA")


def test_weights_are_distributions_over_the_valid_tokens():
    x, queries, _ = inputs(3)
    a = np.asarray(jax.jit(lambda x, q: efficient_probing_weights(x, q, valid=jnp.asarray(VALID)))(x, queries))
    assert a.shape == (B, M, N)
    np.testing.assert_allclose(a[:2].sum(-1), 1.0, rtol=1e-6)
    assert np.all(a[1, :, 7:] == 0) and np.all(a[2] == 0)


def test_scale_and_bf16():
    x, queries, w_v = inputs(4)
    y = jax.jit(lambda *a: efficient_probing(*a, scale=1.0))(x, queries, w_v)
    assert_close(y, numpy_probe(x, queries * np.sqrt(D), w_v, np.ones((B, N), bool)), name="scale=1")
    xb, qb, wb = (a.astype(jnp.bfloat16) for a in (x, queries, w_v))
    out = jax.jit(efficient_probing)(xb, qb, wb)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, numpy_probe(x, queries, w_v, np.ones((B, N), bool)), rtol=3e-2, name="bf16")


def test_bad_inputs_name_the_argument():
    x, queries, w_v = inputs()
    with pytest.raises(ValueError, match=r"x must have shape \[batch, tokens, dim\]"):
        efficient_probing(x[0], queries, w_v)
    with pytest.raises(ValueError, match=r"queries must have shape \[num_queries, 8\]"):
        efficient_probing(x, queries[:, :4], w_v)
    with pytest.raises(ValueError, match="w_v must have shape .* multiple of num_queries = 4"):
        efficient_probing(x, queries, w_v[:, :6])
    with pytest.raises(ValueError, match=r"valid must be a bool array \[batch, tokens\]"):
        efficient_probing(x, queries, w_v, valid=jnp.ones((B, N)))
    with pytest.raises(ValueError, match="scale must be positive"):
        efficient_probing(x, queries, w_v, scale=-1.0)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        efficient_probing(x.astype(jnp.int32), queries, w_v)
