"""ScatterFormerLayer against a plain reference of the official layer (``SLALayer`` + ``CWI_FFN_Layer``), parameter
count, bf16, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.scatterformer import ScatterFormerLayer
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.vision.test_scatterformer import GRID, brute_force_windows, neighbour_conv, voxels


def layer_reference(p, x, coords, valid, heads, window):
    """BatchNorms over the valid voxels; SLA as masked dense attention per window; CWI through neighbour tables."""
    B, N, C = x.shape
    g, d = C // 4, C // heads
    mask = valid[..., None]

    def batch_norm(q, t):
        mean = jnp.sum(t * mask, (0, 1)) / mask.sum()
        var = jnp.sum((t - mean) ** 2 * mask, (0, 1)) / mask.sum()
        return (t - mean) / jnp.sqrt(var + 1e-3) * q["scale"] + q["bias"]

    ids = brute_force_windows(coords, valid, (*window, GRID[2]), (0, 0, 0))
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    qkv = jnp.einsum("bnc,ce->bne", batch_norm(p["norm0"], x), p["qkv"]["kernel"], precision="highest")
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, N, heads, d) for i in range(3))
    scores = jnp.einsum("bihd,bjhd->bhij", jax.nn.relu(q), jax.nn.relu(k), precision="highest") * same[:, None]
    attended = jnp.einsum("bhij,bjhd->bihd", scores, v, precision="highest") / (
        scores.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    x = x + jnp.einsum("bnc,ce->bne", attended.reshape(B, N, C), p["proj"]["kernel"], precision="highest") \
        + p["proj"]["bias"]
    y = batch_norm(p["norm1"], x)
    cwi = jnp.concatenate([neighbour_conv(y[..., :g], coords, valid, p["local_kernel"]),
                           neighbour_conv(y[..., g:2 * g], coords, valid, p["x_kernel"][:, None, None]),
                           neighbour_conv(y[..., 2 * g:3 * g], coords, valid, p["y_kernel"][None, :, None]),
                           y[..., 3 * g:]], axis=-1)
    y = y + cwi
    h = jax.nn.relu(jnp.einsum("bnc,ce->bne", batch_norm(p["norm2"], y), p["fc1"]["kernel"], precision="highest")
                    + p["fc1"]["bias"])
    y = y + jnp.einsum("bne,ec->bnc", h, p["fc2"]["kernel"], precision="highest") + p["fc2"]["bias"]
    return jnp.where(mask, y, 0)


@pytest.mark.slow
def test_layer_equals_the_official_layer_forward_and_gradients():
    """Training-mode BatchNorms (statistics over the 24 valid voxels of two rows), windows of 2 x 4 voxels spanning
    the grid's depth, CWI kernels of 3 taps along x and 5 along y, padding voxels with garbage coordinates. The
    projection bias feeds a training-mode BatchNorm, which cancels it: its gradient is rounding noise (the atol)."""
    coords, valid = voxels()
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 13, 8)), jnp.float32)
    model = ScatterFormerLayer(8, grid_shape=GRID, num_heads=2, window_size=(2, 4), rngs=nnx.Rngs(0))
    check_module_against_reference(
        model, lambda p, x, c, v: layer_reference(p, x, coords, valid, 2, (2, 4)), x, jnp.asarray(coords),
        jnp.asarray(valid), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("C, window, norm", [(8, 12, "batch"), (16, (2, 4), "none")])
def test_parameter_count(C, window, norm):
    sw, sh = (window, window) if isinstance(window, int) else window
    expected = 8 * C * C + 4 * C + (6 * C if norm == "batch" else 0) + (29 + sw + sh) * (C // 4)
    model = nnx.eval_shape(lambda: ScatterFormerLayer(C, grid_shape=GRID, num_heads=2, window_size=window, norm=norm,
                                                      rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    coords, valid = voxels()
    model = ScatterFormerLayer(8, grid_shape=GRID, num_heads=2, window_size=2, shift=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 13, 8)), jnp.bfloat16)
    y = nnx.jit(lambda m, *a: m(*a))(model, x, coords, valid)
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    assert np.all(np.asarray(y[1, -2:], np.float32) == 0)
    with pytest.raises(ValueError, match=r"features must have shape \[batch, voxels, 8\]"):
        model(x[..., :4], coords, valid)
    with pytest.raises(ValueError, match=r"coords must have shape \[batch, voxels, 3\] = \[2, 13, 3\]"):
        model(x, coords[..., :2], valid)
    with pytest.raises(ValueError, match=r"coords of valid voxels must lie in \[0, grid_shape\)"):
        model(x, coords, None)
    with pytest.raises(ValueError, match="window_size must be a positive even int or two"):
        ScatterFormerLayer(8, grid_shape=GRID, window_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"grid_shape must be \(X, Y, Z\)"):
        ScatterFormerLayer(8, grid_shape=(7, 6), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"channels \(6\) must be a multiple of num_heads \(4\)"):
        ScatterFormerLayer(6, grid_shape=GRID, rngs=nnx.Rngs(0))
