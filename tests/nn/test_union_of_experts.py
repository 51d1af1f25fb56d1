"""attnjax.nn.union_of_experts: SelectiveMultiHeadAttention against a plain reference written from its definition
(routing, capacity, per-expert masked attention; forward and every gradient, routers included), hierarchical
routing, parameter count, the load-balancing loss, decoding with capacity drops, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.nn.union_of_experts import SelectiveMultiHeadAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close

B, T, DM, E = 2, 7, 12, 4


def inputs(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, DM), jnp.float32)


def top_k_mask(probs, k):
    """True on each row's k largest entries."""
    kth = jnp.sort(probs, axis=-1)[..., -k, None]
    return probs >= kth


def plain_smha(p, x, *, top_k, capacity=None, sample_top_k=None, causal=True):
    """Routing by its rules, then each head attends only among the tokens routed to it, outputs weighted by
    the router probabilities (times the sample router's)."""
    logits = x @ p["router"]["kernel"] + p["router"]["bias"]
    sample = 1.0
    if sample_top_k is not None:
        s = jax.nn.softmax(x.mean(1) @ p["sample_router"]["kernel"] + p["sample_router"]["bias"], axis=-1)
        allowed = top_k_mask(s, sample_top_k)
        sample = jnp.where(allowed, s, 0.0)[:, None, :]
        logits = jnp.where(allowed[:, None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    sel = top_k_mask(probs, top_k)
    if capacity is not None:
        sel = sel & (jnp.cumsum(sel, axis=1) <= capacity)
    q, k, v = (jnp.einsum("btd,dek->betk", x, p[name]["kernel"]) for name in ("query", "key", "value"))
    s = jnp.einsum("betk,besk->bets", q, k) / np.sqrt(q.shape[-1])
    se = jnp.swapaxes(sel, 1, 2)
    allow = se[:, :, :, None] & se[:, :, None, :]
    if causal:
        allow = allow & jnp.tril(jnp.ones((x.shape[1],) * 2, bool))
    a = jax.nn.softmax(jnp.where(allow, s, -jnp.inf), axis=-1)
    o = jnp.where(se[..., None], jnp.einsum("bets,besk->betk", jnp.where(allow, a, 0.0), v), 0.0)
    return jnp.einsum("betk,ekm,bte->btm", o, p["out_kernel"], jnp.where(sel, probs, 0.0) * sample)


@pytest.mark.parametrize("kwargs", [dict(top_k=2, capacity=4),
                                    pytest.param(dict(top_k=1, sample_top_k=3, causal=False), marks=pytest.mark.slow)],
                         ids=["causal-capacity", "hierarchical"])
def test_module_equals_plain_reference(kwargs):
    layer = SelectiveMultiHeadAttention(DM, E, **kwargs, rngs=nnx.Rngs(0))
    call = {"mask": masks.Causal()} if kwargs.get("causal", True) else {}
    check_module_against_reference(layer, lambda p, x: plain_smha(p, x, **kwargs), inputs(), call_kwargs=call,
                                   rtol=1e-5)


def test_capacity_drops_tokens_and_decode_keeps_the_same_ones():
    layer = SelectiveMultiHeadAttention(DM, E, top_k=2, capacity=3, rngs=nnx.Rngs(1))
    x = inputs(1)
    selected = np.asarray(layer.routing(x)[0])
    assert selected.sum(axis=1).max() == 3 and selected.sum() < B * T * 2, "some tokens are dropped"
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x)
    step, cache, steps = nnx.jit(lambda m, x_t, c: m.decode(x_t, c)), layer.init_cache(B, T + 2), []
    assert cache.k.shape == (B, 3, E, DM // E)
    for t in range(T):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        steps.append(y_t)
    assert_close(jnp.concatenate(steps, axis=1), y, rtol=1e-5, name="decode")
    np.testing.assert_array_equal(np.asarray(cache.counts), selected.sum(axis=1))


def test_parameter_count():
    layer = nnx.eval_shape(lambda: SelectiveMultiHeadAttention(DM, E, head_dim=5, sample_top_k=3, causal=False,
                                                               rngs=nnx.Rngs(0)))
    assert parameter_count(layer) == 2 * (DM * E + E) + 3 * DM * E * 5 + E * 5 * DM


def test_load_balancing_loss_equals_its_formula():
    layer = SelectiveMultiHeadAttention(DM, E, top_k=2, capacity=2, rngs=nnx.Rngs(2))
    x = inputs(2)
    loss = nnx.jit(lambda m, x: m.load_balancing_loss(x))(layer, x)
    p = parameters(layer)["router"]
    logits = np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[..., :2]                       # before the capacity cap
    f = np.array([(top == e).sum() for e in range(E)]) / top.size
    assert_close(loss, E * np.sum(f * probs.reshape(-1, E).mean(0)), rtol=1e-5, name="load balancing")


def test_bfloat16_module_is_finite():
    """Parameters and computation in bfloat16 (the layer is built inside the compiled call)."""
    def run(x):
        layer = SelectiveMultiHeadAttention(DM, E, capacity=4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                            rngs=nnx.Rngs(0))
        return layer(x, mask=masks.Causal())

    y = jax.jit(run)(inputs().astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"top_k \(5\) must be at most num_heads \(4\)"):
        SelectiveMultiHeadAttention(DM, E, top_k=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="can't be causal; pass causal=False"):
        SelectiveMultiHeadAttention(DM, E, sample_top_k=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sample_top_k \(1\) must be in \[top_k, num_heads\]"):
        SelectiveMultiHeadAttention(DM, E, top_k=2, sample_top_k=1, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        SelectiveMultiHeadAttention(DM, E, capacity=0, rngs=nnx.Rngs(0))
    hierarchical = nnx.eval_shape(lambda: SelectiveMultiHeadAttention(DM, E, sample_top_k=3, causal=False,
                                                                      rngs=nnx.Rngs(0)))
    with pytest.raises(NotImplementedError, match="can't be causal"):
        hierarchical(inputs(), mask=masks.Causal())
    with pytest.raises(NotImplementedError, match="decoding needs a causal layer"):
        hierarchical.init_cache(B, T)
    layer = nnx.eval_shape(lambda: SelectiveMultiHeadAttention(DM, E, rngs=nnx.Rngs(0)))
    with pytest.raises(NotImplementedError, match=r"takes mask=None or masks.Causal\(\) only"):
        layer(inputs(), mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 12\]"):
        layer(inputs()[:, :, :5])
