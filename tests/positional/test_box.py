"""Plain DETR's BoxRPB: the decomposed rule against the box-to-pixel definition from a loop, paths and gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.blocked import flash_attention_xla
from attnjax.positional.box import (BoxRelativeBias, box_corners, box_pixel_offsets, box_relative_bias,
                                    box_relative_bias_reference, transform_offsets)
from attnjax.softmax.softmax import softmax_attention_reference
from tests.helpers import assert_close

B, NQ, HH, W, HEADS, HIDDEN = 2, 5, 3, 4, 3, 6


def random_boxes(key, batch=B, queries=NQ):
    kc, ks = jax.random.split(key)
    centres = jax.random.uniform(kc, (batch, queries, 2), minval=0.1, maxval=0.9)
    sizes = jax.random.uniform(ks, (batch, queries, 2), minval=0.05, maxval=0.6)
    return jnp.concatenate([centres, sizes], axis=-1)


def mlp_params(key, heads=HEADS):
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    one = lambda a, b, c: dict(w1=jax.random.normal(a, (2, HIDDEN)) * 0.3, b1=jax.random.normal(b, (HIDDEN,)),
                               w2=jax.random.normal(c, (HIDDEN, heads)) * 0.3)
    return dict(x=one(k1, k2, k3), y=one(k4, k5, k6))


def mlp(p):
    return lambda f: jax.nn.relu(jnp.einsum("...i,ij->...j", f, p["w1"], precision="highest") + p["b1"]) @ p["w2"]


def numpy_mlp(p, f):
    return np.maximum(f @ np.asarray(p["w1"], np.float64) + np.asarray(p["b1"], np.float64), 0) @ np.asarray(
        p["w2"], np.float64)


def numpy_transform(d, transform):
    return d if transform == "linear" else np.sign(d) * np.log2(np.abs(d) + 1) / 3.0


def loop_bias(boxes, params, height, width, stride, transform):
    """B[b, h, i, y·W + x] = MLP_1(x1 − p_x, x2 − p_x) + MLP_2(y1 − p_y, y2 − p_y), one (box, pixel) at a time."""
    boxes = np.asarray(boxes, np.float64)
    out = np.zeros((boxes.shape[0], HEADS, boxes.shape[1], height * width))
    for b in range(boxes.shape[0]):
        for i in range(boxes.shape[1]):
            cx, cy, w, h = boxes[b, i]
            x1, x2 = (cx - w / 2) * width * stride, (cx + w / 2) * width * stride
            y1, y2 = (cy - h / 2) * height * stride, (cy + h / 2) * height * stride
            for y in range(height):
                for x in range(width):
                    px, py = (x + 0.5) * stride, (y + 0.5) * stride
                    fx = numpy_transform(np.array([x1 - px, x2 - px]), transform)
                    fy = numpy_transform(np.array([y1 - py, y2 - py]), transform)
                    out[b, :, i, y * width + x] = numpy_mlp(params["x"], fx) + numpy_mlp(params["y"], fy)
    return out


@pytest.mark.parametrize("transform,stride", [("linear", 16.0), pytest.param("log8", 8.0, marks=pytest.mark.slow)])
def test_rule_and_reference_equal_the_box_to_pixel_loop(transform, stride):
    boxes, params = random_boxes(jax.random.key(0)), mlp_params(jax.random.key(1))
    want = loop_bias(boxes, params, HH, W, stride, transform)
    reference = box_relative_bias_reference(boxes, mlp(params["x"]), mlp(params["y"]), HH, W, stride=stride,
                                            transform=transform)
    rule = box_relative_bias(boxes, mlp(params["x"]), mlp(params["y"]), HH, W, stride=stride, transform=transform)
    assert rule.bias_x.shape == (B, HEADS, NQ, W) and rule.bias_y.shape == (B, HEADS, NQ, HH)
    assert (rule.height, rule.width) == (HH, W)
    np.testing.assert_allclose(np.asarray(reference), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(rule.dense(NQ, HH * W)), want, rtol=1e-5, atol=1e-4 * np.abs(want).max())


def test_tile_gathers_bias_x_plus_bias_y_per_pixel():
    kx, ky = jax.random.split(jax.random.key(2))
    bx, by = jax.random.normal(kx, (2, 3, NQ, W)), jax.random.normal(ky, (2, 3, NQ, HH))
    bias = BoxRelativeBias(bx, by)
    dense = np.zeros((2, 3, NQ, HH * W))
    for p in range(HH * W):
        y, x = divmod(p, W)
        dense[..., p] = np.asarray(bx)[..., x] + np.asarray(by)[..., y]
    np.testing.assert_allclose(np.asarray(bias.dense(NQ, HH * W)), dense, rtol=1e-6)
    # a tile with padding rows/columns past the ends repeats the last query/pixel (the paths mask or drop them)
    rows, cols = np.arange(3, 8), np.arange(6, 15)
    tile = np.asarray(bias.tile(jnp.asarray(rows), jnp.asarray(cols), NQ, HH * W))
    np.testing.assert_allclose(tile, dense[:, :, np.minimum(rows, NQ - 1)][..., np.minimum(cols, HH * W - 1)],
                               rtol=1e-6)


def test_offsets_and_corners_follow_the_official_coordinates():
    boxes = jnp.asarray([[[0.5, 0.25, 0.5, 0.5]]])
    np.testing.assert_allclose(np.asarray(box_corners(boxes, 2, 4, stride=10)), [[[10.0, 0.0, 30.0, 10.0]]])
    fx, fy = box_pixel_offsets(boxes, 2, 4, stride=10)
    np.testing.assert_allclose(np.asarray(fx[0, 0]), [[5, 25], [-5, 15], [-15, 5], [-25, -5]])
    np.testing.assert_allclose(np.asarray(fy[0, 0]), [[-5, 5], [-15, -5]])
    np.testing.assert_allclose(np.asarray(transform_offsets(jnp.asarray([-7.0, 0.0, 63.0]), "log8")),
                               [-1.0, 0.0, 2.0], rtol=1e-6)


def test_blocked_xla_path_equals_the_reference_forward_and_gradients_to_both_mlps_and_the_boxes():
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (B, NQ, 4, 8))
    k = jax.random.normal(ks[1], (B, HH * W, 2, 8))
    v = jax.random.normal(ks[2], (B, HH * W, 2, 8))
    boxes, params = random_boxes(ks[3]), mlp_params(jax.random.key(4), heads=4)

    def loss(fn, fast):
        def f(q, k, v, params, boxes):
            make = box_relative_bias if fast else box_relative_bias_reference
            bias = make(boxes, mlp(params["x"]), mlp(params["y"]), HH, W, stride=16.0, transform="log8")
            out = fn(q, k, v, bias=bias)
            return jnp.sum(out * jnp.cos(out)), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, params, boxes)

    (_, want), dwant = loss(softmax_attention_reference, False)
    (_, got), dgot = loss(lambda *a, **kw: flash_attention_xla(*a, block_q=4, block_kv=8, **kw), True)
    assert_close(got, want, rtol=1e-5)
    for (path, g), (_, w) in zip(jax.tree.leaves_with_path(dgot), jax.tree.leaves_with_path(dwant)):
        assert_close(g, w, atol=2e-5, rtol=2e-5, name=jax.tree_util.keystr(path))
    for name in ("x", "y"):
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(dwant[3][name])), name
    assert float(jnp.abs(dwant[4]).max()) > 0


def test_bf16_tables_are_finite_through_the_api():
    q = jax.random.normal(jax.random.key(5), (1, NQ, 2, 8), jnp.bfloat16)
    kv = jax.random.normal(jax.random.key(6), (1, HH * W, 2, 8), jnp.bfloat16)
    bias = BoxRelativeBias(jnp.ones((1, 2, NQ, W), jnp.bfloat16), jnp.ones((1, 1, NQ, HH), jnp.bfloat16))
    out = jax.jit(lambda q, kv, b: aj.attention(q, kv, kv, bias=b, implementation="xla"))(q, kv, bias)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_bad_tables_boxes_and_transforms_are_refused():
    q, kv = jnp.zeros((2, NQ, 2, 4)), jnp.zeros((2, HH * W, 2, 4))
    good_x, good_y = jnp.zeros((2, 2, NQ, W)), jnp.zeros((2, 2, NQ, HH))
    with pytest.raises(ValueError, match=r"with the same Nq"):
        aj.attention(q, kv, kv, bias=BoxRelativeBias(good_x, jnp.zeros((2, 2, NQ + 1, HH))))
    with pytest.raises(ValueError, match=r"does not fit \[B, H, T, S\] = \[2, 2, 5, 12\]"):
        aj.attention(q, kv, kv, bias=BoxRelativeBias(jnp.zeros((2, 2, NQ, W + 1)), good_y))
    with pytest.raises(ValueError, match="does not fit"):
        aj.attention(q, kv, kv, bias=BoxRelativeBias(jnp.zeros((2, 3, NQ, W)), jnp.zeros((2, 3, NQ, HH))))
    with pytest.raises(ValueError, match="does not fit"):
        aj.attention(q[:, :4], kv, kv, bias=BoxRelativeBias(good_x, good_y))
    with pytest.raises(TypeError, match="bias_y must be a float array"):
        aj.attention(q, kv, kv, bias=BoxRelativeBias(good_x, jnp.zeros((2, 2, NQ, HH), jnp.int32)))
    with pytest.raises(ValueError, match=r"boxes must have shape \[batch, queries, 4\]"):
        box_pixel_offsets(jnp.zeros((2, NQ, 2)), HH, W)
    with pytest.raises(TypeError, match="boxes must be a float array"):
        box_pixel_offsets(jnp.zeros((2, NQ, 4), jnp.int32), HH, W)
    with pytest.raises(ValueError, match="transform must be one of"):
        box_pixel_offsets(jnp.zeros((2, NQ, 4)), HH, W, transform="log")
    assert math.isclose(float(transform_offsets(jnp.asarray(7.0), "log8")), 1.0, rel_tol=1e-6)
