"""attnjax.nn.memory Titans layers (NeuralMemoryLayer, TitansMAC, TitansMAG, TitansMAL): each against the paper's
equations written plainly on the module's parameters (output and every gradient; token scans; MAC at T = 9 with a
partial last segment), the deep and Miras memories through the layers (forward; the full-gradient MAL with a deep
memory and the Moneta and Memora bare layers are slow), causality across MAC's segment boundary, the persistent
tokens' gradients (slow), bf16, and argument errors. jit, the Linen bridge, checkpointing, causality and decode ==
parallel of the registered examples (bare layer, MAC, MAG, and MAL with a deep memory) come from the module
conformance suite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import masks
from attnjax.memory.miras import HuberBias, KLRetention, LpBias, LqRetention
from attnjax.nn.memory import MEMORIES, MemoryConfig, NeuralMemoryLayer, TitansMAC, TitansMAG, TitansMAL
from attnjax.testing.modules import check_module_against_reference, parameters
from tests.helpers import TOLERANCE, assert_close

B, T, DM, H, NP, SEG, WIN, C, K = 2, 13, 16, 2, 2, 4, 4, 2, 3
COMMON = dict(num_persistent=NP, chunk_size=C, conv_size=K)
CALL = nnx.jit(lambda m, x: m(x, mask=masks.Causal()))
"""The parallel call, compiled once per layer configuration and shape."""


def inputs(seed=0, t=T):
    return jax.random.normal(jax.random.key(seed), (B, t, DM), jnp.float32)


# ---- the paper's equations, plainly ------------------------------------------------------------------------------

def rms_norm(x, scale):
    """RMSNorm with learnable vector-valued weights (flax's ε = 1e-6)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def memory_projections(pm, x):
    """Eqs. 11, 15 and Sec. 4.4: q, k, v = SiLU(causal depthwise conv(x W)), q and k ℓ2-normalized; [B, T, H, D]."""
    u = jnp.concatenate([jnp.einsum("btm,mhd->bthd", x, pm[n]["kernel"]).reshape(*x.shape[:2], -1)
                         for n in ("query", "key", "value")], axis=-1)
    w = pm["conv"]["kernel"][:, 0]                                           # [K, 3·H·D]
    padded = jnp.pad(u, ((0, 0), (K - 1, 0), (0, 0)))
    u = sum(w[j] * padded[:, j:j + x.shape[1]] for j in range(K))            # Σ_j w_j u_(t−K+1+j)
    q, k, v = (a.reshape(*x.shape[:2], H, -1) for a in jnp.split(jax.nn.silu(u), 3, axis=-1))
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    return unit(q), unit(k), v


def memory_gates(pm, x, config):
    """θ = σ(·) (θ_max = 1), η = σ(·) (0 without momentum), α = σ(·), δ = softplus(·): [B, T, H]."""
    def logit(name):
        return x @ pm[f"{name}_gate"]["kernel"] + pm[f"{name}_gate"]["bias"]

    eta = jax.nn.sigmoid(logit("momentum")) if config.momentum else jnp.zeros(x.shape[:2] + (H,))
    delta = jax.nn.softplus(logit("delta")) if config.objective.needs_delta else jnp.ones(x.shape[:2] + (H,))
    return jax.nn.sigmoid(logit("lr")), eta, jax.nn.sigmoid(logit("decay")), delta


def memory_apply(config, weights, x):
    """M_W(x): the matrix memory x·W, or the MLP [x +] W_2 σ(W_1 x) on weights ψ(P)."""
    if config.linear:
        return x @ weights[0]
    h = x
    for i, w in enumerate(weights):
        h = (jax.nn.gelu(h, approximate=False) if i else h) @ w
    return x + h if config.residual else h


class PlainMemory:
    """Titans eqs. 12-15 token by token for one sequence of memory inputs, continuing across calls:
    ``S_t = η_t S_(t−1) − θ_t ∇ℓ(M_base; k_t, v_t)``, ``M_t = (1 − α_t) M_(t−1) + S_t``, ``o_t = M_t(q_t)``,
    ``M_base`` the memory before the chunk of C tokens holding t (chunks from the first token written). The
    gradient is ``∇_W ℓ(M_W(k), v)`` at ``W = ψ(M_base)`` (ψ = id but for Miras' ℓq and KL retention)."""

    def __init__(self, pm, config):
        self.config = config
        if config.linear:
            self.state = [jnp.zeros((B, H, DM // H, DM // H))]
        else:
            self.state = [jnp.broadcast_to(w, (B,) + w.shape) for w in pm["initial_weights"].values()]
        self.momentum = [jnp.zeros_like(s) for s in self.state]
        self.base, self.t = self.state, 0
        per_head = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731  (over batch and heads)
        psi = lambda state: [config.retention.weights(s) for s in state]  # noqa: E731
        loss = lambda w, k, v, delta: config.objective.loss(memory_apply(config, w, k), v, delta)  # noqa: E731
        if config.linear:   # ∇_W ½‖k·W − v‖² = kᵀ(k·W − v) (eq. 12; eq. 17's form)
            self.grad = per_head(lambda state, k, v, delta: [jnp.outer(k, k @ state[0] - v)])
        else:
            self.grad = per_head(lambda state, k, v, delta: jax.grad(loss)(psi(state), k, v, delta))
        self.read_one = per_head(lambda state, q: memory_apply(config, psi(state), q))

    def read(self, state, q):
        """``[B, T, H, D]`` queries against a fixed state."""
        return jax.vmap(self.read_one, in_axes=(None, 1), out_axes=1)(state, q)

    def write(self, q, k, v, gates):
        """A ``lax.scan`` over the tokens; returns ``o [B, T, H, D]``."""
        def token(carry, inputs):
            state, momentum, base, t = carry
            q, k, v, lr, eta, alpha, delta = inputs
            base = [jnp.where(t % C == 0, s, b) for s, b in zip(state, base)]
            grads = self.grad(base, k, v, delta)
            momentum = [eta[..., None, None] * u - lr[..., None, None] * g for u, g in zip(momentum, grads)]
            state = [(1 - alpha[..., None, None]) * s + u for s, u in zip(state, momentum)]
            return (state, momentum, base, t + 1), self.read_one(state, q)

        xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, *gates))
        carry, out = jax.lax.scan(token, (self.state, self.momentum, self.base, self.t), xs)
        self.state, self.momentum, self.base, self.t = carry
        return jnp.moveaxis(out, 0, 1)


def memory_output(pm, o, x):
    """Sec. 4.4's gating: W_O (RMSNorm(o) ⊙ SiLU(x W_G))."""
    gated = rms_norm(o, pm["norm"]["scale"]) * jax.nn.silu(jnp.einsum("btm,mhd->bthd", x, pm["gate"]["kernel"]))
    return jnp.einsum("bthd,hdm->btm", gated, pm["out"]["kernel"])


def memory_layer(pm, x, config):
    """The neural memory layer on a whole sequence x (one stream): ``[B, T, d]``."""
    q, k, v = memory_projections(pm, x)
    o = PlainMemory(pm, config).write(q, k, v, memory_gates(pm, x, config))
    return memory_output(pm, o, x)


def softmax_attention(p, q_in, kv_in, visible):
    """``softmax(q kᵀ/√D + mask) v`` W_O with GQA (query head h reads kv head h // (Hq / Hkv))."""
    q = jnp.einsum("btm,mhd->bthd", q_in, p["query"]["kernel"])
    k, v = (jnp.einsum("bsm,mhd->bshd", kv_in, p[n]["kernel"]) for n in ("key", "value"))
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd,hdm->btm", weights, v, p["out"]["kernel"])


def gate_combine(p, y, m):
    """y ⊗ m = RMSNorm(y) ⊙ σ(RMSNorm(m)) (eqs. 25, 28)."""
    return rms_norm(y, p["attention_norm"]["scale"]) * jax.nn.sigmoid(rms_norm(m, p["memory_norm"]["scale"]))


def plain_mac(config):
    def reference(p, x):
        """Eqs. 21-25 segment by segment (the last one shorter, no padding)."""
        pm, P = p["memory"], p["persistent"]
        memory = PlainMemory(pm, config)
        q_x, _, _ = memory_projections(pm, x)                  # the memory's queries of every input token
        outs, ys = [], []
        for start in range(0, x.shape[1], SEG):
            s = x[:, start:start + SEG]
            n = s.shape[1]
            h = memory_output(pm, memory.read(memory.state, q_x[:, start:start + n]), s)     # eq. 21
            context = jnp.concatenate([jnp.broadcast_to(P, (B, NP, DM)), h, s], axis=1)       # eq. 22
            i, j = np.arange(n)[:, None], np.arange(2 * n)[None, :] % n
            visible = np.concatenate([np.ones((n, NP), bool), j <= i], axis=1)
            y = softmax_attention(p, s, context, visible)                                      # eq. 23
            ys.append(y)
            q, k, v = (a[:, start:] for a in memory_projections(pm, jnp.concatenate(ys, axis=1)))
            m = memory_output(pm, memory.write(q, k, v, memory_gates(pm, y, config)), y)       # eqs. 24-25
            outs.append(gate_combine(p, y, m))
        return jnp.concatenate(outs, axis=1)
    return reference


def window_visible(t):
    """Query i (position N_p + i of x̃) sees x̃ positions N_p + i − w < j ≤ N_p + i."""
    i, j = np.arange(t)[:, None] + NP, np.arange(NP + t)[None, :]
    return (j <= i) & (j > i - WIN)


def plain_mag(config):
    def reference(p, x):
        """Eqs. 26-28."""
        x_tilde = jnp.concatenate([jnp.broadcast_to(p["persistent"], (B, NP, DM)), x], axis=1)
        m = memory_layer(p["memory"], x_tilde, config)[:, NP:]
        visible = window_visible(x.shape[1]) | (np.arange(NP + x.shape[1]) < NP)[None, :]
        return gate_combine(p, softmax_attention(p, x, x_tilde, visible), m)
    return reference


def plain_mal(config):
    def reference(p, x):
        """Eqs. 29-31."""
        x_tilde = jnp.concatenate([jnp.broadcast_to(p["persistent"], (B, NP, DM)), x], axis=1)
        y = memory_layer(p["memory"], x_tilde, config)
        return softmax_attention(p, y[:, NP:], y, window_visible(x.shape[1]))
    return reference


# ---- tests ---------------------------------------------------------------------------------------------------------

def test_mac_equals_the_paper_equations():
    """GQA attention (2 query heads, 1 kv head); T = 9: two segments of 4 and one of 1 (the reference unrolls the
    segments, so each one more adds to its compile); every gradient."""
    layer = TitansMAC(DM, H, num_kv_heads=1, segment_size=SEG, rngs=nnx.Rngs(0), **COMMON)
    check_module_against_reference(layer, plain_mac(MEMORIES["titans_linear"]), inputs(0, 9), rtol=2e-5)


def test_mag_equals_the_paper_equations():
    layer = TitansMAG(DM, H, window=WIN, rngs=nnx.Rngs(1), **COMMON)
    check_module_against_reference(layer, plain_mag(MEMORIES["titans_linear"]), inputs(1), rtol=2e-5)


@pytest.mark.parametrize("memory", ["titans_linear", pytest.param("titans_deep", marks=pytest.mark.slow)])
def test_mal_equals_the_paper_equations(memory):
    layer = TitansMAL(DM, H, window=WIN, memory=memory, rngs=nnx.Rngs(2), **COMMON)
    check_module_against_reference(layer, plain_mal(MEMORIES[memory]), inputs(2, 7), rtol=2e-5)


@pytest.mark.parametrize("name", [pytest.param("moneta", marks=pytest.mark.slow), "yaad",
                                  pytest.param("memora", marks=pytest.mark.slow)])
def test_miras_memories_through_the_layer(name):
    """The memory layer with Miras' variants (ℓ3/ℓ4, Huber with δ_t, KL; no momentum gate) against the
    token loop with the variant's written loss and ψ, forward; and decoding (δ_t reaches deep_memory_step)."""
    config = MEMORIES[name]
    layer = NeuralMemoryLayer(DM, H, chunk_size=C, conv_size=K, memory=name, rngs=nnx.Rngs(3))
    x = inputs(3, 5)
    expected = jax.jit(lambda p, x: memory_layer(p, x, config))(parameters(layer), x)
    y = CALL(layer, x)
    assert_close(y, expected, rtol=2e-5, name=name)
    assert hasattr(layer, "delta_gate") == (name == "yaad") and not hasattr(layer, "momentum_gate")
    if name == "yaad":
        step, cache, steps = nnx.jit(lambda m, x_t, c: m.decode(x_t, c)), layer.init_cache(B, 5), []
        for t in range(5):
            y_t, cache = step(layer, x[:, t:t + 1], cache)
            steps.append(y_t)
        assert_close(jnp.concatenate(steps, 1), y, atol=2e-5, rtol=2e-5, name="decode")


def test_mac_reads_a_deep_memory():
    """MAC with Memora's MLP memory (KL retention: the read applies ψ = softmax to the state): forward against the
    equations, T = 6 (the second segment reads the memory the first one wrote)."""
    config = MEMORIES["memora"]
    layer = TitansMAC(DM, H, segment_size=SEG, memory="memora", rngs=nnx.Rngs(8), **COMMON)
    x = inputs(8, 6)
    expected = jax.jit(plain_mac(config))(parameters(layer), x)
    assert_close(CALL(layer, x), expected, rtol=2e-5, name="memora MAC")


def test_memory_presets_and_config():
    assert isinstance(MEMORIES["moneta"].objective, LpBias) and isinstance(MEMORIES["moneta"].retention, LqRetention)
    assert isinstance(MEMORIES["yaad"].objective, HuberBias) and isinstance(MEMORIES["memora"].retention, KLRetention)
    assert MEMORIES["titans_linear"].linear and MEMORIES["titans_deep"].depth == 2
    layer = NeuralMemoryLayer(DM, H, memory=MemoryConfig(depth=3, expansion=2.0, activation="silu"),
                              rngs=nnx.Rngs(0))
    assert [w.shape for w in layer.initial_weights] == [(H, 8, 16), (H, 16, 16), (H, 16, 8)]


def test_mac_is_causal_across_segment_boundaries():
    """Changing token 5 (inside the second segment) leaves outputs 0..4 as they were and changes 5..12."""
    layer = TitansMAC(DM, H, segment_size=SEG, rngs=nnx.Rngs(0), **COMMON)
    x = inputs(4)
    y, y_changed = CALL(layer, x), CALL(layer, x.at[:, 5].set(1.0))
    np.testing.assert_array_equal(np.asarray(y[:, :5]), np.asarray(y_changed[:, :5]))
    assert not np.any(np.isclose(np.asarray(y[:, 5:]), np.asarray(y_changed[:, 5:]), atol=1e-6).all(axis=(0, 2)))


def test_bf16_forward_is_finite_and_close_to_float32():
    layer = TitansMAC(DM, H, segment_size=SEG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **COMMON)
    x = inputs(4)
    y = CALL(layer, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))
    y32 = CALL(TitansMAC(DM, H, segment_size=SEG, rngs=nnx.Rngs(0), **COMMON), x)
    assert_close(y, y32, rtol=TOLERANCE[jnp.bfloat16], name="bf16")


@pytest.mark.slow
def test_persistent_tokens_receive_gradients():
    """MAL: the persistent tokens reach the output through the memory writes and the window's keys (MAG's are
    attention keys besides). Slow: the module conformance suite checks every parameter's gradient nonzero for the
    registered MAC, MAG and MAL (deep memory) examples, and the tests above check every variant's against the
    reference."""
    layer = TitansMAL(DM, H, window=WIN, rngs=nnx.Rngs(0), **COMMON)
    x = inputs(5, 3)
    g = np.asarray(nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer).persistent[...])
    assert g.shape == (NP, DM) and np.all(np.isfinite(g)) and np.any(g != 0)


def test_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"segment_size \(6\) must be a multiple of chunk_size \(4\)"):
        TitansMAC(DM, H, segment_size=6, chunk_size=4, rngs=rngs)
    with pytest.raises(ValueError, match="memory must be one of"):
        TitansMAG(DM, H, memory="lstm", rngs=rngs)
    with pytest.raises(ValueError, match="num_persistent must be a non-negative int, got -1"):
        TitansMAL(DM, H, num_persistent=-1, rngs=rngs)
    with pytest.raises(ValueError, match="window must be a positive int"):
        TitansMAG(DM, H, window=0, rngs=rngs)
    with pytest.raises(ValueError, match=r"num_heads \(2\) must be a multiple of num_kv_heads \(3\)"):
        TitansMAC(DM, H, num_kv_heads=3, rngs=rngs)
    with pytest.raises(ValueError, match="depth-1 memory is Titans' linear"):
        MemoryConfig(depth=1, objective="lp")
    with pytest.raises(ValueError, match="conv_size must be a non-negative int"):
        NeuralMemoryLayer(DM, H, conv_size=-2, rngs=rngs)
    with pytest.raises(ValueError, match="max_lr must be a positive number"):
        NeuralMemoryLayer(DM, H, max_lr=0.0, rngs=rngs)
    layer = TitansMAC(DM, H, segment_size=SEG, rngs=rngs, **COMMON)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\], got \[2, 5, 8\]"):
        layer(jnp.zeros((2, 5, 8)))
    with pytest.raises(NotImplementedError, match=r"TitansMAC takes mask=None or masks.Causal\(\) only"):
        layer(inputs(), mask=masks.SlidingWindow(2, 0))
    with pytest.raises(ValueError, match=r"x_t must have shape \[B, 1, d_model\] = \[2, 1, 16\]"):
        layer.decode(jnp.zeros((2, 2, DM)), layer.init_cache(2, 4))
