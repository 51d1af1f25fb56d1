"""attnjax.nn.moh.MoHAttention against a plain MoH written from the paper's equations, parameter counts, the
balance loss and decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.heads.moh import moh_balance_loss
from attnjax.nn.moh import MoHAttention
from attnjax.testing.modules import check_module_against_reference, parameter_count, parameters
from tests.helpers import assert_close

D_MODEL, HEADS, SHARED, TOP_K, KV_HEADS = 24, 6, 2, 2, 3


def plain_moh(p, x, *, causal=True, official=False):
    """MoH sec. 3.2 by hand: top-k of W_r x by sorting, g = α₁·softmax(W_s x) | α₂·softmax(W_r x) on the top-k,
    every head computed (K/V repeated for GQA), y = Σ_i g_i H^i W_O^i."""
    q = jnp.einsum("btd,dhk->bthk", x, p["query"]["kernel"])
    k = jnp.repeat(jnp.einsum("btd,dhk->bthk", x, p["key"]["kernel"]), HEADS // KV_HEADS, axis=2)
    v = jnp.repeat(jnp.einsum("btd,dhk->bthk", x, p["value"]["kernel"]), HEADS // KV_HEADS, axis=2)
    logits = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    if causal:
        T = x.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    heads = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v)
    routed = x @ p["router_routed"]["kernel"]
    rank = jnp.argsort(jnp.argsort(-routed, axis=-1, stable=True), axis=-1, stable=True)
    chosen = (rank < TOP_K).astype(jnp.float32)
    probs = jax.nn.softmax(routed, axis=-1)
    alpha = jax.nn.softmax(x @ p["router_balance"]["kernel"], axis=-1)
    shared = jax.nn.softmax(x @ p["router_shared"]["kernel"], axis=-1)
    if official:
        selected = probs * chosen
        gates = 2 * jnp.concatenate([alpha[..., :1] * SHARED * shared,
                                     alpha[..., 1:] * TOP_K * selected / selected.sum(-1, keepdims=True)], -1)
    else:
        gates = jnp.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * probs * chosen], -1)
    return jnp.einsum("bthk,bth,hkd->btd", heads, gates, p["out"]["kernel"])


def make(**kw):
    return MoHAttention(D_MODEL, HEADS, **{"num_shared_heads": SHARED, "top_k": TOP_K, "num_kv_heads": KV_HEADS,
                                            "block_q": 4, "block_kv": 4, "rngs": nnx.Rngs(0), **kw})


def inputs(seed=0, T=7):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, T, D_MODEL)), jnp.float32)


def test_module_matches_plain_moh_forward_and_every_gradient():
    """The dense path of the module, forward and the gradient of every parameter (router included); the routed
    path's gradients equal the dense path's in tests/heads/test_moh.py."""
    check_module_against_reference(make(implementation="reference"), plain_moh, inputs(),
                                   call_kwargs={"mask": masks.Causal()})


@pytest.mark.parametrize("kw", [{}, {"implementation": "reference", "official_scaling": True}],
                         ids=["routed heads", "official scaling"])
def test_module_paths_forward(kw):
    layer, x = make(**kw), inputs(1, T=5)
    causal = not kw
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal() if causal else None))(layer, x)
    expected = jax.jit(lambda p, x: plain_moh(p, x, causal=causal, official=bool(kw)))(parameters(layer), x)
    assert_close(y, expected, name="y")


@pytest.mark.parametrize("shared, top_k, kv", [(2, 2, 3), (1, 3, 6), (0, 2, 2), (6, 0, 1)])
def test_parameter_count(shared, top_k, kv):
    m = nnx.eval_shape(lambda: MoHAttention(D_MODEL, HEADS, num_shared_heads=shared, top_k=top_k, num_kv_heads=kv,
                                            rngs=nnx.Rngs(0)))
    D, routed = D_MODEL // HEADS, HEADS - shared
    router = D_MODEL * (routed + (shared if shared > 1 else 0) + (2 if shared and routed else 0))
    assert parameter_count(m) == 2 * D_MODEL * HEADS * D + 2 * D_MODEL * kv * D + router


def test_defaults_follow_moh_llama3_and_balance_loss_matches_its_formula():
    """The method's value against Σ f_i P_i from the router's logits (its gradient to the router is tested on
    moh_balance_loss in tests/heads/test_moh.py)."""
    m = MoHAttention(16, 8, rngs=nnx.Rngs(0))
    assert (m.num_shared_heads, m.top_k) == (4, 2)  # 75% of the heads active
    layer, x = make(), inputs(2)
    loss, direct = nnx.jit(lambda m, x: (m.balance_loss(x), moh_balance_loss(m.route(x))))(layer, x)
    assert_close(loss, direct, atol=1e-7, name="balance loss")
    routed = np.asarray(x @ layer.router_routed.kernel[...]).reshape(-1, HEADS - SHARED)
    top = np.argsort(-routed, axis=-1, kind="stable")[:, :TOP_K]
    f = np.bincount(top.ravel(), minlength=HEADS - SHARED) / len(routed)
    e = np.exp(routed - routed.max(-1, keepdims=True))
    assert abs(float(loss) - float(np.sum(f * (e / e.sum(-1, keepdims=True)).mean(0)))) < 1e-6


def test_reference_decode_equals_parallel_causal_call():
    layer, x = make(implementation="reference"), inputs(3, T=5)
    y = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))(layer, x)
    step = nnx.jit(lambda m, x_t, c: m.decode(x_t, c))
    cache, steps = layer.init_cache(2, 8), []
    for t in range(x.shape[1]):
        y_t, cache = step(layer, x[:, t:t + 1], cache)
        steps.append(y_t)
    assert_close(jnp.concatenate(steps, axis=1), y, atol=2e-5, name="decode")


def test_errors():
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\]"):
        make(top_k=5)
    with pytest.raises(ValueError, match="num_shared_heads must be an int"):
        make(num_shared_heads=7)
    with pytest.raises(ValueError, match="no routed heads"):
        make(num_shared_heads=HEADS, top_k=1)
    with pytest.raises(ValueError, match="implementation must be one of"):
        make(implementation="pallas")
    with pytest.raises(NotImplementedError, match="mask=None or masks.Causal"):
        make()(inputs(), mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 24\]"):
        make()(jnp.ones((2, 3, 5)))
