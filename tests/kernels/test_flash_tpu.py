"""The Pallas TPU flash-attention kernel (``pallas_kernels.flash.tpu``) against
``attnjax.softmax.softmax_attention_reference``, in TPU interpret mode on CPU.

Interpret mode compiles slowly, so each case runs forward and backward in one jitted VJP and
combines several features; small blocks (16) make T and S span several, ragged tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.positional import ALiBi, alibi_slopes
from attnjax.softmax.softmax import softmax_attention_reference
from pallas_kernels.common import FlashStatic
from pallas_kernels.flash import common, tpu
from pallas_kernels.flash.tpu import flash_attention_tpu
from tests.helpers import TOLERANCE, assert_close, random_qkv

BLOCKS = dict(block_q=16, block_kv=16)


def _value_and_vjp(fn, args, seed=0):
    """``fn(*args)`` and the gradients of ``Σ fn(*args)·w`` (fixed random ``w``, per output), in
    one jit: the interpret-mode kernels compile once."""
    shapes = jax.eval_shape(fn, *args)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    w = jax.tree.unflatten(tree, [jax.random.normal(key, s.shape, jnp.float32) for key, s in zip(keys, leaves)])

    @jax.jit
    def run(*a):
        out, pull = jax.vjp(fn, *a)
        cotangent = jax.tree.map(lambda x, c: jnp.where(jnp.isfinite(x), c, 0.0).astype(x.dtype), out, w)
        return out, pull(cotangent)

    return run(*args)


def _check(kernel, args, names, rtol=None):
    """Kernel vs reference (both called as ``fn(*args)``): outputs and gradients of every arg."""
    out, grads = _value_and_vjp(kernel, args)
    ref_out, ref_grads = _value_and_vjp(lambda *a: kernel(*a, reference=True), args)
    rtol = rtol or TOLERANCE[jnp.float32]
    for name, a, e in zip(("out", "lse"), jax.tree.leaves(out), jax.tree.leaves(ref_out)):
        finite = np.isfinite(np.asarray(e))
        np.testing.assert_array_equal(np.isfinite(np.asarray(a)), finite, err_msg=f"{name}: -inf rows differ")
        assert_close(jnp.where(finite, a, 0.0), jnp.where(finite, e, 0.0), rtol=rtol, name=name)
    for name, a, e in zip(names, grads, ref_grads):
        assert_close(a, e, rtol=rtol, name=f"d{name}")
    return out, grads


def _attention(interpret=True, **options):
    """``f(q, k, v, [sinks], reference=False)`` for the kernel (or the reference) with ``options``."""
    def f(q, k, v, sinks=None, reference=False):
        if reference:
            kwargs = {n: x for n, x in options.items() if n not in ("block_q", "block_kv")}
            return softmax_attention_reference(q, k, v, sinks=sinks, **kwargs)
        return flash_attention_tpu(q, k, v, sinks=sinks, interpret=interpret, **options)
    return f


def test_no_mask_ragged_lengths_dv_and_lse():
    """T = S = 40 (not a multiple of 16), Dv != D; lse returned and differentiated."""
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=1, T=40, Hq=2, D=16, Dv=8)
    _check(_attention(return_lse=True, **BLOCKS), (q, k, v), "qkv")


def test_causal_gqa_cross_lengths_sinks():
    """Causal with T != S (bottom-right), GQA (4 query heads on 2 KV heads), per-head sinks."""
    q, k, v = random_qkv(jax.random.PRNGKey(1), B=2, T=24, S=40, Hq=4, Hkv=2, D=16)
    sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
    _check(_attention(mask=masks.Causal(), **BLOCKS), (q, k, v, sinks), ["q", "k", "v", "sinks"])


def test_sliding_window_soft_cap_alibi():
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=1, T=40, Hq=2, D=16)
    options = dict(mask=masks.SlidingWindow(12, 3), logits_soft_cap=3.0, bias=ALiBi(alibi_slopes(2)))
    _check(_attention(**options, **BLOCKS), (q, k, v), "qkv")


def test_chunked_causal_and_segments_gqa():
    """A combination: chunked causal & packed segments (ids as kernel inputs), with GQA."""
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=2, T=40, Hq=2, Hkv=1, D=16)
    ids = jnp.array([[0] * 10 + [1] * 25 + [2] * 5, [0] * 30 + [1] * 10])
    mask = masks.ChunkedCausal(16) & masks.Segments(ids)
    _check(_attention(mask=mask, **BLOCKS), (q, k, v), "qkv")


def test_very_negative_logits_after_an_empty_tile():
    """Rows that see nothing in their first key tile, then only logits near -300: the running max
    must start from -inf, not 0, or exp(-300) underflows and the row comes out empty."""
    q, k, v = random_qkv(jax.random.PRNGKey(9), B=1, T=40, Hq=1, D=16)
    k = jnp.broadcast_to(k[:, :1], k.shape)
    q = -1200.0 * jnp.broadcast_to(k[:, :1], q.shape) / jnp.sum(k[0, 0, 0] ** 2)  # s = q·k / 4 = -300
    mask = masks.SlidingWindow(4, 0)
    out = flash_attention_tpu(q, k, v, mask=mask, interpret=True, **BLOCKS)
    assert_close(out, softmax_attention_reference(q, k, v, mask=mask), name="out")


def test_bf16_causal():
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=1, T=40, Hq=2, D=16, dtype=jnp.bfloat16)
    out, _ = _check(_attention(mask=masks.Causal(), **BLOCKS), (q, k, v), "qkv", rtol=TOLERANCE[jnp.bfloat16])
    assert out.dtype == jnp.bfloat16


def test_fully_masked_rows_are_zero_with_finite_grads():
    """Query rows whose segment id has no key: output 0, lse -inf, gradients finite (and equal)."""
    q, k, v = random_qkv(jax.random.PRNGKey(5), B=1, T=24, Hq=2, D=16)
    q_ids = jnp.array([[0] * 8 + [7] * 4 + [1] * 12])
    kv_ids = jnp.array([[0] * 12 + [1] * 12])
    (out, lse), grads = _check(_attention(mask=masks.Segments(q_ids, kv_ids), return_lse=True, **BLOCKS),
                               (q, k, v), "qkv")
    np.testing.assert_array_equal(np.asarray(out[:, 8:12]), 0.0)
    assert np.all(np.asarray(lse[:, 8:12]) == -np.inf)
    np.testing.assert_array_equal(np.asarray(grads[0][:, 8:12]), 0.0)


def test_sigmoid_weight_function():
    """The score-to-weight extension point: sigmoid attention against a naive einsum."""
    q, k, v = random_qkv(jax.random.PRNGKey(6), B=1, T=24, S=40, Hq=2, D=16)
    fn = common.SigmoidWeight(bias=-1.0)
    mask = masks.Causal()

    def f(q, k, v, reference=False):
        if not reference:
            return flash_attention_tpu(q, k, v, mask=mask, weight_fn=fn, interpret=True, **BLOCKS)
        s = jnp.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
        w = jnp.where(mask.dense(24, 40), jax.nn.sigmoid(s - 1.0), 0.0)
        return jnp.einsum("bhts,bshd->bthd", w, v)

    _check(f, (q, k, v), "qkv")


@pytest.mark.slow
def test_explicit_or_window_vmap():
    """An Explicit mask | a sliding window, under vmap over a leading axis."""
    q, k, v = random_qkv(jax.random.PRNGKey(7), B=1, T=24, S=32, Hq=2, D=16)
    explicit = jax.random.bernoulli(jax.random.PRNGKey(8), 0.3, (24, 32))
    mask = masks.Explicit(explicit) | masks.SlidingWindow(4, 0)
    f = _attention(mask=mask, **BLOCKS)
    batched = [jnp.stack([x, -x]) for x in (q, k, v)]
    out = jax.vmap(f)(*batched)
    ref = jax.vmap(lambda *a: f(*a, reference=True))(*batched)
    assert_close(out, ref, name="out")
    _check(f, (q, k, v), "qkv")


def test_local_masks_shrink_the_grid():
    """A static sliding window needs few key steps per query tile; causal and data masks keep all."""
    st = FlashStatic(T=128, S=128, T_pad=128, S_pad=128, num_q_heads=1, num_kv_heads=1, D=8, Dv=8,
                     D_pad=8, Dv_pad=8, block_q=32, block_kv=16, scale=1.0, logits_soft_cap=None,
                     weight_fn=common.SOFTMAX, mask_plan=None, bias_kind=None)
    # 32 queries see 48 keys (3 key tiles); 16 keys are seen by queries in 2 query tiles.
    assert tpu._plans(masks.SlidingWindow(16, 0), st)[1] == (3, 2)
    assert tpu._plans(masks.Causal(), st)[1] == (8, 4)
    widths = []
    jax.jit(lambda ids: widths.append(tpu._plans(masks.Segments(ids), st)[1]) or 0)(jnp.zeros((1, 128), jnp.int32))
    assert widths == [(8, 4)]  # traced segment ids: the schedule is data, the grid is full


@pytest.mark.parametrize("option, value", [("dropout_rate", 0.1), ("bias", jnp.zeros((8, 8)))])
def test_unsupported_options_raise(option, value):
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=1, T=8, Hq=1, D=8)
    with pytest.raises(NotImplementedError, match="bias" if option == "bias" else "dropout"):
        flash_attention_tpu(q, k, v, interpret=True, rng=jax.random.PRNGKey(0), **{option: value})


def test_bad_block_size():
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=1, T=8, Hq=1, D=8)
    with pytest.raises(ValueError, match="block_kv"):
        flash_attention_tpu(q, k, v, block_kv=12, interpret=True)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (compiles with Mosaic, not interpreted)")
@pytest.mark.parametrize("everything", [False, True])
def test_compiled_on_tpu(everything):
    """Mosaic lowering at TPU-sized blocks: causal GQA, then segments, ALiBi, soft cap and sinks."""
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=2, T=384, S=512, Hq=4, Hkv=2, D=128, dtype=jnp.bfloat16)
    args, options = (q, k, v), dict(mask=masks.Causal())
    if everything:
        ids = jnp.repeat(jnp.arange(4), 128)[None].repeat(2, 0)
        options = dict(mask=masks.Causal() & masks.Segments(ids[:, 128:], ids), bias=ALiBi(alibi_slopes(4)),
                       logits_soft_cap=20.0, return_lse=True)
        args = (q, k, v, jnp.linspace(-1.0, 1.0, 4))
    _check(_attention(interpret=False, **options), args, ["q", "k", "v", "sinks"], rtol=TOLERANCE[jnp.bfloat16])
