"""attnjax.nn.bam: BAMAttention against a plain mixture-of-MHA reference (forward and every gradient, router
included), its parameter count, the router losses, upcycling from dense MultiHeadAttention, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.bam import BAMAttention, upcycle_attention
from attnjax.positional import RoPE
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close

B, T, DM = 2, 5, 12
ROPE = RoPE(base=100.0)


def inputs(seed=0, T=T):
    return jax.random.normal(jax.random.key(seed), (B, T, DM), jnp.float32)


def plain_bam(p, x, *, shared_kv, top_k, rope):
    """y = Σ_e g_e (MHA_e(x) + b_o^e), g = softmax(x W_r) (top-k renormalized), written out head by head."""
    logits = x @ p["router"]["kernel"]
    probs = jax.nn.softmax(logits, axis=-1)
    if top_k is not None:
        kth = jnp.sort(probs, axis=-1)[..., -top_k, None]
        probs = jnp.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum(-1, keepdims=True)

    def project(name, spec):
        y = jnp.einsum(f"btd,d{spec}->bt{spec}", x, p[name]["kernel"])
        return y + p[name]["bias"] if "bias" in p[name] else y

    q = project("query", "ehk")
    k, v = (project(name, "jk" if shared_kv else "ejk") for name in ("key", "value"))
    if shared_kv:
        k, v = k[:, :, None], v[:, :, None]
    E, H, D = q.shape[2:]
    if rope is not None:
        pos = jnp.arange(x.shape[1])
        q = rope(q.reshape(B, -1, E * H, D), pos).reshape(q.shape)
        k = rope(k.reshape(B, -1, k.shape[2] * k.shape[3], D), pos).reshape(k.shape)
    group = H // k.shape[3]
    k, v = jnp.repeat(k, group, axis=3), jnp.repeat(v, group, axis=3)
    k, v = jnp.broadcast_to(k, q.shape), jnp.broadcast_to(v, q.shape)
    s = jnp.einsum("btehk,bsehk->behts", q, k) / np.sqrt(D)
    s = jnp.where(jnp.tril(jnp.ones((x.shape[1],) * 2, bool)), s, -jnp.inf)
    o = jnp.einsum("behts,bsehk->btehk", jax.nn.softmax(s, axis=-1), v)
    y = jnp.einsum("btehk,ehkm->btem", o, p["out_kernel"])
    if "out_bias" in p:
        y = y + p["out_bias"]
    return jnp.einsum("btem,bte->btm", y, probs)


def test_module_equals_plain_mixture_of_attentions():
    """Separate experts, GQA, RoPE, biases, top-2 routing: the fused path, every gradient (router included)."""
    config = dict(num_experts=3, num_kv_heads=1, rope=ROPE, qkv_bias=True, out_bias=True, top_k=2)
    layer = BAMAttention(DM, 2, **config, rngs=nnx.Rngs(0))
    check_module_against_reference(layer, lambda p, x: plain_bam(p, x, shared_kv=False, top_k=2, rope=ROPE),
                                   inputs(), call_kwargs={"mask": masks.Causal()}, rtol=1e-5)


def test_routed_module_equals_its_reference_implementation():
    """Shared K/V with top-2 routing runs ``bam_attention_routed``; the expert-by-expert path agrees."""
    routed, reference = (BAMAttention(DM, 2, 4, shared_kv=True, top_k=2, rope=ROPE, implementation=impl,
                                      rngs=nnx.Rngs(1)) for impl in ("auto", "reference"))
    run = nnx.jit(lambda a, b, x: (a(x, mask=masks.Causal()), b(x, mask=masks.Causal())))
    y, y_ref = run(routed, reference, inputs(1))
    assert_close(y, y_ref, rtol=1e-5, name="routed")


@pytest.mark.parametrize("shared_kv, qkv_bias, out_bias", [(False, False, False), (True, True, True)])
def test_parameter_count(shared_kv, qkv_bias, out_bias):
    E, H, Hkv, D = 3, 4, 2, 5
    layer = nnx.eval_shape(lambda: BAMAttention(DM, H, E, num_kv_heads=Hkv, head_dim=D, shared_kv=shared_kv,
                                                qkv_bias=qkv_bias, out_bias=out_bias, rngs=nnx.Rngs(0)))
    kv = (1 if shared_kv else E) * Hkv * D
    expected = DM * E + (DM + qkv_bias) * (E * H * D + 2 * kv) + E * H * D * DM + out_bias * E * DM
    assert parameter_count(layer) == expected


def test_router_losses_equal_their_formulas():
    layer = BAMAttention(DM, 2, 4, top_k=2, rngs=nnx.Rngs(0))
    x = inputs(2)
    losses = nnx.jit(lambda m, x: m.router_losses(x))(layer, x)
    logits = np.asarray(x) @ np.asarray(parameters(layer)["router"]["kernel"])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top2 = np.argsort(-p, axis=-1)[..., :2]
    counts = np.array([(top2 == e).sum() for e in range(4)])
    expected = 4 * np.sum(counts / counts.sum() * p.reshape(-1, 4).mean(0))
    assert_close(losses["load_balancing"], expected, rtol=1e-5, name="load balancing")
    assert_close(losses["z"], np.mean(np.log(np.exp(logits).sum(-1)) ** 2), rtol=1e-5, name="z")


@pytest.mark.parametrize("shared_kv, top_k", [(False, None), (True, 2)])
def test_upcycled_from_one_dense_layer_equals_it(shared_kv, top_k):
    """Every expert is the dense layer and the gates sum to 1, so the output is the dense layer's."""
    dense = MultiHeadAttention(DM, 2, num_kv_heads=1, rope=ROPE, qkv_bias=True, out_bias=True, rngs=nnx.Rngs(3))
    layer = upcycle_attention(dense, 3, shared_kv=shared_kv, top_k=top_k, rngs=nnx.Rngs(4))
    run = nnx.jit(lambda dense, layer, x: (dense(x, mask=masks.Causal()), layer(x, mask=masks.Causal())))
    y_dense, y = run(dense, layer, inputs(3))
    assert_close(y, y_dense, rtol=1e-5, name="upcycled")


def test_upcycled_experts_take_each_dense_layers_weights_and_shared_kv_their_mean():
    denses = [MultiHeadAttention(DM, 2, rngs=nnx.Rngs(seed)) for seed in (5, 6)]
    for shared_kv in (False, True):
        p = parameters(upcycle_attention(denses, shared_kv=shared_kv, rngs=nnx.Rngs(7)))
        dense = [parameters(m) for m in denses]
        for e in range(2):
            np.testing.assert_array_equal(p["query"]["kernel"][:, e], dense[e]["query"]["kernel"])
            np.testing.assert_array_equal(p["out_kernel"][e], dense[e]["out"]["kernel"])
            if not shared_kv:
                np.testing.assert_array_equal(p["key"]["kernel"][:, e], dense[e]["key"]["kernel"])
        if shared_kv:
            mean = (dense[0]["value"]["kernel"] + dense[1]["value"]["kernel"]) / 2
            assert_close(p["value"]["kernel"], mean, rtol=1e-7, name="shared value")


def test_bfloat16_module_is_finite():
    """Parameters and computation in bfloat16 (the layer is built inside the compiled call)."""
    def run(x):
        layer = BAMAttention(DM, 2, 3, shared_kv=True, top_k=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                             rngs=nnx.Rngs(0))
        return layer(x, mask=masks.Causal())

    y = jax.jit(run)(inputs().astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"top_k \(4\) must be at most num_experts \(3\)"):
        BAMAttention(DM, 2, 3, top_k=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        BAMAttention(DM, 4, 3, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="implementation must be one of"):
        BAMAttention(DM, 2, 3, implementation="xla", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_experts is required"):
        upcycle_attention(MultiHeadAttention(DM, 2, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="share one configuration"):
        upcycle_attention([MultiHeadAttention(DM, 2, rngs=nnx.Rngs(0)), MultiHeadAttention(DM, 3, rngs=nnx.Rngs(0))],
                          rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="self-attention layers"):
        upcycle_attention(MultiHeadAttention(DM, 2, context_dim=8, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="without dropout"):
        upcycle_attention(MultiHeadAttention(DM, 2, dropout_rate=0.1, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        nnx.eval_shape(lambda: BAMAttention(DM, 2, 3, rngs=nnx.Rngs(0)))(jnp.zeros((B, T, DM), jnp.int32))
