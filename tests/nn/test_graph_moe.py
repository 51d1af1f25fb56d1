"""attnjax.nn.graph_moe: GraphMoE (S-MoE) and GraphMoEBlock (A-MoE) against plain references written here from the
paper's equations (outputs and every gradient, the router's included), the expert paths, capacity, the
load-balancing method, parameter counts and errors. The module checks run the attention calls' "reference"
implementation (quick to compile); the blocked mixing is checked against it in tests/heads/test_graph_routing.py,
and the default path runs in the conformance suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.heads.graph_routing import expert_capacity
from attnjax.nn.graph_moe import GraphMoE, GraphMoEBlock
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.helpers import assert_close, numpy_rng

B, T, D_MODEL, E, D_FF, HEADS, KV_HEADS = 2, 7, 16, 4, 24, 4, 2


def inputs():
    return jnp.asarray(numpy_rng(jax.random.key(0)).standard_normal((B, T, D_MODEL), np.float32))


def causal_softmax(s):
    allowed = jnp.tril(jnp.ones(s.shape[-2:], bool))
    return jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, s, -1e30), axis=-1), 0.0)


def plain_moe(p, x, mixed):
    """Top-2 of ``mixed`` with gates ``mixed``, every expert run: ``Σ_e g_e·(W2_e·GELU(W1_e·x + b1_e) + b2_e)``."""
    weights, index = jax.lax.top_k(mixed, 2)
    gates = jnp.sum(jax.nn.one_hot(index, E) * weights[..., None], axis=-2)  # [B, T, E]
    h = jax.nn.gelu(jnp.einsum("btd,edf->btef", x, p["w1"]) + p["b1"], approximate=False)
    return jnp.einsum("bte,btef,efd->btd", gates, h, p["w2"]) + gates @ p["b2"]


def plain_s_moe(p, x, tau):
    """S-MoE: ``P̃ = S·softmax(ℓ)`` with ``S = softmax(ℓ ℓᵀ / τ)`` (causal) over the router logits ``ℓ = x W_g``."""
    logits = x @ p["gate"]["kernel"]
    mixed = causal_softmax(jnp.einsum("bte,bse->bts", logits, logits) / tau) @ jax.nn.softmax(logits, axis=-1)
    return plain_moe(p, x, mixed)


def perturbed(model):
    """Nonzero expert biases (zero at init), so that the reference is checked on them."""
    key = jax.random.key(5)
    for param in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda a: isinstance(a, nnx.Param)):
        if not jnp.any(param[...] != 0) or jnp.all(param[...] == 1):
            key, sub = jax.random.split(key)
            param[...] = param[...] + 0.3 * jax.random.normal(sub, param.shape)
    return model


def test_s_moe_layer_matches_plain_reference():
    model = perturbed(GraphMoE(D_MODEL, E, d_ff=D_FF, tau=0.5, implementation="reference", rngs=nnx.Rngs(0)))
    check_module_against_reference(model, lambda p, x: plain_s_moe(p, x, 0.5), inputs(),
                                   call_kwargs={"mask": masks.Causal()}, rtol=1e-5)


def plain_a_moe_block(p, x):
    """``u = x + MHA(LN(x))``, ``y = u + MoE(LN(u))`` routed by the head-averaged attention matrix of that MHA."""
    def layer_norm(p, x):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]

    a = p["attention"]
    xn = layer_norm(p["attention_norm"], x)
    q = jnp.einsum("btd,dhk->bhtk", xn, a["query"]["kernel"])
    k = jnp.repeat(jnp.einsum("btd,dhk->bhtk", xn, a["key"]["kernel"]), HEADS // KV_HEADS, axis=1)
    v = jnp.repeat(jnp.einsum("btd,dhk->bhtk", xn, a["value"]["kernel"]), HEADS // KV_HEADS, axis=1)
    attn = causal_softmax(jnp.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(D_MODEL // HEADS))
    u = x + jnp.einsum("bhts,bhsk,hkd->btd", attn, v, a["out"]["kernel"])
    un = layer_norm(p["moe_norm"], u)
    mixed = attn.mean(1) @ jax.nn.softmax(un @ p["moe"]["gate"]["kernel"], axis=-1)
    return u + plain_moe(p["moe"], un, mixed)


def test_a_moe_block_matches_plain_reference():
    model = perturbed(GraphMoEBlock(D_MODEL, HEADS, E, d_ff=D_FF, num_kv_heads=KV_HEADS, implementation="reference",
                                    rngs=nnx.Rngs(1)))
    check_module_against_reference(model, plain_a_moe_block, inputs(), call_kwargs={"mask": masks.Causal()},
                                   rtol=1e-5)


def test_expert_paths_capacity_softmax_router_and_load_balancing_loss():
    """One compiled call: dispatch == every-expert reference; a capacity factor drops slots (and equals the routed
    reference only where nothing of the token is dropped); the softmax router is plain SMoE; the loss method is
    ``E·Σ f_e·p̄_e`` of the routing."""
    build = lambda **kw: GraphMoE(D_MODEL, E, d_ff=D_FF, rngs=nnx.Rngs(2), **kw)
    models = (build(), build(experts="reference"), build(capacity_factor=0.5),
              build(router="softmax"), build(router="softmax", experts="reference"))
    x, causal = inputs(), masks.Causal()

    def run(models, x):
        dispatch, plain = models[0], models[3]
        return ([m(x, mask=causal) for m in models], dispatch.mixed_probabilities(x, mask=causal),
                dispatch.load_balancing_loss(x, mask=causal), plain.mixed_probabilities(x, mask=causal),
                jax.nn.softmax(x @ plain.gate.kernel[...], axis=-1))

    (y, y_ref, y_dropped, y_plain, y_plain_ref), probs, loss, plain_probs, softmax = nnx.jit(run)(models, x)
    assert_close(y, y_ref, rtol=1e-5, name="dispatch")
    assert_close(y_plain, y_plain_ref, rtol=1e-5, name="softmax router")
    assert_close(plain_probs, softmax, rtol=1e-6, name="softmax router probabilities")
    assert expert_capacity(B * T, E, 2, 0.5) == 4
    assert not np.allclose(y_dropped, y, atol=1e-4)
    index = np.asarray(jax.lax.top_k(probs, 2)[1]).reshape(-1, 2)
    fraction = np.bincount(index.ravel(), minlength=E) / index.size
    expected = E * np.sum(fraction * np.asarray(probs).reshape(-1, E).mean(0))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_parameter_counts():
    moe = GraphMoE(D_MODEL, E, d_ff=D_FF, rngs=nnx.Rngs(0))
    experts = E * (D_MODEL * D_FF + D_FF + D_FF * D_MODEL + D_MODEL)
    assert parameter_count(moe) == D_MODEL * E + experts  # the graph routers add no parameters
    block = GraphMoEBlock(D_MODEL, HEADS, E, d_ff=D_FF, num_kv_heads=KV_HEADS, rngs=nnx.Rngs(0))
    head_dim = D_MODEL // HEADS
    attention = 2 * D_MODEL * HEADS * head_dim + 2 * D_MODEL * KV_HEADS * head_dim
    assert parameter_count(block) == 2 * 2 * D_MODEL + attention + D_MODEL * E + experts


def test_errors():
    with pytest.raises(ValueError, match="router must be one of"):
        GraphMoE(D_MODEL, E, d_ff=D_FF, router="hash", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"top_k \(5\) must be at most num_experts \(4\)"):
        GraphMoE(D_MODEL, E, d_ff=D_FF, top_k=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="experts must be one of"):
        GraphMoE(D_MODEL, E, d_ff=D_FF, experts="gather", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        GraphMoE(D_MODEL, E, d_ff=D_FF, capacity_factor=0.0, rngs=nnx.Rngs(0))
    a_moe = GraphMoE(D_MODEL, E, d_ff=D_FF, router="attention", rngs=nnx.Rngs(0))
    x = inputs()
    with pytest.raises(NotImplementedError, match="attention_routed"):
        a_moe(x)
    with pytest.raises(ValueError, match=r"needs attention=\(q, k\)"):
        a_moe.mixed_probabilities(x)
    with pytest.raises(NotImplementedError, match="decode_attention_routed"):
        a_moe.decode(x[:, :1], a_moe.init_cache(B, 4))
    s_moe = GraphMoE(D_MODEL, E, d_ff=D_FF, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"takes no attention=\(q, k\)"):
        s_moe.mixed_probabilities(x, attention=(x, x))
    with pytest.raises(ValueError, match="is for router 'attention'"):
        s_moe.decode_attention_routed(x[:, :1], s_moe.init_cache(B, 4), x, x)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\]"):
        s_moe(x[..., :8])
