"""The paged KV cache (``attnjax.inference.paged_cache``): a ragged batch decoded through the page pool equals each
sequence decoded alone with ``MultiHeadAttention``'s contiguous ``KVCache``, step by step, through a ``free`` and the
reuse of its pages by a new sequence; the pool's bookkeeping (allocation order, free list, overflow); errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.inference import PagedKVCache, append, free, init_paged_cache, paged_decode, prefill
from attnjax.nn import MultiHeadAttention
from attnjax.positional import RoPE
from experiments import bench_decode
from tests.helpers import assert_close

D_MODEL = 16
PAGE = 4


def _layer(**kw):
    kw = dict(num_heads=4, num_kv_heads=2, rope=RoPE(base=100.0)) | kw
    return MultiHeadAttention(D_MODEL, rngs=nnx.Rngs(0), **kw)


def _tokens(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


class Contiguous:
    """Each sequence decoded alone with ``layer.decode`` and a ``KVCache`` of its own (the baseline)."""

    def __init__(self, layer, max_len=16):
        self.layer, self.max_len, self.caches = layer, max_len, {}
        self.step = nnx.jit(lambda layer, x_t, cache: layer.decode(x_t, cache))

    def start(self, name):
        self.caches[name] = self.layer.init_cache(1, self.max_len)

    def feed(self, name, x):
        """``x [T, d_model]`` token by token; the outputs ``[T, d_model]``."""
        ys = []
        for t in range(x.shape[0]):
            y, self.caches[name] = self.step(self.layer, x[None, t:t + 1], self.caches[name])
            ys.append(y[0, 0])
        return jnp.stack(ys)


def _check_pool(cache: PagedKVCache):
    """Every page is either on the free list or in exactly one active sequence's used columns."""
    lengths, table = np.asarray(cache.lengths), np.asarray(cache.page_table)
    used = [int(p) for s in range(cache.max_batch) for p in table[s, :-(-lengths[s] // cache.page_size)]]
    free_list = np.asarray(cache.free_pages)[:int(cache.num_free)].tolist()
    assert sorted(used + free_list) == list(range(cache.num_pages))
    assert np.all(table[np.arange(table.shape[1])[None] >= -(-lengths[:, None] // cache.page_size)] == -1)


@pytest.mark.parametrize("layer_kw", [
    dict(),
    pytest.param(dict(num_kv_heads=1, num_v_heads=2, head_dim=8, v_head_dim=4), marks=pytest.mark.slow, id="sigma"),
])
def test_matches_contiguous_decode_through_free_and_reuse(layer_kw):
    """Prompts of 5, 1 and 8 tokens (ragged; pages of 4) in slots 0-2, three decode steps; slot 1 is freed, a step
    skips it (output 0), a 3-token prompt takes its place, then two more steps with the slots in another order.
    Nine pages hold exactly what is left at the end, so the freed page serves another sequence (it is on top of the
    free list), and a further prompt chunk runs out of pages (under jit: dropped, ``overflow`` set)."""
    layer = _layer(**layer_kw)
    base = Contiguous(layer)
    cache = init_paged_cache(layer, num_pages=9, page_size=PAGE, max_batch=3, max_pages_per_seq=4)
    step = nnx.jit(lambda layer, x_t, cache, ids=None: paged_decode(layer, x_t, cache, ids))
    fill = nnx.jit(lambda layer, x, cache, ids, n: prefill(layer, x, cache, ids, n))

    lengths = np.array([5, 1, 8])
    prompts = _tokens(1, (3, 8, D_MODEL))
    y, cache = fill(layer, prompts, cache, jnp.arange(3), jnp.asarray(lengths))
    for s, n in enumerate(lengths):
        base.start(s)
        assert_close(y[s, :n], base.feed(s, prompts[s, :n]), name=f"prefill {s}")
        np.testing.assert_array_equal(y[s, n:], 0.0)
    np.testing.assert_array_equal(cache.page_table[:, 0], [0, 2, 3])  # pages handed out in row order from page 0

    def decode_steps(steps, seed, names, ids=None):
        nonlocal cache
        for i in range(steps):
            x_t = _tokens(seed + i, (3, 1, D_MODEL))
            y_t, cache = step(layer, x_t, cache) if ids is None else step(layer, x_t, cache, jnp.asarray(ids))
            for row, name in enumerate(names):
                if name is None:
                    np.testing.assert_array_equal(y_t[row], 0.0)
                else:
                    assert_close(y_t[row, 0], base.feed(name, x_t[row, :1])[0], name=f"step {i} row {row}")
            _check_pool(cache)

    decode_steps(3, 10, [0, 1, 2])
    np.testing.assert_array_equal(cache.lengths, [8, 4, 11])
    freed = int(cache.page_table[1, 0])
    cache = free(cache, 1)
    assert int(cache.num_free) == 4 and not bool(cache.active[1]) and int(cache.lengths[1]) == 0
    _check_pool(cache)
    decode_steps(1, 20, [0, None, 2])  # slot 1 is inactive: skipped; slot 0 starts its third page
    assert int(cache.lengths[1]) == 0 and int(cache.page_table[0, 2]) == freed

    new_prompt = _tokens(2, (1, 8, D_MODEL))
    y, cache = fill(layer, new_prompt, cache, jnp.asarray([1]), jnp.asarray([3]))
    base.start("new")
    assert_close(y[0, :3], base.feed("new", new_prompt[0, :3]), name="prefill after free")
    decode_steps(2, 30, [2, 0, "new"], ids=[2, 0, 1])
    np.testing.assert_array_equal(cache.lengths, [11, 5, 14])
    assert int(cache.num_free) == 0 and not bool(cache.overflow)

    # the next prompt chunk of the new sequence (5 -> 9 tokens) needs a third page: none is left
    _, after = fill(layer, new_prompt, cache, jnp.asarray([1]), jnp.asarray([4]))
    assert bool(after.overflow)
    np.testing.assert_array_equal(after.lengths, cache.lengths)
    np.testing.assert_array_equal(after.page_table, cache.page_table)


def test_append_writes_tokens_in_order():
    """Gathering a slot's pages through its page table gives back the tokens appended, in order; requests that don't
    fit raise (outside jit)."""
    cache = init_paged_cache((2, 4), num_pages=5, page_size=PAGE, max_batch=2, max_pages_per_seq=3)
    k, v = _tokens(3, (2, 7, 2, 4)), _tokens(4, (2, 7, 2, 4))
    write = jax.jit(append)
    cache = write(cache, k, v, jnp.asarray([1, 0]), jnp.asarray([6, 2]))
    cache = write(cache, k[:, 4:], v[:, 4:], jnp.asarray([1, 0]), jnp.asarray([3, 3]))
    expected = {1: jnp.concatenate([k[0, :6], k[0, 4:]]), 0: jnp.concatenate([k[1, :2], k[1, 4:]])}
    for s, tokens in expected.items():
        n = tokens.shape[0]
        pages = np.asarray(cache.page_table[s, :-(-n // PAGE)])
        np.testing.assert_array_equal(cache.k_pages[pages].reshape(-1, 2, 4)[:n], tokens)
    np.testing.assert_array_equal(cache.lengths, [5, 9])
    _check_pool(cache)
    with pytest.raises(ValueError, match="sequence 1 would need 4 pages, more than max_pages_per_seq = 3"):
        append(cache, k[:, :4], v[:, :4], [1, 0])
    with pytest.raises(ValueError, match="out of pages: the request needs 1 new pages, the pool has 0 free of 5"):
        append(cache, k, v, [0, 1], counts=jnp.asarray([7, 0]))


def test_errors():
    layer = _layer()
    cache = init_paged_cache(layer, num_pages=4, page_size=PAGE, max_batch=2)
    x = _tokens(7, (2, 3, D_MODEL))
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        prefill(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), x, cache, [0, 1])
    with pytest.raises(TypeError, match="cache must be a PagedKVCache"):
        paged_decode(layer, x[:, :1], layer.init_cache(2, 8))
    with pytest.raises(ValueError, match=r"the cache holds K heads x dim \(4, 4\).*layer needs K \(2, 4\)"):
        paged_decode(layer, x[:, :1], init_paged_cache((4, 4), 4, PAGE, 2))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 1, d_model\] = \[2, 1, 16\]"):
        paged_decode(layer, x, cache)
    with pytest.raises(ValueError, match=r"seq_ids must be slots in \[0, 2\) \(max_batch\), got \[0, 2\]"):
        prefill(layer, x, cache, [0, 2])
    with pytest.raises(ValueError, match="seq_ids must be distinct"):
        prefill(layer, x, cache, [1, 1])
    with pytest.raises(ValueError, match="one slot per row of x"):
        prefill(layer, x, cache, [1])
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T\] = \[0, 3\]"):
        prefill(layer, x, cache, [0, 1], jnp.asarray([4, 1]))
    with pytest.raises(ValueError, match="out of pages"):
        prefill(layer, _tokens(8, (2, 9, D_MODEL)), cache, [0, 1])
    with pytest.raises(ValueError, match=r"k must be \[n, T, Hk, D\] = \[1, T, 2, 4\]"):
        append(cache, jnp.zeros((1, 3, 4, 4)), jnp.zeros((1, 3, 2, 4)), [0])
    with pytest.raises(ValueError, match="seq_id must be slots"):
        free(cache, 5)
    with pytest.raises(ValueError, match="num_pages must be a positive int"):
        init_paged_cache(layer, 0, PAGE, 2)
    with pytest.raises(TypeError, match=r"layer_or_dims must be a MultiHeadAttention or a tuple \(Hk, D\)"):
        init_paged_cache("mha", 4, PAGE, 2)
    with pytest.raises(NotImplementedError, match="softmax"):
        paged_decode(MultiHeadAttention(D_MODEL, 4, mechanism="sigmoid", rngs=nnx.Rngs(0)), x[:, :1], cache)


@pytest.mark.slow
def test_bench_decode_paged_section_smoke(tmp_path):
    """``python -m experiments.bench_decode --only paged`` at tiny sizes: every program timed, ratios positive."""
    results = bench_decode.main(["--smoke", "--only", "paged", "--out", str(tmp_path), "--name", "tiny"])
    section = results["sections"]["paged"]
    assert len(section["rows"]) == 8 and all(r["median_s"] > 0 for r in section["rows"])
    assert set(section["paged_over_contiguous"]) == {"64x1", "64x2", "128x1", "128x2"}
    assert "## paged" in (tmp_path / "tiny.md").read_text()
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--only", "nope"])
