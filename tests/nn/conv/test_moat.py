"""MOAT block against a plain reference of Yang et al. 2023 (sec. 3.2): MBConv without SE, then multi-head
self-attention, globally or one window at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import MOATBlock
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count, parameters
from tests.helpers import assert_close


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def batch_norm(x, p, eps=1e-3):
    """Training-mode BatchNorm: statistics over batch and pixels, biased variance (the first one has no shift)."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p.get("bias", 0.0)


def layer_norm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
    return 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))


def mbconv_reference(p, x, norm):
    """x + Proj(GELU(N(DWConv(GELU(N(Expand(N(x)))))))), no squeeze-and-excitation."""
    p = p["mbconv"]
    h = gelu(norm(conv2d(norm(x, p["pre_norm"]), p["expand"]["kernel"]), p["expand_norm"]))
    h = gelu(norm(conv2d(h, p["depthwise"]["kernel"], groups=h.shape[-1]), p["depthwise_norm"]))
    return x + conv2d(h, p["project"]["kernel"], p["project"]["bias"])


def attention_reference(p, x, head_dim, window):
    """x + Attn(LN(x)): softmax(q k / sqrt(d) + relative bias) v per head, over each window's real pixels
    (border windows cropped by the map's edge), one window at a time; window None: the whole map."""
    B, H, W, C = x.shape
    heads = C // head_dim
    h = layer_norm(x, p["attention_norm"])
    q, v = (jnp.einsum("bhwc,cd->bhwd", h, p[n]["kernel"], precision="highest") + p[n]["bias"]
            for n in ("query", "value"))
    k = jnp.einsum("bhwc,cd->bhwd", h, p["key"]["kernel"], precision="highest")  # a key bias cancels in softmax
    wh, ww = (H, W) if window is None else window
    out = jnp.zeros_like(x)
    for i0 in range(0, H, wh):
        for j0 in range(0, W, ww):
            pos = [(r - i0, c - j0) for r in range(i0, min(i0 + wh, H)) for c in range(j0, min(j0 + ww, W))]
            qs, ks, vs = (a[:, i0:i0 + wh, j0:j0 + ww].reshape(B, len(pos), heads, head_dim) for a in (q, k, v))
            logits = jnp.einsum("bthd,bshd->bhts", qs, ks, precision="highest") / np.sqrt(head_dim)
            if "relative_position" in p:
                dy = np.array([[yi - yj + wh - 1 for yj, _ in pos] for yi, _ in pos])
                dx = np.array([[xi - xj + ww - 1 for _, xj in pos] for _, xi in pos])
                logits = logits + p["relative_position"][dy * (2 * ww - 1) + dx].transpose(2, 0, 1)
            o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), vs, precision="highest")
            rows, cols = min(i0 + wh, H) - i0, min(j0 + ww, W) - j0
            out = out.at[:, i0:i0 + wh, j0:j0 + ww].set(o.reshape(B, rows, cols, C))
    return x + jnp.einsum("bhwc,cd->bhwd", out, p["out"]["kernel"], precision="highest") + p["out"]["bias"]


def moat_reference(head_dim, window=None, norm=batch_norm):
    def reference(p, x):
        return attention_reference(p, mbconv_reference(p, x, norm), head_dim, window)
    return reference


def test_global_attention_equals_the_paper_formula_forward_and_gradients():
    model = MOATBlock(16, head_dim=8, rngs=nnx.Rngs(0))
    check_module_against_reference(model, moat_reference(8), image(), rtol=5e-5)


def test_window_attention_equals_a_loop_over_windows_forward_and_gradients():
    model = MOATBlock(16, head_dim=8, window_size=3, relative_position=True, rngs=nnx.Rngs(1))
    check_module_against_reference(model, moat_reference(8, (3, 3)), image((2, 6, 6, 16), seed=1), rtol=5e-5)


def test_windows_that_do_not_divide_the_map_attend_over_real_pixels_only():
    """A 5x3 map in 3x2 windows (padded on both axes), LayerNorm in the MBConv; forward only (the gradients of
    these code paths are checked above)."""
    model = MOATBlock(16, head_dim=4, window_size=(3, 2), relative_position=True, norm="layer",
                      rngs=nnx.Rngs(2))
    x = image((2, 5, 3, 16), seed=2)
    reference = jax.jit(moat_reference(4, (3, 2), norm=layer_norm))
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), reference(parameters(model), x), rtol=5e-5, name="output")


def test_eval_mode_uses_running_averages_so_samples_are_independent():
    """In training mode a sample's output depends on the batch (BatchNorm's batch statistics); after
    ``model.eval()`` it does not."""
    model = MOATBlock(16, head_dim=8, window_size=3, rngs=nnx.Rngs(0))
    model.eval()
    forward = nnx.jit(lambda m, x: m(x))
    x = image()
    np.testing.assert_allclose(forward(model, x[:1]), forward(model, x)[:1], atol=1e-5)


@pytest.mark.parametrize("kwargs, extra", [
    (dict(), 0),
    (dict(window_size=(7, 5), relative_position=True), 2 * 13 * 9),   # heads·(2wh−1)(2ww−1)
])
def test_parameter_count(kwargs, extra):
    C, E, k = 64, 4 * 64, 3
    mbconv = C + C * E + 2 * E + k * k * E + 2 * E + E * C + C       # the first BatchNorm: scale only
    attention = 2 * C + 4 * C * C + 3 * C            # no key bias
    assert parameter_count(nnx.eval_shape(lambda: MOATBlock(C, rngs=nnx.Rngs(0), **kwargs))) == (mbconv + attention
                                                                                                   + extra)


def test_bf16_is_finite_and_keeps_the_dtype():
    model = MOATBlock(16, head_dim=8, window_size=3, relative_position=True, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 7, 16)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    model = MOATBlock(16, head_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 16, 5, 7\]"):
        model(image((2, 16, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        model(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"channels \(16\) must be a multiple of head_dim \(32\)"):
        MOATBlock(16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        MOATBlock(16, head_dim=8, norm="group", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="relative_position needs window_size"):
        MOATBlock(16, head_dim=8, relative_position=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window must be a positive int or a pair"):
        MOATBlock(16, head_dim=8, window_size=(3, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expansion must be a positive int, got 0"):
        MOATBlock(16, head_dim=8, expansion=0, rngs=nnx.Rngs(0))
