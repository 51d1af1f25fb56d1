"""RepBN and PRepBN (SLAB, sec. 3.1) against their formulas in training mode (batch statistics), the schedule,
the running statistics, the re-parameterized inference BatchNorm against the trained module, parameter counts,
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.normalization import ProgressiveRepBatchNorm, RepBatchNorm, set_progress
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import assert_close


def tokens(shape=(2, 9, 8), seed=0, dtype=jnp.float32):
    """Features with a per-channel offset and spread, so that the statistics matter."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) * rng.uniform(0.5, 3, shape[-1]) + rng.normal(size=shape[-1]), dtype)


def batch_norm(p, x, eps=1e-5):
    mean, var = x.mean(axis=(0, 1)), x.var(axis=(0, 1))
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def layer_norm(p, x, eps=1e-5):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def perturb(model, seed=1):
    """Random parameters (scale, shift and alpha away from their initial 1, 0 and 1)."""
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    return model


def test_rep_batch_norm_is_batch_norm_plus_alpha_x_forward_and_gradients():
    model = perturb(RepBatchNorm(8, rngs=nnx.Rngs(0)))
    check_module_against_reference(model, lambda p, x: batch_norm(p["bn"], x) + p["alpha"] * x, tokens(), rtol=1e-5)


def test_prepbn_mixes_layer_norm_and_rep_batch_norm_by_the_schedule():
    """``γ = 1 − t/T`` after the warm-up; mid-schedule the output is ``γ LN(x) + (1 − γ) RepBN(x)``."""
    model = perturb(ProgressiveRepBatchNorm(8, total_steps=8, warmup_steps=2, initial_step=5, rngs=nnx.Rngs(0)))
    gammas = []
    for t in (0, 2, 3, 5, 10, 11):
        model.set_progress(t)
        gammas.append(float(model.gamma()))
    np.testing.assert_allclose(gammas, [1, 1, 7 / 8, 5 / 8, 0, 0])
    model.set_progress(5)

    def reference(p, x):
        rep = batch_norm(p["rep_batch_norm"]["bn"], x) + p["rep_batch_norm"]["alpha"] * x
        return 5 / 8 * layer_norm(p["layer_norm"], x) + 3 / 8 * rep

    check_module_against_reference(model, reference, tokens(), rtol=1e-5)


def test_training_updates_running_statistics_and_the_folded_batch_norm_equals_the_trained_module():
    """Train through the whole schedule under ``nnx.jit`` (``set_progress`` inside the step); then, in eval mode,
    the PRepBN is RepBN on the running statistics, and ``reparameterize()`` gives an ``nnx.BatchNorm`` with
    the same outputs. Before the end of the schedule it refuses."""
    model = perturb(ProgressiveRepBatchNorm(8, total_steps=3, rngs=nnx.Rngs(0)))
    x0 = tokens(seed=10)
    step = nnx.jit(lambda m, x, t: (set_progress(m, t), m(x))[1])
    step(model, x0, 0)
    bn = model.rep_batch_norm.bn
    assert_close(bn.mean[...], 0.1 * x0.mean(axis=(0, 1)), rtol=1e-6, name="running mean, momentum 0.9")
    assert_close(bn.var[...], 0.9 + 0.1 * x0.var(axis=(0, 1)), rtol=1e-6, name="running var")
    with pytest.raises(ValueError, match=r"needs the schedule finished \(gamma = 0, step >= warmup_steps \+ "
                                         r"total_steps = 3\), got step 0"):
        model.reparameterize()
    for t in range(1, 5):
        step(model, tokens(seed=10 + t), t)
    assert int(model.step[...]) == 4 and float(model.gamma()) == 0.0
    model.eval()
    x = tokens(seed=20)
    y = model(x)
    p = nnx.to_pure_dict(nnx.state(model.rep_batch_norm, nnx.Param))
    running = (x - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    assert_close(y, running + p["alpha"] * x, rtol=1e-6, name="eval mode")
    folded = model.reparameterize()
    assert isinstance(folded, nnx.BatchNorm) and folded.use_running_average
    assert_close(folded(x), y, atol=1e-5, rtol=1e-6, name="re-parameterized")
    assert_close(nnx.jit(lambda m, x: m(x))(folded, x), y, atol=1e-5, rtol=1e-6, name="re-parameterized, jit")


def test_set_progress_reaches_every_prepbn_of_a_model_and_checks_the_step():
    class Two(nnx.Module):
        def __init__(self, rngs):
            self.a = ProgressiveRepBatchNorm(8, total_steps=4, rngs=rngs)
            self.b = nnx.List([ProgressiveRepBatchNorm(8, total_steps=8, rngs=rngs)])

    model = Two(nnx.Rngs(0))
    set_progress(model, 2)
    assert float(model.a.gamma()) == 0.5 and float(model.b[0].gamma()) == 0.75
    for bad in (-1, 1.5, jnp.ones(2, jnp.int32)):
        with pytest.raises(ValueError, match="step must be a non-negative int scalar"):
            model.a.set_progress(bad)


@pytest.mark.parametrize("C", [8, 96])
def test_parameter_counts(C):
    assert parameter_count(nnx.eval_shape(lambda: RepBatchNorm(C, rngs=nnx.Rngs(0)))) == 2 * C + 1
    assert parameter_count(nnx.eval_shape(lambda: ProgressiveRepBatchNorm(C, rngs=nnx.Rngs(0)))) == 4 * C + 1


def test_bf16_and_bad_inputs_name_the_argument():
    model = ProgressiveRepBatchNorm(8, total_steps=4, initial_step=2, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, tokens(dtype=jnp.bfloat16) * 10)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, ..., 8\] \(features last\)"):
        model(tokens((2, 9, 4)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        RepBatchNorm(8, rngs=nnx.Rngs(0))(jnp.ones((2, 8), jnp.int32))
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        ProgressiveRepBatchNorm(8, total_steps=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative int"):
        ProgressiveRepBatchNorm(8, warmup_steps=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        RepBatchNorm(0, rngs=nnx.Rngs(0))
