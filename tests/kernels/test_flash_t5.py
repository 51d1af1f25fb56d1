"""T5's relative position bias (``attnjax.positional.T5Bias``) inside the Pallas flash kernels.

The GPU (Triton) kernel runs in Pallas interpret mode and the TPU (Mosaic) kernel in TPU interpret
mode, each against ``attnjax.softmax.softmax_attention_reference`` with the same rule: the output
and the gradients of q, k, v and the table, in one jit per case (interpret mode compiles slowly).
Lengths T=21, S=37 with 16-wide blocks leave ragged tiles; GQA puts 4 query heads on 2 KV heads;
``max_distance=20`` with 37 keys reaches the log-spaced and the last buckets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import masks
from attnjax.positional.t5 import T5Bias, t5_relative_buckets
from attnjax.softmax.softmax import softmax_attention_reference
from pallas_kernels.common.mask_plans import tile_iotas
from pallas_kernels.common.scores import T5Buckets, t5_bucket_tile, t5_table_grad, t5_tile
from pallas_kernels.flash import common
from pallas_kernels.flash.gpu import flash_attention_gpu
from pallas_kernels.flash.ops import flash_attention_pallas
from pallas_kernels.flash.tpu import flash_attention_tpu
from tests.helpers import TOLERANCE, assert_close, random_qkv

T, S, BLOCKS = 21, 37, dict(block_q=16, block_kv=16)


def value_and_grads(fn, args, num_float_args=4):
    """``fn(*args)`` and the gradients of ``Σ fn(*args)·w`` (fixed random ``w``) w.r.t. the first
    ``num_float_args`` args, in one jit compiled at XLA's lowest backend optimization level
    (interpret mode is compile-bound); the rest (an int query offset) are traced too."""
    w = jax.random.normal(jax.random.PRNGKey(123), jax.eval_shape(fn, *args).shape, jnp.float32)

    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    jitted = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(num_float_args)), has_aux=True))
    compiled = jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    (_, out), g = compiled(*args)
    return out, g


def check_against_reference(kernel, args, *, mask, query_offset=None, **rule):
    """``kernel(q, k, v, mask=, bias=T5Bias(table, **rule))`` against the reference, forward and
    the gradients of q, k, v and the table; ``query_offset`` (an int) is passed traced. Returns the
    table's gradient."""
    def run(attend):
        def f(q, k, v, table, *offset):
            return attend(q, k, v, mask=mask, bias=T5Bias(table, **rule, query_offset=offset[0] if offset else None))
        return f

    args = tuple(args) + (() if query_offset is None else (jnp.int32(query_offset),))
    out, grads = value_and_grads(run(kernel), args)
    want, want_grads = value_and_grads(run(softmax_attention_reference), args)
    assert_close(out, want, rtol=TOLERANCE[jnp.float32], name="out")
    for name, g, e in zip(("q", "k", "v", "table"), grads, want_grads):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert_close(g, e, rtol=TOLERANCE[jnp.float32], name=f"d{name}")
    return grads[3]


def inputs(columns):
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=2, T=T, S=S, Hq=4, Hkv=2, D=16)
    return q, k, v, jax.random.normal(jax.random.PRNGKey(1), (16, columns))


def gpu(q, k, v, **kw):
    return flash_attention_gpu(q, k, v, interpret=True, **BLOCKS, **kw)


def tpu(q, k, v, **kw):
    return flash_attention_tpu(q, k, v, interpret=True, **BLOCKS, **kw)


def test_gpu_kernel_causal_gqa_per_head_table():
    d_table = check_against_reference(gpu, inputs(4), mask=masks.Causal(), bidirectional=False, max_distance=20)
    assert np.count_nonzero(np.asarray(d_table)) > d_table.size // 2, "most buckets receive gradient"


@pytest.mark.slow
def test_api_pallas_reaches_the_kernel_bidirectional_shared_column_with_query_offset():
    """Through ``attnjax.attention(implementation="pallas")`` (the GPU kernel, interpreted on CPU):
    bidirectional buckets, a 1-column table shared by the heads, a traced ``query_offset``."""
    def attend(q, k, v, mask, bias):
        return aj.attention(q, k, v, mask=mask, bias=bias, implementation="pallas")

    args = inputs(1)
    assert "pallas_call" in str(jax.make_jaxpr(lambda q, k, v, t: attend(q, k, v, None, T5Bias(t)))(*args))
    d_table = check_against_reference(attend, args, mask=None, query_offset=9, bidirectional=True, max_distance=20)
    # Every bucket but 8 (bidirectional "key after the query at distance 0": never occurs) is reached.
    assert d_table.shape == (16, 1) and np.flatnonzero(np.asarray(d_table) == 0).tolist() == [8]


@pytest.mark.slow
def test_tpu_kernel_causal_gqa_shared_column():
    check_against_reference(tpu, inputs(1), mask=masks.Causal(), bidirectional=False, max_distance=20)


@pytest.mark.slow
def test_tpu_kernel_bidirectional_per_head_table_with_query_offset():
    check_against_reference(tpu, inputs(4), mask=None, query_offset=9, bidirectional=True, max_distance=20)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_hardware(platform):
    """Forward and backward with a T5 bias (traced query offset) lower to Triton / Mosaic
    (cross-lowering from the CPU host; no run)."""
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=1, T=128, Hq=4, Hkv=2, D=64, dtype=jnp.bfloat16)
    backend = "gpu" if platform == "cuda" else "tpu"

    def loss(q, k, v, table, offset):
        rule = T5Bias(table, bidirectional=False, query_offset=offset)
        out = flash_attention_pallas(q, k, v, mask=masks.Causal(), bias=rule, backend=backend, interpret=False)
        return out.astype(jnp.float32).sum()

    args = (q, k, v, jnp.zeros((32, 4)), jnp.int32(0))
    text = jax.jit(jax.grad(loss, (0, 1, 2, 3))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    for kernel in ("fwd", "dq", "dkdv"):
        assert f"attnjax_flash_{'tpu_' if platform == 'tpu' else ''}{kernel}" in text


@pytest.mark.parametrize("bidirectional", [True, False])
def test_tile_helpers_equal_the_rule(bidirectional):
    """``t5_bucket_tile`` is ``t5_relative_buckets`` on a tile (bit for bit), ``t5_tile`` reads the
    table like the rule's dense form, and ``t5_table_grad`` equals a scatter-add of dS by bucket."""
    spec = T5Buckets(num_buckets=16, bidirectional=bidirectional, max_distance=20)
    rng = np.random.default_rng(0)
    table, ds = rng.standard_normal((16, 3), np.float32), rng.standard_normal((16, 16), np.float32)

    @jax.jit
    def run(table, ds):
        rows, cols = tile_iotas(1, 2, 16, 16)  # query rows 16..31, key columns 32..47
        buckets = t5_bucket_tile(rows, cols, S - T, spec)
        direct = t5_relative_buckets(cols - rows - (S - T), bidirectional=bidirectional, num_buckets=16,
                                     max_distance=20)
        dense = T5Bias(table, bidirectional=bidirectional, max_distance=20).dense(T, S)[0, 2, 16:, 32:]
        scatter = jax.ops.segment_sum(ds.reshape(-1), buckets.reshape(-1), num_segments=16)
        return (buckets, direct, t5_tile(list(table[:, 2]), buckets), dense, scatter,
                t5_table_grad(ds, buckets, jnp.zeros(32), 16), t5_table_grad(ds, buckets, jnp.zeros((8, 16)), 16))

    buckets, direct, values, dense, scatter, one_d, two_d = run(table, ds)
    np.testing.assert_array_equal(buckets, direct)
    assert len(np.unique(buckets)) >= 6
    np.testing.assert_array_equal(values, table[np.asarray(buckets), 2])
    np.testing.assert_array_equal(values[:T - 16, :S - 32], dense)
    assert_close(one_d, np.pad(scatter, (0, 16)), name="1-D sums")
    assert_close(two_d, np.broadcast_to(scatter, (8, 16)), name="2-D sums")


def test_classify_and_refusals():
    rule = T5Bias(jnp.zeros((16, 2)))
    assert common.classify_bias(rule) == ("t5", rule)
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=1, T=8, Hq=2, D=8)
    with pytest.raises(ValueError, match="query_offset"):
        flash_attention_gpu(q, k, v, bias=T5Bias(jnp.zeros((16, 2)), query_offset=jnp.zeros(2, jnp.int32)))
    with pytest.raises(ValueError, match=r"T5Bias table has shape \(16, 3\)"):
        flash_attention_tpu(q, k, v, bias=T5Bias(jnp.zeros((16, 3))), interpret=True)
