"""Paged decode attention (``attnjax.softmax.paged``): the reference against per-sequence contiguous softmax,
the xla path against the reference (outputs and gradients), ragged lengths, GQA, Dv != D, several query tokens,
bf16, dispatch, and the errors. The Pallas kernels are tested in tests/kernels/test_paged_attention.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.softmax import (paged_attention, paged_attention_pallas, paged_attention_reference,
                             paged_attention_xla, softmax_attention_reference)
from tests.helpers import TOLERANCE, assert_close, assert_grads_close

LENGTHS = (6, 1, 16)
"""Ragged: ends mid-page (page_size 4), a single token, a full page table."""


def random_paged(seed=0, lengths=LENGTHS, Hq=4, Hk=2, Hv=None, D=16, Dv=8, page_size=4, max_pages=4, num_pages=14,
                 tq=None, dtype=jnp.float32):
    """``(q, k_pages, v_pages, page_table, lengths)`` with each sequence's pages drawn at random from a pool that
    holds more pages than they use; page-table columns past a sequence's last page are -1 ("no page")."""
    rng = np.random.default_rng(seed)
    B, Hv = len(lengths), Hk if Hv is None else Hv
    used = [-(-n // page_size) for n in lengths]
    order = rng.permutation(num_pages)
    table = np.full((B, max_pages), -1, np.int32)
    start = 0
    for b, n in enumerate(used):
        table[b, :n] = order[start:start + n]
        start += n
    q_shape = (B, Hq, D) if tq is None else (B, tq, Hq, D)
    q, k, v = (jnp.asarray(rng.standard_normal(s).astype(np.float32), dtype)
               for s in (q_shape, (num_pages, page_size, Hk, D), (num_pages, page_size, Hv, Dv)))
    return q, k, v, jnp.asarray(table), jnp.asarray(lengths, jnp.int32)


_causal = jax.jit(lambda q, k, v: softmax_attention_reference(q, k, v, mask=masks.Causal()))


def contiguous(q, k_pages, v_pages, page_table, lengths):
    """Each sequence on its own: its tokens copied out page by page into a ``[1, L, H, D]`` cache, then causal
    softmax attention of its last Tq queries (bottom-right ``masks.Causal``); an independent check of the
    reference."""
    q4 = q[:, None] if q.ndim == 3 else q
    outs = []
    page_size = k_pages.shape[1]
    for b, n in enumerate(np.asarray(lengths)):
        pages = np.asarray(page_table[b, :-(-n // page_size)])
        k = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:n][None]
        v = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:n][None]
        outs.append(_causal(q4[b:b + 1], k, v)[0])
    out = jnp.stack(outs)
    return out[:, 0] if q.ndim == 3 else out


def test_reference_equals_contiguous_softmax():
    """Three trailing queries (the decode case is the last of them)."""
    args = random_paged(tq=3, lengths=(6, 3, 16))
    assert_close(paged_attention_reference(*args), contiguous(*args), name="out")


CASES = {
    # name: random_paged kwargs, xla kwargs
    "gqa_dv": (dict(), dict(pages_per_block=3)),  # 3 does not divide the 4 table columns
    "several_tokens": (dict(tq=3), dict(pages_per_block=2)),
    "mqa_default_block": (dict(Hq=4, Hk=1, page_size=3, max_pages=6, lengths=(6, 1, 17)), dict()),
    "kv_heads_differ": (dict(Hq=4, Hk=1, Hv=2), dict(pages_per_block=2)),
    "mha_one_page_per_step": (dict(Hq=2, Hk=2, Dv=16), dict(pages_per_block=1)),
}
GRAD_CASES = ("gqa_dv",)
"""Cases whose gradients the default suite checks; the others' are slow tests."""
FORWARD_CASES = ("gqa_dv", "several_tokens", "mqa_default_block", "kv_heads_differ")
"""Cases whose outputs the default suite checks; the others' are slow tests."""


def _xla(case):
    data_kw, xla_kw = CASES[case]
    return random_paged(**data_kw), jax.jit(lambda *a: paged_attention_xla(*a, **xla_kw))


@pytest.mark.parametrize("case", [c if c in FORWARD_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_xla_matches_reference(case):
    args, xla = _xla(case)
    assert_close(xla(*args), paged_attention_reference(*args), name="out")


@pytest.mark.parametrize("case", [c if c in GRAD_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_xla_gradients_match_reference(case):
    """Gradients of q, k_pages and v_pages (the pages no sequence uses get zero gradient)."""
    args, xla = _xla(case)
    assert_grads_close(lambda q, k, v: xla(q, k, v, *args[3:]),
                       lambda q, k, v: paged_attention_reference(q, k, v, *args[3:]),
                       args[:3], argnums=(0, 1, 2), names=["q", "k_pages", "v_pages"])


def test_empty_sequence_and_early_queries_give_zero():
    """A sequence of length 0, and queries placed before the first token (``Tq > length``), see no key: 0, not NaN."""
    q, k, v, table, _ = random_paged(tq=3)
    lengths = jnp.asarray([0, 1, 5], jnp.int32)
    for path in (paged_attention_reference, paged_attention_xla):
        out = path(q, k, v, table, lengths)
        assert np.all(np.isfinite(np.asarray(out)))
        np.testing.assert_array_equal(out[0], 0.0)
        np.testing.assert_array_equal(out[1, :2], 0.0)
        assert float(jnp.abs(out[1, 2]).max()) > 0


def test_bf16():
    args = random_paged(dtype=jnp.bfloat16)
    exact = [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args]
    out = jax.jit(paged_attention_xla)(*args)
    assert out.dtype == jnp.bfloat16
    assert_close(out, paged_attention_reference(*exact), rtol=TOLERANCE[jnp.bfloat16], name="out")


def test_scale_and_vmap():
    args = random_paged()
    batched = [jnp.stack([a, a]) for a in args]
    batched[0] = batched[0].at[1].multiply(2.0)
    out = jax.jit(jax.vmap(lambda *a: paged_attention_xla(*a, scale=0.3)))(*batched)
    assert_close(out[0], paged_attention_reference(*args, scale=0.3), name="out[0]")
    assert_close(out[1], paged_attention_reference(args[0] * 2, *args[1:], scale=0.3), name="out[1]")


def test_dispatch():
    args = random_paged()
    expected = paged_attention_reference(*args)
    assert_close(paged_attention(*args), expected, name="auto")  # on CPU: the xla path
    with pytest.raises(ValueError, match="implementation"):
        paged_attention(*args, implementation="fast")
    with pytest.raises(NotImplementedError, match="recurrent"):
        paged_attention(*args, implementation="recurrent")


def test_pallas_path_gradient_is_the_xla_gradient():
    """The "pallas" path (GPU kernel, interpret mode) has the xla path's VJP (no backward kernel)."""
    args = random_paged(lengths=(6, 1), Hq=2, Hk=1)

    def pallas(q, k, v):
        return paged_attention_pallas(q, k, v, *args[3:], backend="gpu", interpret=True, pages_per_block=2)

    assert_grads_close(pallas, lambda q, k, v: paged_attention_reference(q, k, v, *args[3:]), args[:3],
                       argnums=(0, 1, 2), names=["q", "k_pages", "v_pages"])


def test_errors_name_the_argument():
    q, k, v, table, lengths = random_paged()
    with pytest.raises(ValueError, match=r"lengths\[2\] = 17 .*page_table \[3, 4\] holds at most 4 pages of 4"):
        paged_attention_xla(q, k, v, table, lengths.at[2].set(17))
    with pytest.raises(ValueError, match=r"lengths\[0\] = 6 .*page table too short"):
        paged_attention_reference(q, k, v, table[:, :1], lengths)
    with pytest.raises(ValueError, match=r"page_table\[0, 1\] = 14 is not a page of the pool .*14 pages"):
        paged_attention_xla(q, k, v, table.at[0, 1].set(14), lengths)
    with pytest.raises(ValueError, match=r"page_table\[1, 0\] = -1"):
        paged_attention_xla(q, k, v, table.at[1, 0].set(-1), lengths)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, D\]"):
        paged_attention(q[0], k, v, table, lengths)
    with pytest.raises(ValueError, match=r"k_pages must be \[num_pages, page_size, Hk, D\]"):
        paged_attention(q, k[0], v, table, lengths)
    with pytest.raises(ValueError, match=r"agree on \[num_pages, page_size\]"):
        paged_attention(q, k, v[:, :2], table, lengths)
    with pytest.raises(ValueError, match=r"k_pages head_dim 8 != q head_dim 16"):
        paged_attention(q, k[..., :8], v, table, lengths)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k_pages heads \(3\)"):
        paged_attention(q, jnp.concatenate([k, k[:, :, :1]], 2), v, table, lengths)
    with pytest.raises(ValueError, match=r"page_table must be \[B, max_pages_per_seq\] with B=3"):
        paged_attention(q, k, v, table[:2], lengths)
    with pytest.raises(ValueError, match=r"lengths must be \[B\] with B=3"):
        paged_attention(q, k, v, table, lengths[:2])
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        paged_attention(q, k, v, table, lengths.astype(jnp.float32))
    with pytest.raises(TypeError, match="share one dtype"):
        paged_attention(q.astype(jnp.bfloat16), k, v, table, lengths)
    with pytest.raises(ValueError, match="pages_per_block"):
        paged_attention_xla(q, k, v, table, lengths, pages_per_block=0)
