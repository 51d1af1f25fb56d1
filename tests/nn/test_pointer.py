"""Pointer attention (Vinyals et al. 2015, eq. 3): the chunked path and the module against the naive equation,
forward and every gradient, odd lengths, masks (fully masked rows included), bf16, jit, bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.pointer import PointerAttention, pointer_log_probs, pointer_scores, pointer_scores_reference
from attnjax.testing.modules import check_module_against_reference
from tests.helpers import assert_close

B, N, M, DE, DD, H = 2, 9, 7, 8, 6, 4  # M = 7 decoder steps: not a multiple of the chunk of 3


def inputs(seed: int = 0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s, np.float32) for s in ((B, N, DE), (B, M, DD), (DE, H), (DD, H), (H,))]
    return [jnp.asarray(a, dtype) for a in arrays]


def allowed(seed: int = 1) -> jax.Array:
    """A random mask with row (0, 3) fully masked."""
    mask = np.random.default_rng(seed).random((B, M, N)) < 0.6
    mask[0, 3] = False
    mask[1, 2] = True
    return jnp.asarray(mask)


def masked_log_probs_numpy(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Brute force per row: log of the softmax over the allowed entries; -inf elsewhere."""
    out = np.full(scores.shape, -np.inf)
    for b, i in np.ndindex(*scores.shape[:2]):
        keep = mask[b, i]
        if keep.any():
            s = scores[b, i, keep].astype(np.float64)
            out[b, i, keep] = s - np.log(np.sum(np.exp(s - s.max()))) - s.max()
    return out


def test_reference_is_the_equation_elementwise():
    e, d, w1, w2, v = inputs()
    u = np.asarray(pointer_scores_reference(e, d, w1, w2, v))
    e, d, w1, w2, v = map(np.asarray, (e, d, w1, w2, v))
    for b, i, j in [(0, 0, 0), (1, 6, 8), (0, 3, 5)]:
        np.testing.assert_allclose(u[b, i, j], v @ np.tanh(w1.T @ e[b, j] + w2.T @ d[b, i]), rtol=1e-5)


def test_masked_log_probs_against_brute_force_and_gradients():
    scores = jnp.asarray(np.random.default_rng(2).standard_normal((B, M, N)) * 3, jnp.float32)
    mask = allowed()
    w = jnp.asarray(np.random.default_rng(3).standard_normal((B, M, N)), jnp.float32)

    @jax.jit
    def run(s):
        """Log-probabilities, their gradient (masked entries weighted 0) and the [B, n] mask form."""
        loss = lambda s: jnp.sum(jnp.where(mask, pointer_log_probs(s, mask), 0.0) * w)
        return pointer_log_probs(s, mask), jax.grad(loss)(s), pointer_log_probs(s, mask[:, 0])

    out, grad, per_step = map(np.asarray, run(scores))
    expected = masked_log_probs_numpy(np.asarray(scores), np.asarray(mask))
    assert np.array_equal(np.isneginf(out), np.isneginf(expected))
    np.testing.assert_allclose(out[np.isfinite(expected)], expected[np.isfinite(expected)], rtol=1e-5, atol=1e-5)
    assert np.all(np.isneginf(out[0, 3])), "a fully masked row is all -inf"
    assert np.all(np.isfinite(grad)), "no NaN from masked entries or the fully masked row"
    assert np.all(grad[~np.asarray(mask)] == 0), "masked positions get no gradient"
    assert np.array_equal(np.isneginf(per_step), np.broadcast_to(~np.asarray(mask[:, :1]), (B, M, N)))


def reference_module(p, e, d, mask=None):
    """Eq. 3 on the module's parameters, then the masked log-softmax."""
    return pointer_log_probs(pointer_scores_reference(e, d, p["w1"], p["w2"], p["v"]), mask)


def test_chunked_module_matches_reference_forward_and_every_gradient():
    """The "xla" path (``pointer_scores``) at an odd length, 7 steps over chunks of 3 (a padded last chunk), against
    eq. 3: outputs, the gradients of ``W1``, ``W2``, ``v`` and of both inputs."""
    e, d = inputs()[:2]
    model = PointerAttention(DE, DD, H, chunk_size=3, rngs=nnx.Rngs(0))
    check_module_against_reference(model, reference_module, e, d)


def test_bf16_single_chunk_with_mask_against_reference():
    """bf16 inputs through the one-chunk path (chunk_size 64 > 7 steps) with a mask: bf16 out, -inf where masked,
    finite and close to the float32 reference elsewhere."""
    e, d = inputs(dtype=jnp.bfloat16)[:2]
    model = PointerAttention(DE, DD, H, rngs=nnx.Rngs(0))
    mask = jnp.ones((B, M, N), bool).at[:, :, 4].set(False)
    out = nnx.jit(lambda m, *a: m(*a))(model, e, d, mask)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    assert np.all(np.isneginf(out[:, :, 4]))
    p = {"w1": model.w1[...], "w2": model.w2[...], "v": model.v[...]}
    expected = np.asarray(reference_module(p, e.astype(jnp.float32), d.astype(jnp.float32), mask))
    assert_close(np.delete(out, 4, axis=2), np.delete(expected, 4, axis=2), rtol=2e-2, name="bf16")


def test_bad_inputs_raise_clear_errors():
    e, d, w1, w2, v = inputs()
    with pytest.raises(ValueError, match="same B"):
        pointer_scores(e, d[:1], w1, w2, v)
    with pytest.raises(ValueError, match="w1"):
        pointer_scores_reference(e, d, w2, w2, v)
    with pytest.raises(TypeError, match="encoded"):
        pointer_scores(e.astype(jnp.int32), d, w1, w2, v)
    with pytest.raises(ValueError, match="chunk_size"):
        pointer_scores(e, d, w1, w2, v, chunk_size=0)
    scores = jnp.zeros((B, M, N))
    with pytest.raises(TypeError, match="mask"):
        pointer_log_probs(scores, jnp.ones((B, M, N), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, m, n\]"):
        pointer_log_probs(scores, jnp.ones((B, M, N + 1), bool))
    with pytest.raises(NotImplementedError, match="PointerAttention"):
        PointerAttention(DE, DD, implementation="pallas", rngs=nnx.Rngs(0))
