"""Cross-layer attention similarity, blockwise, against NumPy cosines of dense maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks, positional
from attnjax.analysis.similarity import attention_similarity, attention_similarity_of_maps
from tests.analysis.test_entropy_and_sinks import numpy_map
from tests.helpers import assert_close, random_qkv


def numpy_cosines(p1, p2):
    """Per head: the cosine of the flattened maps and the mean per-row cosine over rows attending somewhere."""
    flat = np.sum(p1 * p2, axis=(-2, -1)) / np.sqrt(np.sum(p1 ** 2, axis=(-2, -1)) * np.sum(p2 ** 2, axis=(-2, -1)))
    n1, n2 = np.linalg.norm(p1, axis=-1), np.linalg.norm(p2, axis=-1)
    valid = (n1 > 0) & (n2 > 0)
    rows = np.where(valid, np.sum(p1 * p2, axis=-1) / np.where(valid, n1 * n2, 1), 0)
    return flat, rows.sum(-1) / valid.sum(-1)


CASES = [
    dict(T=23, S=23, Hq=4, Hkv=(2, 1), D=(8, 8), mask=masks.Causal(), bias=None, per_row=(False,)),
    dict(T=13, S=30, Hq=2, Hkv=(2, 2), D=(8, 4), mask=masks.SlidingWindow(6, 2), bias=None, per_row=(True,)),
    dict(T=17, S=17, Hq=2, Hkv=(1, 2), D=(4, 4), mask=masks.Explicit(jnp.arange(17)[:, None] >= jnp.arange(17) + 3),
         bias=positional.ALiBi(positional.alibi_slopes(2)), per_row=(False, True)),
]


@pytest.mark.parametrize("case", CASES, ids=["causal-gqa", "window-cross-dims", "alibi-rows-without-keys"])
def test_blockwise_similarity_equals_numpy_cosines(case):
    q1, k1, _ = random_qkv(jax.random.key(0), T=case["T"], S=case["S"], Hq=case["Hq"], Hkv=case["Hkv"][0],
                           D=case["D"][0])
    q2, k2, _ = random_qkv(jax.random.key(1), T=case["T"], S=case["S"], Hq=case["Hq"], Hkv=case["Hkv"][1],
                           D=case["D"][1])
    q1, q2 = 2 * q1, 2 * q2
    opts = dict(mask=case["mask"], bias=case["bias"], block_q=5)
    blockwise = jax.jit(lambda q1, k1, q2, k2: [attention_similarity(q1, k1, q2, k2, per_row=per_row, **opts)
                                                for per_row in case["per_row"]])(q1, k1, q2, k2)
    bias = None if case["bias"] is None else np.asarray(case["bias"].dense(case["T"], case["S"]))
    p1, _ = numpy_map(q1, k1, case["mask"], bias=bias)
    p2, _ = numpy_map(q2, k2, case["mask"], bias=bias)
    expected_flat, expected_rows = numpy_cosines(p1, p2)
    for got, per_row in zip(blockwise, case["per_row"]):
        assert got.shape == (2, case["Hq"])
        assert_close(got, expected_rows if per_row else expected_flat, rtol=1e-5, name=f"per_row={per_row}")
    of_maps = jax.jit(lambda a, b: (attention_similarity_of_maps(a, b),
                                    attention_similarity_of_maps(a, b, per_row=True)))
    flat_maps, rows_maps = of_maps(p1.astype(np.float32), p2.astype(np.float32))
    assert_close(flat_maps, expected_flat, rtol=1e-5, name="of maps")
    assert_close(rows_maps, expected_rows, rtol=1e-5, name="of maps, per row")


def test_same_maps_give_one_and_the_layer_matrix_broadcasts():
    q, k, _ = random_qkv(jax.random.key(2), T=9, S=9, Hq=2, Hkv=2, D=4)
    same = jax.jit(lambda q, k: attention_similarity(q, k, 3 * q / 3, k, mask=masks.Causal(), block_q=4))(q, k)
    assert_close(same, np.ones((2, 2)), rtol=1e-6, name="a map with itself")
    maps = np.stack([numpy_map(random_qkv(jax.random.key(s), T=9, Hq=2, D=4)[0], k)[0] for s in range(3)])
    matrix = jax.jit(lambda m: attention_similarity_of_maps(m[:, None], m[None]))(maps.astype(np.float32))
    assert matrix.shape == (3, 3, 2, 2)
    assert_close(jnp.diagonal(matrix, axis1=0, axis2=1), np.ones((2, 2, 3)), rtol=1e-6, name="diagonal")
    assert_close(matrix, np.swapaxes(np.asarray(matrix), 0, 1), rtol=1e-6, name="symmetric")
    assert np.all(np.asarray(matrix) < 1 + 1e-6) and np.all(np.asarray(matrix) > 0)


def test_bad_inputs_name_the_arguments():
    q, k, _ = random_qkv(jax.random.key(3), T=8, S=8, Hq=2, Hkv=2, D=4)
    with pytest.raises(ValueError, match="must share B, T, Hq and S"):
        attention_similarity(q, k, q[:, :5], k)
    with pytest.raises(ValueError, match=r"q \[B, T, Hq, D\] and k \[B, S, Hkv, D\]"):
        attention_similarity(q, k, q, k[..., :3])
    with pytest.raises(ValueError, match="probabilities1 and probabilities2 must be maps"):
        attention_similarity_of_maps(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 3)))
