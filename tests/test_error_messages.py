"""Bad input through the public API gets a short error that names the argument and never prints
array values (CONTRIBUTING: name the argument, the shapes seen and the shapes expected).

Each case passes arrays large enough that printing them would show: 64 values or more.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import attnjax as aj
from attnjax import masks, parallel
from attnjax.linear import linear_attention

MAX_LENGTH = 400
"""Longest message allowed (the longest reason here, grouped by "auto" over its paths, is ~310)."""

ARRAY_PRINT = re.compile(r"Array\(|array\(|\[\s*-?\d[\d.e+-]*\s+-?\d[\d.e+-]*\s+-?\d")
"""An array printed by value: ``Array(`` / ``array(`` or three whitespace-separated numbers in brackets
(NumPy's print; shapes print with commas)."""

RNG = np.random.default_rng(0)
Q, K, V = (jnp.asarray(RNG.standard_normal((2, 64, 4, 8)), jnp.float32) for _ in range(3))
DENSE = masks.Explicit(jnp.asarray(RNG.random((2, 1, 64, 64)) > 0.5))
IDS = jnp.asarray(np.repeat(np.arange(8), 8)[None].repeat(2, 0), jnp.int32)


def _mesh():
    return Mesh(np.array(jax.devices()[:8]), ("sp",))


CASES = {
    "q rank": (lambda: aj.attention(Q[0], K, V), ValueError, r"\bq\b"),
    "integer q": (lambda: aj.attention(Q.astype(jnp.int32), K, V), TypeError, r"\bq\b"),
    "head dims": (lambda: aj.attention(Q, K[..., :4], V), ValueError, "head_dim"),
    "bias shape": (lambda: aj.attention(Q, K, V, bias=jnp.ones((3, 3, 64, 64))), ValueError, "bias"),
    "sinks shape": (lambda: aj.attention(Q, K, V, sinks=jnp.ones((64,))), ValueError, "sinks"),
    "scale array": (lambda: aj.attention(Q, K, V, scale=jnp.full((64,), -1.0)), ValueError, "scale"),
    "traced scale": (lambda: jax.jit(lambda s: aj.attention(Q, K, V, scale=s))(0.5), TypeError, "scale"),
    "dropout array": (lambda: aj.attention(Q, K, V, dropout_rate=jnp.full((64,), 0.5)), ValueError, "dropout_rate"),
    "explicit mask shape": (lambda: aj.attention(Q, K, V, mask=masks.Explicit(jnp.ones((2, 1, 63, 64), bool))),
                            ValueError, "mask"),
    "segment ids shape": (lambda: aj.attention(Q, K, V, mask=masks.Segments(jnp.ones((2, 63), jnp.int32))),
                          ValueError, "segment_ids"),
    "linear with a dense mask": (lambda: aj.attention(Q, K, V, mechanism="linear", mask=DENSE),
                                 NotImplementedError, "mask"),
    "stick-breaking without causality": (
        lambda: aj.attention(Q, K, V, mechanism="stick_breaking", mask=masks.Segments(IDS)),
        NotImplementedError, "mask"),
    "decay out of range": (lambda: linear_attention(Q[:, :, :1].repeat(64, 2), K[:, :, :1].repeat(64, 2),
                                                    V[:, :, :1].repeat(64, 2), decay=jnp.full((64,), 1.5),
                                                    causal=True), ValueError, "decay"),
    "cu_seqlens": (lambda: linear_attention(Q[:1], K[:1], V[:1], causal=True,
                                            cu_seqlens=jnp.asarray(np.arange(0, 200, 3), jnp.int32)),
                   ValueError, "cu_seqlens"),
    "unknown mechanism": (lambda: aj.attention(Q, K, V, mechanism="sofmax"), ValueError, "mechanism"),
    "unknown implementation": (lambda: aj.attention(Q, K, V, implementation="palas"), ValueError, "implementation"),
    "block ids out of range": (lambda: aj.sparse.from_block_ids(np.arange(64).reshape(1, 1, 1, 64),
                                                                np.ones((1, 1, 1, 64), bool), 16, 16, 8),
                               ValueError, "ids"),
    "selector window": (lambda: aj.sparse.SparseWindow(window_blocks=np.arange(64)), ValueError, "window_blocks"),
    "MoA block size": (lambda: aj.sparse.MoA(block_q=np.arange(64)), ValueError, "block_q"),
    "XAttention block size": (lambda: aj.sparse.XAttention(block_q=np.arange(64)), ValueError, "block_q"),
    "VMoBA chunk": (lambda: aj.registry.get("vmoba")(chunk_2d=np.arange(64)), ValueError, "chunk_2d"),
    "softplus train_length": (lambda: aj.softmax.Softplus(train_length=np.arange(64)), ValueError, "train_length"),
    "sliding window size": (lambda: masks.SlidingWindow(left=np.arange(64)), ValueError, "left"),
    "rope factor": (lambda: aj.positional.RoPE(scaling="linear", factor=np.arange(64.0)), ValueError, "factor"),
    "sigmoid bias": (lambda: aj.softmax.Sigmoid(bias=np.arange(64.0)), ValueError, "bias"),
    "rope positions": (lambda: aj.positional.RoPE()(Q, jnp.arange(63)), ValueError, "positions"),
    "ring segment ids": (lambda: parallel.ring_attention_sharded(Q, K, V, mesh=_mesh(), seq_axis="sp",
                                                                 segment_ids=jnp.ones((2, 63), jnp.int32)),
                         ValueError, "segment_ids"),
    "ring with a dense mask": (lambda: parallel.ring_attention_sharded(Q, K, V, mesh=_mesh(), seq_axis="sp",
                                                                       mask=DENSE), NotImplementedError, "mask"),
    "lasp2 decay shape": (lambda: parallel.lasp2_sharded(Q, K, V, mesh=_mesh(), seq_axis="sp",
                                                         decay=jnp.full((4, 64), 0.5)), ValueError, "decay"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_short_message_naming_the_argument(case):
    call, error, names = CASES[case]
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    assert re.search(names, message), f"{case}: the message does not name the argument: {message!r}"
    assert len(message) < MAX_LENGTH, f"{case}: {len(message)} characters: {message!r}"
    assert not ARRAY_PRINT.search(message), f"{case}: the message prints array values: {message!r}"


def test_array_print_pattern_catches_printed_arrays():
    assert ARRAY_PRINT.search(f"got {np.full(64, 1.5)}") and ARRAY_PRINT.search(f"got {jnp.arange(3)!r}")
    assert not ARRAY_PRINT.search("shape (2, 1, 64, 64), expected [B, H, T, S] = [2, 4, 64, 64]")
