"""RoutingAttention: the layer against a plain reference (forward and every parameter's gradient), the EMA
centroid update, a short training run, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.routing import RoutingAttention
from attnjax.softmax import softmax_attention_reference
from attnjax.sparse.routing import kmeans_statistics, normalize, routing_attention
from attnjax.testing.modules import check_module_against_reference

D_MODEL, H, HKV, T = 16, 4, 2, 11


def make(**kwargs):
    args = dict(num_kv_heads=HKV, num_local_heads=2, num_clusters=2, window=3, block_q=8, block_kv=8)
    return RoutingAttention(D_MODEL, H, **{**args, **kwargs}, rngs=nnx.Rngs(0))


def plain_layer(p, x, centroids, mask, balanced):
    """Projections, local heads 0-1 (window 3) and routing heads 2-3 on the normalized q, k, output projection."""
    q = jnp.einsum("btd,dhe->bthe", x, p["query"]["kernel"])
    k = jnp.einsum("btd,dhe->bthe", x, p["key"]["kernel"])
    v = jnp.einsum("btd,dhe->bthe", x, p["value"]["kernel"])
    window = masks.SlidingWindow(3, 0) if isinstance(mask, masks.Causal) else masks.SlidingWindow(3, 3)
    local = softmax_attention_reference(q[:, :, :2], k[:, :, :1], v[:, :, :1], mask=window)
    routed = routing_attention(normalize(q[:, :, 2:]), normalize(k[:, :, 1:]), v[:, :, 1:], centroids, mask=mask,
                               balanced=balanced, implementation="reference")
    return jnp.einsum("bthe,hed->btd", jnp.concatenate([local, routed], axis=2), p["out"]["kernel"])


@pytest.mark.parametrize("balanced,mask", [(True, masks.Causal()), pytest.param(False, None, marks=pytest.mark.slow)])
def test_layer_matches_a_plain_reference(balanced, mask):
    layer = make(balanced=balanced, use_running_average=True, implementation="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, T, D_MODEL))
    centroids = layer.centroids[...]
    check_module_against_reference(layer, lambda p, x: plain_layer(p, x, centroids, mask, balanced), x,
                                   call_kwargs={"mask": mask}, rtol=1e-5, atol=1e-5)


def cluster_mean_gap(layer, x):
    """Mean distance from each centroid to the mean of its current members (normalized routing q and k)."""
    _, (qr, kr, _) = layer._heads(x)
    c = layer.centroids[...]
    counts, sums = (a + b for a, b in zip(kmeans_statistics(qr, c), kmeans_statistics(kr, c)))
    means = sums / jnp.maximum(counts, 1.0)[..., None]
    return float(jnp.sqrt(jnp.square(means - c).sum(-1))[counts > 0].mean())


def test_short_training_lowers_the_commitment_loss_and_pulls_centroids_to_their_clusters():
    """A toy regression (reproduce a fixed random map of x) with the commitment loss added: after 25 Adam steps
    in training mode the commitment loss is lower and the EMA centroids sit closer to their members' mean. The
    first step's EMA update is checked exactly."""
    layer = make(num_clusters=3, decay=0.8, commitment=1.0, implementation="reference")
    x = jax.random.normal(jax.random.PRNGKey(2), (4, T, D_MODEL))
    target = jnp.tanh(x @ jax.random.normal(jax.random.PRNGKey(3), (D_MODEL, D_MODEL)))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, optimizer):
        def loss(m):
            commit = m.commitment_loss(x)
            return jnp.mean(jnp.square(m(x, mask=masks.Causal()) - target)) + commit, commit

        (_, commit), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
        optimizer.update(layer, grads)
        return commit

    gap0, c0 = cluster_mean_gap(layer, x), layer.centroids[...]
    _, (qr, kr, _) = layer._heads(x)
    (cq, sq), (ck, sk) = kmeans_statistics(qr, c0), kmeans_statistics(kr, c0)
    losses = [float(step(layer, optimizer))]
    counts, sums = 0.2 * (cq + ck), 0.2 * (sq + sk)
    np.testing.assert_allclose(layer.ema_counts[...], counts, rtol=1e-6)
    np.testing.assert_allclose(layer.centroids[...], jnp.where(counts[..., None] > 0, sums / jnp.maximum(
        counts, 1e-30)[..., None], c0), rtol=1e-5, atol=1e-6)
    losses += [float(step(layer, optimizer)) for _ in range(24)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert cluster_mean_gap(layer, x) < 0.5 * gap0


@pytest.mark.slow
def test_eval_mode_leaves_the_centroids_alone():
    layer = make(implementation="reference")
    layer.eval()
    frozen = layer.centroids[...]
    nnx.jit(lambda m, x: m(x))(layer, jax.random.normal(jax.random.PRNGKey(4), (1, T, D_MODEL)))
    np.testing.assert_array_equal(layer.centroids[...], frozen)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_local_heads must be in"):
        make(num_local_heads=1)
    with pytest.raises(ValueError, match="num_local_heads must be in"):
        make(num_local_heads=4)
    with pytest.raises(ValueError, match="decay must be in"):
        make(decay=1.0)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        make()(jnp.zeros((1, T, D_MODEL), jnp.int32))
    with pytest.raises(NotImplementedError, match="decodes with balanced=False only"):
        make().init_cache(1, 4)
