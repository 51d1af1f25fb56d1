"""``attnjax.meshes``: typing for the user's ``shard_map`` (``vary_like``, ``varying_structs``) and
Explicit meshes (``explicit_axes``, ``on_auto_axes``, ``accepts_explicit_meshes`` on the entry points)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax as aj
from attnjax import meshes
from attnjax.linear import linear_attention
from attnjax.sparse import block_sparse_attention, from_block_mask


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])


def _put(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, P("data")))


def test_no_op_on_plain_arrays():
    x = jnp.ones((2, 3))
    assert meshes.varying_axes(x) == frozenset()
    assert meshes.vary_like(x, x) is x
    assert meshes.explicit_axes(x, "a string", 1.0) == ()
    s = jax.ShapeDtypeStruct((2,), jnp.float32)
    assert meshes.varying_structs(s, x) is s
    assert meshes.on_auto_axes(lambda q, y: q + y, x, 1.0) is not None


def test_vary_like_inside_shard_map(mesh):
    """A constant cast with ``vary_like`` varies like the per-device value; the struct helper agrees;
    a carry left constant is refused by jax (which is what vary_like is for)."""

    def body(x):
        zeros = jnp.zeros(x.shape)
        assert meshes.varying_axes(x) == {"data"} and meshes.varying_axes(zeros) == frozenset()
        cast = meshes.vary_like(zeros, x)
        assert meshes.varying_axes(cast) == {"data"}
        struct = meshes.varying_structs(jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        assert meshes.varying_axes(jax.eval_shape(lambda: cast)) == meshes.varying_axes(cast)
        assert struct.shape == x.shape
        return jax.lax.fori_loop(0, 3, lambda i, c: c + x, cast)

    x = _put(mesh, jnp.arange(8.0).reshape(2, 4))
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)
    np.testing.assert_allclose(out, 3 * np.arange(8.0).reshape(2, 4))
    with pytest.raises(TypeError, match="carry"):
        jax.jit(jax.shard_map(lambda x: jax.lax.fori_loop(0, 3, lambda i, c: c + x, jnp.zeros(x.shape)),
                              mesh=mesh, in_specs=P("data"), out_specs=P("data")))(x)


def test_entry_points_on_explicit_meshes(mesh):
    """``attention`` (with lse), ``linear_attention`` (with its state) and ``block_sparse_attention``
    run eagerly and under jit on batch-sharded Explicit arrays, equal the unsharded result, and keep
    the batch sharding on every output with a leading batch dim."""
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 16, 2, 8)) for i in range(3))
    blocks = from_block_mask(np.tril(np.ones((2, 2), bool)), 8, 8)
    calls = {
        "attention": lambda q, k, v: aj.attention(q, k, v, mask=aj.masks.Causal(), return_lse=True),
        "linear": lambda q, k, v: linear_attention(q, k, v, return_state=True),
        "block_sparse": lambda q, k, v: block_sparse_attention(q, k, v, blocks, mask=aj.masks.Causal()),
    }
    sharded = [_put(mesh, x) for x in (q, k, v)]
    assert meshes.explicit_axes(*sharded) == ("data",)
    for name, f in calls.items():
        expected = f(q, k, v)
        for run in (f, jax.jit(f)):
            got = run(*sharded)
            for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
                np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=name)
                assert tuple(jax.typeof(g).sharding.spec)[:1] == ("data",), name
