"""InLine attention: the O(N) path against the quadratic reference (forward, gradients), the reference against
eq. 5 written per query, injectivity, the registry entry, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.linear.inline import InLine, inline_attention, inline_attention_reference
from tests.helpers import assert_close, outputs_and_grads, random_qkv

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("feature_map", ["identity", "relu"])
def test_xla_equals_the_reference_forward_and_gradients(feature_map):
    """GQA (4 query heads over 2), cross (T = 11, S = 17), Dv != D."""
    q, k, v = random_qkv(KEY, B=2, T=11, S=17, Hq=4, Hkv=2, D=8, Dv=6)
    ref = lambda *a: inline_attention_reference(*a, feature_map=feature_map)
    fast = lambda *a: inline_attention(*a, feature_map=feature_map, implementation="xla")
    (out, grads), (expected, expected_grads) = (outputs_and_grads(fn, (q, k, v), (0, 1, 2)) for fn in (fast, ref))
    assert_close(out, expected, rtol=2e-5, name="out")
    for name, g, e in zip("qkv", grads, expected_grads):
        assert_close(g, e, rtol=2e-5, name=f"d{name}")


def test_reference_is_eq5_per_query():
    """``o_i = Σ_j (σ/N (q_i·k_j − mean_s q_i·k_s) + 1/N) v_j`` with loops over one head; weights sum to 1."""
    q, k, v = (np.asarray(x, np.float64) for x in random_qkv(KEY, B=1, T=5, S=7, Hq=1, D=4, Dv=3))
    sigma, N = 0.5, 7
    expected = np.zeros((5, 3))
    for i in range(5):
        s = np.array([q[0, i, 0] @ k[0, j, 0] for j in range(N)])
        w = sigma / N * (s - s.mean()) + 1 / N
        assert abs(w.sum() - 1) < 1e-12
        expected[i] = w @ v[0, :, 0]
    out = inline_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), scale=sigma)
    assert_close(out[0, :, 0], expected, rtol=1e-6, name="eq. 5")


def test_injective_in_the_query_scale():
    """Rescaled queries give other outputs (normalized linear attention with the identity map would not)."""
    q, k, v = random_qkv(KEY, B=1, T=4, Hq=1, D=4)
    call = jax.jit(lambda q: inline_attention(q, k, v))
    assert not np.allclose(call(q), call(2.0 * q), atol=1e-3)


def test_bfloat16_is_finite_and_close():
    q, k, v = random_qkv(KEY, B=1, T=17, Hq=2, D=8, dtype=jnp.bfloat16)
    out = jax.jit(inline_attention)(q, k, v)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    expected = jax.jit(inline_attention_reference)(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert_close(out, expected, rtol=2e-2, name="bf16")


def test_registry_entry():
    q, k, v = random_qkv(KEY, B=1, T=5, S=9, Hq=4, Hkv=2, D=4)
    out = jax.jit(lambda *a: aj.attention(*a, mechanism=InLine(feature_map="relu"), scale=0.3, implementation="xla"))(
        q, k, v)
    expected = jax.jit(lambda *a: inline_attention_reference(*a, feature_map="relu", scale=0.3))(q, k, v)
    assert_close(out, expected, rtol=2e-5, name="registry")
    with pytest.raises(NotImplementedError, match="mask"):
        aj.attention(q, k[:, :5], v[:, :5], mechanism="inline", mask=aj.masks.Causal())


def test_errors():
    q, k, v = random_qkv(KEY, B=1, T=5, Hq=2, D=4)
    with pytest.raises(ValueError, match="softmax-kernel map"):
        inline_attention(q, k, v, feature_map="taylor")
    with pytest.raises(ValueError, match="unknown feature_map"):
        inline_attention(q, k, v, feature_map="nope")
    with pytest.raises(ValueError, match="scale must be a scalar"):
        inline_attention_reference(q, k, v, scale=jnp.ones(2))
    with pytest.raises(ValueError, match="rank 4"):
        inline_attention(q[0], k, v)
