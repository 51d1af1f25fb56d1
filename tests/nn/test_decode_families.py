"""``MultiHeadAttention.init_cache``/``decode`` for every registered mechanism that decodes (catalog I1).

For each registry entry with ``decodes=True``: stepping ``decode`` under ``nnx.jit`` over 9 tokens
equals ``layer(x, mask=masks.Causal())`` (GQA where the mechanism supports it), with the entry's
test config (``conformance.small_tiles``, and the sparser settings of ``tests/test_registry.py`` so
that a sparse selector leaves blocks out at 9 tokens). One mechanism per decode path runs in the
default suite, the rest are slow. A mechanism that does not decode raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks, registry
from attnjax.nn import KVCache, LinearCache, MultiHeadAttention
from attnjax.nn.positional.t5 import T5RelativeBias
from attnjax.positional import RoPE
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

NO_CACHE_PATH = ("simplicial_2",)
"""Entries that decode from a KV cache in the registry's sense but take only ``None``/``Causal()``
masks, so ``MultiHeadAttention`` cannot restrict them to the filled slots of a fixed-size cache."""

DEFAULT = ("stick_breaking", "sparse_window", "lightning")
"""One per kind of decode path in the default suite (right-aligned KV, block pattern, linear state)."""

DECODING = [e.name for e in ENTRIES.values() if e.decodes and e.name != "softmax" and e.name not in NO_CACHE_PATH]


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
    assert_close(jnp.concatenate(outs, axis=1), full, rtol=1e-4, atol=1e-5)


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


def test_every_decoding_entry_has_a_path_or_a_reason():
    for name in DECODING:
        assert _layer(name).decode_path() in ("filled", "selective", "right_aligned", "block_pattern", "linear")
    for name in NO_CACHE_PATH:
        with pytest.raises(NotImplementedError, match=f"{name}.*filled slots"):
            _layer(name).init_cache(1, 4)


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


def test_prefill_in_chunks_equals_parallel_and_other_paths_refuse():
    """``prefill`` of 4 then 5 tokens (softmax, GQA, RoPE, a T5 bias) == the parallel causal call; a mechanism
    that decodes through another path refuses prefill and names it; bad inputs name the argument."""
    bias = functools.partial(T5RelativeBias, bidirectional=False, num_buckets=8, max_distance=16)
    layer = MultiHeadAttention(16, 2, num_kv_heads=1, rope=RoPE(base=100.0), position_bias=bias, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, T, 16)), jnp.float32)
    prefill = nnx.jit(lambda module, x, cache: module.prefill(x, cache))
    first, cache = prefill(layer, x[:, :4], layer.init_cache(2, MAX_LEN))
    second, cache = prefill(layer, x[:, 4:], cache)
    assert int(cache.length) == T
    assert_close(jnp.concatenate([first, second], axis=1), layer(x, mask=masks.Causal()), rtol=1e-4, atol=1e-5)
    with pytest.raises(NotImplementedError, match="'stick_breaking' decodes through the 'right_aligned' path"):
        _layer("stick_breaking").prefill(x, cache)
    with pytest.raises(ValueError, match="x has batch 1"):
        layer.prefill(x[:1], cache)
