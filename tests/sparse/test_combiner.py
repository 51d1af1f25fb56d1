"""Combiner (Ren et al. 2021): supports, the factorized matrix, fast path against reference, and a NumPy loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.api import attention
from attnjax.sparse.combiner import (VARIANTS, CombinerAxial, CombinerFixed, combiner_attention_reference,
                                     combiner_attention_xla, combiner_matrix, combiner_supports)
from tests.helpers import assert_close, assert_grads_close, random_qkv

T_ODD, REGION = 13, 4  # 13 is not a multiple of the segment/row length 4, nor a power of two


CAUSAL = [True, pytest.param(False, marks=pytest.mark.slow)]
"""Bidirectional cases of the slower checks run in the slow suite (the supports tests cover both by default)."""


def _mask(causal: bool):
    return masks.Causal() if causal else None


def _allowed(T: int, causal: bool) -> np.ndarray:
    return np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 16, 21])
def test_supports_partition_the_allowed_keys(variant, causal, T):
    """Direct part and regions cover every allowed key exactly once, and never a later key when causal."""
    sup = combiner_supports(variant, T, causal=causal, region_size=REGION if variant != "logsparse" else None)
    cover = sup.direct.astype(int) + sup.assign.astype(int) @ sup.members.astype(int)
    np.testing.assert_array_equal(cover, _allowed(T, causal).astype(int))
    assert sup.members[sup.assign.any(0)].any(1).all(), "an assigned region is empty"


def test_supports_follow_the_paper_rules_on_small_cases():
    """Hand-checked supports: fixed segments, logsparse dyadic blocks, axial row/column."""
    fixed = combiner_supports("fixed", 7, causal=True, region_size=3)
    assert fixed.direct[4].nonzero()[0].tolist() == [3, 4]
    assert sorted(tuple(fixed.members[r].nonzero()[0]) for r in fixed.assign[6].nonzero()[0]) == [(0, 1, 2), (3, 4, 5)]
    log = combiner_supports("logsparse", 16, causal=True)
    blocks = sorted(tuple(log.members[r].nonzero()[0][[0, -1]]) for r in log.assign[13].nonzero()[0])
    assert blocks == [(0, 7), (8, 11), (12, 12)]  # 13 = 8 + 4 + 1
    assert log.direct[13].nonzero()[0].tolist() == [13]
    log_bi = combiner_supports("logsparse", 16, causal=False)
    right = sorted(tuple(log_bi.members[r].nonzero()[0][[0, -1]]) for r in log_bi.assign[5].nonzero()[0])
    assert right == [(0, 3), (4, 4), (6, 7), (8, 15)]
    axial = combiner_supports("axial", 12, causal=True, region_size=4)  # query 9: row 2, column 1
    assert axial.direct[9].nonzero()[0].tolist() == [1, 5, 8, 9]
    cols = sorted(tuple(axial.members[r].nonzero()[0]) for r in axial.assign[9].nonzero()[0])
    assert cols == [(0, 4), (2, 6), (3, 7)]


def _loop_reference(q, k, v, variant, causal, region_size, scale):
    """Combiner for one head by a plain NumPy loop over queries and their regions (Sec. 3 as written)."""
    sup = combiner_supports(variant, q.shape[0], causal=causal, region_size=region_size)
    out = np.zeros((q.shape[0], v.shape[1]))
    for i in range(q.shape[0]):
        logits, vals = [], []
        for j in sup.direct[i].nonzero()[0]:
            logits.append(scale * q[i] @ k[j])
            vals.append(v[j])
        for r in sup.assign[i].nonzero()[0]:
            idx = sup.members[r].nonzero()[0]
            q_r, k_r = q[idx].max(0), k[idx].max(0)
            w = np.exp(scale * k[idx] @ q_r - np.max(scale * k[idx] @ q_r))
            w /= w.sum()
            logits.append(scale * q[i] @ k_r)
            vals.append(w @ v[idx])
        p = np.exp(np.array(logits) - max(logits))
        out[i] = (p / p.sum()) @ np.array(vals)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", CAUSAL)
def test_reference_equals_a_numpy_loop(variant, causal):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((9, 4)) for _ in range(3))
    expected = _loop_reference(q, k, v, variant, causal, 3, 0.5)
    ref = jax.jit(lambda q, k, v: combiner_attention_reference(q, k, v, variant=variant, region_size=3,
                                                               mask=_mask(causal), scale=0.5))
    got = ref(*(jnp.asarray(x[None, :, None], jnp.float32) for x in (q, k, v)))
    assert_close(got[0, :, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_factorized_matrix_rows_sum_to_one_with_full_support(variant, causal):
    q, k, _ = random_qkv(jax.random.PRNGKey(1), B=1, T=T_ODD, Hq=2, D=4)
    matrix = jax.jit(lambda q, k: combiner_matrix(q, k, variant=variant, region_size=REGION, mask=_mask(causal)))
    P = np.asarray(matrix(q, k))
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    allowed = _allowed(T_ODD, causal)
    assert (P[..., allowed] > 0).all(), "some allowed key is unreachable"
    assert (P[..., ~allowed] == 0).all(), "a causal row attends a later key"


@pytest.mark.parametrize("variant,causal", [
    ("axial", False),
    *(pytest.param(v, c, marks=pytest.mark.slow)
      for v in VARIANTS for c in (True, False) if (v, c) != ("axial", False))])
@pytest.mark.slow
def test_xla_matches_reference_forward_lse_and_grads_gqa_odd_length(variant, causal):
    """Causal GQA forward/grads of every variant's default config also run in tests/test_conformance.py."""
    q, k, v = random_qkv(jax.random.PRNGKey(2), B=1, T=T_ODD, Hq=4, Hkv=2, D=8, Dv=6)
    kw = dict(variant=variant, region_size=REGION, mask=_mask(causal))
    fast = jax.jit(lambda q, k, v: combiner_attention_xla(q, k, v, return_lse=True, **kw))
    out, lse = fast(q, k, v)
    ref, ref_lse = jax.jit(lambda q, k, v: combiner_attention_reference(q, k, v, return_lse=True, **kw))(q, k, v)
    assert_close(out, ref, rtol=1e-5)
    assert_close(lse, ref_lse, rtol=1e-5)
    assert_grads_close(lambda q, k, v: combiner_attention_xla(q, k, v, **kw),
                       lambda q, k, v: combiner_attention_reference(q, k, v, **kw), (q, k, v), (0, 1, 2),
                       rtol=1e-4, names=["dq", "dk", "dv"])


@pytest.mark.parametrize("variant", ["axial", *(pytest.param(v, marks=pytest.mark.slow)
                                                 for v in ("fixed", "logsparse"))])
def test_causal_xla_output_ignores_later_tokens(variant):
    q, k, v = random_qkv(jax.random.PRNGKey(3), B=1, T=T_ODD, Hq=2, D=4)
    fast = jax.jit(lambda q, k, v: combiner_attention_xla(q, k, v, variant=variant, region_size=REGION,
                                                          mask=masks.Causal()))
    out = fast(q, k, v)
    changed = fast(q.at[:, 8:].set(3.0), k.at[:, 8:].set(9.0), v.at[:, 8:].set(-9.0))
    np.testing.assert_allclose(out[:, :8], changed[:, :8], atol=1e-6)


def test_registered_default_region_and_errors():
    """(bf16 of every registered variant: tests/test_conformance.py::test_bfloat16_finite.)"""
    q32, k32, v32 = random_qkv(jax.random.PRNGKey(4), B=1, T=T_ODD, Hq=2, D=4)
    default = jax.jit(lambda q, k, v: attention(q, k, v, mechanism=CombinerAxial(), implementation="xla"))
    assert_close(default(q32, k32, v32), jax.jit(lambda q, k, v: combiner_attention_reference(
        q, k, v, variant="axial", region_size=4))(q32, k32, v32), rtol=1e-5)
    with pytest.raises(NotImplementedError, match="Causal"):
        combiner_attention_xla(q32, k32, v32, variant="fixed", mask=masks.SlidingWindow(3, 0))
    with pytest.raises(ValueError, match="one length"):
        combiner_attention_xla(q32, k32[:, :5], v32[:, :5], variant="fixed")
    with pytest.raises(ValueError, match="variant"):
        combiner_attention_reference(q32, k32, v32, variant="strided")
    with pytest.raises(ValueError, match="region_size"):
        CombinerFixed(region_size=0)
    with pytest.raises(NotImplementedError, match="cross"):
        attention(q32, k32[:, :5], v32[:, :5], mechanism="combiner_fixed")
