"""The ConDaFormer block against a plain reference of the official BasicBlock_Attention on a dense grid."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attnjax.nn.vision.condaformer import ConDaFormerBlock, LocalStructureEnhancement
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.vision.test_condaformer import dense_tri_plane, plane_mask_by_loop


def layer_norm(x, p, eps=1e-6):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def batch_norm(x, p, eps=1e-5):
    """Training mode: the statistics of the batch over every voxel (PyTorch's BatchNorm1d on voxel features)."""
    mean, var = x.mean((0, 1, 2, 3)), x.var((0, 1, 2, 3))
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def linear(x, p):
    y = jnp.einsum("...i,io->...o", x, p["kernel"], precision="highest")
    return y + p["bias"] if "bias" in p else y


def depthwise3d(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", feature_group_count=x.shape[-1],
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


def lse_reference(p, x):
    """[BN(W1 x), BN(W2 GELU(BN(DWConv3(x))))] (official conv_1 / conv_3)."""
    local = linear(jax.nn.gelu(batch_norm(depthwise3d(x, p["depthwise"]["kernel"]), p["depthwise_norm"]),
                               approximate=False), p["mix"])
    return jnp.concatenate([batch_norm(linear(x, p["point"]), p["point_norm"]), batch_norm(local, p["mix_norm"])], -1)


def block_reference(p, x, window, shift, heads):
    B, F, H, W, C = x.shape
    mask = jnp.asarray(plane_mask_by_loop((F, H, W), window, window // 2 if shift else 0))
    qkv = linear(lse_reference(p["pre"], layer_norm(x, p["norm1"])), p["qkv"]).reshape(B, F, H, W, 3, heads, -1)
    tables = (p["q_table"], p["k_table"], p["v_table"])
    attended = dense_tri_plane(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], tables, mask, window)
    x = x + linear(lse_reference(p["post"], attended.reshape(B, F, H, W, C)), p["proj"])
    return x + linear(jax.nn.gelu(linear(layer_norm(x, p["norm2"]), p["fc1"]), approximate=False), p["fc2"])


@pytest.mark.slow  # run with --runslow; the block's conformance forward/gradient checks stay in the default suite
def test_block_equals_the_official_formula_forward_and_gradients():
    """norm="batch" (training mode), shifted 2x2 plane windows on a 2 x 3 x 5 grid, 6 heads of 2."""
    x = jax.random.normal(jax.random.key(0), (2, 2, 3, 5, 12), jnp.float32)
    block = ConDaFormerBlock(12, head_dim=2, window_size=2, shift=True, rngs=nnx.Rngs(0))
    check_module_against_reference(block, lambda p, x: block_reference(p, x, 2, True, 6), x, rtol=1e-4)


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_parameter_count(norm):
    C, w, M = 48, 4, 192
    lse = C * C + 27 * C + (4 * C if norm == "batch" else C // 2)
    expected = 2 * lse + 3 * C * C + 3 * C + 3 * (2 * w - 1) * C + C * C + C + 2 * C * M + M + C + 4 * C
    assert parameter_count(nnx.eval_shape(lambda: ConDaFormerBlock(C, norm=norm, rngs=nnx.Rngs(0)))) == expected


def test_bad_inputs_name_the_argument():
    block = ConDaFormerBlock(12, head_dim=2, window_size=2, norm="none", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, depth, height, width, 12\]"):
        block(jnp.ones((2, 3, 4, 12)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        block(jnp.ones((2, 3, 4, 5, 12), jnp.int32))
    with pytest.raises(ValueError, match="must be head_dim .* times a multiple of 3"):
        ConDaFormerBlock(16, head_dim=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels must be even"):
        LocalStructureEnhancement(9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        ConDaFormerBlock(12, head_dim=2, norm="layer", rngs=nnx.Rngs(0))
