"""Layers with a learned sparse pattern: short training runs lower their losses; DMA's reference layer agrees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.sparse_predicted import DynamicMaskAttention, SparsifinerAttention, SptAttention
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


def test_sparsifiner_distillation_lowers_the_loss_and_only_it_trains_the_predictor():
    """30 Adam steps of attention reconstruction (MSE against the layer's own dense attention) lower the
    loss; the layer's output gives the projections a gradient and the predictor none (its mask is detached)."""
    layer = SparsifinerAttention(16, 2, num_tokens=12, keep_rate=0.5, reduce_n_factor=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * jnp.cos(jnp.arange(16.0)))))(layer)
    assert float(jnp.abs(grads.query.kernel[...]).max()) > 0
    assert all(float(jnp.abs(g[...]).max()) == 0 for _, g in nnx.to_flat_state(grads.predictor))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    q0 = np.asarray(layer.query.kernel[...])

    @nnx.jit
    def step(layer, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m.distillation_loss(x))(layer)
        optimizer.update(layer, grads)
        return loss

    losses = [float(step(layer, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.6 * losses[0], losses
    np.testing.assert_array_equal(np.asarray(layer.query.kernel[...]), q0)


def test_spt_quantizer_loss_trains_the_codebooks_which_the_output_does_not():
    """The authors' PQ loss falls over 20 Adam steps; the layer's output gives the codebooks no gradient."""
    layer = SptAttention(16, 4, num_kv_heads=2, top_l=3, num_subspaces=2, num_codewords=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 16))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, mask=masks.Causal()) * jnp.cos(jnp.arange(16.0)))))(layer)
    assert float(jnp.abs(grads.codebooks[...]).max()) == 0
    assert float(jnp.abs(grads.value.kernel[...]).max()) > 0
    optimizer = nnx.Optimizer(layer, optax.adam(3e-2), wrt=nnx.Param)
    books = np.asarray(layer.codebooks[...])

    @nnx.jit
    def step(layer, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m.quantizer_loss(x))(layer)
        optimizer.update(layer, grads)
        return loss

    losses = [float(step(layer, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.abs(np.asarray(layer.codebooks[...]) - books).max() > 1e-3
