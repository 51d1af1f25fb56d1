"""Ring attention, all-gather and Ulysses context parallelism, layouts, and the module option,
on the 8 fake CPU devices, against the single-device softmax reference (forward and gradients).

As a JAX user runs them: meshes from ``jax.make_mesh`` (Explicit axes) with inputs sharded over
them, the per-device schemes inside the user's ``jax.jit(jax.shard_map(...))`` with its default
``check_vma``, and the ``*_sharded`` wrappers on Explicit and Auto meshes."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax import masks, parallel
from attnjax.nn.attention import MultiHeadAttention, SequenceParallel
from attnjax.parallel import layouts, ring
from attnjax.positional import RoPE
from attnjax.softmax import softmax_attention_reference
from tests.helpers import assert_close, random_qkv

W = 8
LAYOUTS = layouts.LAYOUTS


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((W,), ("sp",))


@pytest.fixture(scope="module")
def mesh2d():
    return jax.make_mesh((2, 4), ("data", "sp"))


def _put(x, mesh, *spec):
    """``x`` sharded over ``mesh`` as ``P(*spec)``: what ``jax.shard_map`` on an Explicit mesh expects."""
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


@functools.lru_cache(maxsize=None)
def _inputs():
    """One random draw (random_qkv compiles per shape): q, k, v [2, 32, 8, 8]."""
    return random_qkv(jax.random.PRNGKey(0), B=2, T=32, Hq=8, Hkv=8, D=8)


def _qkv(Hq=4, Hkv=2, dtype=jnp.float32):
    q, k, v = _inputs()
    return q[:, :, :Hq].astype(dtype), k[:, :, :Hkv].astype(dtype), v[:, :, :Hkv].astype(dtype)


PACKED_IDS = jnp.asarray(np.repeat([[0, 1, 2, 3], [0, 0, 1, 2]], [5, 9, 11, 7], axis=1))
"""Segment ids [2, 32] of packed sequences, with boundaries that don't align with shards."""


def _out_and_grads(fn, q, k, v):
    """``fn(q, k, v)`` and the gradients of ``sum(fn · w)`` for a fixed ``w``, in one jit."""
    shape = q.shape[:3] + v.shape[-1:]
    w = jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)

    @jax.jit
    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w.astype(out.dtype))

    return run(q, k, v)


def _check_scheme(scheme, mesh, layout, mask, *, batch_axis=None, Hq=4, Hkv=2, ids=False, rtol=None, **kw):
    """``scheme`` equals the reference, forward and grads, on inputs in natural order sharded over
    ``mesh`` (batch over ``batch_axis``, sequence over "sp"), put in ``layout`` order and back with
    ``to_layout``/``from_layout`` inside the jitted function.

    ``scheme`` is a per-device function (``parallel.SCHEMES``), run inside the user's
    ``jax.shard_map`` with its defaults, or a ``*_sharded`` wrapper.
    """
    spec = P(batch_axis, "sp")
    q, k, v = (_put(x, mesh, *spec) for x in _qkv(Hq, Hkv))
    to, back = (functools.partial(f, layout=layout, world=mesh.shape["sp"])
                for f in (layouts.to_layout, layouts.from_layout))
    laid_ids = to(_put(PACKED_IDS, mesh, *spec)) if ids else None
    if scheme in parallel.SCHEMES.values():
        def local(q, k, v, segment_ids):
            return scheme(q, k, v, axis_name="sp", layout=layout, mask=mask, segment_ids=segment_ids, **kw)

        run = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 4, out_specs=spec)
    else:
        def run(q, k, v, segment_ids):
            return scheme(q, k, v, mesh=mesh, seq_axis="sp", batch_axis=batch_axis, layout=layout, mask=mask,
                          segment_ids=segment_ids, **kw)

    out, grads = _out_and_grads(lambda q, k, v: back(run(to(q), to(k), to(v), laid_ids)), q, k, v)
    ref, ref_grads = _reference(mask, ids, Hq, Hkv)
    assert_close(out, ref, rtol=rtol, name=f"{layout} out")
    for name, g, e in zip("qkv", grads, ref_grads):
        assert_close(g, e, rtol=rtol, name=f"{layout} d{name}")


@functools.lru_cache(maxsize=None)
def _reference(mask, ids, Hq, Hkv):
    """Reference output and gradients (cached: several layouts and schemes share them)."""
    full_mask = mask & masks.Segments(PACKED_IDS) if ids else mask
    return _out_and_grads(lambda q, k, v: softmax_attention_reference(q, k, v, mask=full_mask), *_qkv(Hq, Hkv))


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_roundtrip_and_positions(layout):
    x = jnp.arange(2 * 32).reshape(2, 32)
    laid = layouts.to_layout(x, layout, W)
    np.testing.assert_array_equal(layouts.from_layout(laid, layout, W), x)
    perm = layouts.permutation(layout, W, 32)
    assert sorted(perm.tolist()) == list(range(32))
    for rank in range(W):  # rank r's shard of the laid-out sequence holds local_positions(r)
        np.testing.assert_array_equal(perm[rank * 4:(rank + 1) * 4], layouts.local_positions(layout, W, rank, 4))
    assert layouts.layout_of(perm, W) == layout


def test_layout_definitions():
    np.testing.assert_array_equal(layouts.local_positions("zigzag", 4, 1, 4), [2, 3, 12, 13])  # chunks 1 and 6
    np.testing.assert_array_equal(layouts.local_positions("striped", 4, 1, 4), [1, 5, 9, 13])
    np.testing.assert_array_equal(layouts.local_positions("contiguous", 4, 1, 4), [4, 5, 6, 7])


def test_layout_roundtrip_on_explicitly_sharded_arrays(mesh2d):
    """On a ``jax.make_mesh`` mesh (Explicit axes), eagerly and under jit: the values are reordered,
    the sharding is kept, and rank r's shard of the laid-out sequence holds its local positions."""
    x = _put(jnp.arange(2 * 32 * 3).reshape(2, 32, 3), mesh2d, "data", "sp", None)
    eager = (layouts.to_layout, layouts.from_layout)
    jitted = tuple(jax.jit(f, static_argnums=(1, 2)) for f in eager)
    for layout in LAYOUTS:
        perm = layouts.permutation(layout, 4, 32)
        for to, back in (eager, jitted):
            laid = to(x, layout, 4)
            assert laid.sharding == x.sharding, (layout, laid.sharding)
            np.testing.assert_array_equal(laid, np.asarray(x)[:, perm])
            shards = {s.index[1].start: np.asarray(s.data)[0, :, 0] // 3 % 32 for s in laid.addressable_shards}
            for rank in range(4):
                np.testing.assert_array_equal(shards[rank * 8], layouts.local_positions(layout, 4, rank, 8))
            back_again = back(laid, layout, 4)
            assert back_again.sharding == x.sharding
            np.testing.assert_array_equal(back_again, x)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unmasked_tiles_match_dense_count(layout):
    """The interval block summary counts exactly the tiles with an allowed entry (causal)."""
    N, block = 64, 2
    dense = np.tril(np.ones((N, N), bool))
    per_rank = []
    for rank in range(W):
        rows = np.asarray(layouts.local_positions(layout, W, rank, N // W))
        count = 0
        for src in range(W):
            cols = np.asarray(layouts.local_positions(layout, W, src, N // W))
            tiles = dense[np.ix_(rows, cols)].reshape(-1, block, N // W // block, block)
            count += int(tiles.any(axis=(1, 3)).sum())
        per_rank.append(count)
    np.testing.assert_array_equal(layouts.unmasked_tiles(layout, W, N, block=block), per_rank)


def test_zigzag_balances_causal_work():
    """N=128 over 8 ranks (16 tokens = 4 tiles of 4 each). Contiguous: rank r has r full blocks
    (16 tiles each) and a causal diagonal block (10 tiles). Zigzag: the diagonal block plus 7 half
    blocks (8 tiles each) on every rank: equal work, same total."""
    counts = {layout: layouts.unmasked_tiles(layout, W, 128, block=4) for layout in LAYOUTS}
    np.testing.assert_array_equal(counts["contiguous"], [16 * r + 10 for r in range(W)])
    np.testing.assert_array_equal(counts["zigzag"], [10 + 7 * 8] * W)
    assert counts["zigzag"].sum() == counts["contiguous"].sum()
    assert np.all(counts["striped"] == counts["striped"][0]), counts["striped"]


# ---------------------------------------------------------------- ring attention


@pytest.fixture
def flash_calls(monkeypatch):
    """Counts, per rank, the ring steps that run the blocked attention (the others are skipped)."""
    calls = collections.Counter()
    real = ring.flash_attention_xla

    def counting_flash(q, k, v, **kw):
        jax.debug.callback(lambda rank: calls.update([int(rank)]), jax.lax.axis_index("sp"))
        return real(q, k, v, **kw)

    monkeypatch.setattr(ring, "flash_attention_xla", counting_flash)
    return calls


@pytest.mark.parametrize("layout, mask", [("contiguous", masks.Causal()), ("zigzag", masks.Causal()),
                                          ("striped", masks.Full())])
def test_ring_in_user_shard_map_matches_reference(mesh, layout, mask, flash_calls):
    """Per-device ``ring_attention`` in the user's ``jax.shard_map`` (default ``check_vma``) on a
    ``jax.make_mesh`` mesh: forward and grads vs the reference; and step skipping: causal in the
    contiguous layout, rank r runs r + 1 of the W steps (the others hold only future keys); zigzag
    (load-balanced causal) and non-causal run all W."""
    _check_scheme(parallel.ring_attention, mesh, layout, mask)
    contiguous_causal = layout == "contiguous" and isinstance(mask, masks.Causal)
    assert dict(flash_calls) == {r: r + 1 if contiguous_causal else W for r in range(W)}


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_ring_sharded_on_make_mesh_2d_non_causal_segment_ids(axis_type):
    """The wrapper on a 2 (data) x 4 (sequence) ``jax.make_mesh`` mesh with Explicit or Auto axes,
    non-causal, packed sequences whose segment ids travel with K/V."""
    mesh = jax.make_mesh((2, 4), ("data", "sp"), axis_types=(axis_type,) * 2)
    _check_scheme(parallel.ring_attention_sharded, mesh, "zigzag", masks.Full(), ids=True, batch_axis="data")


def test_ring_striped_causal_segment_ids(mesh):
    """Packed sequences in the striped layout under a causal mask (zigzag: the test above)."""
    _check_scheme(parallel.ring_attention_sharded, mesh, "striped", masks.Causal(), ids=True)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", [masks.Causal(), masks.Full(), masks.SlidingWindow(5, 2),
                                  masks.ChunkedCausal(8) | masks.SlidingWindow(3, 0)])
@pytest.mark.parametrize("ids", [False, True])
def test_ring_sweep(mesh, layout, mask, ids):
    _check_scheme(parallel.ring_attention_sharded, mesh, layout, mask, ids=ids)


@pytest.mark.slow
def test_ring_bf16_soft_cap_head_axis(mesh2d):
    """bf16 inputs, a logit soft cap, sequence over "sp" (4) and heads over "data" (2)."""
    q, k, v = _qkv(dtype=jnp.bfloat16)
    to, back = (functools.partial(f, layout="striped", world=4) for f in (layouts.to_layout, layouts.from_layout))

    def parallel_fn(q, k, v):
        return back(parallel.ring_attention_sharded(to(q), to(k), to(v), mesh=mesh2d, seq_axis="sp",
                                                    head_axis="data", layout="striped", logits_soft_cap=5.0))

    out, grads = _out_and_grads(parallel_fn, q, k, v)
    ref, ref_grads = _out_and_grads(
        lambda q, k, v: softmax_attention_reference(q, k, v, mask=masks.Causal(), logits_soft_cap=5.0), q, k, v)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, rtol=2e-2, name="out")
    for name, g, e in zip("qkv", grads, ref_grads):
        assert_close(g, e, rtol=3e-2, name=f"d{name}")


@pytest.mark.slow
def test_ring_lse_and_its_gradient(mesh):
    """``return_lse=True`` inside shard_map: the lse over all N keys, and gradients through it."""
    q, k, v = _qkv()
    sharded = tuple(_put(x, mesh, None, "sp") for x in (q, k, v))
    spec = P(None, "sp")
    ring_lse = jax.shard_map(
        lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="sp", layout="zigzag", return_lse=True),
        mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec, spec))
    to, back = (functools.partial(f, layout="zigzag", world=W) for f in (layouts.to_layout, layouts.from_layout))

    def parallel_loss(q, k, v):
        out, lse = ring_lse(to(q), to(k), to(v))
        return back(out), back(lse)

    def reference_loss(q, k, v):
        return softmax_attention_reference(q, k, v, mask=masks.Causal(), return_lse=True)

    def scalar(fn):
        def loss(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(lse))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    (out, lse), (ref, ref_lse) = jax.jit(parallel_loss)(*sharded), reference_loss(q, k, v)
    assert_close(out, ref, name="out")
    assert_close(lse, ref_lse, name="lse")
    (value, grads), (ref_value, ref_grads) = scalar(parallel_loss)(*sharded), scalar(reference_loss)(q, k, v)
    assert_close(value, ref_value, name="loss")
    for name, g, e in zip("qkv", grads, ref_grads):
        assert_close(g, e, name=f"d{name}")


# ---------------------------------------------------------------- all-gather and Ulysses


def test_allgather_in_user_shard_map_matches_reference(mesh):
    _check_scheme(parallel.allgather_attention, mesh, "zigzag", masks.Causal(), ids=True)


def test_ulysses_in_user_shard_map_2d_mesh_gqa(mesh2d):
    """Ulysses over the 4-device sequence axis of a 2 x 4 mesh: 8 q heads, 4 kv heads (GQA)."""
    _check_scheme(parallel.ulysses_attention, mesh2d, "striped", masks.Causal(), Hq=8, Hkv=4, batch_axis="data")


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", [masks.Causal(), masks.Full(), masks.SlidingWindow(4, 1)])
def test_allgather_ulysses_sweep(mesh, layout, mask):
    _check_scheme(parallel.allgather_attention_sharded, mesh, layout, mask, ids=True)
    _check_scheme(parallel.ulysses_attention_sharded, mesh, layout, mask, Hq=8, Hkv=8, ids=True)


# ---------------------------------------------------------------- bad input


def test_bad_inputs(mesh):
    q = k = v = jnp.zeros((2, 24, 4, 8))
    run = functools.partial(parallel.ring_attention_sharded, mesh=mesh)
    with pytest.raises(ValueError, match="not divisible by 16"):  # zigzag: 2 chunks per device
        run(q, k, v, seq_axis="sp", layout="zigzag")
    q = k = v = jnp.zeros((2, 20, 4, 8))
    with pytest.raises(ValueError, match="sequence length 20 is not divisible by 8"):
        run(q, k, v, seq_axis="sp")
    q = k = v = jnp.zeros((2, 32, 4, 8))
    with pytest.raises(ValueError, match="seq_axis='seq' is not an axis of the mesh"):
        run(q, k, v, seq_axis="seq")
    with pytest.raises(ValueError, match="unknown layout"):
        run(q, k, v, seq_axis="sp", layout="zig")
    with pytest.raises(NotImplementedError, match="segment_ids"):
        run(q, k, v, seq_axis="sp", mask=masks.Segments(jnp.zeros((2, 32), jnp.int32)))
    with pytest.raises(ValueError, match=r"q heads \(4\) must be divisible by 8 .* over which the scheme splits"):
        parallel.ulysses_attention_sharded(q, k, v, mesh=mesh, seq_axis="sp")
    q = k = v = _put(q, mesh, None, "sp")
    ulysses = jax.shard_map(lambda q, k, v: parallel.ulysses_attention(q, k, v, axis_name="sp"), mesh=mesh,
                            in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
    with pytest.raises(ValueError, match="must both be divisible by 8"):
        ulysses(q, k, v)
    inside = jax.shard_map(lambda q, k, v: parallel.ring_attention(q, k, v, axis_name="seq"), mesh=mesh,
                           in_specs=(P(None, "sp"),) * 3, out_specs=P(None, "sp"))
    with pytest.raises(ValueError, match="axis_name 'seq' is not an axis of the enclosing shard_map"):
        inside(q, k, v)


def test_layout_mismatch_raises(mesh):
    q = k = v = jnp.zeros((1, 32, 2, 8))
    positions = layouts.to_layout(jnp.arange(32), "striped", W, axis=0)
    with pytest.raises(ValueError, match="order of layout 'striped' for 8 ranks, but layout='zigzag'"):
        parallel.ring_attention_sharded(q, k, v, mesh=mesh, seq_axis="sp", layout="zigzag", positions=positions)
    with pytest.raises(ValueError, match="layout mismatch"):  # laid out for 4 ranks, run on 8
        layouts.check_positions(layouts.to_layout(jnp.arange(32), "zigzag", 4, axis=0), "zigzag", W)
    layouts.check_positions(layouts.to_layout(jnp.arange(32)[None], "zigzag", W), "zigzag", W)


# ---------------------------------------------------------------- module option


def _module_pair(sequence_parallel):
    """The same layer (same parameters) with and without ``sequence_parallel``."""
    kwargs = dict(num_kv_heads=2, rope=RoPE())
    return (MultiHeadAttention(32, 4, sequence_parallel=sequence_parallel, rngs=nnx.Rngs(0), **kwargs),
            MultiHeadAttention(32, 4, rngs=nnx.Rngs(0), **kwargs))


@nnx.jit
def _causal_call(layer, x):
    return layer(x, mask=masks.Causal())


def test_module_sequence_parallel_global_arrays(mesh):
    """Under jax.set_mesh (a ``jax.make_mesh`` mesh, Explicit axes) the module wraps its attention in
    shard_map; x is sharded over the sequence, in zigzag order."""
    sp_layer, layer = _module_pair(("sp", "zigzag"))
    x = _inputs()[0].reshape(2, 32, 64)[..., :32]
    expected = _causal_call(layer, x)
    with jax.set_mesh(mesh):
        y = _causal_call(sp_layer, layouts.to_layout(_put(x, mesh, None, "sp"), "zigzag", W))
    assert_close(layouts.from_layout(y, "zigzag", W), expected)


def test_module_sequence_parallel_inside_shard_map(mesh):
    """A model called inside the user's ``jax.shard_map`` (default ``check_vma``): local shards, RoPE at
    global positions; the output and the parameter gradients (summed over the devices by the
    replicated in_spec's transpose) equal the unsharded layer's."""
    sp_layer, layer = _module_pair(SequenceParallel("sp", layout="striped", scheme="ring"))
    x = _inputs()[0].reshape(2, 32, 64)[..., 32:]
    w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    graphdef, state = nnx.split(sp_layer)
    ref_graphdef, ref_state = nnx.split(layer)

    def local(state, x):
        return nnx.merge(graphdef, state)(x, mask=masks.Causal())

    tokens = P(None, "sp")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), tokens), out_specs=tokens)
    laid_w = layouts.to_layout(_put(w, mesh, *tokens), "striped", W)

    @jax.jit
    def run(state, x):
        return jax.value_and_grad(lambda state: jnp.sum(sharded(state, x) * laid_w))(state), sharded(state, x)

    (_, grads), y = run(_put(state, mesh), layouts.to_layout(_put(x, mesh, *tokens), "striped", W))
    assert_close(layouts.from_layout(y, "striped", W), _causal_call(layer, x))
    ref_grads = jax.jit(jax.grad(lambda state: jnp.sum(nnx.merge(ref_graphdef, state)(x, mask=masks.Causal()) * w)))(
        ref_state)
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert_close(g, e, name=f"d{jax.tree_util.keystr(path)}")


def test_module_sequence_parallel_errors():
    with pytest.raises(ValueError, match="unknown sequence-parallel scheme"):
        SequenceParallel("sp", scheme="tree")
    with pytest.raises(NotImplementedError, match="softmax"):
        MultiHeadAttention(32, 4, mechanism="lightning", sequence_parallel="sp", rngs=nnx.Rngs(0))
    layer = MultiHeadAttention(32, 4, sequence_parallel="sp", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence_parallel axis 'sp' is not bound"):
        layer(jnp.zeros((1, 16, 32)))
