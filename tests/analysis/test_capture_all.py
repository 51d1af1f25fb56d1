"""``capture_attention`` over the whole module registry: every registered module records its softmax attention
(maps of the right shapes) or is refused with its documented reason; the maps of newly wired layers (HaloNet
blocks, DaViT channel groups, CrossFormer's long-distance groups, ComplexFormer's complex scores, EchoAtt's shared
map, Titans' MAG/MAL/MAC attention, CCNet's criss-cross loops, DANet's channel attention, PAT_sf) equal NumPy maps
computed from the layers' own projections."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax.nn  # noqa: F401  (fills the module registry)
from attnjax import masks, registry
from attnjax.analysis.capture import NO_ATTENTION_MAP, REFUSED, attention_maps, capture_attention
from attnjax.bias import as_bias
from attnjax.nn import EchoAttentionStack
from attnjax.nn.conv.dual_attention import DANetChannelAttention
from attnjax.nn.conv.partial_attention import PATBlock, PartialSelfAttention
from attnjax.nn.memory.titans import TitansMAC, TitansMAG, TitansMAL
from attnjax.nn.positional.complexformer import ComplexMultiHeadAttention
from attnjax.nn.registry import modules
from attnjax.nn.vision.criss_cross import RecurrentCrissCrossAttention
from attnjax.nn.vision.crossformer import CrossFormerBlock
from attnjax.nn.vision.davit import ChannelAttention
from attnjax.nn.vision.halo import HaloAttention
from attnjax.vision.halo import HaloLayout, halo_windows, query_blocks
from attnjax.vision.window import grid_attention_inputs
from tests.helpers import assert_close

SPECS = modules()
MECHANISMS = {e.name for e in registry.entries()}


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
    """A module of ``NO_ATTENTION_MAP`` records nothing; any other one recorded at least one call of a registered
    mechanism (softmax, or e.g. a block selector run by ``MultiHeadAttention(mechanism=...)``) with
    ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]`` (``Hq % Hkv == 0``) and a positive scale."""
    if spec.module.__name__ in NO_ATTENTION_MAP:
        assert captured == [], f"{spec.name} holds no attention map but recorded {len(captured)} calls"
        return
    assert captured, f"{spec.name} recorded nothing and was not refused"
    for c in captured:
        assert c.q.ndim == c.k.ndim == 4, (spec.name, c.path, c.q.shape, c.k.shape)
        (Bq, T, Hq, D), (Bk, S, Hkv, Dk) = c.q.shape, c.k.shape
        assert Bq == Bk and D == Dk and Hq % Hkv == 0 and min(T, S) >= 1, (spec.name, c.path, c.q.shape, c.k.shape)
        assert c.mechanism in MECHANISMS and c.scale > 0, (spec.name, c.path, c.mechanism, c.scale)


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


TITANS = dict(num_persistent=2, chunk_size=1, conv_size=2)


def test_titans_mag_and_mal_capture_their_sliding_window_calls():
    """Titans MAG (eqs. 26-28): query t of x (position N_p + t of x̃ = P ‖ x) sees every persistent token and the
    last ``window`` positions of x̃; MAL (eqs. 29-31): queries and keys of the memory outputs y over x̃, the last
    ``window`` positions only. Logits q·k/√D."""
    Np, T, w, D = 2, 7, 3, 4

    @jax.jit
    def run(x):
        mag = TitansMAG(8, 2, window=w, **TITANS, rngs=nnx.Rngs(0))
        mal = TitansMAL(8, 2, window=w, num_kv_heads=1, **TITANS, rngs=nnx.Rngs(1))
        (_, mag_c), (_, mal_c) = capture_attention(mag, x), capture_attention(mal, x)
        y, _ = mal.memory.scan(mal.prefixed(x), mal.memory.initial_cache(x.shape[0]))
        return (attention_maps(mag_c)[0], mag.query(x), mag.key(mag.prefixed(x)), attention_maps(mal_c)[0],
                mal.query(y[:, Np:]), mal.key(y))

    mag_map, q, k, mal_map, q_y, k_y = (np.asarray(a, np.float64)
                                        for a in run(jax.random.normal(jax.random.key(6), (2, T, 8))))
    back = (Np + np.arange(T))[:, None] - np.arange(Np + T)[None, :]          # query position − key position
    window = (back >= 0) & (back < w)
    want = numpy_softmax(np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D), window | (np.arange(Np + T) < Np))
    assert_close(mag_map, want, rtol=1e-4, name="MAG map")
    want = numpy_softmax(np.einsum("bthd,bshd->bhts", q_y, np.repeat(k_y, 2, axis=2)) / np.sqrt(D), window)
    assert_close(mal_map, want, rtol=1e-4, name="MAL map (GQA)")


def test_titans_mac_captures_each_segments_call_over_persistent_memory_and_segment_keys():
    """Titans MAC (eqs. 21-23): segment s's token i attends to [P ‖ h ‖ S^(s)], every persistent token and h_j,
    S_j for j ≤ i; the keys of h come from the memory before the segment, taken here from the decode path's
    cache after each segment (an independent computation of them). Segments are the batch, batch-major."""
    Np, L, T, D = 2, 4, 7, 4

    @jax.jit
    def run(x):
        layer = TitansMAC(8, 2, segment_size=L, **TITANS, rngs=nnx.Rngs(0))
        _, captured = capture_attention(layer, x)
        step = lambda cache, x_t: (layer.decode(x_t[:, None], cache)[1],) * 2  # noqa: E731
        _, caches = jax.lax.scan(step, layer.init_cache(1, T), jnp.moveaxis(x, 1, 0))
        return (attention_maps(captured)[0], layer.query(x), layer.key(layer.persistent[...]),
                caches.kv.k[jnp.array([L - 1, T - 1]), 0])         # [h ‖ S] keys after each segment's last token

    got, q, k_p, k_hs = (np.asarray(a, np.float64) for a in run(jax.random.normal(jax.random.key(7), (1, T, 8))))
    q = np.pad(q[0], ((0, 2 * L - T), (0, 0), (0, 0))).reshape(2, L, 2, D)
    k = np.concatenate([np.broadcast_to(k_p, (2, *k_p.shape)), k_hs], axis=1)
    i, j = np.arange(L)[:, None], np.arange(2 * L)[None, :] % L
    want = numpy_softmax(np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D),
                         np.concatenate([np.ones((L, Np), bool), j <= i], axis=1))
    assert got.shape == (2, 2, L, Np + 2 * L)
    real = np.arange(2 * L).reshape(2, L) < T                                    # the padding query's row aside
    assert_close(got.transpose(0, 2, 1, 3)[real], want.transpose(0, 2, 1, 3)[real], rtol=1e-4, name="MAC maps")


def test_rcca_captures_each_loops_criss_cross_map():
    """CCNet (sec. 3.2-3.3, eqs. 1-2): loop r's map is softmax over pixel u's row and column (u once) of
    Q_u·K_u' (no scaling), on the loop's input; the layer's loop output is γ·(map·V) + x (the map is the one the
    layer applies)."""
    H, W, C = 3, 4, 16

    @jax.jit
    def run(x):
        layer = RecurrentCrissCrossAttention(C, recurrence=2, gamma_init=0.5, rngs=nnx.Rngs(0))
        _, captured = capture_attention(layer, x)
        cca, x1 = layer.cca, layer.cca(x)
        return (captured, attention_maps(captured), [(cca.query(a), cca.key(a), cca.value(a)) for a in (x, x1)],
                [x, x1, layer.cca(x1)])

    captured, maps, qkv, xs = run(jax.random.normal(jax.random.key(8), (1, H, W, C)))
    y, x_ = np.divmod(np.arange(H * W), W)
    allowed = (y[:, None] == y[None, :]) | (x_[:, None] == x_[None, :])
    assert [c.path for c in captured] == [("cca",), ("cca",)]
    for r, (got, (q, k, v)) in enumerate(zip(maps, qkv)):
        q, k, v = (np.asarray(a, np.float64).reshape(H * W, -1) for a in (q, k, v))
        want = numpy_softmax(q @ k.T, allowed)
        assert_close(got[0, 0], want, rtol=1e-4, name=f"loop {r} map")
        out = 0.5 * want @ v + np.asarray(xs[r], np.float64).reshape(H * W, C)
        assert_close(xs[r + 1].reshape(H * W, C), out, rtol=1e-4, name=f"loop {r} output from the map")


def test_danet_channel_attention_captures_its_channel_maps():
    """DANet CAM (eqs. 3-4): X = softmax_d(A_c·A_d) over channels; the official code's softmax(max − A·Aᵀ)
    (``energy="max_minus"``); the layer's output is β·(X·A) + A."""

    @jax.jit
    def run(x):
        layers = [DANetChannelAttention(6, beta_init=0.5, energy=e, rngs=nnx.Rngs(0))
                  for e in ("similarity", "max_minus")]
        return [(attention_maps(capture_attention(layer, x)[1])[0], layer(x)) for layer in layers]

    x = jax.random.normal(jax.random.key(9), (2, 3, 4, 6)) * 0.3
    a = np.asarray(x, np.float64).reshape(2, 12, 6)
    gram = np.einsum("bnc,bnd->bcd", a, a)
    for (got, out), logits in zip(run(x), (gram, gram.max(-1, keepdims=True) - gram)):
        want = numpy_softmax(logits, True)
        assert_close(got[:, 0], want, rtol=1e-4, name="CAM map")
        assert_close(out.reshape(2, 12, 6), 0.5 * np.einsum("bcd,bnd->bnc", want, a) + a, rtol=1e-4,
                     name="CAM output from the map")


def test_pat_self_attention_captures_its_map_with_the_irpe_bias():
    """PAT_sf: heads over the H·W positions of LN(x₂) (the last C − C//4 channels), logits q·k/√d + table[h,
    bucket], the Euclidean bucket ⌊β⌋ + round(‖p_i − p_j‖) for distances within α = 20 (iRPE eq. 18); PATBlock
    with mixer="self" records it under its mixer."""
    H, W, heads, D = 3, 4, 2, 6

    block_paths = []

    @jax.jit
    def run(x):
        layer = PartialSelfAttention(16, num_heads=heads, rngs=nnx.Rngs(0))
        layer.rpe[...] = jax.random.normal(jax.random.key(11), layer.rpe.shape)
        block = PATBlock(16, mixer="self", spatial=False, rngs=nnx.Rngs(0))
        _, captured = capture_attention(layer, x)
        block_paths.extend(c.path for c in capture_attention(block, x)[1])   # while tracing (paths are static)
        return attention_maps(captured)[0], layer.qkv(layer.norm(x[..., 4:])), layer.rpe[...]

    got, qkv, table = run(jax.random.normal(jax.random.key(10), (1, H, W, 16)))
    qkv = np.asarray(qkv, np.float64).reshape(H * W, 3, heads, D)
    y, x_ = np.divmod(np.arange(H * W), W)
    bucket = np.round(np.hypot(y[:, None] - y[None, :], x_[:, None] - x_[None, :])).astype(int) + 40
    logits = np.einsum("thd,shd->hts", qkv[:, 0], qkv[:, 1]) / np.sqrt(D) + np.asarray(table, np.float64)[:, bucket]
    assert_close(got, numpy_softmax(logits, True)[None], rtol=1e-4, name="PAT_sf map")
    assert block_paths == [("mixer",)]
