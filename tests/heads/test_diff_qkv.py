"""DiffQKV (Lin et al. 2025, "Sigma", Fig. 3): K and V with different head counts in
``attnjax.attention``'s calling convention, ``k [B, S, Hk, D]``, ``v [B, S, Hv, Dv]``.

Every path (the reference, the blocked xla path, the GPU and TPU flash kernels in interpret mode,
ring attention on the 8 fake devices) against a naive attention written here that repeats K and V
explicitly to the ``Hq`` query heads; the gradients of K and V are those of the repeated arrays
summed over each head's query group (``dK`` over K's group, ``dV`` over V's own). Head counts that
nest both ways (``Hv = Hk/2``, the issue's case, and ``Hk < Hv``, the paper's) and that don't
(``Hk = 2``, ``Hv = 3``); odd lengths, cross lengths, causal masks. The kernels' Triton and
Mosaic lowerings are checked from the CPU host. The module and its cache are in
``tests/nn/test_sigma.py``; the registry conformance suite adds a "kv_heads" case.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import attnjax as aj
from attnjax import masks
from attnjax.api import attention
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked.scores import repeat_to_common_heads
from attnjax.blocked.tiles import regroup
from attnjax.checks import check_qkv
from attnjax.parallel.ring import ring_attention_sharded
from attnjax.positional import ALiBi, alibi_slopes
from attnjax.softmax.softmax import Softmax, softmax_attention_reference
from pallas_kernels.common.statics import FlashStatic
from pallas_kernels.flash.ops import flash_attention_pallas
from pallas_kernels.flash.tpu import flash_attention_tpu
from tests.helpers import assert_close, numpy_rng

KEY = jax.random.PRNGKey(0)


def qkv(Hq, Hk, Hv, B=1, T=13, S=19, D=8, Dv=6, seed=0, dtype=jnp.float32):
    rng = numpy_rng(jax.random.PRNGKey(seed))
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                 for shape in ((B, T, Hq, D), (B, S, Hk, D), (B, S, Hv, Dv)))


def naive(q, k, v, **options):
    """Softmax attention on K and V repeated explicitly to the ``Hq`` query heads (plain MHA)."""
    Hq = q.shape[2]
    return softmax_attention_reference(q, jnp.repeat(k, Hq // k.shape[2], 2), jnp.repeat(v, Hq // v.shape[2], 2),
                                       **options)


def naive_out_and_grads(q, k, v, w, **options):
    """Output and gradients of ``Σ out·w`` by plain MHA on repeated K and V; the K and V gradients are
    the repeated arrays' gradients summed over each head's query group, written out."""
    Hq, Hk, Hv = q.shape[2], k.shape[2], v.shape[2]
    kr, vr = jnp.repeat(k, Hq // Hk, 2), jnp.repeat(v, Hq // Hv, 2)

    def loss(q, kr, vr):
        out = softmax_attention_reference(q, kr, vr, **options)
        return jnp.sum(out * w), out

    (_, out), (dq, dkr, dvr) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, kr, vr)
    dk = dkr.reshape(*dkr.shape[:2], Hk, Hq // Hk, -1).sum(3)  # query head h = hk·(Hq/Hk) + g
    dv = dvr.reshape(*dvr.shape[:2], Hv, Hq // Hv, -1).sum(3)
    return out, (dq, dk, dv)


def out_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def check(actual, expected, rtol=None):
    for name, a, e in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert_close(a, e, rtol=rtol, name=name)


HEADS = {"hv_half_hk": (4, 2, 1), "hk_below_hv": (4, 1, 2), "not_nested": (6, 2, 3)}
"""``(Hq, Hk, Hv)``: V coarser than K (the issue's ``Hv = Hk/2``), K coarser (the paper's direction:
K compressed more), and neither dividing the other (query head ``h`` reads K ``h // 3``, V ``h // 2``)."""


@pytest.mark.parametrize("heads", ["hv_half_hk", "hk_below_hv",
                                   pytest.param("not_nested", marks=pytest.mark.slow)])  # in the conformance suite
def test_reference_and_xla_equal_explicit_repeat_forward_and_grads(heads):
    """Odd, unequal lengths (13 queries, 19 keys: bottom-right causal), tiles of 8, ``Dv != D``."""
    q, k, v = qkv(*HEADS[heads])
    w = jnp.asarray(numpy_rng(KEY).standard_normal(q.shape[:3] + v.shape[3:], np.float32))
    config = Softmax(block_q=8, block_kv=8)

    @jax.jit
    def run(q, k, v):
        paths = {impl: out_and_grads(functools.partial(attention, mechanism=config, mask=masks.Causal(),
                                                       implementation=impl), q, k, v, w)
                 for impl in ("reference", "xla")}
        return paths, naive_out_and_grads(q, k, v, w, mask=masks.Causal())

    paths, expected = run(q, k, v)
    for impl, result in paths.items():
        check(result, expected)
    assert paths["xla"][0].shape == q.shape[:3] + (v.shape[3],)


@pytest.mark.slow
def test_xla_lse_sinks_soft_cap_and_bias_with_separate_heads():
    """The row statistic, sinks, a soft cap and an array bias through the blocked path (forward and the
    sinks' and bias's gradients), against the explicit repeat."""
    q, k, v = qkv(*HEADS["not_nested"], T=11, S=11)
    rng = numpy_rng(KEY)
    sinks = jnp.asarray(rng.standard_normal((6,)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((1, 6, 11, 11)), jnp.float32)

    def loss(fn, sinks, bias):
        out, lse = fn(q, k, v, sinks=sinks, bias=bias, logits_soft_cap=4.0, return_lse=True)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(lse), (out, lse)

    xla = functools.partial(flash_attention_xla, block_q=4, block_kv=8)
    actual, expected = (jax.jit(jax.grad(functools.partial(loss, fn), (0, 1), has_aux=True))(sinks, bias)
                        for fn in (xla, naive))
    for name, a, e in zip(("dsinks", "dbias", "out", "lse"), jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert_close(a, e, name=name)


def test_gpu_kernel_interpret_k_coarser_than_v_with_alibi_and_sinks():
    """The Triton kernel in interpret mode, ``Hk = 1 < Hv = 2``: its key-major pass runs one head block
    of 4 query heads (one K group, two V groups); ALiBi and sinks are indexed by the query head."""
    Hq, Hk, Hv = HEADS["hk_below_hv"]
    q, k, v = qkv(Hq, Hk, Hv, T=21, S=27, Dv=12)
    options = dict(mask=masks.Causal(), bias=ALiBi(alibi_slopes(Hq)), sinks=jnp.linspace(-1.0, 1.0, Hq))
    w = jnp.asarray(numpy_rng(KEY).standard_normal((1, 21, Hq, 12), np.float32))
    kernel = functools.partial(flash_attention_pallas, block_q=16, block_kv=16, backend="cpu", **options)
    actual = jax.jit(lambda q, k, v: out_and_grads(kernel, q, k, v, w))(q, k, v)
    check(actual, jax.jit(lambda q, k, v: naive_out_and_grads(q, k, v, w, **options))(q, k, v))


@pytest.mark.slow  # run with --runslow; keeps the default suite under 20 minutes on 2 cores
def test_tpu_kernel_interpret_heads_that_do_not_nest_with_alibi_and_sinks():
    """The Mosaic kernel in TPU interpret mode, ``Hk = 2``, ``Hv = 3`` (``gcd = 1``: one head block of
    6 query heads holding 2 K groups of 3 and 3 V groups of 2, each summed and written on its own)."""
    Hq, Hk, Hv = HEADS["not_nested"]
    q, k, v = qkv(Hq, Hk, Hv, T=21, S=27)
    options = dict(mask=masks.Causal(), bias=ALiBi(alibi_slopes(Hq)), sinks=jnp.linspace(-1.0, 1.0, Hq))
    w = jnp.asarray(numpy_rng(KEY).standard_normal((1, 21, Hq, 6), np.float32))
    kernel = functools.partial(flash_attention_tpu, block_q=16, block_kv=16, interpret=True, **options)
    actual = jax.jit(lambda q, k, v: out_and_grads(kernel, q, k, v, w))(q, k, v)
    check(actual, jax.jit(lambda q, k, v: naive_out_and_grads(q, k, v, w, **options))(q, k, v))


def test_key_major_head_blocks():
    """``gcd(Hk, Hv)`` head blocks of whole K and V groups; GQA keeps one block per KV head."""
    def static(Hq, Hk, Hv):
        return FlashStatic(T=8, S=8, T_pad=8, S_pad=8, num_q_heads=Hq, num_kv_heads=Hk, D=8, Dv=8, D_pad=8,
                           Dv_pad=8, block_q=8, block_kv=8, scale=1.0, logits_soft_cap=None, weight_fn=None,
                           mask_plan=None, bias_kind=None, num_v_heads=Hv)

    assert [(s.head_blocks, s.block_heads, s.group, s.v_group) for s in
            (static(8, 2, 2), static(8, 4, 2), static(6, 2, 3), static(8, 8, 1))] == [
        (2, 4, 4, 4), (2, 4, 2, 4), (1, 6, 3, 2), (1, 8, 1, 8)]
    assert static(8, 2, None).v_heads == 2


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_hardware(platform):
    """Forward and backward with ``Hk = 4``, ``Hv = 2`` lower to Triton / Mosaic from the CPU host (no run)."""
    q, k, v = qkv(8, 4, 2, T=256, S=256, D=64, Dv=128, dtype=jnp.bfloat16)
    backend, block = ("gpu", 64) if platform == "cuda" else ("tpu", 128)

    def loss(q, k, v):
        out = flash_attention_pallas(q, k, v, mask=masks.Causal(), backend=backend, interpret=False, block_q=block,
                                     block_kv=block)
        return out.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
    for kernel in ("fwd", "dq", "dkdv"):
        assert f"attnjax_flash_{'tpu_' if platform == 'tpu' else ''}{kernel}" in text


def test_ring_attention_on_eight_devices():
    """Ring attention with ``Hv = Hk/2`` over the 8 fake devices (4 tokens each, zigzag layout: every
    rank's steps see both past and future blocks), forward and gradients."""
    layout = "zigzag"
    mesh = jax.make_mesh((8,), ("sp",))
    q, k, v = qkv(4, 2, 1, B=2, T=32, S=32)
    w = jnp.asarray(numpy_rng(KEY).standard_normal((2, 32, 4, 6), np.float32))
    to, back = (functools.partial(f, layout=layout, world=8) for f in (aj.parallel.to_layout, aj.parallel.from_layout))

    def ring(q, k, v):
        return back(ring_attention_sharded(to(q), to(k), to(v), mesh=mesh, seq_axis="sp", layout=layout,
                                           mask=masks.Causal()))

    put = functools.partial(jax.device_put, device=NamedSharding(mesh, P(None, "sp")))
    actual = jax.jit(lambda q, k, v: out_and_grads(ring, q, k, v, w))(put(q), put(k), put(v))
    check(actual, jax.jit(lambda q, k, v: naive_out_and_grads(q, k, v, w, mask=masks.Causal()))(q, k, v))


def test_one_query_against_unequal_caches_is_the_row_of_causal_attention():
    """Decoding: a query at position t against the first t+1 keys and values gives row t."""
    q, k, v = qkv(4, 2, 1, T=16, S=16)
    t = 9

    @jax.jit
    def rows(q, k, v):
        full = attention(q, k, v, mask=masks.Causal())
        return full[:, t], attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], mask=masks.Causal())[:, 0]

    assert_close(*rows(q, k, v), name=f"row {t}")


def test_bf16_is_finite_and_keeps_the_dtype():
    q, k, v = qkv(6, 2, 3, T=16, S=16, dtype=jnp.bfloat16)
    out = jax.jit(lambda q, k, v: attention(q, k, v, mask=masks.Causal(), implementation="xla"))(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 16, 6, 6)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_common_heads_and_regroup():
    """The reference's explicit repeat to ``lcm(Hk, Hv)`` heads, and the blocked path's regroup of a tile."""
    _, k, v = qkv(6, 2, 3)
    k6, v6 = repeat_to_common_heads(k, v)
    assert k6.shape[2] == v6.shape[2] == 6
    np.testing.assert_array_equal(k6[:, :, 4], k[:, :, 1])  # group 4 of 6: K head 4 // 3
    np.testing.assert_array_equal(v6[:, :, 4], v[:, :, 2])  # V head 4 // 2
    x = jnp.arange(2 * 3 * 5).reshape(1, 2, 3, 5)  # [B, Hk=2, Gk=3, ...]
    y = regroup(x, 3)  # [B, Hv=3, Gv=2, ...]: query head h = hk·3 + g = hv·2 + g'
    assert y.shape == (1, 3, 2, 5)
    np.testing.assert_array_equal(y.reshape(1, 6, 5), x.reshape(1, 6, 5))
    assert regroup(x, 2) is x


def test_errors():
    q, k, v = qkv(4, 2, 1)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of v heads \(3\)"):
        attention(q, k, jnp.concatenate([v] * 3, axis=2))
    with pytest.raises(ValueError, match=r"k and v must agree on \[seq, heads\].*'kv_heads' option"):
        check_qkv(q, k, v)  # an entry point that takes one K/V head count
    check_qkv(q, k, v, kv_heads=True)
    with pytest.raises(ValueError, match="k and v must agree on seq"):
        attention(q, k, v[:, :5])
    with pytest.raises(NotImplementedError, match=r"does not support \['kv_heads'\]"):
        attention(q, k, v, mechanism="sigmoid")
    mesh = jax.make_mesh((1,), ("sp",))
    for scheme in ("allgather", "ulysses"):  # schemes that take one K/V head count refuse clearly
        with pytest.raises(ValueError, match="'kv_heads' option"):
            aj.parallel.SHARDED[scheme](q, k[:, :13], v[:, :13], mesh=mesh, seq_axis="sp")
