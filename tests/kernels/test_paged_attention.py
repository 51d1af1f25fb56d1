"""The Pallas paged decode attention kernels (``pallas_kernels.paged_attention``) against
``attnjax.softmax.paged_attention_reference``: GPU kernel in interpret mode, TPU kernel in TPU interpret mode,
cross-lowering to Triton and Mosaic, and the refusals that let ``implementation="auto"`` fall back.

Interpret mode compiles slowly: one jitted call per case, tiny pools, and each case combines ragged lengths
(one ending mid-page, one of a single token, one filling its page table), GQA and ``Dv != D``."""

import jax
import jax.numpy as jnp
import pytest

from attnjax.softmax import paged_attention, paged_attention_reference
from pallas_kernels.paged_attention import paged_attention_pallas
from tests.helpers import TOLERANCE, assert_close
from tests.softmax.test_paged import random_paged

OPTIONS = {
    # backend -> kernel options: two pages per block; on GPU two splits, so a split of the long sequence
    # holds a partial block and the short ones leave a split empty.
    "gpu": dict(backend="gpu", interpret=True, pages_per_block=2, num_splits=2),
    "tpu": dict(backend="tpu", interpret=True, pages_per_block=2),
}


def _kernel(backend, **options):
    return jax.jit(lambda *a: paged_attention_pallas(*a, **{**OPTIONS[backend], **options}))


@pytest.mark.parametrize("backend", list(OPTIONS))
def test_decode_matches_reference(backend):
    args = random_paged()
    out = _kernel(backend)(*args)
    assert out.shape == (3, 4, 8) and out.dtype == jnp.float32
    assert_close(out, paged_attention_reference(*args), name="out")


@pytest.mark.parametrize("backend", list(OPTIONS))
def test_several_tokens_mqa_bf16(backend):
    """Three trailing queries per sequence (rows of one KV head: 3 tokens x 4 query heads), MQA, bf16 (finite, and
    close to the float32 reference)."""
    args = random_paged(tq=3, Hk=1, lengths=(6, 1, 13), dtype=jnp.bfloat16)
    exact = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    out = _kernel(backend)(*args)
    assert out.shape == (3, 3, 4, 8) and out.dtype == jnp.bfloat16
    assert_close(out, paged_attention_reference(*exact), rtol=TOLERANCE[jnp.bfloat16], name="out")


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(OPTIONS))
def test_default_blocks_and_one_page_per_step(backend):
    args = random_paged(Hq=2, Hk=2, Dv=16, page_size=3, max_pages=6, lengths=(6, 1, 17))
    expected = paged_attention_reference(*args)
    assert_close(jax.jit(lambda *a: paged_attention_pallas(*a, backend=backend, interpret=True))(*args), expected)
    assert_close(_kernel(backend, pages_per_block=1)(*args), expected)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_hardware(platform):
    """The kernels lower to Triton / Mosaic (cross-lowering from the CPU host; no run) at serving sizes: bf16,
    page_size 16, D = 128, GQA 8/2."""
    q = jax.ShapeDtypeStruct((2, 8, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((64, 16, 2, 128), jnp.bfloat16)
    table, lengths = jax.ShapeDtypeStruct((2, 16), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32)
    backend = "gpu" if platform == "cuda" else "tpu"
    run = jax.jit(lambda *a: paged_attention_pallas(*a, backend=backend, interpret=False))
    text = run.trace(q, pages, pages, table, lengths).lower(lowering_platforms=(platform,)).as_text()
    assert ("paged_attention_tpu" if platform == "tpu" else "paged_attention") in text


def test_refusals_raise_not_implemented():
    """What the compiled kernels can't tile raises NotImplementedError (so "auto" falls back to xla)."""
    q, k, v, table, lengths = random_paged()
    odd_pages = random_paged(page_size=3, max_pages=6, lengths=(6, 1, 17))
    for options, args, message in [
        (dict(backend="gpu", interpret=False), odd_pages, "power-of-two sizes"),
        (dict(backend="tpu", interpret=False), (q, k, v, table, lengths), "multiple of 8"),
        (dict(backend="tpu", num_splits=2), (q, k, v, table, lengths), "no split-K"),
        (dict(backend="gpu", interpret=True), (q, k, jnp.concatenate([v, v], 2), table, lengths), "one K/V head"),
        (dict(backend="metal"), (q, k, v, table, lengths), "no Pallas paged attention kernel for backend"),
    ]:
        with pytest.raises(NotImplementedError, match=message):
            paged_attention_pallas(*args, **options)
    long_prompt = random_paged(tq=300, Dv=16, page_size=8, max_pages=40, num_pages=90, lengths=(300, 1, 310))
    with pytest.raises(NotImplementedError, match="at most 512 query rows"):
        paged_attention_pallas(*long_prompt, backend="tpu", interpret=False)
    with pytest.raises(NotImplementedError, match="at most 128 query rows"):
        paged_attention_pallas(*long_prompt, backend="gpu", interpret=False)
    wide = random_paged(D=64, Dv=64, page_size=8, lengths=(6, 1, 30))
    with pytest.raises(NotImplementedError, match="multiples of 128"):
        paged_attention_pallas(*wide, backend="tpu", interpret=False)
    with pytest.raises(ValueError, match="pages_per_block must be a positive int"):
        paged_attention_pallas(q, k, v, table, lengths, pages_per_block=0, backend="gpu", interpret=True)


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a real GPU or TPU (compiled kernel)")
def test_compiled_on_accelerator():
    """Compiled kernel at serving sizes (bf16, page 16, D = 128, GQA 8/2, ragged up to 1000 tokens) against the
    float32 reference, and "auto" picks it."""
    args = random_paged(lengths=(1, 333, 1000, 17), Hq=8, Hk=2, D=128, Dv=128, page_size=16, max_pages=64,
                        num_pages=160, dtype=jnp.bfloat16)
    exact = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    expected = paged_attention_reference(*exact)
    assert_close(jax.jit(paged_attention_pallas)(*args), expected, rtol=TOLERANCE[jnp.bfloat16])
    assert_close(jax.jit(lambda *a: paged_attention(*a, implementation="auto"))(*args), expected,
                 rtol=TOLERANCE[jnp.bfloat16])
