"""Linear attention: recurrent and chunked (xla) paths against the reference, forward, states and
grads; the reference against direct formulas; segments; decoding steps; registry entries."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax as aj
from attnjax import masks
from attnjax.linear import feature_maps as fmaps
from attnjax.linear import linear_attention, linear_attention_step, segment_ids_from_cu_seqlens
from attnjax.positional import alibi_slopes
from tests.helpers import TOLERANCE, assert_close, random_qkv

KEY = jax.random.PRNGKey(0)
MAPS = ["identity", "elu+1", "relu", "performer", "taylor"]
DECAY = jnp.array([0.9, 0.5, 0.99, 1.0], jnp.float32)


def feature_dim(feature_map, D):
    return fmaps.get_feature_map(feature_map)(jnp.zeros((1, D))).shape[-1]


def inputs(B=2, T=37, Hq=4, Hkv=2, D=8, dtype=jnp.float32, feature_map="identity", normalize=False, key=KEY):
    q, k, v = random_qkv(key, B=B, T=T, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype)
    F, E = feature_dim(feature_map, D), D + normalize
    state = 0.1 * jax.random.normal(jax.random.PRNGKey(7), (B, Hq, F, E), jnp.float32)
    return q, k, v, state


def packed_ids(B, T, key=KEY, num=4):
    """Sorted random segment ids [B, T]."""
    return jnp.sort(jax.random.randint(key, (B, T), 0, num), axis=1)


def with_state_loss(impl, **kw):
    """``(q, k, v, decay, state) -> scalar`` mixing the output and the final state."""
    def loss(q, k, v, decay, state):
        out, final = linear_attention(q, k, v, decay=decay, initial_state=state, return_state=True,
                                      implementation=impl, **kw)
        w1 = jax.random.normal(jax.random.PRNGKey(1), out.shape, jnp.float32)
        w2 = jax.random.normal(jax.random.PRNGKey(2), final.shape, jnp.float32)
        return jnp.sum(out.astype(jnp.float32) * w1) + jnp.sum(final * w2)
    return loss


def compare(kw, args, rtol=TOLERANCE[jnp.float32], impls=("recurrent", "xla"), grad_argnums=(0, 1, 2, 3, 4)):
    """Forward, final state and grads of each implementation against the reference (each path's forward and
    gradients compiled together: op-by-op eager calls of the scans cost more than compiling them)."""
    def run(impl):
        def forward_and_grads(*args):
            q, k, v, decay, state = args
            out, final = linear_attention(q, k, v, decay=decay, initial_state=state, return_state=True,
                                          implementation=impl, **kw)
            return out, final, jax.grad(with_state_loss(impl, **kw), grad_argnums)(*args)
        return jax.jit(forward_and_grads)(*args)

    out_ref, state_ref, g_ref = run("reference")
    for impl in impls:
        out, final, g = run(impl)
        assert out.dtype == args[0].dtype and final.dtype == jnp.float32
        assert_close(out, out_ref, rtol=rtol, name=f"{impl} out")
        assert_close(final, state_ref, rtol=rtol, name=f"{impl} state")
        for a, e, n in zip(g, g_ref, [("dq", "dk", "dv", "ddecay", "dstate")[i] for i in grad_argnums]):
            assert_close(a, e, rtol=rtol, name=f"{impl} {n}")


# ----------------------------------------------------------------------------- feature maps


def test_taylor_map_is_second_order_exp_expansion():
    x, y = jax.random.normal(KEY, (2, 5, 6))
    s = jnp.sum(x * y, -1)
    assert_close(jnp.sum(fmaps.taylor(x) * fmaps.taylor(y), -1), 1 + s + s * s / 2, rtol=1e-6)


def test_performer_features_are_positive_unbiased_and_fixed_by_seed():
    x, y = 0.3 * jax.random.normal(KEY, (2, 16, 4))
    phi = fmaps.Performer(num_features=8192)
    fx, fy = phi(x), phi(y)
    assert np.all(np.asarray(fx) > 0)
    assert_close(jnp.sum(fx * fy, -1), jnp.exp(jnp.sum(x * y, -1)), rtol=3e-2, name="E[φ(x)·φ(y)] = exp(x·y)")
    w = fmaps.Performer(num_features=8).weights(4)
    block = w[:4] / jnp.linalg.norm(w[:4], axis=1, keepdims=True)
    assert_close(block @ block.T, jnp.eye(4), atol=1e-5, name="orthogonal block")
    np.testing.assert_array_equal(fmaps.Performer().weights(4), fmaps.Performer().weights(4))
    assert not np.allclose(fmaps.Performer(seed=1).weights(4), fmaps.Performer().weights(4))
    assert fmaps.Performer().weights(8).shape == (round(8 * np.log(8)), 8)


def test_feature_map_registry_and_positivity():
    assert set(fmaps.FEATURE_MAPS) == set(MAPS)
    x = jax.random.normal(KEY, (3, 7))
    assert np.all(np.asarray(fmaps.elu_plus_one(x)) > 0) and np.all(np.asarray(fmaps.relu(x)) >= 0)
    assert fmaps.is_softmax_kernel(fmaps.FEATURE_MAPS["taylor"]) and fmaps.is_softmax_kernel(fmaps.Performer())
    assert not fmaps.is_softmax_kernel(fmaps.FEATURE_MAPS["elu+1"])


# ----------------------------------------------------------------------------- the reference itself


def direct_loop(q, k, v, *, phi, lam, scale, state0, ids=None, normalize=False, return_state=False):
    """Token-by-token numpy recurrence in float64, written independently of the library (and the final state
    ``[B, Hq, F, E]`` with ``return_state``)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, Hq, _ = q.shape
    G = Hq // k.shape[2]
    out = np.zeros((B, T, Hq, v.shape[-1]))
    final = np.zeros(np.shape(state0))
    for b in range(B):
        for h in range(Hq):
            S = np.asarray(state0[b, h], np.float64).copy()
            for t in range(T):
                if ids is not None and t > 0 and ids[b, t] != ids[b, t - 1]:
                    S[:] = 0
                kk = np.asarray(phi(k[b, t, h // G]), np.float64)
                vv = np.append(v[b, t, h // G], 1.0) if normalize else v[b, t, h // G]
                S = lam[h] * S + np.outer(kk, vv)
                o = scale * np.asarray(phi(q[b, t, h]), np.float64) @ S
                out[b, t, h] = o[:-1] / (o[-1] + 1e-6) if normalize else o
            final[b, h] = S
    return (out, final) if return_state else out


@pytest.mark.parametrize("normalize", [False, True])
def test_reference_matches_direct_recurrence(normalize):
    B, T, D = 2, 11, 4
    q, k, v, state = inputs(B=B, T=T, D=D, feature_map="elu+1", normalize=normalize)
    ids = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 5], [3] * 6 + [4] * 5])
    phi = lambda x: np.asarray(fmaps.elu_plus_one(jnp.asarray(x, jnp.float32)))
    expected = direct_loop(q, k, v, phi=phi, lam=np.asarray(DECAY), scale=0.5, state0=np.asarray(state), ids=ids,
                           normalize=normalize)
    out = linear_attention(q, k, v, feature_map="elu+1", decay=DECAY, scale=0.5, initial_state=state,
                           segment_ids=jnp.asarray(ids), normalize=normalize, implementation="reference")
    assert_close(out, expected, rtol=1e-5)


def test_lightning_reference_matches_openlab_decay_matrix():
    """OpenNLPLab's torch reference: o = [(QKᵀ) ⊙ exp(-s·(i−j))] V with ALiBi slopes s, no scale."""
    q, k, v, _ = inputs(B=1, T=20, Hq=4, Hkv=4)
    s = alibi_slopes(4)
    i, j = np.arange(20)[:, None], np.arange(20)[None]
    m = np.where(j <= i, np.exp(-s[:, None, None] * (i - j)), 0.0)
    expected = np.einsum("bthd,bshd,hts,bshe->bthe", np.asarray(q), np.asarray(k), m, np.asarray(v))
    for impl in ("reference", "xla"):
        assert_close(linear_attention(q, k, v, decay="alibi", scale=1.0, implementation=impl), expected, rtol=1e-5)


# ----------------------------------------------------------------------------- fast paths vs reference


PERFORMER8 = fmaps.Performer(num_features=8)  # same feature dim as the plain maps: shared compiled ops
PATH_CASES = [("identity", False, False), ("identity", True, False)] + [
    (m, d, d) for m in ("elu+1", "relu", PERFORMER8, "taylor") for d in (False, True)]


SLOW_PATH_CASES = [("relu", False, False), ("relu", True, True), (PERFORMER8, False, False), (PERFORMER8, True, True),
                   ("elu+1", False, False), ("taylor", False, False), ("identity", True, False)]
"""Feature-map cases the slow suite adds. Every path reads the features that ``prepare_inputs`` computes for the
reference too, so a map changes only the values (and, for taylor, the feature dim F != D): the default runs no
decay and no normalizer (identity), both (elu+1), and both with F != D (taylor); relu runs in the segment edge
cases and Performer in the decoding and mechanism tests."""


@pytest.mark.parametrize("feature_map, decay, normalize", [
    c if c not in SLOW_PATH_CASES else pytest.param(*c, marks=pytest.mark.slow) for c in PATH_CASES], ids=str)
def test_paths_match_reference_with_grads(feature_map, decay, normalize):
    """T=37 is not a multiple of the chunk (16); GQA 4/2; grads of q, k, v, decay, initial state.
    (normalize needs a positive map: with identity the normalizer crosses 0.)"""
    q, k, v, state = inputs(feature_map=feature_map, normalize=normalize)
    kw = dict(feature_map=feature_map, normalize=normalize, chunk_size=16)
    args = (q, k, v, DECAY if decay else None, state)
    compare(kw, args, grad_argnums=(0, 1, 2, 3, 4) if decay else (0, 1, 2, 4))


def test_bf16_matches_float32_reference():
    q, k, v, state = inputs(dtype=jnp.bfloat16, normalize=True, feature_map="elu+1")
    compare(dict(feature_map="elu+1", normalize=True, chunk_size=16), (q, k, v, DECAY, state),
            rtol=TOLERANCE[jnp.bfloat16])


@pytest.mark.slow
def test_bf16_identity_map_without_normalizer():
    """The unnormalized identity map in bf16 (the chunked path the default bf16 case runs, without the normalizer)."""
    q, k, v, state = inputs(dtype=jnp.bfloat16)
    compare(dict(chunk_size=16), (q, k, v, DECAY, state), rtol=TOLERANCE[jnp.bfloat16], impls=("xla",))


@pytest.mark.parametrize("chunk_size", [pytest.param(c, marks=pytest.mark.slow) for c in (16, 64, 128)])
def test_chunk_sizes_with_segments_and_mqa(chunk_size):
    q, k, v, state = inputs(B=2, T=150, Hq=4, Hkv=1, D=8)
    ids = packed_ids(2, 150)
    compare(dict(chunk_size=chunk_size, segment_ids=ids), (q, k, v, DECAY, state), impls=("xla",))


def test_segment_edge_cases_in_chunks():
    """Boundaries exactly at chunk starts and ends, 1-token segments, a segment spanning 3 chunks."""
    ids = np.zeros((2, 37), np.int32)
    ids[0, 8:16], ids[0, 16], ids[0, 17:32], ids[0, 32:] = 1, 2, 3, 4
    ids[1, 1:], ids[1, 36] = 1, 2
    q, k, v, state = inputs(normalize=True, feature_map="relu")
    compare(dict(chunk_size=8, segment_ids=jnp.asarray(ids), normalize=True, feature_map="relu"),
            (q, k, v, DECAY, state))


def test_packed_segments_equal_separate_sequences():
    lengths = [5, 17, 1, 10]
    T = sum(lengths)
    q, k, v, state = inputs(B=1, T=T)
    cu = jnp.asarray(np.cumsum([0] + lengths), jnp.int32)
    packed, final = linear_attention(q, k, v, decay=DECAY, cu_seqlens=cu, initial_state=state, return_state=True,
                                     chunk_size=8)
    ids = segment_ids_from_cu_seqlens(cu, T)
    np.testing.assert_array_equal(ids[0], np.repeat(np.arange(4), lengths))
    same = linear_attention(q, k, v, decay=DECAY, segment_ids=ids, initial_state=state, chunk_size=8)
    assert_close(same, packed, rtol=1e-6)
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):  # each sequence alone, by the float64 loop (no compiles)
        sl = slice(int(a), int(b))
        out, fin = direct_loop(q[:, sl], k[:, sl], v[:, sl], phi=lambda x: x, lam=np.asarray(DECAY), scale=8 ** -0.5,
                               state0=np.asarray(state) if n == 0 else np.zeros(state.shape), return_state=True)
        assert_close(packed[:, sl], out, name=f"segment {n}")
    assert_close(final, fin, name="final state = last segment's")


# ----------------------------------------------------------------------------- states and decoding


@pytest.mark.parametrize("segments", [False, True])
def test_split_in_halves_equals_whole(segments):
    """The cut falls inside a segment; the state carries across the call boundary."""
    half = 20
    q, k, v, state = inputs(normalize=True, feature_map="elu+1")
    ids = jnp.asarray([[0] * 10 + [1] * 15 + [2] * 12, [5] * 30 + [6] * 7]) if segments else None
    kw = dict(decay=DECAY, normalize=True, feature_map="elu+1", chunk_size=16)
    whole, final = linear_attention(q, k, v, initial_state=state, return_state=True, segment_ids=ids, **kw)
    cut = lambda x, sl: None if x is None else x[:, sl]
    first, mid = linear_attention(q[:, :half], k[:, :half], v[:, :half], initial_state=state, return_state=True,
                                  segment_ids=cut(ids, slice(None, half)), **kw)
    second, end = linear_attention(q[:, half:], k[:, half:], v[:, half:], initial_state=mid, return_state=True,
                                   segment_ids=cut(ids, slice(half, None)), **kw)
    assert_close(jnp.concatenate([first, second], axis=1), whole, name="out")
    assert_close(end, final, name="state")


def test_decode_steps_equal_parallel_forward():
    q, k, v, state = inputs(normalize=True, feature_map=PERFORMER8)
    kw = dict(decay="alibi", normalize=True, feature_map=PERFORMER8)
    expected, final = linear_attention(q, k, v, initial_state=state, return_state=True, **kw)
    step = jax.jit(functools.partial(linear_attention_step, **kw))
    s, outs = state, []
    for t in range(q.shape[1]):
        o, s = step(q[:, t], k[:, t], v[:, t], s)
        outs.append(o)
    assert_close(jnp.stack(outs, axis=1), expected, name="steps")
    assert_close(s, final, name="state")
    o0, s0 = linear_attention_step(q[:, 0], k[:, 0], v[:, 0])
    assert s0.shape == (2, 4, 8, 8) and o0.shape == (2, 4, 8)


@pytest.mark.slow
def test_pallas_kernel_matches_reference():
    """``pallas_kernels.lightning`` in interpret mode, behind the feature map, normalizer and GQA."""
    q, k, v, state = inputs(T=20, feature_map="elu+1", normalize=True)
    compare(dict(feature_map="elu+1", normalize=True, chunk_size=16), (q, k, v, DECAY, state), impls=("pallas",))


# ----------------------------------------------------------------------------- non-causal


@pytest.mark.parametrize("normalize", [False, True])
def test_noncausal_matches_direct_product(normalize):
    """``o = σ φ(q)·S`` with ``S = S_0 + Σ_j φ(k_j)ᵀ [v_j, 1]`` (the ones column only with the normalizer, which
    divides by it), and the final state ``S``; GQA 4/2, T = 9 queries on S = 13 keys."""
    q, k, v = random_qkv(KEY, B=2, T=9, S=13, Hq=4, Hkv=2, D=8)
    state0 = 0.1 * jax.random.normal(jax.random.PRNGKey(7), (2, 4, 8, 8 + normalize), jnp.float32)
    fq, fk = fmaps.elu_plus_one(q) * 8 ** -0.5, jnp.repeat(fmaps.elu_plus_one(k), 2, axis=2)
    vv = jnp.repeat(v, 2, axis=2)
    vv = jnp.concatenate([vv, jnp.ones_like(vv[..., :1])], axis=-1) if normalize else vv
    final = state0 + jnp.einsum("bshf,bshe->bhfe", fk, vv)
    o = jnp.einsum("bthf,bhfe->bthe", fq, final)
    expected = o[..., :-1] / (o[..., -1:] + 1e-6) if normalize else o
    for impl in ("reference", "xla"):
        out, state = linear_attention(q, k, v, feature_map="elu+1", causal=False, normalize=normalize,
                                      initial_state=state0, return_state=True, implementation=impl)
        assert_close(out, expected, name=impl)
        assert_close(state, final, name=f"{impl} state")


def test_noncausal_segments_and_state_match_reference():
    q, k, v, state = inputs(normalize=True, feature_map="elu+1")
    kw = dict(feature_map="elu+1", causal=False, normalize=True, chunk_size=16, segment_ids=packed_ids(2, 37))
    compare(kw, (q, k, v, None, state), impls=("xla",), grad_argnums=(0, 1, 2, 4))


@pytest.mark.slow
def test_noncausal_state_and_grads_match_reference():
    """Without segments (one einsum each way; its output and state are checked against the direct product above)."""
    q, k, v, state = inputs(normalize=True, feature_map="elu+1")
    compare(dict(feature_map="elu+1", causal=False, normalize=True, chunk_size=16), (q, k, v, None, state),
            impls=("xla",), grad_argnums=(0, 1, 2, 4))


# ----------------------------------------------------------------------------- numerics and memory


def test_long_sequence_strong_decay_bf16_is_finite():
    T = 8192
    q, k, v = random_qkv(KEY, B=1, T=T, Hq=2, D=4, dtype=jnp.bfloat16)
    decay = jnp.array([1e-4, 1.0 - 1e-6], jnp.float32)
    fn = jax.jit(lambda q, k, v, d: linear_attention(q, k, v, decay=d, chunk_size=64, return_state=True))
    out, final = fn(q, k, v, decay)
    assert np.all(np.isfinite(np.asarray(out, np.float32))) and np.all(np.isfinite(np.asarray(final)))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32)), (0, 1, 2, 3)))(q, k, v, decay)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
    tail = slice(T - 200, T)
    expected = linear_attention(q[:, tail], k[:, tail], v[:, tail], decay=decay[:1] * jnp.ones(2),
                                implementation="reference")
    assert_close(out[:, tail, 0], expected[:, :, 0], rtol=2e-2, name="strong decay forgets the far past")


def test_chunked_memory_is_linear_and_below_blocked_softmax():
    """The xla path scans chunk by chunk: its temporaries (forward, and forward + grads) are a few
    copies of the inputs, O(T·D) — not O(T·C) scores (C = 64 > D = 16 here) — grow linearly in T,
    and stay below the blocked softmax's at T = 8k. Compile-only (XLA's memory analysis)."""
    def temp_bytes(fn, L, grad):
        x = jax.ShapeDtypeStruct((1, L, 2, 16), jnp.float32)
        f = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2)) if grad else fn
        return jax.jit(f).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    lightning = functools.partial(linear_attention, decay="alibi", chunk_size=64, implementation="xla")
    softmax = functools.partial(aj.softmax.flash_attention_xla, mask=masks.Causal())
    for grad in (False, True):
        small, large = temp_bytes(lightning, 2048, grad), temp_bytes(lightning, 8192, grad)
        assert small < 6 * 2048 * 2 * 16 * 4 and large < 6 * 8192 * 2 * 16 * 4, (grad, small, large)
        assert large < 4.5 * small, (grad, small, large)
        assert large < temp_bytes(softmax, 8192, grad), grad


# ----------------------------------------------------------------------------- registry and attention()


def test_attention_lightning_causal_matches_functional():
    q, k, v, _ = inputs()
    expected = linear_attention(q, k, v, decay="alibi", implementation="reference")
    for impl in ("auto", "xla", "recurrent", "reference"):
        assert_close(aj.attention(q, k, v, mechanism="lightning", mask=masks.Causal(), implementation=impl),
                     expected, name=impl)


@pytest.mark.parametrize("mechanism, feature_map, all_masks", [
    ("linear", "elu+1", True), ("performer", "performer", False), ("based_linear", "taylor", False),
    pytest.param("performer", "performer", True, marks=pytest.mark.slow),
    pytest.param("based_linear", "taylor", True, marks=pytest.mark.slow)])
def test_normalized_mechanisms_with_masks(mechanism, feature_map, all_masks):
    """Each mechanism's feature map under the causal mask; every mask's translation into linear_attention's
    arguments (the same code for the three) with ``linear`` by default, with all three in the slow suite."""
    q, k, v, _ = inputs()
    ids = packed_ids(2, 37)
    cases = [(masks.Causal(), dict()), (None, dict(causal=False)),
             (masks.Causal() & masks.Segments(ids), dict(segment_ids=ids)),
             (masks.Segments(ids), dict(causal=False, segment_ids=ids))]
    for mask, kw in cases if all_masks else cases[:1]:
        expected = linear_attention(q, k, v, feature_map=feature_map, normalize=True, implementation="reference", **kw)
        assert_close(aj.attention(q, k, v, mechanism=mechanism, mask=mask), expected, name=f"{mechanism} {mask}")


def test_registry_entries_and_module():
    entries = {e.name: e for e in aj.registry.entries()}
    for name in ("linear", "lightning", "performer", "based_linear"):
        assert entries[name].family == "linear"
        assert entries[name].implementations == ("reference", "recurrent", "xla", "pallas")
    layer = aj.nn.MultiHeadAttention(32, 4, num_kv_heads=2, mechanism="lightning", rngs=nnx.Rngs(0))
    x = jax.random.normal(KEY, (2, 10, 32))
    y = layer(x, mask=masks.Causal(), deterministic=True)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))


UNSUPPORTED = {
    "bias": dict(bias=jnp.zeros((1, 4, 16, 16))), "soft cap": dict(logits_soft_cap=5.0),
    "sinks": dict(sinks=jnp.zeros(4)), "lse": dict(return_lse=True),
    "window": dict(mask=masks.SlidingWindow(4, 0)), "no mask with decay": dict(mask=None),
    "kv segments": dict(mask=masks.Segments(jnp.zeros((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32))),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_options_raise_not_implemented(case):
    q, k, v = random_qkv(KEY, B=2, T=16, Hq=4, D=8)
    kwargs = dict(mask=masks.Causal(), implementation="xla") | UNSUPPORTED[case]
    with pytest.raises(NotImplementedError):
        aj.attention(q, k, v, mechanism="lightning", **kwargs)


@pytest.mark.parametrize("T, S", [(5, 9), (9, 5)])
def test_causal_cross_is_bottom_right_aligned(T, S):
    """Query i sits at key position i + S − T (attnjax.masks): equal to the causal rows of a padded query."""
    q, k, v = random_qkv(KEY, B=2, T=T, S=S, Hq=4, Hkv=2, D=8)
    L = max(T, S)
    full_q = jnp.concatenate([jnp.zeros((2, L - T, 4, 8)), q], axis=1)[:, L - S:] if S >= T else q[:, T - S:]
    expected = linear_attention(full_q, k, v, feature_map="elu+1", normalize=True, decay="alibi",
                                implementation="reference")
    expected = expected[:, S - T:] if S >= T else jnp.concatenate([jnp.zeros((2, T - S, 4, 8)), expected], axis=1)
    for impl in ("xla", "recurrent"):
        out = aj.attention(q, k, v, mechanism=aj.linear.Lightning(feature_map="elu+1", normalize=True),
                           mask=masks.Causal(), implementation=impl)
        assert_close(out, expected, name=impl)
    assert aj.attention(q, k, v, mechanism="linear").shape == (2, T, 4, 8)


def test_jit_and_vmap():
    q, k, v, _ = inputs()
    expected = linear_attention(q, k, v, decay=DECAY, implementation="reference")
    jitted = jax.jit(lambda q, k, v, d: linear_attention(q, k, v, decay=d, chunk_size=16))
    assert_close(jitted(q, k, v, DECAY), expected, name="jit")
    one = lambda a, b, c: linear_attention(a[None], b[None], c[None], decay=DECAY, chunk_size=16)[0]
    assert_close(jax.jit(jax.vmap(one))(q, k, v), expected, name="vmap")  # an eager vmapped scan runs op by op


def call(**kw):
    q, k, v = kw.pop("qkv", random_qkv(KEY, B=2, T=16, Hq=4, D=8))
    return linear_attention(q, k, v, **kw)


BAD = {
    "feature map name": (dict(feature_map="cosine"), ValueError, "unknown feature_map 'cosine'"),
    "feature map type": (dict(feature_map=3), TypeError, "feature_map must be a name or a callable"),
    "decay shape": (dict(decay=jnp.ones(3)), ValueError, r"decay must have shape \[Hq\] = \(4,\)"),
    "decay range": (dict(decay=jnp.array([0.5, 0.0, 1.0, 0.9])), ValueError, "0 < λ <= 1"),
    "decay above one": (dict(decay=jnp.array([0.5, 1.5, 1.0, 0.9])), ValueError, "0 < λ <= 1"),
    "decay string": (dict(decay="rope"), ValueError, "decay must be None, 'alibi'"),
    "decay int": (dict(decay=jnp.ones(4, jnp.int32)), TypeError, "decay must be a float array"),
    "decay non-causal": (dict(decay="alibi", causal=False), ValueError, "decay needs causal=True"),
    "state shape": (dict(initial_state=jnp.zeros((2, 4, 8, 9))), ValueError, r"initial_state has shape \(2, 4, 8, 9\)"),
    "chunk size": (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    "segment shape": (dict(segment_ids=jnp.zeros((2, 15), jnp.int32)), ValueError, "segment_ids has shape"),
    "segment dtype": (dict(segment_ids=jnp.zeros((2, 16))), TypeError, "segment_ids must be integers"),
    "cu_seqlens batch": (dict(cu_seqlens=jnp.array([0, 8, 16])), ValueError, "cu_seqlens needs batch size 1"),
    "cu_seqlens values": (dict(qkv=random_qkv(KEY, B=1, T=16), cu_seqlens=jnp.array([0, 9, 8, 16])), ValueError,
                          "cu_seqlens must rise from 0 to T=16"),
    "both": (dict(cu_seqlens=jnp.array([0, 16]), segment_ids=jnp.zeros((2, 16), jnp.int32)), ValueError,
             "not both"),
    "implementation": (dict(implementation="cuda"), ValueError, "unknown implementation 'cuda'"),
    "scale": (dict(scale=-1.0), ValueError, "scale must be positive"),
    "causal cross": (dict(qkv=random_qkv(KEY, T=4, S=6)), ValueError, "causal linear attention needs"),
    "recurrent non-causal": (dict(causal=False, implementation="recurrent"), NotImplementedError, "causal only"),
    "pallas segments": (dict(implementation="pallas", segment_ids=jnp.zeros((2, 16), jnp.int32)),
                        NotImplementedError, "without segments"),
    "step shape": (None, ValueError, "q_t must have shape"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clear_error(case):
    kwargs, error, message = BAD[case]
    with pytest.raises(error, match=message):
        if kwargs is None:
            q, k, v = random_qkv(KEY, B=2, T=16, Hq=4, D=8)
            linear_attention_step(q, k[:, 0], v[:, 0])
        else:
            call(**kwargs)
