"""``capture_attention`` over the whole module registry: every registered module records its softmax attention
(maps of the right shapes) or is refused with its documented reason; the maps of newly wired layers (HaloNet
blocks, DaViT channel groups, CrossFormer's long-distance groups, ComplexFormer's complex scores, EchoAtt's shared
map) equal NumPy maps computed from the layers' own projections."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax.nn  # noqa: F401  (fills the module registry)
from attnjax import masks
from attnjax.analysis.capture import NO_ATTENTION_MAP, REFUSED, attention_maps, capture_attention
from attnjax.bias import as_bias
from attnjax.nn import EchoAttentionStack
from attnjax.nn.positional.complexformer import ComplexMultiHeadAttention
from attnjax.nn.registry import modules
from attnjax.nn.vision.crossformer import CrossFormerBlock
from attnjax.nn.vision.davit import ChannelAttention
from attnjax.nn.vision.halo import HaloAttention
from attnjax.vision.halo import HaloLayout, halo_windows, query_blocks
from attnjax.vision.window import grid_attention_inputs
from tests.helpers import assert_close

SPECS = modules()


def spec_id(spec) -> str:
    return f"{spec.kind}-{spec.name}"


def check_refusal(spec, error: NotImplementedError) -> None:
    """The refusal names, for each silent module, a class of ``REFUSED`` and its documented reason (or the layer
    refused by itself, ``refuse_capture``, and its class is documented)."""
    message = str(error)
    listed = re.findall(r" \((\w+)\): ", message)
    if "recorded nothing" not in message:
        listed = re.findall(r"not supported for (\w+)", message)
    assert listed, f"{spec.name}: a refusal that names no module class: {message}"
    for name in listed:
        assert name in REFUSED, (f"{spec.name}: {name} records no attention and has no documented reason; wire it to "
                                 f"attnjax.nn.capture.sow_attention_inputs, or add it to REFUSED or NO_ATTENTION_MAP "
                                 f"of attnjax.analysis.capture: {message}")
        assert "recorded nothing" not in message or REFUSED[name] in message, message


def check_entries(spec, captured) -> None:
    """A module of ``NO_ATTENTION_MAP`` records nothing; any other one recorded at least one softmax call with
    ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]`` (``Hq % Hkv == 0``) and a positive scale."""
    if spec.module.__name__ in NO_ATTENTION_MAP:
        assert captured == [], f"{spec.name} holds no attention map but recorded {len(captured)} calls"
        return
    assert captured, f"{spec.name} recorded nothing and was not refused"
    for c in captured:
        assert c.q.ndim == c.k.ndim == 4, (spec.name, c.path, c.q.shape, c.k.shape)
        (Bq, T, Hq, D), (Bk, S, Hkv, Dk) = c.q.shape, c.k.shape
        assert Bq == Bk and D == Dk and Hq % Hkv == 0 and min(T, S) >= 1, (spec.name, c.path, c.q.shape, c.k.shape)
        assert c.mechanism == "softmax" and c.scale > 0, (spec.name, c.path, c.mechanism, c.scale)


def test_documented_classes_are_registered_and_disjoint():
    registered = {spec.module.__name__ for spec in SPECS}
    assert set(REFUSED) <= registered, sorted(set(REFUSED) - registered)
    assert set(NO_ATTENTION_MAP) <= registered, sorted(set(NO_ATTENTION_MAP) - registered)
    assert not set(REFUSED) & set(NO_ATTENTION_MAP)


@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_every_registered_module_records_or_is_refused(spec):
    """Traced only (``nnx.eval_shape``: no compile, no values), so the whole registry runs in seconds; the values
    are checked by ``test_captured_maps_are_row_stochastic`` (slow) and the layer tests below."""
    model = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    inputs = jax.eval_shape(lambda: spec.example_inputs(jax.random.key(0)))

    def run(model, *inputs):
        return capture_attention(model, *inputs, **spec.call_kwargs)[1]

    try:
        captured = nnx.eval_shape(run, model, *inputs)
    except NotImplementedError as error:
        check_refusal(spec, error)
        return
    check_entries(spec, captured)


def dense_inputs(c) -> tuple:
    """``(q, k, allowed, bias, scale)`` of a captured entry with the mask and the bias (rule or array) made dense:
    ``allowed`` bool and ``bias`` (or None) broadcastable to ``[B, Hq, T, S]``."""
    T, S = c.q.shape[1], c.k.shape[1]
    allowed = jnp.ones((1, 1, T, S), bool) if c.mask is None else c.mask.dense(T, S)
    bias = None if c.bias is None else as_bias(c.bias)
    if bias is not None:
        bias = (bias.query_tile(jnp.swapaxes(c.q, 1, 2), jnp.arange(T), jnp.arange(S), T, S) if bias.reads_queries
                else bias.dense(T, S))
    return c.q, c.k, allowed, bias, jnp.float32(c.scale)


def numpy_map(q, k, allowed, bias, scale) -> np.ndarray:
    """``softmax(scale·q·kᵀ + bias)`` over the allowed keys with NumPy, float64 ``[B, Hq, T, S]``, 0 on rows with
    no allowed key; GQA query head ``h`` reads key head ``h // (Hq // Hkv)``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    logits = float(scale) * np.einsum("bthd,bshd->bhts", q, np.repeat(k, q.shape[2] // k.shape[2], axis=2))
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    allowed = np.broadcast_to(np.asarray(allowed), logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    top = logits.max(-1, keepdims=True)
    e = np.where(allowed, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=spec_id)
def test_captured_maps_are_row_stochastic(spec):
    """With values: each captured map (``attention_maps``) equals its NumPy recomputation from the recorded q, k,
    mask, bias and scale, is ``[B, Hq, T, S]`` and sums to 1 on every row with an allowed key; refusals carry their
    documented reason."""

    paths = []

    @jax.jit
    def run(key):                                    # the module built inside: one compile per spec
        model = spec.build(nnx.Rngs(0))
        _, captured = capture_attention(model, *spec.example_inputs(key), **spec.call_kwargs)
        paths.extend(c.path for c in captured)       # while tracing (paths are static)
        return [dense_inputs(c) for c in captured], attention_maps(captured)

    try:
        inputs, maps = run(jax.random.key(0))
    except NotImplementedError as error:
        check_refusal(spec, error)
        return
    assert bool(paths) != (spec.module.__name__ in NO_ATTENTION_MAP), (spec.name, paths)
    for path, parts, got in zip(paths, inputs, maps):
        want = numpy_map(*parts)
        q, k = parts[:2]
        assert got.shape == want.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1]), (spec.name, path)
        sums = want.sum(-1)
        assert (sums > 0).any() and np.allclose(sums[sums > 0], 1.0), (spec.name, path)
        assert_close(got, want, rtol=1e-4, name=f"{spec.name} {path}")


def numpy_softmax(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    s = np.where(allowed, logits, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pixel_ids(height: int, width: int) -> jax.Array:
    """``[1, H, W, 1, 1]`` float: pixel ``y·W + x`` as ``1 + y·W + x`` (0 marks padding once grouped)."""
    return jnp.arange(1, height * width + 1, dtype=jnp.float32).reshape(1, height, width, 1, 1)


def scatter_groups(maps: np.ndarray, query_ids: np.ndarray, key_ids: np.ndarray, batch: int, tokens: int
                   ) -> np.ndarray:
    """Group maps ``[B·n, heads, tq, tk]`` to dense ``[B, heads, T, T]`` over pixels, through each group slot's pixel
    id (``[n, tq]``, ``[n, tk]``, 0 for padding: padded query rows dropped, padded keys must have weight 0)."""
    query_ids, key_ids = query_ids.astype(np.int64), key_ids.astype(np.int64)
    n, heads = query_ids.shape[0], maps.shape[1]
    maps = maps.reshape(batch, n, heads, *maps.shape[2:])
    dense = np.zeros((batch, heads, tokens, tokens))
    for g in range(n):
        rows, cols = query_ids[g] > 0, key_ids[g] > 0
        assert np.all(maps[:, g][:, :, rows][..., ~cols] == 0), "weight on a padded key"
        block = maps[:, g][:, :, rows][..., cols]
        dense[:, :, (query_ids[g][rows] - 1)[:, None], (key_ids[g][cols] - 1)[None, :]] = block
    return dense


def test_halo_attention_captures_each_blocks_map_over_its_halo():
    """HaloNet (sec. 2, timm's relative logits): query pixel p of block (by, bx) sees key pixel P iff P is in the
    block's (b + 2h)² window; logit scale·q·k + q·r_h[t_y − i_y + w − 1] + q·r_w[t_x − i_x + w − 1]."""
    H, W, b, h, heads, D = 5, 6, 4, 1, 2, 4
    layout = HaloLayout(H, W, b, h)

    @jax.jit
    def run(x):                                      # the layer built inside: one compile for the whole test
        layer = HaloAttention(8, num_heads=heads, block_size=b, halo_size=h, rngs=nnx.Rngs(0))
        _, captured = capture_attention(layer, x)
        ids = pixel_ids(H, W)
        return (attention_maps(captured)[0], layer.q(x), layer.kv(x), layer.relative_height[...],
                layer.relative_width[...], query_blocks(ids, layout)[0, :, :, 0, 0],
                halo_windows(ids, layout)[0, :, :, 0, 0])

    got, q, kv, r_h, r_w, query_ids, key_ids = (np.asarray(a, np.float64)
                                                for a in run(jax.random.normal(jax.random.key(1), (1, H, W, 8))))
    win = b + 2 * h
    q, k = q.reshape(H * W, heads, D), kv.reshape(H * W, heads, 2 * D)[..., :D]
    y, x_ = np.divmod(np.arange(H * W), W)
    ty = y[None, :] - (y[:, None] // b * b - h)                    # key row inside the query block's window
    tx = x_[None, :] - (x_[:, None] // b * b - h)
    iy, ix = (y % b)[:, None], (x_ % b)[:, None]
    allowed = (ty >= 0) & (ty < win) & (tx >= 0) & (tx < win)
    rows = np.arange(H * W)[:, None]
    qr_h = np.einsum("thd,rd->htr", q, r_h)[:, rows, np.clip(ty - iy + win - 1, 0, 2 * win - 2)]
    qr_w = np.einsum("thd,rd->htr", q, r_w)[:, rows, np.clip(tx - ix + win - 1, 0, 2 * win - 2)]
    want = numpy_softmax(np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + qr_h + qr_w, allowed)[None]
    assert got.shape == (layout.num_blocks, heads, b * b, win * win)
    assert_close(scatter_groups(got, query_ids, key_ids, 1, H * W), want, rtol=1e-4, name="halo maps")


def test_davit_channel_attention_captures_its_channel_group_maps():
    """DaViT (sec. 3.2, official roles): A_g = softmax(C_g^-½·k_gᵀ v_g) over channels; the recorded map is the one
    the layer applies (its output, recomputed from the NumPy map, equals the layer's)."""

    @jax.jit
    def run(x):
        layer = ChannelAttention(8, 2, rngs=nnx.Rngs(0))
        out, captured = capture_attention(layer, x)
        return (out, attention_maps(captured)[0], captured[0].q, layer.qkv(x), layer.proj.kernel[...],
                layer.proj.bias[...])

    out, got, recorded_q, qkv, w, bias = run(jax.random.normal(jax.random.key(2), (2, 3, 5, 8)))
    qkv = np.asarray(qkv, np.float64).reshape(2, 15, 6, 4)
    q, k, v = qkv[:, :, :2], qkv[:, :, 2:4], qkv[:, :, 4:]
    want = numpy_softmax(np.einsum("bngc,bngd->bgcd", k, v) / 2.0, True)
    assert recorded_q.shape == (2, 4, 2, 15)                       # [B, C_g, G, N]: channel tokens, pixels as D
    assert_close(got, want, rtol=1e-4, name="channel maps [B, G, C_g, C_g]")
    o = np.einsum("bgcd,bngd->bngc", want, q).reshape(2, 3, 5, 8)
    assert_close(out, o @ np.asarray(w, np.float64) + np.asarray(bias, np.float64), rtol=1e-4,
                 name="the layer's output from the map")


def test_crossformer_long_distance_captures_each_groups_map_with_its_dpb():
    """CrossFormer LDA (sec. 3.2-3.3): pixels with equal (y mod I, x mod I) form a group, position (y // I, x // I)
    inside it; logit scale·q·k + DPB(Δy, Δx)."""
    H, W, heads, D = 5, 7, 2, 8
    y, x_ = np.divmod(np.arange(H * W), W)
    offsets = np.stack([y[:, None] // 2 - y[None, :] // 2, x_[:, None] // 2 - x_[None, :] // 2], -1)

    @jax.jit
    def run(x):
        layer = CrossFormerBlock(16, num_heads=heads, interval=2, long_distance=True, dpb_dim=4, rngs=nnx.Rngs(0))
        _, captured = capture_attention(layer, x)
        ids = pixel_ids(H, W)
        return (attention_maps(captured)[0], layer.qkv(layer.attention_norm(x)),
                layer.position_bias(jnp.asarray(offsets.reshape(-1, 2), jnp.float32)),
                grid_attention_inputs(ids, ids, interval=2)[0][:, :, 0, 0])

    x = jax.random.normal(jax.random.key(3), (1, H, W, 16))
    got, qkv, dpb, groups = (np.asarray(a, np.float64) for a in run(x))
    qkv = qkv.reshape(H * W, 3, heads, D)
    allowed = (y[:, None] % 2 == y[None, :] % 2) & (x_[:, None] % 2 == x_[None, :] % 2)
    logits = (np.einsum("thd,shd->hts", qkv[:, 0], qkv[:, 1]) / np.sqrt(D)
              + dpb.reshape(H * W, H * W, heads).transpose(2, 0, 1))
    want = numpy_softmax(logits, allowed)[None]
    assert got.shape == (4, heads, 12, 12)
    assert_close(scatter_groups(got, groups, groups, 1, H * W), want, rtol=1e-4, name="LDA maps")


def test_complexformer_captures_its_complex_score_map():
    """ComplexFormer (released code's CMHA): s_mn = scale·Σ_r ρ^q_m ρ^k_n cos(δ(φ^q_m − φ^k_n) + β + (m − n)ω_r),
    ``x[r] + i·x[r + D/2]`` in polar form, causal softmax; GQA reads K/V head h // 2."""
    config = dict(eps=1e-9, base=10000.0, scale=1.0)

    @jax.jit
    def run(x):
        layer = ComplexMultiHeadAttention(16, 4, num_kv_heads=2, **config, rngs=nnx.Rngs(0))
        _, captured = capture_attention(layer, x, mask=masks.Causal())
        return attention_maps(captured)[0], layer.query(x), layer.key(x), layer.delta[...], layer.beta[...]

    got, q, k, delta, beta = (np.asarray(a, np.float64) for a in run(jax.random.normal(jax.random.key(4), (2, 7, 16))))

    def polar(a):                                                   # [B, T, H, 4] -> [B, H, T, 2] each
        re, im = a[..., :2].transpose(0, 2, 1, 3), a[..., 2:].transpose(0, 2, 1, 3)
        return np.sqrt(re ** 2 + im ** 2 + config["eps"]), np.arctan2(im, re)

    (rq, pq), (rk, pk) = polar(q), polar(np.repeat(k, 2, axis=2))
    m = np.arange(7)
    angle = (np.repeat(delta, 2, axis=0)[None, :, None, None] * (pq[:, :, :, None] - pk[:, :, None])
             + beta[None, :, None, None] + (m[:, None] - m[None, :])[..., None] * config["base"] ** (-np.arange(2) / 2))
    scores = config["scale"] * np.sum(rq[:, :, :, None] * rk[:, :, None] * np.cos(angle), axis=-1)
    assert_close(got, numpy_softmax(scores, np.tril(np.ones((7, 7), bool))), rtol=1e-4, name="CMHA map")


def test_echo_stack_records_the_anchor_map_for_every_sublayer():
    """EchoAtt: every sublayer applies the anchor's softmax(q_e k_eᵀ/√D); one entry per sublayer, in order."""

    @jax.jit
    def run(x):
        stack = EchoAttentionStack(8, 2, num_layers=3, rngs=nnx.Rngs(0))
        _, captured = capture_attention(stack, x, mask=masks.Causal())
        return captured, attention_maps(captured), stack.query(x), stack.key(x)

    captured, maps, q, k = run(jax.random.normal(jax.random.key(5), (1, 6, 8)))
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    want = numpy_softmax(np.einsum("bthd,bshd->bhts", q, k) / 2.0, np.tril(np.ones((6, 6), bool)))
    assert [c.path for c in captured] == [("layers", 0), ("layers", 1), ("layers", 2)]
    for got in maps:
        assert_close(got, want, rtol=1e-4, name="the anchor's map")
