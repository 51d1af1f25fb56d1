"""AttentionMILPooling (ABMIL, Ilse et al. 2018) and ACMILPooling (Zhang et al. 2024) against plain references,
with padded bags; ACMIL's masking rule written here independently (ranks by comparison, not top_k/argsort)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.mil import ACMILPooling, AttentionMILPooling, GatedAttentionLogits, bag_example
from attnjax.testing.modules import check_module_against_reference, parameter_count
from attnjax.vision.mil import acmil_diversity_loss

HP = jax.lax.Precision.HIGHEST


def logits_reference(p, x):
    """Ilse et al. eq. 8 (tanh) or eq. 9 (tanh ⊙ sigmoid gate), one row per branch."""
    t = jnp.tanh(x @ p["v"]["kernel"] + p["v"]["bias"])
    if "u" in p:
        t = t * jax.nn.sigmoid(x @ p["u"]["kernel"] + p["u"]["bias"])
    return jnp.einsum("bnl,lm->bmn", t, p["w"]["kernel"], precision=HP)


def pool_reference(s, x, keep):
    """z_m = Σ_n softmax over kept n of s_{m,n} · x_n (eq. 7)."""
    a = jax.nn.softmax(jnp.where(keep, s, -1e30), axis=-1) * keep
    return jnp.einsum("bmn,bnc->bmc", a, x, precision=HP), a


def stkim_reference(s, valid, noise, top_k, p):
    """Drop, per row, the int(k·p) top-k instances whose slots carry the smallest noise, k = min(top_k, n_valid).
    An instance's slot is its rank: how many valid instances have a larger logit (or an equal one earlier)."""
    n = s.shape[-1]
    idx = jnp.arange(n)
    above = (s[..., None, :] > s[..., :, None]) | ((s[..., None, :] == s[..., :, None]) & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(above & valid[:, None, None, :], axis=-1)                      # [B, M, N]
    k = jnp.minimum(valid.sum(-1), min(top_k, n))[:, None, None]
    in_top = valid[:, None, :] & (rank < k)
    u = jnp.take_along_axis(noise, jnp.minimum(rank, noise.shape[-1] - 1), axis=-1)
    below = jnp.sum(in_top[..., None, :] & (u[..., None, :] < u[..., :, None]), axis=-1)
    count = jnp.floor(k * p + 1e-6).astype(jnp.int32)
    return in_top & (below < count)


def test_abmil_equals_the_reference():
    """Gated (eq. 9): forward and every gradient; plain (eq. 8): forward, with the padded bag's weights."""
    x, valid = bag_example(jax.random.key(0))

    def reference(p, x):
        s = logits_reference(p["logits"], x)
        return pool_reference(s, x, valid[:, None, :])[0][:, 0]

    check_module_against_reference(AttentionMILPooling(16, hidden=8, rngs=nnx.Rngs(0)), reference, x,
                                   call_kwargs=dict(valid=valid))
    plain = AttentionMILPooling(16, hidden=8, gated=False, rngs=nnx.Rngs(1))
    z, a = nnx.jit(lambda m, x, v: (m(x, v), m.attention(x, v)))(plain, x, valid)
    z_ref = jax.jit(reference)(nnx.to_pure_dict(nnx.state(plain, nnx.Param)), x)
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(a).sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(a)[1, 9:] == 0)


def test_acmil_inference_equals_the_mean_branch_attention_pooling():
    x, valid = bag_example(jax.random.key(1))

    def reference(p, x):
        """The slide feature pooled with the mean of the branches' maps (ACMIL_GA's bag_A @ x)."""
        _, a = pool_reference(logits_reference(p["logits"], x), x, valid[:, None, :])
        return jnp.einsum("bn,bnc->bc", a.mean(1), x, precision=HP)

    module = ACMILPooling(16, hidden=8, num_branches=3, top_k=4, rngs=nnx.Rngs(0))
    check_module_against_reference(module, reference, x, call_kwargs=dict(valid=valid, deterministic=True))


def test_acmil_training_masks_with_the_stkim_rule():
    """With a key: the branch maps equal the reference with the instances its rule drops; the same key draws
    the noise [B, M, min(K, N)] uniformly, as the module does."""
    x, valid = bag_example(jax.random.key(2))
    module = ACMILPooling(16, hidden=8, num_branches=3, top_k=4, mask_drop=0.5, rngs=nnx.Rngs(0))
    key = jax.random.key(7)
    out = nnx.jit(lambda m, x, v, k: m.pool(x, v, rng=k))(module, x, valid, key)

    @jax.jit
    def reference(p, x, key):
        s = logits_reference(p["logits"], x)
        dropped = stkim_reference(s, valid, jax.random.uniform(key, (2, 3, 4)), 4, 0.5)
        return dropped, *pool_reference(s, x, valid[:, None, :] & ~dropped)

    dropped, z, a = reference(nnx.to_pure_dict(nnx.state(module, nnx.Param)), x, key)
    assert np.all(np.asarray(dropped).sum(-1) == 2)
    np.testing.assert_allclose(np.asarray(out.attention), np.asarray(a), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.branches), np.asarray(z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.bag), np.asarray(z.mean(1)), rtol=1e-5, atol=1e-6)
    loss = acmil_diversity_loss(out.attention)
    assert 0.0 < float(loss) < 1.0


def test_acmil_randomness_follows_flax_dropout():
    """Stream keys differ call to call; deterministic=True, model.eval() and nnx.view turn masking off."""
    x, valid = bag_example(jax.random.key(3))
    module = ACMILPooling(16, hidden=8, num_branches=3, top_k=4, rngs=nnx.Rngs(0))
    call = nnx.jit(lambda m, x, v: m.pool(x, v).attention)
    first, second = call(module, x, valid), call(module, x, valid)
    assert not np.array_equal(np.asarray(first == 0), np.asarray(second == 0)), "fresh masks per call"
    plain = nnx.jit(lambda m, x, v: m.pool(x, v, deterministic=True).attention)(module, x, valid)
    assert np.all(np.asarray(plain)[0] > 0)
    viewed = nnx.view(module, deterministic=True)
    np.testing.assert_array_equal(np.asarray(call(viewed, x, valid)), np.asarray(plain))
    without_stream = ACMILPooling(16, hidden=8, num_branches=3, top_k=4, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="pass rng=key"):
        without_stream.pool(x, valid)


def test_parameter_counts():
    """(C + 1)·L for V, again for the gate U, and L·M for w (no bias on w)."""
    def count(cls, *args, **kwargs):
        return parameter_count(nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0))))

    assert count(AttentionMILPooling, 32) == 2 * 33 * 128 + 128
    assert count(AttentionMILPooling, 32, gated=False) == 33 * 128 + 128
    assert count(ACMILPooling, 32, hidden=16) == 2 * 33 * 16 + 16 * 5
    assert count(GatedAttentionLogits, 32, hidden=16, branches=2) == 2 * 33 * 16 + 32


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match=r"mask_drop must be a number in \[0, 1\]"):
        ACMILPooling(16, mask_drop=2.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        ACMILPooling(16, top_k=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        AttentionMILPooling(16, hidden=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        AttentionMILPooling(16, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 8)))
