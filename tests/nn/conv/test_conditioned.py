"""Sentence Attention Block (Khoshsirat & Kambhamettu 2023) and DCAN / GDCAN domain conditioned channel
attention (Li et al. 2020, 2021) against plain references of their formulas (and official code)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import DomainConditionedAttention, SentenceAttentionBlock
from attnjax.testing.modules import check_module_against_reference, parameter_count
from attnjax.vision.conditioned import domain_gap


def normal(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def sab_reference(p, x, e):
    """s = softmax_c(W2 ReLU(LN(W1 e + b1)) + b2), y = s * x per channel (official SentenceAttention)."""
    h = e @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"])
    s = jax.nn.softmax(h @ p["gate_logits"]["kernel"] + p["gate_logits"]["bias"], axis=-1)
    return x * s[:, None, None, :]


def test_sentence_attention_equals_the_formula_forward_and_gradients():
    model = SentenceAttentionBlock(16, 8, rngs=nnx.Rngs(0))
    check_module_against_reference(model, sab_reference, normal((2, 5, 7, 16)), normal((2, 8), seed=1))


def test_sentence_gate_is_a_distribution_over_channels_and_bf16_is_finite():
    model = SentenceAttentionBlock(16, 8, rngs=nnx.Rngs(0))
    x, e = normal((2, 5, 7, 16), dtype=jnp.bfloat16), 10 * normal((2, 8), seed=1, dtype=jnp.bfloat16)
    gate, y = nnx.jit(lambda m, x, e: (m.gate(x, e), m(x, e)))(model, x, e)
    gate = np.asarray(gate, np.float32)
    assert gate.shape == (2, 1, 1, 16) and np.all(gate > 0)
    np.testing.assert_allclose(gate.sum(-1), 1.0, atol=2e-2)
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_sentence_attention_parameter_count():
    C, E, M = 64, 384, 4 * 384
    model = nnx.eval_shape(lambda: SentenceAttentionBlock(C, E, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == (E * M + M) + 2 * M + (M * C + C)


def test_sentence_attention_bad_inputs_name_the_argument():
    model = SentenceAttentionBlock(16, 8, rngs=nnx.Rngs(0))
    x = normal((2, 5, 7, 16))
    with pytest.raises(ValueError, match=r"e must have shape \[batch, embed_dim\] = \[2, 8\] for x of shape "
                                         r"\[2, 5, 7, 16\], got \[3, 8\]"):
        model(x, normal((3, 8)))
    with pytest.raises(ValueError, match=r"e must have shape \[batch, embed_dim\] = \[2, 8\]"):
        model(x, normal((2, 1, 8)))
    with pytest.raises(TypeError, match="e must be a floating-point array"):
        model(x, jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\)"):
        model(normal((2, 16, 5)), normal((2, 8)))
    with pytest.raises(ValueError, match="embed_dim must be a positive int, got 0"):
        SentenceAttentionBlock(16, 0, rngs=nnx.Rngs(0))


def excitation(z, reduce, expand):
    return jax.nn.sigmoid(jax.nn.relu(z @ reduce["kernel"] + reduce["bias"]) @ expand["kernel"] + expand["bias"])


def domain_reference(separate):
    """DCAN: source samples use W1_s, target samples W1_t, W2 shared; shared (separate False): all use W1_s."""
    def reference(p, x, domain):
        z = x.mean(axis=(1, 2))
        source = excitation(z, p["reduce_source"], p["expand"])
        target = excitation(z, p["reduce_target"], p["expand"])
        gate = jnp.where((domain[:, None] == 1) & separate, target, source)
        return x * gate[:, None, None, :]
    return reference


def gap_numpy(x, domain):
    """GDCAN's official statistic: tanh(|r_s - r_t| / r_t), r = mean / sqrt(unbiased var + 1e-5) of the squeezed z."""
    z = np.asarray(x, np.float64).mean(axis=(1, 2))
    r = [z[domain == d].mean() / np.sqrt(z[domain == d].var(ddof=1) + 1e-5) for d in (0, 1)]
    return np.tanh(abs(r[0] - r[1]) / r[1])


def domains_apart(seed=0):
    """Source samples N(0, 1), target samples N(3, 1), interleaved: GDCAN separates them."""
    domain = jnp.array([1, 0, 0, 1, 1, 0], jnp.int32)
    return normal((6, 5, 7, 16), seed) + 3.0 * domain[:, None, None, None], domain


def same_statistics():
    """Target samples that repeat the source samples (in another order): the domain gap is 0, GDCAN shares."""
    domain = jnp.array([1, 0, 0, 1, 1, 0], jnp.int32)
    source = normal((3, 5, 7, 16), seed=2) + 3.0
    return source[jnp.array([2, 0, 1, 1, 0, 2])], domain


def test_domain_gap_is_the_official_statistic():
    x, domain = domains_apart()
    gap = jax.jit(domain_gap)
    np.testing.assert_allclose(gap(x, domain), gap_numpy(x, np.asarray(domain)), rtol=1e-5)
    unequal = jnp.array([1, 0, 1, 1, 1, 0], jnp.int32)           # 2 source, 4 target samples: N(2, 1), N(4, 1)
    x = normal((6, 5, 7, 16), seed=3) + 2.0 + 2.0 * unequal[:, None, None, None]
    np.testing.assert_allclose(gap(x, unequal), gap_numpy(x, np.asarray(unequal)), rtol=1e-5)


@pytest.mark.parametrize("adaptive, apart, separate", [
    (True, True, True),      # GDCAN, domain statistics far apart: the target branch
    (True, False, False),    # GDCAN, identical statistics: target samples share the source branch (plain SE)
    (False, False, True),    # DCAN: always separate
])
def test_domain_conditioned_attention_equals_the_formula(adaptive, apart, separate):
    model = DomainConditionedAttention(16, reduction=4, adaptive=adaptive, rngs=nnx.Rngs(0))
    x, domain = domains_apart(seed=1) if apart else same_statistics()
    if adaptive:
        assert (gap_numpy(x, np.asarray(domain)) >= 0.2) == separate
        assert bool(model.separate_domains(x, domain)) == separate
    check_module_against_reference(model, domain_reference(separate), x, domain)


def test_a_batch_with_one_domain_uses_its_branch_unless_told():
    model = DomainConditionedAttention(16, reduction=4, rngs=nnx.Rngs(0))
    x, target = normal((2, 5, 7, 16)), jnp.ones((2,), jnp.int32)
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    y, y_shared = nnx.jit(lambda m, x, d: (m(x, d), m(x, d, separate=False)))(model, x, target)
    np.testing.assert_allclose(y, domain_reference(True)(p, x, target), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_shared, domain_reference(False)(p, x, target), rtol=1e-5, atol=1e-6)


def test_domain_conditioned_attention_parameter_count():
    assert parameter_count(nnx.eval_shape(lambda: DomainConditionedAttention(256, rngs=nnx.Rngs(0)))) == (
        3 * 256 * 16 + 2 * 16 + 256)


def test_domain_conditioned_attention_bad_inputs_name_the_argument():
    model = DomainConditionedAttention(16, reduction=4, rngs=nnx.Rngs(0))
    x = normal((2, 5, 7, 16))
    with pytest.raises(TypeError, match=r"domain must be an integer array \[batch\]"):
        model(x, jnp.zeros((2,), jnp.float32))
    with pytest.raises(ValueError, match=r"domain must have shape \[batch\] = \[2\] for x of shape \[2, 5, 7, 16\], "
                                         r"got \[2, 1\]"):
        model(x, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"domain must hold 0 \(source\) or 1 \(target\), got values \[0, 2\]"):
        model(x, jnp.array([0, 2]))
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
        DomainConditionedAttention(16, eta=2.0, rngs=nnx.Rngs(0))
