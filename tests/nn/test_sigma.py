"""Sigma's DiffQKV attention (Lin et al. 2025, Fig. 3) as ``MultiHeadAttention`` with separate K and V
head counts (``num_kv_heads``, ``num_v_heads``) and augmented Q (q/k head dim above v's), registered
as the layer "sigma": against a plain reference written here, parameter count, decoding from a
``KVCache`` whose K and V have their own head counts and dims, and the cache's size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.attention import KVCache, MultiHeadAttention
from attnjax.nn.registry import modules
from attnjax.positional import RoPE
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import assert_close

D_MODEL, HEADS, K_HEADS, V_HEADS, QK_DIM, V_DIM = 16, 4, 1, 2, 8, 4
"""Sigma's shape of the layer: K compressed more than V (1 K head, 2 V heads for 4 query heads) and
augmented Q (q/k heads of 8 features, v heads of 4, so ``HEADS·QK_DIM = 32 > d_model``)."""


def sigma(**kw):
    return MultiHeadAttention(D_MODEL, HEADS, **{"num_kv_heads": K_HEADS, "num_v_heads": V_HEADS,
                                                  "head_dim": QK_DIM, "v_head_dim": V_DIM, "rngs": nnx.Rngs(0), **kw})


def plain_sigma(params, x):
    """``y = concat_h(softmax(q_h·k_{h // (Hq/Hk)}ᵀ/√D + causal) v_{h // (Hq/Hv)}) W_o``, one head at a time."""
    q = jnp.einsum("btd,dhk->bthk", x, params["query"]["kernel"])
    k = jnp.einsum("btd,dhk->bthk", x, params["key"]["kernel"])
    v = jnp.einsum("btd,dhk->bthk", x, params["value"]["kernel"])
    T = x.shape[1]
    causal = np.tril(np.ones((T, T), bool))
    heads = []
    for h in range(HEADS):
        s = jnp.einsum("bte,bse->bts", q[:, :, h], k[:, :, h // (HEADS // K_HEADS)]) / np.sqrt(QK_DIM)
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        heads.append(jnp.einsum("bts,bse->bte", p, v[:, :, h // (HEADS // V_HEADS)]))
    return jnp.einsum("bthe,hed->btd", jnp.stack(heads, axis=2), params["out"]["kernel"])


def test_matches_plain_reference_forward_and_grads():
    x = jax.random.normal(jax.random.key(0), (2, 7, D_MODEL), jnp.float32)
    check_module_against_reference(sigma(implementation="xla"), plain_sigma, x, call_kwargs={"mask": masks.Causal()})


def test_parameter_count_and_shapes():
    m = sigma()
    assert parameter_count(m) == D_MODEL * (HEADS * QK_DIM + K_HEADS * QK_DIM + V_HEADS * V_DIM) + HEADS * V_DIM * D_MODEL
    assert m.value.kernel.shape == (D_MODEL, V_HEADS, V_DIM) and m.out.kernel.shape == (HEADS, V_DIM, D_MODEL)


def test_decode_with_unequal_caches_equals_the_parallel_causal_call():
    m = sigma(rope=RoPE(base=100.0))
    x = jax.random.normal(jax.random.key(1), (2, 6, D_MODEL), jnp.float32)
    cache = m.init_cache(2, 8)
    assert cache.k.shape == (2, 8, K_HEADS, QK_DIM) and cache.v.shape == (2, 8, V_HEADS, V_DIM)

    @nnx.jit
    def generate(m, x, cache):
        def step(cache, x_t):
            y_t, cache = m.decode(x_t[:, None], cache)
            return cache, y_t[:, 0]
        cache, ys = jax.lax.scan(step, cache, x.transpose(1, 0, 2))
        return ys.transpose(1, 0, 2), cache

    ys, cache = generate(m, x, cache)
    assert int(cache.length) == 6 and cache.v.shape == (2, 8, V_HEADS, V_DIM)
    assert_close(ys, nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(m, x), rtol=1e-5, name="decode")


def cache_bytes(cache: KVCache) -> int:
    return cache.k.nbytes + cache.v.nbytes


def test_kv_cache_bytes_of_hv_half_hk_against_gqa():
    """``B·L·(Hk·D + Hv·Dv)·itemsize``: with ``Hv = Hk/2`` (same dims) the cache is 3/4 of GQA's with
    the same ``Hk``; Sigma's layer above stores ``1·8 + 2·4 = 16`` features per token against MHA's 64."""
    B, L, H, Hk, D = 2, 128, 8, 4, 16
    diff = MultiHeadAttention(H * D, H, num_kv_heads=Hk, num_v_heads=Hk // 2, rngs=nnx.Rngs(0)).init_cache(B, L)
    gqa = MultiHeadAttention(H * D, H, num_kv_heads=Hk, rngs=nnx.Rngs(0)).init_cache(B, L)
    assert cache_bytes(diff) == B * L * (Hk * D + Hk // 2 * D) * 4 == 98304
    assert cache_bytes(gqa) == B * L * 2 * Hk * D * 4 == 131072
    assert cache_bytes(diff) / cache_bytes(gqa) == 0.75
    assert cache_bytes(sigma().init_cache(1, 1)) == (K_HEADS * QK_DIM + V_HEADS * V_DIM) * 4


def test_registered_as_a_decoding_causal_layer():
    spec = next(s for s in modules("layer") if s.name == "sigma")
    assert spec.module is MultiHeadAttention and spec.causal and spec.decodes
    assert spec.kwargs["num_kv_heads"] != spec.kwargs["num_v_heads"] and spec.kwargs["head_dim"] > spec.kwargs["v_head_dim"]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_v_heads=3), ValueError, r"num_heads \(4\) must be a multiple of num_v_heads \(3\)"),
    (dict(v_head_dim=0), ValueError, "v_head_dim must be a positive int"),
    (dict(mechanism="sigmoid"), NotImplementedError, r"needs \['kv_heads'\] from its mechanism"),
    (dict(sequence_parallel=("sp", "contiguous", "allgather")), NotImplementedError, "runs with scheme 'ring'"),
])
def test_bad_configurations(kwargs, error, match):
    with pytest.raises(error, match=match):
        sigma(**kwargs)
