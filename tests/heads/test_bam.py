"""attnjax.heads.bam: the top-k rule against a NumPy loop, the router losses against their formulas, and the
fused and routed mixtures of attention experts against the expert-by-expert reference, forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.heads.bam import (bam_attention, bam_attention_reference, bam_attention_routed, load_balancing_loss,
                               router_z_loss, top_k_gates)
from tests.helpers import assert_close, numpy_rng

B, T, E, H, D, DM = 2, 7, 3, 2, 4, 6
NAMES = ["q", "k", "v", "logits", "w_o", "b_o"]


def output_and_grads(fn, args):
    """``fn(*args)`` and the gradients of ``sum(fn · w)`` (fixed random ``w``) for every argument, in one compile."""
    w = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args).shape)

    def both(*a):
        y, pullback = jax.vjp(fn, *a)
        return y, pullback(w.astype(y.dtype))

    return jax.jit(both)(*args)


def assert_same(fn, reference, args, rtol=1e-5):
    """Outputs and the gradients of every argument of ``fn`` and ``reference`` agree; returns fn's gradients."""
    (y, g), (y_ref, g_ref) = output_and_grads(fn, args), output_and_grads(reference, args)
    assert_close(y, y_ref, rtol=rtol, name="y")
    for name, a, e in zip(NAMES, g, g_ref):
        assert_close(a, e, rtol=rtol, name=f"d{name}")
    return g


def experts(seed, *, kv_experts, H=H, Hkv=1, dtype=jnp.float32):
    rng = numpy_rng(jax.random.key(seed))

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    return (normal(B, T, E, H, D), normal(B, T, kv_experts, Hkv, D), normal(B, T, kv_experts, Hkv, D),
            normal(B, T, E), normal(E, H, D, DM), normal(E, DM))


def numpy_top_k(logits, k):
    """Brute force: per token, the k largest probabilities (ties: lower index), renormalized."""
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    gates, index = np.zeros_like(p), np.zeros(p.shape[:-1] + (k,), np.int64)
    for pos in np.ndindex(p.shape[:-1]):
        order = sorted(range(p.shape[-1]), key=lambda e: (-p[pos][e], e))[:k]
        index[pos] = order
        gates[pos][order] = p[pos][order] / p[pos][order].sum()
    return gates, index, p


@pytest.mark.parametrize("k", [1, 2, 4, None])
def test_top_k_gates_equal_a_numpy_loop(k):
    logits = np.asarray(numpy_rng(jax.random.key(k or 0)).standard_normal((2, 5, 4)), np.float32)
    logits[0, 0] = [0.5, 0.5, 0.5, -1.0]                           # a tie: the lower indices win
    gates, index, probs = jax.jit(top_k_gates, static_argnums=1)(jnp.asarray(logits), k)
    g_np, i_np, p_np = numpy_top_k(logits, k or 4)
    assert_close(probs, p_np, rtol=1e-6, name="probs")
    assert_close(gates, g_np if k else p_np, rtol=1e-6, name="gates")
    if k:
        np.testing.assert_array_equal(np.asarray(index), i_np)
        np.testing.assert_array_equal(np.asarray(index[0, 0, :min(k, 3)]), np.arange(min(k, 3)))


def test_load_balancing_and_z_losses_equal_their_formulas():
    rng = numpy_rng(jax.random.key(3))
    logits = rng.standard_normal((2, 6, E)).astype(np.float32)

    @jax.jit
    def losses(z):
        gates, _, probs = top_k_gates(z, 2)
        selected = gates > 0
        grad = jax.grad(lambda p: load_balancing_loss(p, selected))(probs)
        uniform = jnp.full((4, E), 1.0 / E)
        return (selected, probs, load_balancing_loss(probs, selected), router_z_loss(z), grad,
                load_balancing_loss(uniform, uniform > 0))

    selected, probs, balance, z, grad, uniform = (np.asarray(a) for a in losses(jnp.asarray(logits)))
    f = selected.reshape(-1, E).sum(0) / selected.sum()            # Switch eq. 5 (top-k slots)
    P = probs.reshape(-1, E).mean(0)                                 # Switch eq. 6
    assert_close(balance, E * np.sum(f * P), rtol=1e-6, name="load balancing")
    assert_close(z, np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-6, name="z")
    assert_close(uniform, 1.0, rtol=1e-6, name="uniform")
    assert_close(grad, np.broadcast_to(E * f / (2 * 6), grad.shape), rtol=1e-6, name="dP")
    with pytest.raises(ValueError, match="one shape"):
        load_balancing_loss(jnp.asarray(probs), selected[..., :2])


@pytest.mark.parametrize("kv_experts, Hq, Hkv, k", [(E, 2, 1, None), (1, 4, 2, 2)])
def test_fused_path_equals_reference_forward_and_backward(kv_experts, Hq, Hkv, k):
    q, kk, v, logits, w_o, b_o = experts(0, kv_experts=kv_experts, H=Hq, Hkv=Hkv)
    mask = masks.Causal()

    def fused(q, kk, v, logits, w_o, b_o):
        return bam_attention(q, kk, v, top_k_gates(logits, k)[0], w_o, b_o, mask=mask)

    def reference(q, kk, v, logits, w_o, b_o):
        return bam_attention_reference(q, kk, v, top_k_gates(logits, k)[0], w_o, b_o, mask=mask)

    assert_same(fused, reference, (q, kk, v, logits, w_o, b_o))


def test_routed_path_equals_masked_reference_and_routes_gradients_to_the_router():
    q, kk, v, logits, w_o, b_o = experts(1, kv_experts=1, H=4, Hkv=2)

    def routed(q, kk, v, logits, w_o, b_o):
        gates, index, _ = top_k_gates(logits, 2)
        return bam_attention_routed(q, kk, v, index, jnp.take_along_axis(gates, index, -1), w_o, b_o,
                                    mask=masks.Causal())

    def reference(q, kk, v, logits, w_o, b_o):
        return bam_attention_reference(q, kk, v, top_k_gates(logits, 2)[0], w_o, b_o, mask=masks.Causal())

    d_logits = assert_same(routed, reference, (q, kk, v, logits, w_o, b_o))[3]
    assert np.mean(np.abs(np.asarray(d_logits)) > 1e-4) > 0.5, "the router's logits get gradients"


def test_bfloat16_is_finite_and_close_to_a_plain_mixture_of_attentions():
    """bf16 routed path against the definition in float64: Σ_e g_e (softmax(q_e kᵀ/√D) v W_o^e + b_o^e)."""
    args32 = experts(4, kv_experts=1)
    args16 = tuple(a.astype(jnp.bfloat16) for a in args32)
    q, kk, v, logits, w_o, b_o = args16
    gates, index, _ = top_k_gates(logits, 2)
    y = jax.jit(lambda *a: bam_attention_routed(*a, mask=masks.Causal()))(
        q, kk, v, index, jnp.take_along_axis(gates, index, -1), w_o, b_o)
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    q, kk, v, logits, w_o, b_o = (np.asarray(a, np.float64) for a in args32)
    g = np.asarray(top_k_gates(jnp.asarray(logits), 2)[0])
    s = np.einsum("btehd,bsd->behts", q, kk[:, :, 0, 0]) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mha = np.einsum("behts,bsd,ehdm->btem", p, v[:, :, 0, 0], w_o) + b_o
    assert_close(y, np.einsum("btem,bte->btm", mha, g), rtol=3e-2, name="bf16 vs plain MHA mixture")


def test_errors_name_the_argument():
    q, kk, v, logits, w_o, b_o = experts(5, kv_experts=E)
    gates = top_k_gates(logits, None)[0]
    with pytest.raises(NotImplementedError, match="shared K/V"):
        bam_attention_routed(q, kk, v, jnp.zeros((B, T, 1), jnp.int32), jnp.ones((B, T, 1)), w_o)
    with pytest.raises(ValueError, match="k/v must have 1 .shared. or E=3"):
        bam_attention(q, kk[:, :, :2], v[:, :, :2], gates, w_o)
    with pytest.raises(ValueError, match="w_o must have shape"):
        bam_attention_reference(q, kk, v, gates, w_o[:2])
    with pytest.raises(ValueError, match="gates must have shape"):
        bam_attention(q, kk, v, gates[:, :3], w_o)
    with pytest.raises(ValueError, match="q must have rank 5"):
        bam_attention(q[:, :, 0], kk, v, gates, w_o)
    with pytest.raises(ValueError, match="k must be at most the number of experts"):
        top_k_gates(logits, 4)
    with pytest.raises(TypeError, match="indices must be an integer array"):
        bam_attention_routed(q, kk[:, :, :1], v[:, :, :1], jnp.zeros((B, T, 1)), jnp.ones((B, T, 1)), w_o)
