"""``MultiHeadAttention.init_cache``/``decode``/``prefill`` for every registered mechanism that decodes (catalog I1),
and ``prefill`` of the other modules that decode.

For each registry entry with ``decodes=True``: stepping ``decode`` under ``nnx.jit`` over 9 tokens
equals ``layer(x, mask=masks.Causal())`` (GQA where the mechanism supports it), and ``prefill`` in
chunks of 4 and 5 tokens equals those steps, with the entry's test config
(``conformance.small_tiles``, and the sparser settings of ``tests/test_registry.py`` so that a sparse
selector leaves blocks out at 9 tokens). One mechanism per decode path runs in the default suite, the
rest are slow. A mechanism that does not decode raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, registry
from attnjax.nn import KVCache, LinearCache, MultiHeadAttention
from attnjax.nn.registry import modules
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.positional import RoPE
from attnjax.softmax import Softmax
from attnjax.testing import conformance
from experiments import bench_decode
from tests.helpers import assert_close

ENTRIES = {e.name: e for e in registry.entries()}
T = 9
MAX_LEN = 12
"""Tokens decoded and the cache size (> T, so the decode reads a partly filled cache)."""

SPARSE_AT_T = {
    "sparse_window": dict(window_blocks=0, block_q=4, block_kv=4),
    "dilated": dict(span_blocks=1, dilation=2, block_q=2, block_kv=2),
    "streaming": dict(sink_blocks=1, window_blocks=0, block_q=2, block_kv=2),
    "power": dict(window_blocks=0, block_q=2, block_kv=2),
    "radial": dict(frame_shape=(1, 1), sink_frames=0, min_window=1, block_q=1, block_kv=1),
    "s2": dict(num_shards=2, window_blocks=0, block_q=2, block_kv=2),
}
"""Configs that make each mechanism differ from softmax at ``T`` tokens (tiles of 2-4 tokens)."""

SOFTMAX_HERE = ("urpe",)
"""URPE's default ``C = 1`` is softmax, and ``MultiHeadAttention`` keeps its mechanism as a static
attribute, which cannot hold a config with an array ``c``: its decode is checked at ``C = 1`` only."""

DEFAULT = ("stick_breaking", "sparse_window", "lightning")
"""One per kind of decode path in the default suite (right-aligned KV, block pattern, linear state); softmax's
prefill is ``test_prefill_in_chunks_equals_parallel``'s, kernelized RPE's ``test_prefill_equals_parallel``'s."""

CUTS = (4,)
"""``prefill`` chunks of the 9 tokens: 4 (into an empty cache), then 5 (into a filled one)."""


def prefill_in_chunks(module, x, cuts: tuple, max_len: int):
    """``module.prefill`` over ``x [B, T, d]`` cut at ``cuts``, from ``init_cache(B, max_len)``, in one ``nnx.jit``
    program: ``(y [B, T, d], cache)``."""
    @nnx.jit(static_argnums=2)
    def run(module, x, cuts):
        cache, outs = module.init_cache(x.shape[0], max_len), []
        for start, stop in zip((0, *cuts), (*cuts, x.shape[1])):
            y, cache = module.prefill(x[:, start:stop], cache)
            outs.append(y)
        return jnp.concatenate(outs, axis=1), cache
    return run(module, x, cuts)

DECODING = [e.name for e in ENTRIES.values() if e.decodes and e.name != "softmax"]


def _config(name: str):
    config = conformance.small_tiles(ENTRIES[name].config())
    fields = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in SPARSE_AT_T.get(name, {}).items() if k in fields})


def _layer(name: str, **kwargs) -> MultiHeadAttention:
    gqa = "gqa" in ENTRIES[name].supports
    return MultiHeadAttention(16, 2, num_kv_heads=1 if gqa else 2, mechanism=_config(name), rngs=nnx.Rngs(0), **kwargs)


def _check_decode_equals_parallel(layer: MultiHeadAttention, name: str) -> None:
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, 16)), jnp.float32)
    full = layer(x, mask=masks.Causal())
    if name not in SOFTMAX_HERE:
        softmax = MultiHeadAttention(16, 2, num_kv_heads=layer.num_kv_heads, rope=layer.rope, rngs=nnx.Rngs(0))
        assert not np.allclose(full, softmax(x, mask=masks.Causal()), atol=1e-4), f"{name} equals softmax here"
    step = nnx.jit(lambda module, x_t, cache: module.decode(x_t, cache))
    cache = layer.init_cache(2, MAX_LEN)
    assert isinstance(cache, LinearCache if layer.decode_path() == "linear" else KVCache)
    outs = []
    for t in range(T):
        y, cache = step(layer, x[:, t:t + 1], cache)
        outs.append(y)
    assert int(cache.length) == T
    steps = jnp.concatenate(outs, axis=1)
    assert_close(steps, full, rtol=1e-4, atol=1e-5)
    chunked, cache = prefill_in_chunks(layer, x, CUTS, MAX_LEN)
    assert int(cache.length) == T
    assert_close(chunked, steps, rtol=1e-4, atol=1e-5, name="prefill")


@pytest.mark.filterwarnings("ignore:.*selects every block:UserWarning")
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in DECODING])
def test_decode_equals_parallel_causal_call(name):
    _check_decode_equals_parallel(_layer(name), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stick_breaking", "lightning", "softplus"])
def test_decode_with_rope(name):
    _check_decode_equals_parallel(_layer(name, rope=RoPE(base=100.0)), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stick_breaking", "softplus", "selective", "kernelized_rpe"])
def test_decode_with_t5_relative_bias(name):
    bias = functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=16)
    _check_decode_equals_parallel(_layer(name, position_bias=bias), name)


@pytest.mark.parametrize("name", ["kernelized_rpe", pytest.param("selective", marks=pytest.mark.slow)])
def test_prefill_equals_parallel(name):
    """``prefill`` in chunks of 4 and 5 tokens == the parallel causal call, without the decode steps: kernelized RPE
    (its prefill is the mechanism's causal call over the whole cache) and selective (a query temperature per
    position) in the default suite's time."""
    layer = _layer(name)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, 16)), jnp.float32)
    chunked, cache = prefill_in_chunks(layer, x, CUTS, MAX_LEN)
    assert int(cache.length) == T
    assert_close(chunked, nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x), rtol=1e-4, atol=1e-5)


def test_every_decoding_entry_has_a_path_or_a_reason():
    for name in DECODING:
        assert _layer(name).decode_path() in ("filled", "selective", "right_aligned", "block_pattern", "linear")


def test_a_mechanism_that_does_not_decode_refuses_clearly():
    layer = _layer("reversed")
    for call in (lambda: layer.init_cache(1, 4), lambda: layer.decode(jnp.zeros((1, 1, 16)), None)):
        with pytest.raises(NotImplementedError, match="'reversed' does not decode.*decodes=False"):
            call()


def test_decode_refuses_the_other_cache_type():
    layer = _layer("lightning")
    kv = MultiHeadAttention(16, 2, rngs=nnx.Rngs(0)).init_cache(1, 4)
    with pytest.raises(TypeError, match="'lightning' decodes from a LinearCache"):
        layer.decode(jnp.zeros((1, 1, 16)), kv)


@pytest.mark.slow
def test_bench_decode_families_section_smoke(tmp_path):
    """``python -m experiments.bench_decode --only families`` at tiny sizes: every program timed, ratios positive."""
    results = bench_decode.main(["--smoke", "--only", "families", "--out", str(tmp_path), "--name", "tiny"])
    section = results["sections"]["families"]
    assert len(section["rows"]) == 2 * (1 + len(bench_decode.FAMILY_REPRESENTATIVES))
    assert all(r["median_s"] > 0 for r in section["rows"]) and all(v > 0 for v in section["over_softmax"].values())
    assert "## families" in (tmp_path / "tiny.md").read_text()


@pytest.mark.parametrize("bias", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_prefill_in_chunks_equals_parallel(bias):
    """Softmax (GQA, RoPE) ``prefill`` of 4 then 5 tokens == the parallel causal call: without a position bias
    through the in-place read of the filled slots (``block_kv=5`` over 12 slots: a last block that overlaps the one
    before), with a T5 bias through ``Explicit(filled)``; bad inputs name the argument; the other cache type is
    refused."""
    bias = functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=16) if bias else None
    layer = MultiHeadAttention(16, 2, num_kv_heads=1, rope=RoPE(base=100.0), position_bias=bias,
                               mechanism=Softmax(block_kv=5), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, 16)), jnp.float32)
    chunked, cache = prefill_in_chunks(layer, x, (4,), MAX_LEN)
    assert int(cache.length) == T
    assert_close(chunked, layer(x, mask=masks.Causal()), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="x has batch 1, the cache 2"):
        layer.prefill(x[:1], cache)
    with pytest.raises(TypeError, match="'lightning' decodes from a LinearCache"):
        _layer("lightning").prefill(x, cache)


PREFILLS = [spec for spec in modules() if spec.decodes and hasattr(spec.module, "prefill")
            and spec.module is not MultiHeadAttention]
"""Registered modules other than ``MultiHeadAttention`` (whose mechanisms are checked above) that have ``prefill``."""
DEFAULT_MODULES = ("block-based",)
"""The BASED block (Taylor linear state and sliding-window ring buffer) in the default suite; the others (A-MoE,
the layers, selective) are slow (TransNormer's also runs through the language model, tests/inference)."""
REFUSES = {"routed_sparse": "'moba' does not decode from a cache"}
"""Modules that inherit ``MultiHeadAttention.prefill`` but decode through their own ``decode`` only: the refusal
they give (``RoutedSparseAttention``'s mechanism, MoBA, has no cache path of ``MultiHeadAttention``)."""


@pytest.mark.parametrize("spec", [pytest.param(s, marks=() if f"{s.kind}-{s.name}" in DEFAULT_MODULES
                                               else pytest.mark.slow) for s in PREFILLS],
                         ids=lambda s: f"{s.kind}-{s.name}")
def test_module_prefill_in_chunks_equals_parallel(spec):
    """The spec's example: ``prefill`` in chunks of 3 and ``T − 3`` tokens (more than the sliding window's 4) == the
    parallel causal call (and so ``T`` decode steps, which the module conformance suite checks equal to it)."""
    module = spec.build(nnx.Rngs(0))
    (x,) = spec.example_inputs(jax.random.key(1))
    if spec.name in REFUSES:
        with pytest.raises(NotImplementedError, match=REFUSES[spec.name]):
            module.prefill(x, module.init_cache(x.shape[0], x.shape[1]))
        return
    chunked, _ = prefill_in_chunks(module, x, (3,), x.shape[1] + 3)
    assert_close(chunked, nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(module, x), rtol=1e-4, atol=2e-5)
