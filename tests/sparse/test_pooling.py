"""Tile-pooled attention maps: the blocked pass equals the dense map, for both pools."""

import jax
import numpy as np
import pytest

from attnjax import masks
from attnjax.sparse.pooling import pooled_attention, pooled_attention_reference
from tests.helpers import assert_close, random_qkv


@pytest.mark.parametrize("pool", ["max", "sum"])
def test_blocked_equals_dense(pool):
    q, k, _ = random_qkv(jax.random.PRNGKey(3), T=37, S=45, Hq=4, Hkv=2)
    mask = masks.Causal() & masks.SlidingWindow(20, 0)
    kwargs = dict(block_q=16, block_kv=8, pool=pool, mask=mask)
    actual = pooled_attention(q, k, **kwargs)
    expected = pooled_attention_reference(q, k, **kwargs)
    assert actual.shape == (2, 4, 3, 6)
    assert_close(actual, expected)
    if pool == "sum":  # every valid query row's probabilities sum to 1
        rows = np.minimum(16, 37 - 16 * np.arange(3))
        np.testing.assert_allclose(np.asarray(actual).sum(-1), np.broadcast_to(rows, (2, 4, 3)), rtol=1e-5)


def test_unknown_pool_raises():
    q, k, _ = random_qkv(jax.random.PRNGKey(0), T=8)
    with pytest.raises(ValueError, match="pool must be one of"):
        pooled_attention(q, k, block_q=4, block_kv=4, pool="mean")
