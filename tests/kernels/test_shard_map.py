"""The Pallas kernels inside the user's ``jax.shard_map`` with the default ``check_vma``.

Compiled kernels type-check there (``pallas_kernels.common.pallas_call`` types ``out_shape`` like
the operands): forward and backward cross-lower to Triton from the CPU host. The interpret mode
can't (jax's interpreter indexes per-device refs with replicated grid indices) and says so with
``NotImplementedError``, which "auto" falls back on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import attnjax as aj
from pallas_kernels.block_sparse import block_sparse_attention_pallas
from pallas_kernels.flash import flash_attention_pallas
from pallas_kernels.lightning import lightning_attention_pallas
from pallas_kernels.stick_breaking import stick_breaking_attention_pallas

CAUSAL = aj.masks.Causal()
KERNELS = {
    "flash": lambda q, k, v, **kw: flash_attention_pallas(q, k, v, mask=CAUSAL, **kw),
    "stick_breaking": lambda q, k, v, **kw: stick_breaking_attention_pallas(q, k, v, mask=CAUSAL, **kw),
    "block_sparse": lambda q, k, v, **kw: block_sparse_attention_pallas(
        q, k, v, aj.sparse.from_block_mask(np.tril(np.ones((2, 2), bool)), 64, 64), mask=CAUSAL, **kw),
    "lightning": lambda q, k, v, **kw: lightning_attention_pallas(q, k, v, jnp.full((q.shape[2],), 0.9), **kw)[0],
}


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])


def _grads_in_shard_map(kernel, mesh, **kw):
    loss = lambda q, k, v: kernel(q, k, v, **kw).astype(jnp.float32).sum()  # noqa: E731
    return jax.jit(jax.shard_map(jax.grad(loss, (0, 1, 2)), mesh=mesh, in_specs=P("data"), out_specs=P("data")))


@pytest.mark.parametrize("name", list(KERNELS))
def test_compiled_kernels_lower_inside_shard_map(name, mesh):
    q = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    run = _grads_in_shard_map(KERNELS[name], mesh, backend="gpu", interpret=False)
    text = run.trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "tt.func" in text or "triton" in text.lower()


@pytest.mark.parametrize("name", ["flash", "lightning"])
def test_interpret_mode_refuses_inside_shard_map(name, mesh):
    q = jax.device_put(jnp.ones((2, 16, 2, 8)), NamedSharding(mesh, P("data")))
    with pytest.raises(NotImplementedError, match="interpret mode"):
        _grads_in_shard_map(KERNELS[name], mesh, interpret=True)(q, q, q)
