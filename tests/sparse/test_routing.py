"""Routing Transformer selector: the routing rule against a NumPy brute force, the engine against the dense
reference (forward and gradients, GQA, odd lengths), causality, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax import masks
from attnjax.sparse.routing import (Routing, init_centroids, kmeans_step, routing_attention, routing_buckets)
from tests.helpers import assert_close, random_qkv

B, T, S, HQ, HKV, D, C = 2, 13, 17, 4, 2, 8, 3


def numpy_route(x, centroids, balanced):
    """Brute force of the rule: scale-free layer norm, nearest centroid by dot product, then (balanced) the rank in
    the order (cluster, -score, position) cut into windows of ceil(L / C)."""
    x = np.asarray(x, np.float64)
    Bx, L, Hx, _ = x.shape
    G = Hx // centroids.shape[0]
    ids = np.zeros((Bx, Hx, L), np.int64)
    for b in range(Bx):
        for h in range(Hx):
            mu = np.asarray(centroids[h // G], np.float64)
            rows = []
            for i in range(L):
                z = x[b, i, h] - x[b, i, h].mean()
                z = z / np.sqrt((z ** 2).mean() + 1e-6)
                scores = mu @ z
                c = int(np.argmax(scores))
                rows.append((c, -scores[c], i))
            if balanced:
                width = -(-L // centroids.shape[1])
                for rank, (_, _, i) in enumerate(sorted(rows)):
                    ids[b, h, i] = rank // width
            else:
                ids[b, h] = [r[0] for r in rows]
    return ids


@pytest.mark.parametrize("balanced", [True, False])
def test_buckets_match_the_brute_force_rule(balanced):
    q, k, _ = random_qkv(jax.random.PRNGKey(0), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D)
    centroids = init_centroids(jax.random.PRNGKey(1), HKV, C, D)
    buckets = routing_buckets(q, k, centroids, balanced=balanced)
    np.testing.assert_array_equal(np.asarray(buckets.q_ids), numpy_route(q, centroids, balanced))
    np.testing.assert_array_equal(np.asarray(buckets.kv_ids), numpy_route(k, centroids, balanced))
    if balanced:
        counts = np.apply_along_axis(np.bincount, -1, np.asarray(buckets.kv_ids), minlength=C)
        assert set(np.unique(counts[..., :-1])) == {-(-S // C)}, "every window but the last is full"


def test_kmeans_step_moves_each_centroid_to_its_members_mean():
    q, k, _ = random_qkv(jax.random.PRNGKey(2), B=B, T=T, S=S, Hq=HQ, Hkv=HKV, D=D)
    centroids = init_centroids(jax.random.PRNGKey(3), HKV, C, D)
    new = np.asarray(kmeans_step((q, k), centroids))
    members = [[[] for _ in range(C)] for _ in range(HKV)]
    for x in (q, k):
        ids = numpy_route(x, centroids, balanced=False)
        xn = np.asarray(x, np.float64)
        xn = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
        G = x.shape[2] // HKV
        for b in range(B):
            for h in range(x.shape[2]):
                for i in range(x.shape[1]):
                    members[h // G][ids[b, h, i]].append(xn[b, i, h])
    for h in range(HKV):
        for c in range(C):
            want = np.mean(members[h][c], 0) if members[h][c] else np.asarray(centroids[h, c])
            np.testing.assert_allclose(new[h, c], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("balanced,mask", [(True, masks.Causal()), pytest.param(False, None, marks=pytest.mark.slow)])
def test_xla_matches_reference_forward_and_gradients(balanced, mask):
    q, k, v = random_qkv(jax.random.PRNGKey(4), B=B, T=21, S=21, Hq=HQ, Hkv=HKV, D=D)
    sel = Routing(num_clusters=C, balanced=balanced, block_q=8, block_kv=8)

    def loss(impl, q, k, v):
        out = attnjax.attention(q, k, v, mechanism=sel, mask=mask, implementation=impl)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (_, ref), g_ref = grads("reference", q, k, v)
    (_, fast), g_fast = grads("xla", q, k, v)
    assert_close(fast, ref, name="out")
    for name, a, b in zip("qkv", g_fast, g_ref):
        assert_close(a, b, atol=1e-5, name=f"d{name}")


@pytest.mark.slow
def test_causal_query_never_sees_a_later_key():
    """Values after ``t`` never reach outputs up to ``t`` (balanced windows: the routing may move, the keys a query
    sees are never later); with plain clusters and no k-means step, the whole call is causal in q, k and v."""
    q, k, v = random_qkv(jax.random.PRNGKey(5), B=1, T=21, S=21, Hq=HQ, Hkv=HKV, D=D)
    t = 10
    fresh = random_qkv(jax.random.PRNGKey(6), B=1, T=21, S=21, Hq=HQ, Hkv=HKV, D=D)
    run = jax.jit(lambda sel, q, k, v: attnjax.attention(q, k, v, mechanism=sel, mask=masks.Causal(),
                                                         implementation="xla"), static_argnums=0)
    sel = Routing(num_clusters=C, block_q=8, block_kv=8)
    out = run(sel, q, k, v)
    np.testing.assert_array_equal(run(sel, q, k, v.at[:, t + 1:].set(fresh[2][:, t + 1:]))[:, :t + 1], out[:, :t + 1])
    strict = Routing(num_clusters=C, kmeans_steps=0, balanced=False, block_q=8, block_kv=8)
    out = run(strict, q, k, v)
    changed = [x.at[:, t + 1:].set(f[:, t + 1:]) for x, f in zip((q, k, v), fresh)]
    assert_close(run(strict, *changed)[:, :t + 1], out[:, :t + 1], rtol=1e-6, name="changed after t")


def test_functional_core_and_errors():
    q, k, v = random_qkv(jax.random.PRNGKey(7), B=1, T=T, S=T, Hq=HQ, Hkv=HKV, D=D)
    centroids = init_centroids(jax.random.PRNGKey(0), HKV, C, D)
    out, lse = jax.jit(lambda q, k, v, c: routing_attention(q, k, v, c, mask=masks.Causal(), return_lse=True,
                                                            implementation="xla", block_q=8, block_kv=8))(
        q, k, v, centroids)
    assert out.shape == (1, T, HQ, D) and lse.shape == (1, T, HQ)
    with pytest.raises(ValueError, match=r"centroids must be \[H, C, D\]"):
        routing_buckets(q, k, centroids[..., :4])
    with pytest.raises(ValueError, match="one head per kv head"):
        routing_buckets(q, k, init_centroids(jax.random.PRNGKey(0), 1, C, D))
    with pytest.raises(ValueError, match="num_clusters must be a positive int"):
        Routing(num_clusters=0)
    with pytest.raises(ValueError, match="kmeans_steps"):
        Routing(kmeans_steps=-1)
