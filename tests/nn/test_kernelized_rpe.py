"""KernelizedRPEAttention (Luo et al. 2021, Algorithm 1) against a plain einsum reference of eq. 10, and
its parameter count. Decode == parallel, jit, gradients of every parameter, the Linen bridge and the
checkpoint round trip come from tests/test_module_conformance.py (spec "kernelized_rpe", which runs
the quadratic form: that suite checks causality bit for bit); the FFT layer's decode is checked here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.linear.feature_maps import Performer
from attnjax.nn.kernelized_rpe import KernelizedRPEAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count

PHI = Performer(num_features=10, seed=3)


def _reference(causal: bool, k_max: int, num_heads: int, num_kv_heads: int):
    """Eq. 10 with Algorithm 1's ℓ2-normalized q, k and PRF features ``φ(x) = exp(Wx − |x|²/2)/√m``,
    ``b_(j−i) = rpe[h, clip(j − i, −k, k)]`` (causal: ``clip(j − i, −k, 0)``, keys after the query
    dropped)."""
    def reference(p, x):
        T = x.shape[1]
        q = jnp.einsum("btd,dhe->bthe", x, p["query"]["kernel"])
        k = jnp.einsum("btd,dhe->bthe", x, p["key"]["kernel"])
        v = jnp.einsum("btd,dhe->bthe", x, p["value"]["kernel"])
        group = num_heads // num_kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        q, k = (a / jnp.linalg.norm(a, axis=-1, keepdims=True) for a in (q, k))
        w = PHI.weights(q.shape[-1])

        def phi(a):
            return jnp.exp(a @ w.T - 0.5 * jnp.sum(a * a, -1, keepdims=True)) / np.sqrt(w.shape[0])

        offset = jnp.arange(T)[None, :] - jnp.arange(T)[:, None]                      # j − i
        column = jnp.clip(offset, -k_max, 0 if causal else k_max) + k_max
        weights = jnp.exp(p["rpe"][:, column])                                          # [H, T, T]
        if causal:
            weights = jnp.where(offset <= 0, weights, 0.0)
        a = jnp.einsum("bihf,bjhf->bhij", phi(q), phi(k), precision="highest") * weights
        z = jnp.einsum("bhij,bjhe->bihe", a, v, precision="highest") / jnp.sum(a, -1).transpose(0, 2, 1)[..., None]
        return jnp.einsum("bthe,hed->btd", z, p["out"]["kernel"])
    return reference


@pytest.mark.parametrize("causal,num_kv_heads", [(True, 1), (False, 2)])
def test_matches_plain_reference(causal, num_kv_heads):
    model = KernelizedRPEAttention(16, 2, num_kv_heads=num_kv_heads, max_distance=3, causal=causal, feature_map=PHI,
                                   feature_chunk=4, rngs=nnx.Rngs(0))
    model.rpe[...] = jnp.asarray(np.random.default_rng(1).standard_normal(model.rpe.shape), jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 11, 16))
    # rtol: the library's float32 conformance bound; FFT rounding in d(rpe) reaches ~3e-5 here
    check_module_against_reference(model, _reference(causal, 3, 2, num_kv_heads), x, rtol=1e-4)


def test_fft_layer_is_causal_to_rounding_and_decodes():
    """The FFT layer (the default): outputs up to ``t`` move by rounding only (< 1e-5) when later tokens
    change, the change reaches later outputs, and token-by-token ``decode`` gives the parallel call."""
    model = KernelizedRPEAttention(16, 2, num_kv_heads=1, max_distance=3, feature_map=PHI, rngs=nnx.Rngs(0))
    model.rpe[...] = jnp.asarray(np.random.default_rng(1).standard_normal(model.rpe.shape), jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 9, 16))
    changed = x.at[:, 5:].set(jax.random.normal(jax.random.key(3), (2, 4, 16)))
    parallel = nnx.jit(lambda m, x: m(x))
    y, y_changed = parallel(model, x), parallel(model, changed)
    np.testing.assert_allclose(y[:, :5], y_changed[:, :5], atol=1e-5)
    assert not np.allclose(y[:, 5:], y_changed[:, 5:], atol=1e-3)
    step = nnx.jit(lambda m, x_t, cache: m.decode(x_t, cache))
    cache, steps = model.init_cache(2, 12), []
    for t in range(9):
        y_t, cache = step(model, x[:, t:t + 1], cache)
        steps.append(y_t)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), y, rtol=2e-5, atol=2e-5)


def test_parameter_count():
    """``d·H·D`` (q) + ``2·d·Hkv·D`` (k, v) + ``H·D·d`` (out) + ``H·(k + 1)`` (causal) or ``H·(2k + 1)``
    bias scalars."""
    d, H, Hkv, D, k = 16, 4, 2, 8, 5
    for causal, width in ((True, k + 1), (False, 2 * k + 1)):
        model = KernelizedRPEAttention(d, H, num_kv_heads=Hkv, head_dim=D, max_distance=k, causal=causal,
                                       rngs=nnx.Rngs(0))
        assert parameter_count(model) == d * H * D + 2 * d * Hkv * D + H * D * d + H * width


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        KernelizedRPEAttention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="implementation must be 'xla' or 'reference'"):
        KernelizedRPEAttention(16, 2, implementation="pallas", rngs=nnx.Rngs(0))
    encoder = KernelizedRPEAttention(16, 2, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="decoding needs a causal"):
        encoder.init_cache(1, 8)
    with pytest.raises(NotImplementedError, match="mask=None or masks.Causal"):
        encoder(jnp.zeros((1, 5, 16)), mask=masks.SlidingWindow(1, 0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        encoder(jnp.zeros((1, 5, 8)))
