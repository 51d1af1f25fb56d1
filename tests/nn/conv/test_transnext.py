"""TransNeXt's aggregated attention, ConvGLU and block against plain references of Shi 2024 (CVPR) and its
official code (DaiShiResearch/TransNeXt, ``AggregatedAttention``, ``ConvolutionalGLU``, ``Block``).

The references here are dense: the window part is a masked ``[HW, HW]`` score map beside the ``P`` pooled
keys, under one softmax over ``HW + P`` columns; the library gathers ``k×k`` windows instead.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import AggregatedAttention, ConvGLU, TransNeXtBlock
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count, parameters
from attnjax.testing.numerics import assert_close
from attnjax.vision.aggregated_attention import aggregated_attention


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def gelu(x):
    return 0.5 * x * (1 + jax.scipy.special.erf(x / math.sqrt(2)))


def normalize(a):
    return a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def neighbours(H, W, window):
    """``M [k², N, N]``: ``M[j, n, m] = 1`` when pixel ``m`` is the ``j``-th window position of pixel ``n``
    (offsets row-major, as ``torch.nn.Unfold``)."""
    r, N = window // 2, H * W
    M = np.zeros((window * window, N, N), np.float32)
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    for j, (dy, dx) in enumerate(offsets):
        for y in range(H):
            for x in range(W):
                if 0 <= y + dy < H and 0 <= x + dx < W:
                    M[j, y * W + x, (y + dy) * W + x + dx] = 1
    return M


def dense_aggregated_attention(q, k, v, k_pool, v_pool, qe, t, local_bias, pool_bias, tokens, token_bias, window):
    """The paper's aggregated attention with a dense masked ``[HW, HW + P]`` softmax."""
    B, H, W, h, D = q.shape
    N, P = H * W, k_pool.shape[1]
    M = neighbours(H, W, window)
    q_hat, k_hat = normalize(q.reshape(B, N, h, D)), normalize(k.reshape(B, N, h, D))
    log_n = jnp.log(M.sum((0, 2)) + P)                                     # log(keys seen by each query)
    s = (q_hat + qe) * jnp.logaddexp(t, 0.0)[:, None] * log_n[None, :, None, None]
    local = jnp.einsum("bnhd,bmhd->bhnm", s, k_hat) + jnp.einsum("hj,jnm->hnm", local_bias, M)
    local = jnp.where(M.sum(0) > 0, local, -jnp.inf)
    pooled = jnp.einsum("bnhd,bphd->bhnp", s, normalize(k_pool)) + pool_bias.reshape(N, h, P).transpose(1, 0, 2)
    a = jax.nn.softmax(jnp.concatenate([local, pooled], axis=-1), axis=-1)
    learned = jnp.einsum("bnhd,hdj->bhnj", q_hat, tokens) + token_bias[None, :, None, :]
    weights = a[..., :N] + jnp.einsum("bhnj,jnm->bhnm", learned, M)
    out = (jnp.einsum("bhnm,bmhd->bnhd", weights, v.reshape(B, N, h, -1))
           + jnp.einsum("bhnp,bphd->bnhd", a[..., N:], v_pool))
    return out.reshape(B, H, W, h, -1)


def core_inputs(B=2, H=5, W=7, heads=2, D=4, P=6, window=3, seed=0):
    rng, j = np.random.default_rng(seed), window * window
    shapes = [(B, H, W, heads, D)] * 3 + [(B, P, heads, D)] * 2 + [(heads, D), (heads,), (heads, j), (H, W, heads, P),
                                                                    (heads, D, j), (heads, j)]
    return [jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes]


NAMES = ["q", "k", "v", "k_pool", "v_pool", "query_embedding", "temperature", "local_bias", "pool_bias",
         "learnable_tokens", "learnable_bias"]


def core(window):
    return lambda *args: aggregated_attention(*args[:5], **dict(zip(NAMES[5:], args[5:])), window=window)


def test_windowed_core_equals_the_dense_masked_softmax():
    """Forward, every input drawn at random, a 5x5 window on a 5x7 map (the module tests below use 3x3 and
    check the gradients)."""
    args = core_inputs(window=5)
    expected = jax.jit(lambda *a: dense_aggregated_attention(*a, 5))(*args)
    assert_close(jax.jit(core(5))(*args), expected, rtol=2e-5, name="output")


def test_window_part_builds_no_dense_map():
    B, H, W, heads, D, P = 1, 8, 8, 1, 2, 4
    args = core_inputs(B, H, W, heads, D, P)
    jaxpr = jax.make_jaxpr(core(3))(*args).jaxpr
    sizes = [math.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars]
    assert max(sizes) < (H * W) ** 2, "an intermediate as large as an [HW, HW] map"


def bins(L, p):
    """torch's adaptive average pooling: bin i covers [floor(i·L/p), ceil((i+1)·L/p))."""
    return [(i * L // p, -(-(i + 1) * L // p)) for i in range(p)]


def adaptive_pool(x, ph, pw):
    H, W = x.shape[1:3]
    return jnp.stack([jnp.stack([x[:, a:b, c:d].mean((1, 2)) for c, d in bins(W, pw)], 1) for a, b in bins(H, ph)], 1)


def position_bias(p, H, W, ph, pw, pretrain):
    """Official ``get_relative_position_cpb`` + MLP, on every (query, pooled key) pair (no de-duplication)."""
    def centre(L, n):                                            # the mean index of each pooling bin
        return np.array([(a + b - 1) / 2 for a, b in bins(L, n)])

    qy, qx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    ky, kx = np.meshgrid(centre(H, ph), centre(W, pw), indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)) / max(pretrain[0] - 1, 1) * 8
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)) / max(pretrain[1] - 1, 1) * 8
    coords = np.stack([dy, dx], -1)
    coords = np.sign(coords) * np.log2(np.abs(coords) + 1) / 3.0
    hidden = jax.nn.relu(jnp.asarray(coords, jnp.float32) @ p["cpb_fc1"]["kernel"] + p["cpb_fc1"]["bias"])
    bias = hidden @ p["cpb_fc2"]["kernel"] + p["cpb_fc2"]["bias"]                    # [N, P, heads]
    return bias.reshape(H, W, ph * pw, -1).transpose(0, 1, 3, 2)


def layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def linear(p, x):
    return x @ p["kernel"] + p["bias"]


def aggregated_reference(heads, window, pool, pretrain=None):
    def reference(p, x):
        B, H, W, C = x.shape
        ph, pw = pool(H, W)

        def split(t):
            return t.reshape(*t.shape[:-1], heads, C // heads)

        kv = linear(p["kv"], x)
        pooled = layer_norm(adaptive_pool(gelu(linear(p["sr"], x)), ph, pw).reshape(B, ph * pw, C), p["norm"], 1e-5)
        kv_pool = linear(p["kv"], pooled)
        out = dense_aggregated_attention(
            split(linear(p["q"], x)), split(kv[..., :C]), split(kv[..., C:]), split(kv_pool[..., :C]),
            split(kv_pool[..., C:]), p["query_embedding"], p["temperature"], p["local_bias"],
            position_bias(p, H, W, ph, pw, pretrain or (H, W)), p["learnable_tokens"], p["learnable_bias"], window)
        return linear(p["proj"], out.reshape(B, H, W, C))
    return reference


def randomize_biases(model):
    """Nonzero token bias and a larger window bias, so that a misplaced one shows."""
    rng = np.random.default_rng(1)
    model.learnable_bias[...] = jnp.asarray(rng.standard_normal(model.learnable_bias.shape, np.float32))
    model.local_bias[...] = jnp.asarray(rng.standard_normal(model.local_bias.shape, np.float32))
    return model


def test_aggregated_attention_equals_the_paper_formula_forward_and_gradients():
    model = randomize_biases(AggregatedAttention(16, num_heads=2, sr_ratio=2, rngs=nnx.Rngs(0)))
    check_module_against_reference(model, aggregated_reference(2, 3, lambda H, W: (H // 2, W // 2)), image())


def test_fixed_pool_size_and_pretrain_size():
    """Forward only (the gradients are checked above): a fixed 3x2 grid, coordinates normalized by a 9x9
    pre-training map."""
    model = randomize_biases(AggregatedAttention(16, num_heads=2, fixed_pool_size=(3, 2), pretrain_size=9,
                                                 rngs=nnx.Rngs(0)))
    reference = aggregated_reference(2, 3, lambda H, W: (3, 2), (9, 9))
    x = image(seed=5)
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), jax.jit(reference)(parameters(model), x), name="output")


def conv_glu_reference(p, x):
    """Official ConvolutionalGLU: fc1 -> chunk(2) -> GELU(DWConv3x3(first)) * second -> fc2."""
    h = linear(p["fc1"], x)
    gate, value = jnp.split(h, 2, axis=-1)
    act = gelu(conv2d(gate, p["dwconv"]["kernel"], p["dwconv"]["bias"], groups=gate.shape[-1]))
    return linear(p["fc2"], act * value)


def test_conv_glu_equals_the_paper_formula_forward_and_gradients():
    check_module_against_reference(ConvGLU(16, rngs=nnx.Rngs(0)), conv_glu_reference, image(seed=3))


def test_transnext_block_is_two_pre_norm_residuals():
    """Forward only: the gradients of both parts are checked above."""
    attention = aggregated_reference(2, 3, lambda H, W: (H // 2, W // 2))

    def reference(p, x):
        x = x + attention(p["attn"], layer_norm(x, p["norm1"], 1e-6))
        return x + conv_glu_reference(p["mlp"], layer_norm(x, p["norm2"], 1e-6))

    model, x = TransNeXtBlock(16, num_heads=2, sr_ratio=2, rngs=nnx.Rngs(0)), image(seed=4)
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), jax.jit(reference)(parameters(model), x), name="block")


def count(cls, *args, **kwargs):
    return parameter_count(nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0))))


def test_parameter_counts():
    C, heads, k = 64, 8, 3                                       # the defaults: 8 heads, window 3
    expected = (4 * C * C + 4 * C) + (C * C + C) + 2 * C + (3 * 512 + 513 * heads) + heads + C + heads * k * k \
        + C * k * k + heads * k * k
    assert count(AggregatedAttention, C) == expected
    assert count(AggregatedAttention, C, qkv_bias=False) == expected - 3 * C
    E = int(2 * (4 * C) / 3)                                     # ConvGLU's hidden width, mlp_ratio 4
    glu = 2 * C * E + 2 * E + 10 * E + E * C + C
    assert E == 170 and count(ConvGLU, C) == glu
    assert count(TransNeXtBlock, C) == expected + glu + 4 * C


def test_bf16_is_finite_and_defaults_run_at_stage_one_size():
    model = AggregatedAttention(16, num_heads=2, rngs=nnx.Rngs(0))           # sr_ratio 8: a 1x2 grid on 8x17
    y = nnx.jit(lambda m, x: m(x))(model, 30 * image((1, 8, 17, 16), dtype=jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 8, 17, 16)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    model = AggregatedAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), "
                                         r"got \[2, 16, 5, 7\]"):
        model(image((2, 16, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        model(jnp.ones((2, 8, 8, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"height and width \[5, 7\] give a pooled grid \[0, 0\] with sr_ratio=8"):
        model(image())
    with pytest.raises(ValueError, match="window_size must be odd, got 4"):
        AggregatedAttention(16, window_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"d_model \(16\) must be a multiple of num_heads \(3\)"):
        AggregatedAttention(16, num_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"fixed_pool_size must be an int or a pair"):
        AggregatedAttention(16, fixed_pool_size=(1, 2, 3), rngs=nnx.Rngs(0))
    args = core_inputs()
    args[8] = args[8][:, :, :, :4]
    with pytest.raises(ValueError, match=r"pool_bias must have shape \[5, 7, 2, 6\] .* got \[5, 7, 2, 4\]"):
        core(3)(*args)
    with pytest.raises(ValueError, match="window must be a positive odd int, got 2"):
        core(2)(*core_inputs())
