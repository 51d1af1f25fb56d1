"""attnjax.nn.memory.RAT: the layer against its formula written plainly (forward and every gradient), the
forget-gate bias initialization, decoding into a bf16 cache, and argument errors. jit, the Linen bridge,
checkpointing, causality and decode == parallel in float32 come from the module conformance suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.memory.rat import rat_reference
from attnjax.nn.memory import RAT
from attnjax.positional import RoPE
from attnjax.testing.modules import check_module_against_reference
from tests.helpers import TOLERANCE, assert_close

B, T, DM, H, G, L = 2, 11, 16, 4, 2, 4
ROPE = RoPE(base=100.0)


def inputs(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, DM), jnp.float32)


def plain_rat(p, x):
    """The official layer without its pre-norm and residual: q, k from G groups shared by H // G heads,
    g = σ(x W_g + b_g), z = σ(x W_z), y = W_o (z ⊙ RAT(q, k, v, g)) with RAT the per-token reference."""
    def proj(name):
        return jnp.einsum("btm,mhd->bthd", x, p[name]["kernel"])

    q, k = (jnp.repeat(proj(name), H // G, axis=2) for name in ("query", "key"))
    g = jax.nn.sigmoid(proj("forget_gate") + p["forget_bias"])
    z = jax.nn.sigmoid(proj("output_gate"))
    y = rat_reference(q, k, proj("value"), g, chunk_size=L, rope=ROPE)
    return jnp.einsum("bthd,hdm->btm", z * y, p["out"]["kernel"])


def test_module_equals_the_plain_layer():
    """The chunked path (T = 11: a partial last chunk), every parameter's and x's gradient."""
    layer = RAT(DM, H, chunk_size=L, num_qk_heads=G, rope=ROPE, rngs=nnx.Rngs(0))
    check_module_against_reference(layer, plain_rat, inputs(), rtol=1e-5)


def test_forget_bias_starts_in_the_official_range():
    """b_g = log u, u ~ U(1, L − 1): σ(b_g) in [1/2, (L − 1)/L]; L = 1 starts at b_g = 0 (g = 1/2)."""
    g = jax.nn.sigmoid(RAT(DM, H, chunk_size=16, rngs=nnx.Rngs(0)).forget_bias[...])
    assert 0.5 <= float(g.min()) and float(g.max()) <= 15 / 16 and float(g.max() - g.min()) > 0.1
    np.testing.assert_array_equal(RAT(DM, H, chunk_size=1, rngs=nnx.Rngs(0)).forget_bias[...], 0.0)


@pytest.mark.slow
def test_decode_into_a_bf16_cache_follows_the_parallel_call():
    """One shared q/k group (num_qk_heads=1); a bf16 cache (slots and running states)."""
    layer = RAT(DM, H, chunk_size=L, num_qk_heads=1, rope=ROPE, rngs=nnx.Rngs(1))
    x = inputs(1)
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x)
    step, cache, ys = nnx.jit(lambda m, x_t, c: m.decode(x_t, c)), layer.init_cache(B, T, jnp.bfloat16), []
    assert cache.k_run.dtype == jnp.bfloat16 and cache.k.shape[1] == 3
    for t in range(T):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        ys.append(y_t)
    decoded = jnp.concatenate(ys, 1)
    assert bool(jnp.all(jnp.isfinite(decoded)))
    assert_close(decoded, y, rtol=TOLERANCE[jnp.bfloat16], name="decode bf16")


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_qk_heads"):
        RAT(DM, H, num_qk_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        RAT(DM, H, chunk_size=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="implementation"):
        RAT(DM, H, implementation="pallas", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rope must be"):
        RAT(DM, H, rope=100.0, rngs=nnx.Rngs(0))
    layer = RAT(DM, H, chunk_size=L, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="RAT takes mask=None or masks.Causal"):
        layer(inputs(), mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        layer(inputs()[..., :8])
    with pytest.raises(ValueError, match="x_t must have shape"):
        layer.decode(inputs()[:, :2], layer.init_cache(B, T))
