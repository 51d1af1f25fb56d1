"""Every registered mechanism where JAX users run it: data parallel inside the user's ``jax.shard_map``
(default ``check_vma``) and under ``jax.jit`` on a ``jax.make_mesh`` mesh (Explicit axes), forward and
gradients equal to the single-device reference (``attnjax.testing.conformance.check_sharded``).

The ``core`` case (causal where masks are supported, GQA, ``T < S``) on 2 of the 8 fake CPU devices.
Pallas runs in interpret mode on CPU, which jax cannot type-check inside ``shard_map`` (it raises
``NotImplementedError``; tests/kernels/test_shard_map.py lowers the compiled kernels instead); the
other implementations than "auto" are the slow sweep.
"""

from __future__ import annotations

import jax
import pytest

from attnjax import registry
from attnjax.sparse import BlockSelector, TokenSelector
from attnjax.testing import conformance

ENTRIES = {e.name: e for e in registry.entries()}
MODES = ("shard_map", "jit")

pytestmark = pytest.mark.filterwarnings("ignore::attnjax.sparse.DenseSelectionWarning")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])


def _check(name, implementation, mode, mesh):
    config = conformance.small_tiles(ENTRIES[name].config())
    case = next(c for c in conformance.cases(config) if c.name == "core")
    try:
        conformance.check_sharded(config, implementation, case, mesh, mode=mode)
    except conformance.CaseNotDefined as e:
        pytest.skip(f"not defined by the reference: {e}")


FAMILY_FIRSTS = {next(e.name for e in ENTRIES.values() if e.family == family)
                 for family in {e.family for e in ENTRIES.values()}}
"""The first registered mechanism of each family: the ``jit`` mode (global arrays on an Explicit mesh, the wiring
of ``attnjax.meshes.accepts_explicit_meshes``, shared by every mechanism) runs for these in the default suite and
for every mechanism in the slow one."""


SELECTOR_FIRSTS = {next(e.name for e in ENTRIES.values() if issubclass(e.config, base))
                   for base in (BlockSelector, TokenSelector)}
"""Every block selector runs the block-sparse engine on its lists and every token selector the token engine: the
``shard_map`` mode runs one of each by default (a selection step is per batch row, so it shards with the batch), and
every selector in the slow suite."""


def _default_suite(name: str, mode: str) -> bool:
    if mode == "jit":
        return name in FAMILY_FIRSTS
    config = ENTRIES[name].config
    return name in SELECTOR_FIRSTS or not issubclass(config, (BlockSelector, TokenSelector))


@pytest.mark.parametrize("name,mode", [
    pytest.param(name, mode, marks=() if _default_suite(name, mode) else pytest.mark.slow)
    for name in ENTRIES for mode in MODES])
def test_data_parallel(name, mode, mesh):
    _check(name, "auto", mode, mesh)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,implementation", [(e.name, impl) for e in ENTRIES.values()
                                                 for impl in e.implementations if impl != "pallas"])
def test_data_parallel_every_implementation(name, implementation, mode, mesh):
    _check(name, implementation, mode, mesh)


def test_wrong_sharded_result_is_caught(mesh, monkeypatch):
    """The check fails when a path goes wrong only when sharded (its batch shards swapped)."""
    config = conformance.small_tiles(ENTRIES["softmax"].config())
    case = next(c for c in conformance.cases(config) if c.name == "core")
    original = config.implementations

    def swapped():
        paths = dict(original())
        xla = paths["xla"]
        paths["xla"] = lambda q, *a, **kw: xla(q[::-1], *a, **kw) if q.shape[0] > 1 else xla(q, *a, **kw)
        return paths

    monkeypatch.setattr(type(config), "implementations", lambda self: swapped())
    with pytest.raises(AssertionError):
        conformance.check_sharded(config, "xla", case, mesh, mode="jit")
