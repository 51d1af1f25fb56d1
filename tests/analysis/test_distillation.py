"""MiniLM and HASTE losses, blockwise, against NumPy computations of their definitions on dense maps;
gradients w.r.t. the student against a dense jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.analysis.distillation import (HasteSchedule, attention_cross_entropy, attention_cross_entropy_of_maps,
                                           attention_kl, attention_kl_of_maps, feature_alignment_loss,
                                           gradient_cosine, haste_attention_loss, haste_gradient_trigger,
                                           minilm_attention_loss, minilm_loss, minilm_loss_of_maps,
                                           minilm_value_relation_loss, value_relation_map)
from attnjax.analysis.blockwise import scan_query_tiles_pair
from tests.analysis.test_entropy_and_sinks import numpy_map
from tests.analysis.test_regularizers import dense_log_p
from tests.helpers import assert_close, numpy_rng, random_qkv


def numpy_kl(pt, ps):
    on = pt > 0
    return np.sum(np.where(on, pt * (np.log(np.where(on, pt, 1)) - np.log(np.where(on, ps, 1))), 0), axis=-1)


def numpy_cross_entropy(pt, ps):
    on = pt > 0
    return -np.sum(np.where(on, pt * np.log(np.where(on, ps, 1)), 0), axis=-1)


def dense_kl(teacher, student, mask=None):
    lt, ls = dense_log_p(*teacher, mask), dense_log_p(*student, mask)
    return jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1)


CASES = [
    dict(T=13, S=13, Hkv_t=2, Hkv_s=1, Dt=8, Ds=4, mask=masks.Causal()),
    dict(T=9, S=14, Hkv_t=4, Hkv_s=2, Dt=4, Ds=8, mask=masks.SlidingWindow(4, 2)),
]


@pytest.mark.parametrize("case", CASES, ids=["causal-gqa", "window-cross"])
def test_blockwise_kl_and_cross_entropy_equal_numpy(case):
    q_t, k_t, _ = random_qkv(jax.random.key(0), T=case["T"], S=case["S"], Hq=4, Hkv=case["Hkv_t"], D=case["Dt"])
    q_s, k_s, _ = random_qkv(jax.random.key(1), T=case["T"], S=case["S"], Hq=4, Hkv=case["Hkv_s"], D=case["Ds"])
    pt, allowed = numpy_map(2 * q_t, k_t, case["mask"])
    ps, _ = numpy_map(q_s, k_s, case["mask"])
    kl, ce = jax.jit(lambda *a: (attention_kl(*a, mask=case["mask"], block_q=4),
                                 attention_cross_entropy(*a, mask=case["mask"], block_q=4)))(2 * q_t, k_t, q_s, k_s)
    assert_close(kl, numpy_kl(pt, ps), rtol=1e-5, name="KL")
    assert_close(ce, numpy_cross_entropy(pt, ps), rtol=1e-5, name="CE")
    assert_close(attention_kl_of_maps(pt, ps), numpy_kl(pt, ps), rtol=1e-5, name="KL of maps")
    assert_close(attention_cross_entropy_of_maps(pt, ps), numpy_cross_entropy(pt, ps), rtol=1e-5, name="CE of maps")


def test_minilm_losses_equal_numpy_and_student_gradients_match_dense():
    mask = masks.Causal()
    q_t, k_t, v_t = random_qkv(jax.random.key(2), T=11, Hq=4, Hkv=2, D=8)
    q_s, k_s, v_s = random_qkv(jax.random.key(3), T=11, Hq=4, Hkv=2, D=4)
    teacher, student = (2 * q_t, k_t, v_t), (q_s, k_s, v_s)
    a_t, a_s = numpy_map(2 * q_t, k_t, mask)[0], numpy_map(q_s, k_s, mask)[0]
    vr_t, vr_s = numpy_map(v_t, v_t, mask)[0], numpy_map(v_s, v_s, mask)[0]  # softmax(V Vᵀ / √d_k), eq. 8
    l_at, l_vr = numpy_kl(a_t, a_s).mean(), numpy_kl(vr_t, vr_s).mean()

    def reference(student):
        q, k, v = student
        return (jnp.mean(dense_kl(teacher[:2], (q, k), mask))
                + jnp.mean(dense_kl((teacher[2], teacher[2]), (v, v), mask)))

    @jax.jit
    def run(teacher, student):
        value, grads = jax.value_and_grad(lambda s: minilm_loss(teacher, s, mask=mask, block_q=4))(student)
        return value, grads, jax.grad(reference)(student), value_relation_map(teacher[2], mask=mask)

    value, grads, ref, vr = run(teacher, student)
    assert_close(value, l_at + l_vr, rtol=1e-5, name="L_AT + L_VR")
    assert_close(vr, vr_t, rtol=1e-5, name="value relation (eq. 8)")
    assert_close(minilm_loss_of_maps(a_t, a_s, vr_t, vr_s), l_at + l_vr, rtol=1e-5, name="of maps")
    for got, want, name in zip(grads, ref, ("dq_s", "dk_s", "dv_s")):  # dq, dk from L_AT only, dv from L_VR only
        assert_close(got, want, rtol=1e-4, name=name)


def test_identical_maps_give_zero_and_rows_without_keys_are_left_out():
    q, k, _ = random_qkv(jax.random.key(4), B=1, T=6, S=6, Hq=2, Hkv=1, D=4)
    mask = masks.Explicit(jnp.arange(6)[:, None] >= jnp.arange(6)[None, :] + 2)  # rows 0, 1 see nothing
    q_s = q + 0.3 * random_qkv(jax.random.key(5), B=1, T=6, S=6, Hq=2, Hkv=1, D=4)[0]
    same = jax.jit(lambda q, k: attention_kl(q, k, q, k, mask=mask, block_q=4))(q, k)
    assert_close(same, np.zeros((1, 2, 6)), atol=1e-6, name="KL(p ‖ p)")
    value, (dq, dk) = jax.jit(jax.value_and_grad(
        lambda q_s, k_s: minilm_attention_loss(q, k, q_s, k_s, mask=mask, block_q=4), argnums=(0, 1)))(q_s, k)
    pt, ps = numpy_map(q, k, mask)[0], numpy_map(q_s, k, mask)[0]
    assert_close(value, numpy_kl(pt, ps)[..., 2:].mean(), rtol=1e-5, name="mean over rows that see a key")
    assert np.all(np.isfinite(np.asarray(dq))) and np.all(np.asarray(dq)[0, :2] == 0)
    assert np.all(np.isfinite(np.asarray(dk)))


def test_haste_attention_and_feature_alignment_equal_numpy():
    layers = [random_qkv(jax.random.key(6 + i), T=10, Hq=2, Hkv=2, D=8) for i in range(4)]
    teacher = [(q, k) for q, k, _ in layers[:2]]
    student = [(q, k) for q, k, _ in layers[2:]]
    expected = np.mean([numpy_cross_entropy(numpy_map(*t)[0], numpy_map(*s)[0]).mean()
                        for t, s in zip(teacher, student)])

    def reference(student):
        return jnp.mean(jnp.stack([-jnp.mean(jnp.sum(jnp.exp(dense_log_p(*t)) * dense_log_p(*s), axis=-1))
                                   for t, s in zip(teacher, student)]))

    @jax.jit
    def run(student):
        return jax.value_and_grad(lambda s: haste_attention_loss(teacher, s, block_q=4))(student), jax.grad(
            reference)(student)

    (loss, grads), ref = run(student)
    assert_close(loss, expected, rtol=1e-5, name="L_ATTA")
    for (dq, dk), (rq, rk) in zip(grads, ref):
        assert_close(dq, rq, rtol=1e-4, name="dq_s")
        assert_close(dk, rk, rtol=1e-4, name="dk_s")
    rng = numpy_rng(jax.random.key(9))
    y, z = rng.standard_normal((2, 7, 16)), rng.standard_normal((2, 7, 16))
    cos = np.sum(y * z, -1) / (np.linalg.norm(y, axis=-1) * np.linalg.norm(z, axis=-1))
    assert_close(feature_alignment_loss(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32)), -cos.mean(),
                 rtol=1e-5, name="REPA feature alignment")


def test_haste_schedule_terminates_alignment():
    schedule = HasteSchedule(attention_weight=0.5, feature_weight=0.25, stop_step=100)
    assert schedule.active(99) and not schedule.active(100)
    assert float(schedule.loss(10, 1.0, 2.0, 4.0)) == 3.0
    assert float(schedule.loss(100, 1.0, 2.0, 4.0)) == 1.0
    total = jax.jit(lambda step, a: schedule.loss(step, 1.0, a, 4.0))
    assert float(total(jnp.int32(5), 2.0)) == 3.0 and float(total(jnp.int32(500), jnp.nan)) == 1.0
    d_after = jax.grad(lambda a: schedule.loss(jnp.int32(500), 1.0, a, 4.0))(2.0)
    assert float(d_after) == 0.0
    assert HasteSchedule().weights(0) == (0.5, 0.5) and HasteSchedule().stop_step == 250_000
    with pytest.raises(ValueError, match="stop_step must be a non-negative int"):
        HasteSchedule(stop_step=1.5)
    with pytest.raises(ValueError, match="attention_weight must be >= 0"):
        HasteSchedule(attention_weight=-1.0)


def test_haste_gradient_trigger_is_the_mean_cosine_below_delta():
    """App. A.2: the mean over timesteps of cos(grad L_align, grad L_denoise) over one block's parameters,
    all leaves flattened together, compared with delta = -0.05."""
    rng = numpy_rng(jax.random.key(12))

    def grads():
        return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}

    align, denoise = [grads() for _ in range(4)], [grads() for _ in range(4)]
    flat = [np.concatenate([g["b"], g["w"].ravel()]).astype(np.float64) for g in align + denoise]
    cos = [a @ d / (np.linalg.norm(a) * np.linalg.norm(d)) for a, d in zip(flat[:4], flat[4:])]
    rho, fired = jax.jit(haste_gradient_trigger)(align, denoise)
    assert_close(rho, np.mean(cos), rtol=1e-5, name="mean cosine over timesteps")
    assert bool(fired) == (np.mean(cos) < -0.05)
    opposed = [jax.tree.map(lambda x: -0.5 * x, g) for g in align]
    rho, fired = haste_gradient_trigger(align, opposed)
    assert_close(rho, -1.0, rtol=1e-6, name="opposite gradients")
    assert bool(fired)
    _, fired = haste_gradient_trigger(align, align, threshold=0.99)
    assert not bool(fired)
    assert float(gradient_cosine({"w": jnp.zeros(3)}, {"w": jnp.ones(3)})) == 0.0
    with pytest.raises(ValueError, match="one gradient per timestep"):
        haste_gradient_trigger(align, denoise[:3])
    with pytest.raises(ValueError, match="same structure"):
        gradient_cosine({"w": jnp.zeros(3)}, {"w": jnp.zeros(4)})


def test_bad_inputs_name_the_argument():
    q_t, k_t, v_t = random_qkv(jax.random.key(10), T=8, Hq=4, Hkv=2, D=4)
    q_s, k_s, v_s = random_qkv(jax.random.key(11), T=8, Hq=2, Hkv=2, D=4)
    with pytest.raises(ValueError, match=r"MiniLM matches teacher and student attention head by head.*got 4 and 2"):
        minilm_attention_loss(q_t, k_t, q_s, k_s)
    with pytest.raises(ValueError, match=r"same number of heads \(A_h\): got 2 and 1"):
        minilm_value_relation_loss(v_t, v_s[:, :, :1])
    with pytest.raises(ValueError, match="the two maps must share B, T, Hq and S"):
        scan_query_tiles_pair(q_t, k_t, q_t[:, :5], k_t, lambda *a: (None, None))
    with pytest.raises(ValueError, match="pair up one to one"):
        haste_attention_loss([(q_t, k_t)], [])
    with pytest.raises(ValueError, match=r"teacher and student must be maps \[..., T, S\] of one shape"):
        attention_kl_of_maps(jnp.ones((2, 3, 3)), jnp.ones((2, 3, 4)))
