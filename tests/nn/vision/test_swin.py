"""Swin's window attention and block, and the MaxViT block, against plain references of their papers'
formulas (Liu et al. 2021, sec. 3.1-3.2, eq. 3-4; Tu et al. 2022, sec. 3, Fig. 2)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from attnjax.nn.vision.maxvit import MaxViTBlock
from attnjax.nn.vision.swin import SwinBlock, TransformerMLP, WindowAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from attnjax.vision.window import grid_attention_reference, window_attention_reference
from tests.helpers import assert_close
from tests.nn.conv.test_moat import batch_norm, gelu, image, layer_norm


def linear(x, p):
    return jnp.einsum("...c,cd->...d", x, p["kernel"], precision="highest") + p.get("bias", 0.0)


def attention_reference(p, x, heads, window, shift=(0, 0), partition="window"):
    """qkv, Swin's softmax(QKᵀ/√d + B)V inside (shifted) windows or MaxViT grids as one dense masked softmax
    over all pixels, proj."""
    B, H, W, C = x.shape
    q, k, v = jnp.split(linear(x, p["qkv"]).reshape(B, H, W, 3 * heads, -1), 3, axis=3)
    table = p["relative_position_bias_table"]
    if partition == "grid":
        o = grid_attention_reference(q, k, v, grid_size=window, relative_bias_table=table)
    else:
        o = window_attention_reference(q, k, v, window_size=window, shift_size=shift, relative_bias_table=table)
    return linear(o.reshape(B, H, W, C), p["proj"])


def block_reference(p, x, heads, window, shift=(0, 0), partition="window"):
    """x + (S)W-MSA(LN(x)), then x + MLP(LN(x)) (Swin, eq. 3)."""
    x = x + attention_reference(p["attn"], layer_norm(x, p["norm1"]), heads, window, shift, partition)
    mlp = p["mlp"]
    return x + linear(gelu(linear(layer_norm(x, p["norm2"]), mlp["fc1"])), mlp["fc2"])


def test_window_attention_module_equals_the_formula_forward_and_gradients():
    model = WindowAttention(8, 2, window_size=(3, 4), shift_size=(1, 2), rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: attention_reference(p, x, 2, (3, 4), (1, 2)),
                                   image((2, 5, 7, 8)), rtol=5e-5)


@pytest.mark.parametrize("shift", [0, 1])
def test_swin_block_equals_the_formula_forward_and_gradients(shift):
    model = SwinBlock(8, 2, window_size=3, shift_size=shift, rngs=nnx.Rngs(shift))
    check_module_against_reference(model, lambda p, x: block_reference(p, x, 2, (3, 3), (shift, shift)),
                                   image((2, 5, 7, 8), seed=shift), rtol=5e-5)


def test_the_shift_is_dropped_when_the_map_fits_in_one_window():
    """Swin: "if window size is larger than input resolution, we don't partition windows"."""
    shifted = WindowAttention(8, 2, window_size=4, shift_size=2, rngs=nnx.Rngs(0))
    plain = WindowAttention(8, 2, window_size=4, rngs=nnx.Rngs(0))
    x = image((1, 3, 4, 8))
    assert_close(shifted(x), plain(x), rtol=1e-6, name="3x4 map in a 4x4 window")


def maxvit_reference(p, x, head_dim, block, grid):
    """MBConv with SE (SiLU, sigmoid gate), then block and grid attention layers."""
    p, attention = p["mbconv"], p
    h = gelu(batch_norm(conv2d(batch_norm(x, p["pre_norm"]), p["expand"]["kernel"]), p["expand_norm"]))
    h = gelu(batch_norm(conv2d(h, p["depthwise"]["kernel"], groups=h.shape[-1]), p["depthwise_norm"]))
    se = p["squeeze_excite"]
    gate = jax.nn.sigmoid(linear(jax.nn.silu(linear(jnp.mean(h, axis=(1, 2), keepdims=True), se["reduce"])),
                                 se["expand"]))
    x = x + conv2d(h * gate, p["project"]["kernel"], p["project"]["bias"])
    heads = x.shape[-1] // head_dim
    x = block_reference(attention["block_attention"], x, heads, block)
    return block_reference(attention["grid_attention"], x, heads, grid, partition="grid")


@pytest.mark.slow  # run with --runslow; keeps the default suite under 20 minutes on 2 cores
def test_maxvit_block_equals_the_formula_forward_and_gradients():
    """Training-mode BatchNorm; a 5x7 map in 3x3 blocks and a 2x2 grid (interval 3x4), both padded."""
    model = MaxViTBlock(16, head_dim=8, block_size=3, grid_size=2, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: maxvit_reference(p, x, 8, (3, 3), (2, 2)), image(),
                                   rtol=5e-5)


def test_parameter_counts():
    C, heads, M = 96, 3, 7
    attention = 3 * C * C + 3 * C + C * C + C + heads * (2 * M - 1) ** 2
    mlp = 2 * C * 4 * C + 4 * C + C
    assert parameter_count(nnx.eval_shape(lambda: WindowAttention(C, heads, rngs=nnx.Rngs(0)))) == attention
    assert parameter_count(nnx.eval_shape(lambda: TransformerMLP(C, rngs=nnx.Rngs(0)))) == mlp
    assert parameter_count(nnx.eval_shape(lambda: SwinBlock(C, heads, rngs=nnx.Rngs(0)))) == attention + 4 * C + mlp
    C, E = 64, 256
    S = C // 4
    mbconv = C + C * E + 2 * E + 9 * E + 2 * E + (E * S + S + S * E + E) + E * C + C
    layer = 3 * C * C + 3 * C + C * C + C + 2 * (2 * 7 - 1) ** 2 + 4 * C + 2 * C * E + E + C
    assert parameter_count(nnx.eval_shape(lambda: MaxViTBlock(C, rngs=nnx.Rngs(0)))) == mbconv + 2 * layer


def test_bf16_is_finite_and_keeps_the_dtype():
    model = SwinBlock(16, 2, window_size=3, shift_size=1, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="partition must be one of"):
        WindowAttention(8, 2, partition="diagonal", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shift_size applies to partition='window' only"):
        WindowAttention(8, 2, shift_size=1, partition="grid", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shift_size must be smaller than window_size"):
        WindowAttention(8, 2, window_size=3, shift_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"d_model \(8\) must be a multiple of num_heads \(3\)"):
        WindowAttention(8, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"channels \(16\) must be a multiple of head_dim \(32\)"):
        MaxViTBlock(16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must"):
        SwinBlock(8, 2, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 7, 4)))
