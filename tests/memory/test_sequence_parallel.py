"""Titans' neural memory sequence-parallel on 4 fake CPU devices against the single-device chunked memory."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnjax.memory.neural_memory import neural_memory
from attnjax.memory.sequence_parallel import neural_memory_sequence_parallel
from tests.helpers import assert_close

B, T, HQ, H, DK, DV, CHUNK = 2, 32, 4, 2, 4, 6, 4
TOKENS, REPLICATED = P(None, "sp"), P()


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4,), ("sp",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:4])


def inputs():
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    gate = lambda key, s: jax.nn.sigmoid(jax.random.normal(key, (B, T, H))) * s
    return (jax.random.normal(ks[0], (B, T, HQ, DK)), 0.5 * jax.random.normal(ks[1], (B, T, H, DK)),
            jax.random.normal(ks[2], (B, T, H, DV)), gate(ks[3], 0.5), gate(ks[4], 1.0), gate(ks[5], 0.2),
            jax.random.normal(ks[6], (B, H, DK, DV)), 0.1 * jax.random.normal(ks[7], (B, H, DK, DV)))


def test_sharded_memory_equals_one_device_forward_state_and_gradients(mesh):
    """Outputs and the end state (memory, momentum, chunk base) match; so do the gradients of q, k, v, the three
    gates, the initial state and the initial momentum, through the outputs and the end memory."""
    args = inputs()
    w = jax.random.normal(jax.random.PRNGKey(9), (B, T, HQ, DV))

    def sharded(*a):
        def local(*x):
            return neural_memory_sequence_parallel(*x[:6], axis_name="sp", chunk_size=CHUNK, initial_state=x[6],
                                                   initial_momentum=x[7], return_state=True)
        return jax.shard_map(local, mesh=mesh, in_specs=(TOKENS,) * 6 + (REPLICATED,) * 2,
                             out_specs=(TOKENS, REPLICATED))(*a)

    def single(*a):
        return neural_memory(*a[:6], chunk_size=CHUNK, initial_state=a[6], initial_momentum=a[7], return_state=True)

    def loss(fn, *a):
        out, state = fn(*a)
        return jnp.sum(out * w) + jnp.sum(state.memory ** 2), (out, state)

    placed = jax.device_put(args, tuple(NamedSharding(mesh, s) for s in (TOKENS,) * 6 + (REPLICATED,) * 2))
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(1, 9)), has_aux=True), static_argnums=0)
    (g, (out, state)), (g_ref, (out_ref, state_ref)) = grad(sharded, *placed), grad(single, *args)
    assert_close(out, out_ref, name="out")
    for name, a, e in zip(("memory", "momentum", "base"), state[:3], state_ref[:3]):
        assert_close(a, e, name=name)
    assert int(state.position) == T
    for name, a, e in zip(("q", "k", "v", "lr", "momentum", "decay", "state", "initial momentum"), g, g_ref):
        assert_close(a, e, atol=1e-4, name=f"d{name}")


def test_a_chunk_may_not_straddle_two_ranks(mesh):
    args = jax.device_put(inputs()[:6], NamedSharding(mesh, TOKENS))
    local = lambda *x: neural_memory_sequence_parallel(*x, axis_name="sp", chunk_size=3)
    with pytest.raises(ValueError, match="multiple of chunk_size=3"):
        jax.shard_map(local, mesh=mesh, in_specs=(TOKENS,) * 6, out_specs=TOKENS)(*args)
