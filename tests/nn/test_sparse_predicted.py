"""Layers with a learned sparse pattern: short training runs lower their losses; DMA's reference layer agrees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.sparse_predicted import DynamicMaskAttention
from tests.helpers import assert_close


def test_dynamic_mask_training_lowers_the_loss_and_moves_a_and_w_dt():
    """20 Adam steps on copying the previous token: the loss falls, and A and W_Δ (trained only
    through the bias on the kept keys' logits) change."""
    layer = DynamicMaskAttention(16, 4, num_kv_heads=2, keep=4, a_init=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 16))
    target = jnp.pad(x[:, :-1], ((0, 0), (1, 0), (0, 0)))
    a0, w0 = np.asarray(layer.a[...]), np.asarray(layer.dt_proj.kernel[...])
    optimizer = nnx.Optimizer(layer, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x, mask=masks.Causal()) - target) ** 2))(layer)
        optimizer.update(layer, grads)
        return loss

    losses = [float(step(layer, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.abs(np.asarray(layer.a[...]) - a0).max() > 1e-3
    assert np.abs(np.asarray(layer.dt_proj.kernel[...]) - w0).max() > 1e-3


@pytest.mark.slow
def test_dynamic_mask_reference_layer_agrees_with_the_engine_layer():
    fast = DynamicMaskAttention(16, 4, num_kv_heads=2, keep=4, a_init=1.0, rngs=nnx.Rngs(0))
    ref = DynamicMaskAttention(16, 4, num_kv_heads=2, keep=4, a_init=1.0, implementation="reference",
                               rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 16))
    for mask in (None, masks.Causal()):
        assert_close(fast(x, mask=mask), ref(x, mask=mask), name=str(mask))
