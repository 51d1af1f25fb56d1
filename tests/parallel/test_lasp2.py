"""LASP-2 and LASP-2H on 8 fake CPU devices against single-device linear / softmax attention:
inside the user's ``jax.shard_map`` (default ``check_vma``) and through the wrappers, on meshes
from ``jax.make_mesh`` (Explicit axes unless a test says Auto)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax as aj
from attnjax.linear import linear_attention
from attnjax.parallel import comm
from attnjax.parallel.lasp2 import lasp2, lasp2_sharded
from attnjax.parallel.lasp2h import lasp2h_attention, lasp2h_sharded
from tests.helpers import assert_close, random_qkv

DECAY = jnp.array([0.9, 0.8, 0.95, 0.7], jnp.float32)
INTRA = "reference"
"""The intra-chunk path of the tests that check the distribution rather than the chunked Lightning
path (which the first test runs): it compiles much faster."""


@pytest.fixture(scope="module")
def mesh_2x4():
    return jax.make_mesh((2, 4), ("data", "seq"))


@pytest.fixture(scope="module")
def mesh_8():
    return jax.make_mesh((8,), ("seq",))


def put(tree, mesh, *spec):
    """Every array of ``tree`` sharded over ``mesh`` as ``P(*spec)``, as ``jax.shard_map`` on an
    Explicit mesh expects its inputs."""
    return jax.device_put(tree, NamedSharding(mesh, P(*spec)))


def value_and_grads(fn, args, argnums):
    """``(out, grads of sum(out * w))`` from one jitted function (w: fixed random cotangent)."""
    w = jax.random.normal(jax.random.PRNGKey(123), jax.eval_shape(fn, *args).shape, jnp.float32)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), g = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(*args)
    return out, g


def assert_same(fn, ref, args, argnums, names, rtol=None, fn_args=None):
    """``fn(*fn_args)`` (default ``args``) equals ``ref(*args)``, forward and gradients."""
    out, g = value_and_grads(fn, args if fn_args is None else fn_args, argnums)
    out_ref, g_ref = value_and_grads(ref, args, argnums)
    assert_close(out, out_ref, rtol=rtol, name="out")
    for a, e, n in zip(g, g_ref, names):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(e)):
            assert_close(x, y, rtol=rtol, name=f"d{n}{jax.tree_util.keystr(path)}")


def test_decay_gqa_on_data_by_sequence_mesh_matches_linear_attention(mesh_2x4):
    """The wrapper on an Explicit mesh, with unsharded inputs."""
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=2, T=32, Hq=4, Hkv=2, D=8)

    def sharded(q, k, v, lam):
        return lasp2_sharded(q, k, v, mesh=mesh_2x4, seq_axis="seq", batch_axis="data", decay=lam, chunk_size=4)

    def single(q, k, v, lam):
        return linear_attention(q, k, v, decay=lam, implementation="reference")

    assert_same(sharded, single, (q, k, v, DECAY), (0, 1, 2, 3), "qkv" + "λ")


@pytest.mark.slow
def test_non_causal_normalized_feature_map_gqa_matches_linear_attention(mesh_8):
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=1, T=16, Hq=4, Hkv=2, D=8)
    kw = dict(causal=False, normalize=True, feature_map="elu+1")
    assert_same(lambda q, k, v: lasp2_sharded(q, k, v, mesh=mesh_8, seq_axis="seq", implementation=INTRA, **kw),
                lambda q, k, v: linear_attention(q, k, v, implementation="reference", **kw), (q, k, v), (0, 1, 2),
                "qkv")


def test_heads_sharded_alibi_decay_bf16_forward():
    """The wrapper on a ``jax.make_mesh`` mesh with Auto axes."""
    mesh = jax.make_mesh((2, 4), ("heads", "seq"), axis_types=(AxisType.Auto,) * 2)
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=1, T=32, Hq=4, D=8, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: lasp2_sharded(q, k, v, mesh=mesh, seq_axis="seq", head_axis="heads",
                                                decay="alibi", implementation=INTRA))(q, k, v)
    assert out.dtype == jnp.bfloat16
    expected = jax.jit(lambda q, k, v: linear_attention(q, k, v, decay="alibi", implementation="reference"))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    assert_close(out, expected, rtol=2e-2)


def test_checked_shard_map_matches_and_has_one_all_gather_per_direction_independent_of_length(mesh_8):
    """Called in ``jax.shard_map`` with the varying-axes check on (the default). The compiled
    forward has one all-gather, forward + backward two, of the ``[B, H, D, Dv]`` float32 states
    (the cost model's bytes), whatever T."""
    spec = P(None, "seq", None, None)
    sharded = jax.shard_map(lambda q, k, v: lasp2(q, k, v, axis_name="seq", implementation=INTRA), mesh=mesh_8,
                            in_specs=(spec,) * 3, out_specs=spec)
    single = lambda q, k, v: linear_attention(q, k, v, implementation="reference")  # noqa: E731
    model = comm.traffic("lasp2", comm.Workload(1, 32, 2, 2, 8, dtype_bytes=4), 8, "linear")
    state_bytes = 1 * 2 * 8 * 8 * 4
    assert model.bytes_fwd == model.bytes_bwd == 7 * state_bytes
    for T in (32, 64):
        qkv = random_qkv(jax.random.PRNGKey(T), B=1, T=T, Hq=2, D=8)
        sharded_qkv = put(qkv, mesh_8, *spec)
        forward = jax.jit(sharded).lower(*sharded_qkv).compile()
        assert [(c.kind, c.sent_bytes) for c in comm.collectives(forward)] == [("all-gather", model.bytes_fwd)]
    assert_close(forward(*sharded_qkv), jax.jit(single)(*qkv))
    loss = lambda f: lambda q, k, v, w: jnp.sum(f(q, k, v) * w)  # noqa: E731
    step = jax.jit(jax.grad(loss(sharded), (0, 1, 2))).lower(*sharded_qkv, sharded_qkv[0]).compile()
    gathers = comm.collectives(step)
    assert [(c.kind, c.sent_bytes) for c in gathers] == [("all-gather", model.bytes_fwd)] * 2   # forward, backward
    expected = jax.jit(jax.grad(loss(single), (0, 1, 2)))(*qkv, qkv[0])
    for a, e, n in zip(step(*sharded_qkv, sharded_qkv[0]), expected, "qkv"):
        assert_close(a, e, name=f"d{n}")


def hybrid_params(key, d_model=16, heads=2, layers="LSLS"):
    keys = jax.random.split(key, len(layers))
    scale = d_model ** -0.5
    return [{"wqkv": jax.random.normal(k, (3, d_model, heads, d_model // heads)) * scale,
             "wo": jax.random.normal(jax.random.fold_in(k, 1), (heads, d_model // heads, d_model)) * scale}
            for k in keys]


def hybrid_model(params, x, decay, layers, linear_layer, softmax_layer):
    """Pre-norm residual stack: 'L' layers are Lightning (decay), 'S' layers causal softmax."""
    for p, kind in zip(params, layers):
        h = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        q, k, v = jnp.einsum("btd,cdhe->cbthe", h, p["wqkv"])
        o = linear_layer(q, k, v, decay) if kind == "L" else softmax_layer(q, k, v)
        x = x + jnp.einsum("bthe,hed->btd", o, p["wo"])
    return x


def test_hybrid_lightning_softmax_model_under_one_sequence_sharding_equals_unsharded(mesh_2x4):
    """LASP-2 and LASP-2H layers inside the user's ``jax.shard_map`` (default ``check_vma``), inputs
    sharded over an Explicit mesh: the model's output and its gradients equal the unsharded model's."""
    layers = "LS"
    params = hybrid_params(jax.random.PRNGKey(5), layers=layers)
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 16))
    decay = jnp.array([0.9, 0.75])

    def sharded(params, x, decay):
        def local(params, x, decay):
            return hybrid_model(params, x, decay, layers,
                                lambda q, k, v, lam: lasp2(q, k, v, axis_name="seq", decay=lam, implementation=INTRA),
                                lambda q, k, v: lasp2h_attention(q, k, v, axis_name="seq", implementation=INTRA))
        tokens = P("data", "seq", None)
        return jax.shard_map(local, mesh=mesh_2x4, in_specs=(P(), tokens, P()), out_specs=tokens)(
            params, x, decay)

    def single(params, x, decay):
        return hybrid_model(params, x, decay, layers,
                            lambda q, k, v, lam: linear_attention(q, k, v, decay=lam, implementation="reference"),
                            lambda q, k, v: aj.attention(q, k, v, mask=aj.masks.Causal(), implementation="reference"))

    args = (params, x, decay)
    sharded_args = (put(params, mesh_2x4), put(x, mesh_2x4, "data", "seq"), put(decay, mesh_2x4))
    assert_same(sharded, single, args, (0, 1, 2), ["params", "x", "decay"], rtol=1e-4, fn_args=sharded_args)


def test_bad_inputs_raise_clear_errors(mesh_2x4, mesh_8):
    q, k, v = random_qkv(jax.random.PRNGKey(8), B=2, T=12, Hq=2, D=8)
    with pytest.raises(ValueError, match="not divisible"):
        lasp2_sharded(q, k, v, mesh=mesh_8, seq_axis="seq")
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        lasp2_sharded(q, k, v, mesh=mesh_2x4, seq_axis="sp")
    with pytest.raises(ValueError, match="not divisible"):
        lasp2h_sharded(q, k, v, mesh=mesh_8, seq_axis="seq")
    spec = P(None, "seq", None, None)
    wrong_axis = jax.shard_map(lambda q, k, v: lasp2(q, k, v, axis_name="sp"), mesh=mesh_2x4,
                               in_specs=(spec,) * 3, out_specs=spec)
    with pytest.raises(ValueError, match="'sp' is not an axis"):
        wrong_axis(*put((q[:, :8], k[:, :8], v[:, :8]), mesh_2x4, *spec))
    with pytest.raises(ValueError, match="decay"):
        lasp2_sharded(q[:, :8], k[:, :8], v[:, :8], mesh=mesh_8, seq_axis="seq", decay="cosine")
    with pytest.raises(ValueError, match="0 < λ <= 1"):  # checked before shard_map traces the decay
        lasp2_sharded(q[:, :8], k[:, :8], v[:, :8], mesh=mesh_8, seq_axis="seq", decay=jnp.full((2,), 2.0))


PACKED = jnp.array([[0] * 3 + [1] * 14 + [2] * 2 + [3] * 13, [5] * 32], jnp.int32)
"""Two rows on 8 ranks of 4 tokens: runs that end inside a rank, span several ranks, and a row of one run."""


def test_segments_initial_state_and_final_state_match_linear_attention(mesh_8):
    """Packed sequences, an initial state and the final state (forward and gradients of q, k, v, λ and
    the initial state through the output and the final state) equal the single-device call."""
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=2, T=32, Hq=4, Hkv=2, D=8)
    state = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 8, 8), jnp.float32)

    def flat(fn, gather=lambda x: x):
        def run(q, k, v, lam, state):
            out, final = fn(q, k, v, decay=lam, segment_ids=PACKED, initial_state=state, return_state=True)
            return jnp.concatenate([gather(out).ravel(), gather(final).ravel()])
        return run

    def replicated(x):
        return jax.reshard(x, NamedSharding(mesh_8, P()))

    assert_same(flat(lambda *a, **kw: lasp2_sharded(*a, mesh=mesh_8, seq_axis="seq", implementation=INTRA, **kw),
                     replicated),
                flat(lambda *a, **kw: linear_attention(*a, implementation="reference", **kw)),
                (q, k, v, DECAY, state), (0, 1, 2, 3, 4), ["q", "k", "v", "λ", "state"])


def test_states_and_segments_need_causal(mesh_8):
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=2, T=32, Hq=4, Hkv=2, D=8)
    with pytest.raises(NotImplementedError, match="need causal=True"):
        lasp2_sharded(q, k, v, mesh=mesh_8, seq_axis="seq", causal=False, segment_ids=PACKED)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 31\)"):
        lasp2_sharded(q, k, v, mesh=mesh_8, seq_axis="seq", segment_ids=PACKED[:, :31])
