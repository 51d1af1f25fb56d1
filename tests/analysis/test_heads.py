"""Retrieval heads, head ablation, head importance and AttentionInfluence against direct computations of
their definitions (NumPy maps, Python loops over steps, one masked head at a time)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks
from attnjax.analysis.heads import (attention_argmax, attention_influence, copy_paste_events,
                                    head_ablation_loss_change, head_importance, retrieval_scores,
                                    uniform_head_masking)
from tests.analysis.test_entropy_and_sinks import numpy_map
from tests.helpers import assert_close, numpy_rng, random_qkv


@pytest.mark.parametrize("case", [dict(T=29, S=29, Hq=4, Hkv=2, mask=masks.Causal()),
                                  dict(T=11, S=37, Hq=2, Hkv=1, mask=masks.SlidingWindow(4, 0))],
                         ids=["causal-gqa", "decode-steps-window"])
def test_attention_argmax_is_the_dense_maps_argmax(case):
    q, k, _ = random_qkv(jax.random.key(0), T=case["T"], S=case["S"], Hq=case["Hq"], Hkv=case["Hkv"], D=8)
    best = jax.jit(lambda q, k: attention_argmax(q, k, mask=case["mask"], block_q=8))(q, k)
    p, _ = numpy_map(q, k, case["mask"])
    assert best.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(best), np.argmax(p, axis=-1))


def test_attention_argmax_of_a_row_without_keys_is_minus_one():
    q, k, _ = random_qkv(jax.random.key(1), B=1, T=5, S=5, Hq=1, Hkv=1, D=4)
    mask = masks.Explicit(jnp.arange(5)[:, None] >= jnp.arange(5)[None, :] + 2)  # rows 0, 1 see nothing
    best = np.asarray(jax.jit(lambda q, k: attention_argmax(q, k, mask=mask, block_q=2))(q, k))[0, 0]
    assert list(best[:2]) == [-1, -1] and best[2] == 0


def python_retrieval_scores(argmax, generated, ids, start, end, distinct):
    """Wu et al. sec. 2 step by step: a copy-paste needs the argmax in the needle holding the emitted token;
    the score counts the needle positions copied (set) or the copy-paste steps (the authors' code)."""
    *lead, B, H, n = argmax.shape
    out = np.zeros((*lead, B, H))
    for idx in np.ndindex(*lead, B, H):
        b = idx[-2]
        copied = [int(j) for j, w in zip(argmax[idx], generated[b]) if start[b] <= j < end[b] and ids[b, j] == w]
        out[idx] = (len(set(copied)) if distinct else len(copied)) / (end[b] - start[b])
    return out


def test_retrieval_scores_follow_the_definition_step_by_step():
    rng = numpy_rng(jax.random.key(2))
    B, H, n, S, L = 2, 5, 9, 30, 2
    ids = rng.integers(0, 6, (B, S))  # a small vocabulary: repeated tokens inside and outside the needle
    start, end = np.array([4, 10]), np.array([12, 19])
    generated = rng.integers(0, 6, (B, n))
    argmax = rng.integers(-1, S, (L, B, H, n))
    argmax[0, :, 0] = np.stack([np.arange(s, s + n) for s in start])  # a perfect copier (if tokens agree)
    generated[:, :] = np.where(rng.random((B, n)) < 0.8, ids[np.arange(B)[:, None], argmax[0, :, 0]], generated)
    argmax[1, :, 1, :2] = start[:, None]  # copies the needle's first token twice: set and step counts differ
    generated[:, :2] = ids[np.arange(B), start][:, None]
    args = (jnp.asarray(argmax), jnp.asarray(generated), jnp.asarray(ids), jnp.asarray(start), jnp.asarray(end))
    sets, steps, events = jax.jit(lambda *a: (retrieval_scores(*a), retrieval_scores(*a, distinct=False),
                                              copy_paste_events(*a)))(*args)
    for scores, distinct in ((sets, True), (steps, False)):
        assert scores.shape == (L, B, H)
        assert_close(scores, python_retrieval_scores(argmax, generated, ids, start, end, distinct), atol=1e-6,
                     name=f"distinct={distinct}")
    assert not np.allclose(sets, steps) and np.asarray(sets).max() <= 1.0
    assert events.shape == (L, B, H, n) and not np.asarray(events)[argmax == -1].any()


def test_a_planted_copy_head_scores_one_and_a_random_head_scores_low():
    """Head 0's query at step t points at needle position start + t (a shared direction), and the generated
    tokens are the needle: it copy-pastes every needle token. Head 1 is random."""
    rng = numpy_rng(jax.random.key(3))
    S, n, D, start = 40, 6, 16, 17
    ids = rng.integers(0, 50, (1, S))
    k = rng.standard_normal((1, S, 2, D)).astype(np.float32)
    q = rng.standard_normal((1, n, 2, D)).astype(np.float32)
    needle_keys = k[0, start:start + n, 0]
    q[0, :, 0] = 8.0 * needle_keys / np.linalg.norm(needle_keys, axis=-1, keepdims=True)
    scores = jax.jit(lambda q, k, ids: retrieval_scores(attention_argmax(q, k, mask=masks.Causal(), block_q=4),
                                                        ids[:, start:start + n], ids, start, start + n))(q, k, ids)
    assert float(scores[0, 0]) == 1.0 and float(scores[0, 1]) < 0.5


def test_retrieval_inputs_are_checked():
    argmax, generated, ids = jnp.zeros((1, 2, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"generated_tokens must be an int array \[B, n\]"):
        retrieval_scores(argmax, generated.astype(jnp.float32), ids, 0, 2)
    with pytest.raises(ValueError, match="must share B and n"):
        retrieval_scores(argmax, jnp.zeros((1, 4), jnp.int32), ids, 0, 2)
    with pytest.raises(ValueError, match=r"needle_start must be an int or an int \[B\]"):
        retrieval_scores(argmax, generated, ids, jnp.zeros(3, jnp.int32), 2)


# A tiny 2-layer, 2-head causal transformer whose head outputs are multiplied by head_mask [L, H], written
# once for NumPy (float64 references, finite differences) and jax.numpy (the library's inputs).
L, H, DH, DM, V, N, T = 2, 2, 4, 8, 11, 3, 7
MASKED = np.array([[True, False], [False, False]])
SILENT = np.array([[False, False], [False, True]])  # layer 1, head 1 writes nothing


def toy_losses(xp, head_mask, params, tokens, masking="output"):
    """Per-example next-token cross entropy ``[N]``; ``masking="uniform"``: a masked head attends with equal
    weights to its prefix (AttentionInfluence, App. C; the library's ``uniform_head_masking`` under jnp, the
    prefix mean of v under NumPy)."""
    x = params["embed"][tokens[:, :-1]]
    causal = xp.tril(xp.ones((T - 1, T - 1), bool))
    for layer in range(L):
        q, k, v = (xp.einsum("ntd,dhe->nthe", x, params[w][layer]) for w in ("wq", "wk", "wv"))
        s = xp.where(causal, xp.einsum("nthe,nshe->nhts", q, k) / np.sqrt(DH), -np.inf)
        e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
        heads = xp.einsum("nhts,nshe->nthe", e / xp.sum(e, axis=-1, keepdims=True), v)
        if masking == "output":
            heads = heads * head_mask[layer][None, None, :, None]
        elif xp is np:
            uniform = np.cumsum(v, axis=1) / np.arange(1, T)[None, :, None, None]
            xi = head_mask[layer][None, None, :, None]
            heads = xi * heads + (1 - xi) * uniform
        else:
            heads = uniform_head_masking(q, k, v, heads, head_mask[layer], mask=masks.Causal())
        x = x + xp.einsum("nthe,hed->ntd", heads, params["wo"][layer])
    logits = x @ params["unembed"]
    m = xp.max(logits, axis=-1, keepdims=True)
    logp = logits - m - xp.log(xp.sum(xp.exp(logits - m), axis=-1, keepdims=True))
    return -xp.mean(xp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], axis=-1)


@pytest.fixture(scope="module")
def toy():
    """The library's results on the toy model, from one compiled function, and the NumPy model."""
    rng = numpy_rng(jax.random.key(4))
    params = {name: rng.standard_normal(shape) / np.sqrt(shape[-2]) for name, shape in (
        ("embed", (V, DM)), ("wq", (L, DM, H, DH)), ("wk", (L, DM, H, DH)), ("wv", (L, DM, H, DH)),
        ("wo", (L, H, DH, DM)), ("unembed", (DM, V)))}
    params["embed"] *= 3
    params["wo"][SILENT] = 0.0
    tokens = rng.integers(0, V, (N, T))

    def run(p, t):
        losses = functools.partial(toy_losses, jnp, params=p, tokens=t)
        return dict(ablation=head_ablation_loss_change(losses, (L, H)), importance=head_importance(losses, (L, H)),
                    influence=attention_influence(losses, jnp.asarray(MASKED)),
                    influence_silent=attention_influence(losses, jnp.asarray(SILENT)),
                    influence_uniform=attention_influence(functools.partial(losses, masking="uniform"),
                                                          jnp.asarray(MASKED)))

    f32 = {name: jnp.asarray(w, jnp.float32) for name, w in params.items()}
    results = jax.jit(run)(f32, jnp.asarray(tokens))
    numpy_losses = functools.partial(toy_losses, np, params={n: np.asarray(w, np.float64) for n, w in f32.items()},
                                     tokens=tokens)
    return results, numpy_losses


def test_ablation_loss_change_is_one_masked_head_at_a_time(toy):
    results, losses = toy
    base = losses(np.ones((L, H)))
    expected = np.zeros((L, H, N))
    for layer, head in np.ndindex(L, H):
        mask = np.ones((L, H))
        mask[layer, head] = 0.0
        expected[layer, head] = losses(mask) - base
    assert results["ablation"].shape == (L, H, N)
    assert_close(results["ablation"], expected, atol=1e-5, name="per-example delta")
    assert np.abs(expected[SILENT]).max() < 1e-12 and np.abs(expected).max() > 1e-2


def test_head_importance_is_the_mean_absolute_per_example_gradient(toy):
    results, losses = toy
    eps, grads = 1e-6, np.zeros((L, H, N))
    for layer, head in np.ndindex(L, H):
        up, down = np.ones((L, H)), np.ones((L, H))
        up[layer, head] += eps
        down[layer, head] -= eps
        grads[layer, head] = (losses(up) - losses(down)) / (2 * eps)
    assert_close(results["importance"], np.abs(grads).mean(-1), rtol=1e-4, name="E|dL(x)/dxi|")
    assert not np.allclose(np.abs(grads).mean(-1), np.abs(grads.mean(-1)), rtol=1e-2)  # |.| inside E matters here
    assert float(results["importance"][SILENT][0]) == 0.0 and np.all(np.asarray(results["importance"])[~SILENT] > 0)


def test_attention_influence_is_the_relative_loss_increase_of_the_masked_model(toy):
    results, losses = toy
    base = losses(np.ones((L, H)))
    assert results["influence"].shape == (N,)
    assert_close(results["influence"], (losses(np.where(MASKED, 0.0, 1.0)) - base) / base, rtol=1e-5,
                 name="(L_ref - L_base) / L_base")
    assert_close(results["influence_silent"], np.zeros(N), atol=1e-6, name="masking a head that writes nothing")
    uniform = functools.partial(losses, masking="uniform")
    base_uniform = uniform(np.ones((L, H)))
    assert_close(base_uniform, base, rtol=1e-12, name="xi = 1 keeps every head")
    want = (uniform(np.where(MASKED, 0.0, 1.0)) - base) / base
    assert_close(results["influence_uniform"], want, rtol=1e-5, name="eq. 5 with the paper's uniform masking")
    assert not np.allclose(want, (losses(np.where(MASKED, 0.0, 1.0)) - base) / base, rtol=1e-3)


def test_uniform_head_masking_averages_the_visible_values():
    q, k, v = random_qkv(jax.random.key(7), T=9, S=12, Hq=4, Hkv=2, D=4)
    out = jax.random.normal(jax.random.key(8), (2, 9, 4, 4))
    keep = jnp.array([0.0, 1.0, 0.25, 0.0])
    window = masks.SlidingWindow(3, 0)
    got, d_keep = jax.jit(lambda keep: (uniform_head_masking(q, k, v, out, keep, mask=window), jax.grad(
        lambda keep: jnp.sum(uniform_head_masking(q, k, v, out, keep, mask=window)))(keep)))(keep)
    allowed = np.asarray(window.dense(9, 12))[0, 0]                          # [T, S]
    vh = np.repeat(np.asarray(v, np.float64), 2, axis=2)                     # [B, S, Hq, Dv]
    uniform = np.einsum("ts,bshe->bthe", allowed / allowed.sum(-1, keepdims=True), vh)
    xi = np.asarray(keep)[None, None, :, None]
    assert_close(got, xi * np.asarray(out) + (1 - xi) * uniform, rtol=1e-5, name="xi out + (1 - xi) mean of v")
    assert_close(d_keep, (np.asarray(out) - uniform).sum((0, 1, 3)), rtol=1e-5, name="d/dxi")
    with pytest.raises(ValueError, match=r"keep must be \[Hq\] = \[4\]"):
        uniform_head_masking(q, k, v, out, jnp.ones(3))


def test_scalar_losses_chunked_ablation_and_layer_normalization():
    """On L(ξ) = Σ w·ξ + ½ Σ c·ξ²: ΔL_h = −w_h − c_h/2 and ∂L/∂ξ_h = w_h + c_h at ξ = 1."""
    w = jnp.asarray(numpy_rng(jax.random.key(6)).standard_normal((3, 2)), jnp.float32)
    c = jnp.arange(6.0).reshape(3, 2) / 10

    def loss(head_mask):
        return jnp.sum(w * head_mask) + 0.5 * jnp.sum(c * head_mask ** 2)

    delta, importance, normalized = jax.jit(lambda: (
        head_ablation_loss_change(loss, (3, 2), batch_size=4), head_importance(loss, (3, 2)),
        head_importance(loss, (3, 2), normalize_layers=True)))()
    assert_close(delta, -w - c / 2, atol=1e-6, name="delta in chunks of 4 of 6 masks")
    assert_close(importance, jnp.abs(w + c), atol=1e-6, name="|dL/dxi|")
    assert_close(normalized, jnp.abs(w + c) / jnp.linalg.norm(w + c, axis=1, keepdims=True), atol=1e-6,
                 name="l2-normalized per layer")


def test_head_masking_inputs_are_checked():
    with pytest.raises(ValueError, match="head_mask_shape must be a tuple"):
        head_importance(lambda m: m.sum(), [2, 2])
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        head_ablation_loss_change(lambda m: m.sum(), (2, 0))
    with pytest.raises(ValueError, match=r"masked_heads must be a bool \[L, H\] array"):
        attention_influence(lambda m: m.sum(), jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        attention_influence(3.0, jnp.ones((2, 2), bool))
