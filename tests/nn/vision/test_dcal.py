"""GLCA and PWCA modules against plain references of DCAL's equations (Zhu et al. 2022, sec. 3.2-3.3): the rollout
``Ŝ = S̄_L ··· S̄_1`` with ``S̄ = 0.5·S + 0.5·E``, a stable argsort of its class-token row, einsum attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.dcal import GlobalLocalCrossAttention, PairwiseCrossAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import assert_close


def linear(p, x):
    y = jnp.einsum("btc,cd->btd", x, p["kernel"], precision="highest")
    return y + p["bias"] if "bias" in p else y


def heads(p, x, h):
    y = linear(p, x)
    return y.reshape(*y.shape[:2], h, -1)


def attention(q, k, v):
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


def glca_reference(p, x, maps, ratio=0.1, h=2):
    """Eq. for Ŝ, then the class token plus the top R = ⌊ratio·N⌋ patches of row 0 query every key and value."""
    T = x.shape[1]
    rollout = jnp.broadcast_to(jnp.eye(T), (x.shape[0], T, T))
    for layer in maps:
        rollout = jnp.einsum("bij,bjk->bik", 0.5 * layer.mean(1) + 0.5 * jnp.eye(T), rollout, precision="highest")
    top = jnp.argsort(-rollout[:, 0, 1:], axis=-1, stable=True)[:, :max(1, int(ratio * (T - 1) + 1e-9))] + 1
    rows = jnp.concatenate([jnp.zeros((x.shape[0], 1), top.dtype), top], axis=1)
    q = jnp.take_along_axis(heads(p["query"], x, h), rows[:, :, None, None], axis=1)
    o = attention(q, heads(p["key"], x, h), heads(p["value"], x, h))
    return linear(p["out"], o.reshape(*o.shape[:2], -1))


def pwca_reference(p, x, distractor=None, h=2):
    """softmax(Q_1 [K_1; K_2]ᵀ/√d) [V_1; V_2] through the output projection; self-attention without image 2."""
    sources = x if distractor is None else jnp.concatenate([x, distractor], axis=1)
    o = attention(heads(p["query"], x, h), heads(p["key"], sources, h), heads(p["value"], sources, h))
    return linear(p["out"], o.reshape(*o.shape[:2], -1))


def tokens_and_maps(seed=0, B=2, T=21, C=16, L=2, dtype=jnp.float32):
    kx, km = jax.random.split(jax.random.key(seed))
    maps = jax.nn.softmax(3 * jax.random.normal(km, (L, B, 2, T, T)), axis=-1)
    return jax.random.normal(kx, (B, T, C), dtype), maps


@pytest.mark.slow  # run with --runslow; keeps the default suite under 20 minutes on 2 cores
def test_glca_equals_the_paper_formula_forward_and_gradients():
    """21 tokens (class token + 20 patches), R = 30 % = 6 local queries plus the class token."""
    x, maps = tokens_and_maps()
    model = GlobalLocalCrossAttention(16, 2, ratio=0.3, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x, m: glca_reference(p, x, m, ratio=0.3), x, maps)
    positions = np.asarray(model.local_queries(maps))
    assert positions.shape == (2, 7) and np.all(positions[:, 0] == 0) and np.all(positions[:, 1:] > 0)


def test_pwca_equals_the_paper_formula_with_and_without_the_distractor():
    x, _ = tokens_and_maps(seed=1, T=9)
    distractor, _ = tokens_and_maps(seed=2, T=7)
    model = PairwiseCrossAttention(16, 2, rngs=nnx.Rngs(1))
    check_module_against_reference(model, pwca_reference, x, distractor)
    y, expected = nnx.jit(lambda m, x: (m(x), pwca_reference(nnx.to_pure_dict(nnx.state(m, nnx.Param)), x)))(model, x)
    assert_close(y, expected, rtol=2e-5, name="self-attention without a distractor")


def test_parameter_counts():
    def count(cls, **kwargs):
        return parameter_count(nnx.eval_shape(lambda: cls(192, 3, **kwargs, rngs=nnx.Rngs(0))))

    for cls in (GlobalLocalCrossAttention, PairwiseCrossAttention):
        assert count(cls) == 4 * 192 ** 2 + 3 * 192
        assert count(cls, qkv_bias=False) == 4 * 192 ** 2 + 192


def test_bad_inputs_name_the_argument():
    x, maps = tokens_and_maps()
    glca = GlobalLocalCrossAttention(16, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"maps must be attention maps \[B, H, T, T\] = \[2, H, 20, 20\]"):
        glca(x[:, :20], maps)
    with pytest.raises(ValueError, match="ratio must be a number in"):
        GlobalLocalCrossAttention(16, 2, ratio=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="distractor must have x's batch"):
        PairwiseCrossAttention(16, 2, rngs=nnx.Rngs(0))(x, x[:1])
    with pytest.raises(ValueError, match=r"distractor must have shape \[batch, seq, 16\]"):
        PairwiseCrossAttention(16, 2, rngs=nnx.Rngs(0))(x, x[..., :8])
    with pytest.raises(ValueError, match=r"d_model \(16\) must be a multiple of num_heads \(3\)"):
        PairwiseCrossAttention(16, 3, rngs=nnx.Rngs(0))
