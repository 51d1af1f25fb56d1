"""Plain DETR's BoxRPB cross-attention against a plain reference of Lin et al. 2023 (sec. 3) and the official
``GlobalCrossAttention`` (impiga/Plain-DETR ``models/global_rpe_decomp_decoder.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.plain_detr import BoxRPBCrossAttention, BoxRPBMLP, detr_example
from attnjax.testing.modules import check_module_against_reference, parameter_count

HEADS = 2


def linear(x, p):
    return jnp.einsum("...c,cd->...d", x, p["kernel"], precision="highest") + p.get("bias", 0.0)


def mlp_reference(p, f):
    return linear(jax.nn.relu(linear(f, p["hidden"])), p["out"])


def cross_attention_reference(p, queries, boxes, features, position=None, *, stride, transform):
    """softmax(q·k/√d + MLP_1(x1 − p_x, x2 − p_x) + MLP_2(y1 − p_y, y2 − p_y))·v, every (query, pixel) pair dense."""
    B, Nq, C = queries.shape
    _, H, W, _ = features.shape
    d = C // HEADS
    cx, cy, w, h = (boxes[..., n] for n in range(4))
    x1, x2 = (cx - w / 2) * W * stride, (cx + w / 2) * W * stride
    y1, y2 = (cy - h / 2) * H * stride, (cy + h / 2) * H * stride
    py, px = np.divmod(np.arange(H * W), W)
    px, py = (px + 0.5) * stride, (py + 0.5) * stride
    fx = jnp.stack([x1[..., None] - px, x2[..., None] - px], -1)  # [B, Nq, HW, 2]
    fy = jnp.stack([y1[..., None] - py, y2[..., None] - py], -1)
    if transform == "log8":
        fx, fy = (jnp.sign(f) * jnp.log2(jnp.abs(f) + 1) / 3 for f in (fx, fy))
    bias = jnp.moveaxis(mlp_reference(p["mlp_x"], fx) + mlp_reference(p["mlp_y"], fy), -1, 1)  # [B, heads, Nq, HW]
    pixels = features.reshape(B, H * W, C)
    keys = pixels if position is None else pixels + position.reshape(B, H * W, C)
    q = linear(queries, p["query"]).reshape(B, Nq, HEADS, d)
    k = linear(keys, p["key"]).reshape(B, H * W, HEADS, d)
    v = linear(pixels, p["value"]).reshape(B, H * W, HEADS, d)
    logits = jnp.einsum("bihd,bphd->bhip", q, k, precision="highest") * d ** -0.5 + bias
    out = jnp.einsum("bhip,bphd->bihd", jax.nn.softmax(logits, axis=-1), v, precision="highest")
    return linear(out.reshape(B, Nq, C), p["proj"])


def test_module_equals_the_formula_forward_and_gradients():
    """The official stride 16 and "abs_log8" offsets, a position embedding on the keys; gradients of every parameter
    and of the queries, boxes, features and position embedding (the example call covers "linear" without one)."""
    model = BoxRPBCrossAttention(16, HEADS, rpe_hidden_dim=8, offset_transform="log8", rngs=nnx.Rngs(0))
    queries, boxes, features = detr_example(jax.random.key(1))
    position = jax.random.normal(jax.random.key(2), features.shape)
    check_module_against_reference(
        model, lambda p, *a: cross_attention_reference(p, *a, stride=16.0, transform="log8"), queries, boxes,
        features, position, rtol=2e-5, atol=2e-5)


def test_boxes_steer_the_attention():
    """Same queries, boxes moved: the output changes (the bias reads the boxes); the example call runs "linear"."""
    model = BoxRPBCrossAttention(16, HEADS, rpe_hidden_dim=8, feature_stride=1.0, rngs=nnx.Rngs(0))
    queries, boxes, features = detr_example(jax.random.key(1))
    call = nnx.jit(lambda m, *a: m(*a))
    moved = boxes.at[..., :2].set(1.0 - boxes[..., :2])
    assert float(jnp.abs(call(model, queries, boxes, features) - call(model, queries, moved, features)).max()) > 1e-3


@pytest.mark.parametrize("C,heads,P,qkv_bias", [(16, 2, 8, True), (256, 8, 512, True), (32, 4, 16, False)])
def test_parameter_count(C, heads, P, qkv_bias):
    model = nnx.eval_shape(lambda: BoxRPBCrossAttention(C, heads, rpe_hidden_dim=P, qkv_bias=qkv_bias,
                                                        rngs=nnx.Rngs(0)))
    projections = 4 * C * C + (3 if qkv_bias else 1) * C
    assert parameter_count(model) == projections + 2 * (3 * P + P * heads)


def test_mlp_is_the_official_cpb_mlp():
    mlp = BoxRPBMLP(3, hidden=8, rngs=nnx.Rngs(0))
    f = jax.random.normal(jax.random.key(3), (2, 5, 4, 2))
    p = nnx.to_pure_dict(nnx.state(mlp, nnx.Param))
    assert set(p["out"]) == {"kernel"} and parameter_count(mlp) == 3 * 8 + 8 * 3
    np.testing.assert_allclose(np.asarray(mlp(f)), np.asarray(mlp_reference(p, f)), rtol=1e-5, atol=1e-6)


def test_bf16_is_finite():
    model = BoxRPBCrossAttention(16, HEADS, rpe_hidden_dim=8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    queries, boxes, features = detr_example(jax.random.key(4))
    y = nnx.jit(lambda m, *a: m(*a))(model, queries.astype(jnp.bfloat16), boxes, features.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"dim \(10\) must be a multiple of num_heads \(4\)"):
        BoxRPBCrossAttention(10, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="offset_transform must be one of"):
        BoxRPBCrossAttention(16, 2, offset_transform="log", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature_stride must be positive"):
        BoxRPBCrossAttention(16, 2, feature_stride=0, rngs=nnx.Rngs(0))
    model = BoxRPBCrossAttention(16, HEADS, rpe_hidden_dim=8, rngs=nnx.Rngs(0))
    queries, boxes, features = detr_example(jax.random.key(5))
    with pytest.raises(ValueError, match=r"must share B and Nq"):
        model(queries, boxes[:, :4], features)
    with pytest.raises(ValueError, match=r"must share B and Nq"):
        model(queries, boxes, features[:1])
    with pytest.raises(ValueError, match=r"boxes must have shape \[batch, queries, 4\]"):
        model(queries, boxes[..., :2], features)
    with pytest.raises(ValueError, match=r"features must have shape \[batch, height, width, 16\]"):
        model(queries, boxes, features[..., :8])
    with pytest.raises(ValueError, match="position must have the shape of features"):
        model(queries, boxes, features, features[:, :2])
    with pytest.raises(ValueError, match=r"offsets must have shape \[..., 2\]"):
        model.mlp_x(jnp.zeros((3, 4)))
