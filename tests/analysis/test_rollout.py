"""Attention rollout against the authors' NumPy ``compute_joint_attention`` (samiraabnar/attention_flow)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.analysis import rollout as analysis_rollout
from attnjax.vision.rollout import attention_rollout
from tests.analysis.test_entropy_and_sinks import numpy_map
from tests.helpers import assert_close, random_qkv


def joint_attention(att_mat, add_residual=True):
    """Abnar & Zuidema's rollout of head-averaged maps ``[L, T, T]``, as in their ``attention_graph_util.py``."""
    if add_residual:
        aug = att_mat + np.eye(att_mat.shape[1])[None]
        aug = aug / aug.sum(axis=-1)[..., None]
    else:
        aug = att_mat
    joint = np.zeros(aug.shape)
    joint[0] = aug[0]
    for i in range(1, aug.shape[0]):
        joint[i] = aug[i].dot(joint[i - 1])
    return joint


def test_rollout_equals_the_authors_joint_attention():
    mask = masks.Causal() & masks.SlidingWindow(4, 0)
    maps = [numpy_map(*random_qkv(jax.random.key(layer), T=11, Hq=3, Hkv=3, D=4)[:2], mask)[0] for layer in range(4)]
    stacked = np.stack(maps).astype(np.float32)
    last, every, plain, from_list = jax.jit(lambda m: (
        attention_rollout(m), attention_rollout(m, all_layers=True), attention_rollout(m, residual=False),
        attention_rollout(list(m))))(stacked)
    head_means = stacked.astype(np.float64).mean(axis=2)  # [L, B, T, T]
    expected = np.stack([joint_attention(head_means[:, b]) for b in range(2)], axis=1)  # [L, B, T, T]
    expected_plain = np.stack([joint_attention(head_means[:, b], False) for b in range(2)], axis=1)
    assert last.shape == (2, 11, 11) and every.shape == (4, 2, 11, 11)
    assert_close(last, expected[-1], rtol=1e-5, name="rollout")
    assert_close(every, expected, rtol=1e-5, name="rollout after every layer")
    assert_close(plain, expected_plain[-1], rtol=1e-5, name="without the residual")
    assert_close(from_list, expected[-1], rtol=1e-5, name="a list of maps")
    assert_close(jnp.sum(last, axis=-1), np.ones((2, 11)), rtol=1e-6, name="rows sum to 1")
    assert_close(last[:, 0], np.eye(11)[None, 0].repeat(2, 0), atol=1e-6, name="the first token sees itself")


def test_rollout_of_identity_maps_and_of_rows_without_keys():
    identity = jnp.broadcast_to(jnp.eye(5), (3, 1, 2, 5, 5))
    empty = jnp.zeros((2, 1, 2, 5, 5))
    a, b = jax.jit(lambda i, e: (attention_rollout(i), attention_rollout(e)))(identity, empty)
    assert_close(a, np.eye(5)[None], atol=1e-6, name="identity")
    assert_close(b, np.eye(5)[None], atol=1e-6, name="no keys: the residual keeps the token")


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match=r"maps must be L >= 1 square maps \[B, H, T, T\]"):
        attention_rollout(jnp.ones((2, 1, 2, 5, 4)))
    with pytest.raises(ValueError, match="square maps"):
        attention_rollout([jnp.ones((2, 5, 5))])


def test_analysis_re_exports_the_vision_implementation():
    assert analysis_rollout.attention_rollout is attention_rollout
    assert analysis_rollout.__all__ == ["attention_rollout"]
