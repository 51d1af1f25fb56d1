"""Region attention (R-MSA, PAAB) against a dense softmax whose mask the test builds from the region ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.vision.region import region_attention, region_attention_reference
from tests.helpers import assert_close, outputs_and_grads


def mask_by_loop(regions):
    """``[B, T, T]``: token i sees token j iff both are in one region (ids >= 0), written as a loop."""
    ids = np.asarray(regions).reshape(regions.shape[0], -1)
    B, T = ids.shape
    mask = np.zeros((B, T, T), bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                mask[b, i, j] = ids[b, i] >= 0 and ids[b, i] == ids[b, j]
    return mask


def dense_masked_softmax(q, k, v, mask):
    """Softmax attention over all tokens of a flattened grid under ``mask [B, T, T]``; empty rows give 0."""
    B, heads, D = q.shape[0], q.shape[-2], q.shape[-1]
    qf, kf, vf = (a.reshape(B, -1, heads, a.shape[-1]) for a in (q, k, v))
    logits = jnp.einsum("bihd,bjhd->bhij", qf, kf, precision="highest") / np.sqrt(D)
    logits = jnp.where(mask[:, None], logits, -jnp.inf)
    weights = jnp.where(mask[:, None], jnp.exp(logits - jnp.max(logits, -1, keepdims=True, initial=-1e30)), 0.0)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bhij,bjhd->bihd", weights, vf, precision="highest")
    return out.reshape(v.shape)


def inputs(grid, heads=2, D=4, Dv=3, B=2, low=-1, high=4, seed=0):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(B, *grid, heads, D)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, *grid, heads, Dv)), jnp.float32)
    regions = jnp.asarray(rng.integers(low, high, size=(B, *grid)), jnp.int32)
    return q, k, v, regions


def test_region_attention_equals_the_dense_masked_softmax_forward_and_gradients():
    """A 5x7 image with three scattered regions and tokens in no region (id -1, output 0)."""
    q, k, v, regions = inputs((5, 7))
    mask = jnp.asarray(mask_by_loop(regions))
    (out, grads), (expected, expected_grads) = (
        outputs_and_grads(fn, (q, k, v), (0, 1, 2)) for fn in (lambda q, k, v: region_attention(q, k, v, regions),
                                                               lambda q, k, v: dense_masked_softmax(q, k, v, mask)))
    assert_close(out, expected, rtol=1e-5, name="region attention")
    assert_close(jax.jit(region_attention_reference)(q, k, v, regions), expected, rtol=1e-5, name="reference")
    assert np.all(np.asarray(out)[np.asarray(regions) < 0] == 0)
    for n, a, e in zip(["q", "k", "v"], grads, expected_grads):
        assert_close(a, e, rtol=1e-5, name=f"d{n}")


def test_any_grid_rank_and_bf16():
    """A 3-D grid [2, 3, 4]; bf16 inputs stay finite and match float32 to bf16 precision."""
    q, k, v, regions = inputs((2, 3, 4), B=1, low=0, high=3, seed=1)
    out = jax.jit(region_attention)(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), regions)
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert_close(out, dense_masked_softmax(q, k, v, jnp.asarray(mask_by_loop(regions))), rtol=2e-2, name="bf16")


def test_bad_inputs_name_the_argument():
    q, k, v, regions = inputs((4, 4))
    with pytest.raises(ValueError, match=r"regions must have shape \[batch, \*grid\] = \[2, 4, 4\]"):
        region_attention(q, k, v, regions[:, :3])
    with pytest.raises(TypeError, match="regions must hold integer region ids"):
        region_attention(q, k, v, regions.astype(jnp.float32))
    with pytest.raises(ValueError, match="q, k, v must share"):
        region_attention(q, k[:, :3], v, regions)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, \*grid, heads, head_dim\]"):
        region_attention(q[0, 0], k, v, regions)
