"""attnjax.heads.low_rank: LAMA's scores against their formula, the pooling paths against the dense reference
and a NumPy loop, forward and backward, causal and not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.heads.low_rank import low_rank_attention, low_rank_attention_reference, low_rank_scores
from tests.helpers import assert_close, numpy_rng

B, T, H, DM = 2, 7, 3, 5


def problem(seed, dtype=np.float32):
    rng = numpy_rng(jax.random.key(seed))
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((B, T, DM), (DM, H), (DM, H), (DM,)))


def numpy_lama(x, p, q, c, causal):
    """Mehta et al.: s_ih = tanh((p_h·c)(q_h·x_i)); position t pools tokens i (<= t when causal) by softmax_i."""
    out = np.zeros((B, T, H, DM))
    for b in range(B):
        for h in range(H):
            s = np.array([np.tanh((p[:, h] @ c) * (q[:, h] @ x[b, i])) for i in range(T)])
            for t in range(T):
                n = t + 1 if causal else T
                a = np.exp(s[:n]) / np.exp(s[:n]).sum()
                out[b, t, h] = a @ x[b, :n]
    return out


def test_scores_equal_the_rank_one_bilinear_form():
    x, p, q, c = problem(0)
    bilinear = np.stack([np.tanh(np.einsum("d,de,bte->bt", c, np.outer(p[:, h], q[:, h]), x)) for h in range(H)], -1)
    assert_close(jax.jit(low_rank_scores)(x, p, q, c), bilinear, rtol=1e-6, name="scores")


@pytest.mark.parametrize("causal", [False, True])
def test_pooling_equals_reference_and_numpy_forward_and_backward(causal):
    args = tuple(jnp.asarray(a) for a in problem(1))
    w = jax.random.normal(jax.random.key(2), (B, T, H, DM))

    def output_and_grads(fn):
        def both(*a):
            y, pullback = jax.vjp(lambda *b: fn(*b, causal=causal), *a)
            return y, pullback(w)
        return jax.jit(both)(*args)

    (y, g), (y_ref, g_ref) = output_and_grads(low_rank_attention), output_and_grads(low_rank_attention_reference)
    assert_close(y_ref, numpy_lama(*problem(1), causal), rtol=1e-5, name="numpy")
    assert_close(y, y_ref, rtol=1e-5, name="y")
    for name, a, e in zip(["x", "p", "q", "c"], g, g_ref):
        assert_close(a, e, rtol=1e-5, name=f"d{name}")
        assert np.any(np.asarray(a) != 0), name


def test_non_causal_rows_are_the_sentence_embedding_and_causal_rows_see_only_the_prefix():
    x, p, q, c = (jnp.asarray(a) for a in problem(3))
    pooled = jax.jit(low_rank_attention)(x, p, q, c)
    np.testing.assert_allclose(np.asarray(pooled), np.broadcast_to(np.asarray(pooled[:, :1]), pooled.shape))
    causal = jax.jit(lambda x: low_rank_attention(x, p, q, c, causal=True))
    changed = x.at[:, 4:].set(0.0)
    np.testing.assert_array_equal(np.asarray(causal(x)[:, :4]), np.asarray(causal(changed)[:, :4]))
    assert_close(causal(x)[:, -1], pooled[:, -1], rtol=1e-6, name="last row")


def test_bfloat16_is_finite_and_close():
    x, p, q, c = problem(4)
    run = jax.jit(lambda *a: low_rank_attention(*a, causal=True))
    y = run(*(jnp.asarray(a, jnp.bfloat16) for a in (x, p, q, c)))
    assert y.dtype == jnp.bfloat16
    assert_close(y, numpy_lama(x, p, q, c, True), rtol=2e-2, name="bf16")


def test_errors_name_the_argument():
    x, p, q, c = problem(5)
    with pytest.raises(ValueError, match=r"c must have shape \[d\]"):
        low_rank_attention(x, p, q, c[:3])
    with pytest.raises(ValueError, match="q must have p's shape"):
        low_rank_attention_reference(x, p, q[:, :2], c)
    with pytest.raises(ValueError, match=r"p must have shape \[d, H\]"):
        low_rank_scores(x, p[:3], q, c)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, d\]"):
        low_rank_attention(x[0], p, q, c)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        low_rank_attention(x.astype(np.int32), p, q, c)
