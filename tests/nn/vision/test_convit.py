"""ConViT's GPSA module and block against plain references of the official code, the locality initialization
(each head's positional attention peaks at its centre), parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.convit import GPSA, ConViTBlock
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters

HP = jax.lax.Precision.HIGHEST


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def rel_indices(height, width):
    """``r_ij = (δx, δy, δx² + δy²)`` for the row-major pixels of an ``height × width`` map: ``[N, N, 3]``."""
    y, x = np.divmod(np.arange(height * width), width)
    dx, dy = x[None, :] - x[:, None], y[None, :] - y[:, None]
    return np.stack([dx, dy, dx * dx + dy * dy], axis=-1).astype(np.float32)


def gpsa_reference(p, x, heads):
    """The official ``GPSA.forward`` / ``get_attention`` on the map's patches (no qkv bias, scale head_dim^-0.5)."""
    B, H, W, C = x.shape
    t = x.reshape(B, H * W, C)
    qk = jnp.einsum("bnc,cd->bnd", t, p["qk"]["kernel"], precision=HP).reshape(B, H * W, 2, heads, C // heads)
    q, k = qk[:, :, 0], qk[:, :, 1]
    v = jnp.einsum("bnc,cd->bnd", t, p["v"]["kernel"], precision=HP).reshape(B, H * W, heads, C // heads)
    pos_score = jax.nn.softmax(jnp.einsum("ijc,ch->hij", rel_indices(H, W), p["pos_proj"]["kernel"], precision=HP))
    patch_score = jax.nn.softmax(jnp.einsum("bihd,bjhd->bhij", q, k, precision=HP) * (C // heads) ** -0.5)
    gating = jax.nn.sigmoid(p["gating_param"])[:, None, None]
    attn = (1.0 - gating) * patch_score + gating * pos_score
    attn = attn / attn.sum(-1, keepdims=True)
    o = jnp.einsum("bhij,bjhd->bihd", attn, v, precision=HP).reshape(B, H, W, C)
    return jnp.einsum("bhwc,cd->bhwd", o, p["proj"]["kernel"], precision=HP) + p["proj"]["bias"]


def layer_norm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def block_reference(p, x, heads):
    """x + GPSA(LN(x)); x + fc2(GELU(fc1(LN(x)))) (official ``Block`` with ``use_gpsa=True``)."""
    x = x + gpsa_reference(p["attn"], layer_norm(x, p["norm1"]), heads)
    m = p["mlp"]
    h = jax.nn.gelu(jnp.einsum("bhwc,ce->bhwe", layer_norm(x, p["norm2"]), m["fc1"]["kernel"], precision=HP)
                    + m["fc1"]["bias"], approximate=False)
    return x + jnp.einsum("bhwe,ec->bhwc", h, m["fc2"]["kernel"], precision=HP) + m["fc2"]["bias"]


def perturbed(model):
    """The model with its gates and positional weights moved off their initial values (so every term matters)."""
    rng = np.random.default_rng(5)
    attn = model.attn if isinstance(model, ConViTBlock) else model
    attn.gating_param[...] = jnp.asarray(rng.normal(size=attn.gating_param.shape), jnp.float32)
    attn.pos_proj.kernel[...] = attn.pos_proj.kernel[...] + 0.3 * jnp.asarray(rng.normal(size=(3, attn.num_heads)),
                                                                               jnp.float32)
    return model


def test_gpsa_equals_the_official_formula_forward_and_gradients():
    """A 5x7 map (non-square grid), 4 heads of 4 channels."""
    model = perturbed(GPSA(16, 4, rngs=nnx.Rngs(0)))
    check_module_against_reference(model, lambda p, x: gpsa_reference(p, x, 4), image(), rtol=1e-4)


@pytest.mark.slow
def test_convit_block_equals_the_official_block():
    model = perturbed(ConViTBlock(8, 2, rngs=nnx.Rngs(1)))
    check_module_against_reference(model, lambda p, x: block_reference(p, x, 2), image((1, 3, 4, 8)), rtol=1e-4)


def positional_attention(model, height, width):
    """``softmax_j(v_pos^hᵀ r_ij)`` of the module, ``[heads, N, N]``."""
    logits = np.einsum("ijc,ch->hij", rel_indices(height, width), np.asarray(model.pos_proj.kernel[...], np.float64))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_locality_init_peaks_each_head_at_its_offset():
    """9 heads: centres (Δx, Δy) ∈ {-1, 0, 1}², each distinct, head h1 + 3·h2 at (h2 − 1, h1 − 1); the positional
    attention of the centre query of a 7x7 map is largest exactly at that offset. The initial state is a
    convolution-like one: v = I, λ = 1."""
    model = GPSA(18, 9, rngs=nnx.Rngs(0))
    attn = np.asarray(positional_attention(model, 7, 7))[:, 3 * 7 + 3]          # query at (3, 3)
    peaks = {divmod(int(np.argmax(attn[h])), 7) for h in range(9)}
    assert len(peaks) == 9
    for h in range(9):
        y, x = divmod(int(np.argmax(attn[h])), 7)
        assert (x - 3, y - 3) == (h // 3 - 1, h % 3 - 1)
        assert attn[h].max() > 0.2                                                # α = 1: e^-1 to each neighbour
    p = parameters(model)
    np.testing.assert_array_equal(p["v"]["kernel"], np.eye(18, dtype=np.float32))
    np.testing.assert_array_equal(p["gating_param"], np.ones(9, np.float32))


def test_locality_init_with_even_kernel_and_extra_heads():
    """5 heads: K = 2, centres (±½, ±½) for heads 0-3, so the four pixels around each centre tie; each row is
    ``softmax_j(−α·‖p_j − (p_i + Δ^h)‖²)`` (eq. 4), sharper for larger α; head 4 keeps a random α·N(0, 0.02²)."""
    ys, xs = np.divmod(np.arange(36), 6)
    for alpha in (1.0, 3.0):
        model = GPSA(10, 5, locality_strength=alpha, rngs=nnx.Rngs(0))
        attn = np.asarray(positional_attention(model, 6, 6))[:, 2 * 6 + 2]       # query at (x, y) = (2, 2)
        for h, (dx, dy) in enumerate([(-.5, -.5), (-.5, .5), (.5, -.5), (.5, .5)]):
            logits = -alpha * ((xs - 2 - dx) ** 2 + (ys - 2 - dy) ** 2)
            want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            np.testing.assert_allclose(attn[h], want, rtol=1e-5, atol=1e-7)
            ties = [(2 + int(np.floor(dy)) + a) * 6 + 2 + int(np.floor(dx)) + b for a in (0, 1) for b in (0, 1)]
            np.testing.assert_allclose(attn[h, ties], attn[h].max(), rtol=1e-5)
        assert np.abs(np.asarray(model.pos_proj.kernel[...])[:, 4]).max() < 0.1 * alpha


@pytest.mark.parametrize("C, heads, qkv_bias", [(16, 4, False), (432, 9, True)])
def test_parameter_count(C, heads, qkv_bias):
    gpsa = 3 * C * C + C * C + C + (3 * C if qkv_bias else 0) + 3 * heads + heads
    assert parameter_count(nnx.eval_shape(lambda: GPSA(C, heads, qkv_bias=qkv_bias, rngs=nnx.Rngs(0)))) == gpsa
    E = 4 * C
    block = nnx.eval_shape(lambda: ConViTBlock(C, heads, qkv_bias=qkv_bias, rngs=nnx.Rngs(0)))
    assert parameter_count(block) == gpsa + 4 * C + 2 * C * E + E + C


def test_bf16_is_finite_and_bad_inputs_name_the_argument():
    model = GPSA(16, 4, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(model, 10 * image(dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\)"):
        model(image((2, 5, 7, 8)))
    with pytest.raises(ValueError, match=r"channels \(16\) must be a multiple of num_heads \(3\)"):
        GPSA(16, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="locality_strength must be a positive number"):
        GPSA(16, 4, locality_strength=0.0, rngs=nnx.Rngs(0))
