"""The registry: its printed listing, "did you mean" for unknown names, and the capability claims
of every registered mechanism checked against what the code does.

``decodes``: a one-token query against the keys and values so far gives the last row of causal
attention, at two positions, and a mechanism that claims it does not must fail that (so the claim
can go stale in neither direction). ``sequence_parallel``: each claimed scheme of
``attnjax.parallel`` runs the mechanism inside a user's ``jax.shard_map`` (default ``check_vma``) on
the 8 fake CPU devices and equals the single-device reference, causal where the mechanism serves a mask
and unmasked where that is its only form (InLine, RALA); ``lasp2`` runs through ``lasp2_mechanism``, the
route of every mechanism with a linear state (the plain linear family's ``lasp2``, the others'
``chunk_attention``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import attnjax as aj
from attnjax import dispatch, masks, parallel, registry
from attnjax.testing import conformance

ENTRIES = {e.name: e for e in registry.entries()}

SCHEMES = {"ring": parallel.ring_attention, "allgather": parallel.allgather_attention,
           "ulysses": parallel.ulysses_attention, "lasp2h": parallel.lasp2h_attention,
           "lasp2": parallel.lasp2_mechanism}
"""The per-device function of each name a mechanism may claim in ``sequence_parallel``."""

DECODE_LENGTH = 40
"""Five tiles of ``conformance.TILE``: long enough that the sparse configs below leave blocks out."""

SPARSE_AT_DECODE_LENGTH = {
    "sparse_window": dict(window_blocks=1), "streaming": dict(window_blocks=1), "power": dict(window_blocks=0),
    "radial": dict(frame_shape=(2, 4)), "s2": dict(num_shards=2, window_blocks=1),
    "moa": dict(alphas=(8.0,), betas=(0.5,), sink=0), "xattention": dict(threshold=0.5, stride=4), "seer": dict(top_k=2),
    "urpe": dict(c=jnp.linspace(0.5, 1.5, 41)[:, None]),
    "longheads": dict(top_k=4),
    "core_context": dict(window=8, group_size=4),
    "hyper": dict(min_seq_len=8, block_size=8, sample_size=8),
}
"""Config changes that make a mechanism differ from softmax at ``DECODE_LENGTH``: a selector's defaults list
every block there, and URPE's default ``C = 1`` is softmax; either would make any decode check pass. None
changes what the config claims."""

EXTRA_DECODE_CONFIGS = {
    "sigmoid_fixed_bias": aj.softmax.Sigmoid(bias=-2.0, block_q=8, block_kv=8),
    "moa_fixed_span": aj.sparse.MoA(alphas=(8.0,), betas=(0.0,), sink=0, block_q=8, block_kv=8),
    "sparse_window_wide_query_tiles": aj.sparse.SparseWindow(window_blocks=1, block_q=16, block_kv=8),
}
"""Configs whose claim differs from their registry default's: sigmoid's fixed bias and MoA's fixed
spans decode; a static selector with query tiles wider than its key blocks does not."""


def _decode_config(name: str):
    config = conformance.small_tiles(ENTRIES[name].config())
    return dataclasses.replace(config, **SPARSE_AT_DECODE_LENGTH.get(name, {}))


def _causal(config, q, k, v):
    return jax.jit(lambda q, k, v: aj.attention(q, k, v, mechanism=config, mask=masks.Causal(),
                                                implementation="reference"))(q, k, v)


@functools.cache
def _decode_inputs() -> tuple[jax.Array, jax.Array, jax.Array, np.ndarray]:
    """``q, k, v [1, DECODE_LENGTH, 2, 8]`` and softmax's causal output on them (computed once)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, DECODE_LENGTH, 2, 8)), jnp.float32) for _ in range(3))
    return q, k, v, np.asarray(_causal(aj.softmax.Softmax(), q, k, v))


def _decodes_from_cache(config) -> bool:
    """Whether one-token queries against the cache at positions 30 and ``DECODE_LENGTH - 1`` give those
    rows of full causal attention; asserts first that the mechanism is not softmax in disguise."""
    q, k, v, softmax = _decode_inputs()
    try:
        full = np.asarray(_causal(config, q, k, v))
    except NotImplementedError:  # no causal mask (e.g. vision windows): nothing to decode
        return False
    if config.name != "softmax":
        assert not np.allclose(full, softmax, atol=1e-4), (
            f"{config.name} equals softmax at length {DECODE_LENGTH}: give it a sparser test config in "
            "SPARSE_AT_DECODE_LENGTH, else its decode check proves nothing")
    for t in (30, DECODE_LENGTH - 1):
        try:
            step = np.asarray(_causal(config, q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1]))
        except NotImplementedError:
            return False
        if not np.allclose(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5):
            return False
    return True


@pytest.mark.filterwarnings("ignore:.*selects every block:UserWarning")  # one query sees all its blocks
@pytest.mark.parametrize("name", list(ENTRIES))
def test_decode_claim_holds(name):
    config = _decode_config(name)
    assert config.decodes == ENTRIES[name].decodes, "the test config must claim what the registry entry claims"
    verb = "decodes" if config.decodes else "does not decode"
    assert _decodes_from_cache(config) == config.decodes, (
        f"{name} claims it {verb} from a KV cache, but a one-token query against the cache "
        f"{'does not give' if config.decodes else 'gives'} the row of full causal attention")


@pytest.mark.filterwarnings("ignore:.*selects every block:UserWarning")
@pytest.mark.parametrize("name", list(EXTRA_DECODE_CONFIGS))
def test_decode_claim_of_non_default_configs(name):
    config = EXTRA_DECODE_CONFIGS[name]
    assert config.decodes != ENTRIES[config.name].decodes
    assert _decodes_from_cache(config) == config.decodes


def test_sequence_parallel_names_are_the_schemes_of_attnjax_parallel():
    assert set(registry.SEQUENCE_PARALLEL) == set(SCHEMES)
    assert set(parallel.SCHEMES) <= set(SCHEMES)


def _scheme_call(scheme, config, causal: bool):
    """``f(q, k, v)`` per device: the scheme with ``mechanism=config`` and ``causal`` where it takes them
    (``lasp2_mechanism``), else with the causal mask or none (the softmax schemes)."""
    fn = SCHEMES[scheme]
    params = inspect.signature(fn).parameters
    kwargs = {"mechanism": config, "causal": causal} if "mechanism" in params else {
        "mask": masks.Causal() if causal else None}
    return lambda q, k, v: fn(q, k, v, axis_name="sp", **kwargs)


@pytest.mark.parametrize("name,scheme", [(e.name, s) for e in ENTRIES.values() for s in e.sequence_parallel])
def test_sequence_parallel_claim_holds(name, scheme):
    config = ENTRIES[name].config()
    causal = "mask" in config.supports
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 32, 8, 8)), jnp.float32) for _ in range(3))
    mesh = Mesh(np.array(jax.devices()[:8]), ("sp",))
    spec = P(None, "sp")
    sharded = jax.jit(jax.shard_map(_scheme_call(scheme, config, causal), mesh=mesh, in_specs=(spec,) * 3,
                                    out_specs=spec))(q, k, v)
    expected = aj.attention(q, k, v, mechanism=config, mask=masks.Causal() if causal else None,
                            implementation="reference")
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(expected), rtol=1e-4, atol=1e-5,
                               err_msg=f"{name} claims sequence-parallel scheme {scheme!r}")


def test_lasp2_refuses_every_mechanism_that_does_not_claim_it():
    """The ``lasp2`` claim can't go stale the other way: ``lasp2_mechanism`` raises ``NotImplementedError`` for
    every registered mechanism that doesn't claim it (traced under ``jax.eval_shape``, nothing compiles)."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("sp",))
    spec = P(None, "sp")
    x = jax.ShapeDtypeStruct((1, 32, 8, 8), jnp.float32)
    served = []
    for entry in ENTRIES.values():
        if "lasp2" in entry.sequence_parallel:
            continue
        config = entry.config()
        call = _scheme_call("lasp2", config, "mask" in config.supports)
        try:
            jax.eval_shape(jax.shard_map(call, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec), x, x, x)
        except NotImplementedError:
            continue
        served.append(entry.name)
    assert not served, f"lasp2_mechanism serves {served}, which don't claim sequence_parallel 'lasp2'"


def test_listing_prints_an_aligned_table_and_is_the_entries():
    listing = registry.list()
    assert listing == registry.entries()
    lines = repr(listing).splitlines()
    assert str(listing) == repr(listing) and len(lines) == len(ENTRIES) + 1
    header = lines[0].split()
    assert header == ["name", "family", "implementations", "options", "decode", "sequence-parallel", "paper"]
    columns = [lines[0].index(h) for h in header]
    for line, entry in zip(lines[1:], ENTRIES.values()):
        cells = [line[a:b].strip() for a, b in zip(columns, columns[1:])]
        assert cells[:4] == [entry.name, entry.family, ",".join(entry.implementations),
                             ",".join(o for o in registry.OPTIONS if o in entry.supports)]
        assert cells[4] == ("yes" if entry.decodes else "no")
        assert cells[5] == (",".join(entry.sequence_parallel) or "-")
        assert entry.paper.startswith(line[columns[-1]:].rstrip("…"))


@pytest.mark.parametrize("typo,expected", [("sofmax", "softmax"), ("lightnin", "lightning"), ("stickbreaking",
                                                                                              "stick_breaking")])
def test_unknown_mechanism_suggests_the_closest_name(typo, expected):
    hint = rf"unknown mechanism '{typo}'; did you mean '{expected}'\? \(attnjax.registry.list\(\) shows all"
    with pytest.raises(ValueError, match=hint):
        registry.get(typo)


def test_unknown_mechanism_without_a_close_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown mechanism 'zzz'; registered: \[") as error:
        aj.attention(*(jnp.zeros((1, 4, 2, 8)),) * 3, mechanism="zzz")
    assert "did you mean" not in str(error.value)


def test_unknown_implementation_suggests_the_closest_name():
    with pytest.raises(ValueError, match=r"unknown implementation 'palas'; did you mean 'pallas'\? expected one of"):
        dispatch.check_implementation("palas")
    with pytest.raises(ValueError, match=r"unknown implementation 'cuda'; expected one of"):
        dispatch.check_implementation("cuda")


def test_register_refuses_a_class_without_its_claims():
    @dataclasses.dataclass(frozen=True)
    class NoClaims:
        name = "no_claims"
        family = "softmax"
        paper = "none"
        supports = frozenset()

        def implementations(self):
            return {}

    with pytest.raises(TypeError, match="lacks class attribute 'decodes'"):
        registry.register(NoClaims)
    NoClaims.decodes, NoClaims.sequence_parallel = False, ("rings",)
    with pytest.raises(ValueError, match=r"unknown schemes \['rings'\]"):
        registry.register(NoClaims)
    assert "no_claims" not in ENTRIES and "no_claims" not in {e.name for e in registry.entries()}
