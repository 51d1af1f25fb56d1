"""``attnjax.inference.generate`` (greedy and sampled decoding with the cache) and ``LanguageModel.decode``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.inference import generate, generate_by_recomputing, sample_token
from experiments import bench_generate
from experiments.lib.model import LanguageModel, ModelConfig, causal_layer_names
from tests.helpers import assert_close

VOCAB = 11
CONFIGS = {
    "softmax": ModelConfig(VOCAB, "softmax", d_model=16, num_layers=2, num_heads=2, short_conv=3),
    "transnormer": ModelConfig(VOCAB, "transnormer", d_model=16, num_layers=2, num_heads=2),
}


def _model(name: str) -> LanguageModel:
    return LanguageModel(CONFIGS[name], rngs=nnx.Rngs(0))


def _prompt(batch: int = 2, length: int = 5, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


class FixedLogits(nnx.Module):
    """A model of the generate protocol whose next-token logits are always ``logits [V]``."""

    def __init__(self, logits):
        self.logits = nnx.Variable(jnp.asarray(logits, jnp.float32))

    def init_cache(self, batch, max_len):
        return jnp.zeros((batch,), jnp.int32)

    def decode(self, tokens_t, cache):
        return jnp.broadcast_to(self.logits[...], (tokens_t.shape[0], 1, self.logits[...].shape[0])), cache + 1

    def __call__(self, tokens):
        return jnp.broadcast_to(self.logits[...], (*tokens.shape, self.logits[...].shape[0]))


@nnx.jit
def _decode_all(model, tokens):
    def step(cache, token):
        logits, cache = model.decode(token[:, None], cache)
        return cache, logits[:, 0]

    _, logits = jax.lax.scan(step, model.init_cache(tokens.shape[0], tokens.shape[1]), tokens.T)
    return jnp.swapaxes(logits, 0, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_equals_parallel(name):
    """``LanguageModel.decode`` stepped over T=9 tokens == the parallel call, position by position (with
    ``ShortConv`` sublayers for softmax, TransNormer blocks for the other)."""
    model, tokens = _model(name), _prompt(2, 9)
    logits = _decode_all(model, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 9, VOCAB)
    assert_close(logits, model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["softmax", pytest.param("transnormer", marks=pytest.mark.slow)])
def test_prefill_in_two_chunks_equals_parallel(name):
    """``LanguageModel.prefill`` of 5 then 4 tokens == the parallel call: ``MultiHeadAttention.prefill`` with RoPE
    and ``ShortConv`` buffers (softmax), ``TransNormerBlock.prefill`` from the linear state (transnormer; in the
    default suite through ``generate``, which prefills the prompt)."""
    model, tokens = _model(name), _prompt(2, 9)

    @nnx.jit
    def two_chunks(model, tokens):
        first, cache = model.prefill(tokens[:, :5], model.init_cache(2, 12))
        second, _ = model.prefill(tokens[:, 5:], cache)
        return jnp.concatenate([first, second], axis=1)

    assert_close(two_chunks(model, tokens), model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_equals_recomputing(name):
    """Greedy decoding with the cache picks the same tokens as recomputing the whole prefix each step."""
    model, prompt = _model(name), _prompt()
    out = generate(model, prompt, 8)
    assert out.shape == (2, 13) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :5], prompt)
    np.testing.assert_array_equal(out, generate_by_recomputing(model, prompt, 8))
    np.testing.assert_array_equal(out, generate(model, prompt, 8, max_len=16))


def test_sampling_is_deterministic_and_matches_recomputing():
    """A fixed rng gives the same sample every time (and the same as the recomputing baseline); another rng
    gives another sample."""
    model, prompt = _model("softmax"), _prompt()
    kwargs = dict(temperature=1.0, top_k=5, top_p=0.95)
    a = generate(model, prompt, 8, rng=jax.random.key(0), **kwargs)
    np.testing.assert_array_equal(a, generate(model, prompt, 8, rng=jax.random.key(0), **kwargs))
    np.testing.assert_array_equal(a, generate_by_recomputing(model, prompt, 8, rng=jax.random.key(0), **kwargs))
    assert not np.array_equal(a, generate(model, prompt, 8, rng=jax.random.key(1), **kwargs))


def test_top_k_never_samples_outside_the_top_k():
    """Fixed logits 0, 1, ..., V−1: with top_k=3 every generated token is one of the 3 largest, and each appears."""
    model = FixedLogits(jnp.arange(VOCAB, dtype=jnp.float32) * 0.5)
    out = generate(model, jnp.zeros((64, 1), jnp.int32), 8, temperature=2.0, top_k=3, rng=jax.random.key(0))
    assert set(np.unique(out[:, 1:]).tolist()) == {VOCAB - 3, VOCAB - 2, VOCAB - 1}


def test_top_p_keeps_the_smallest_nucleus():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps tokens {0, 1} (0.5 < 0.7 ≤ 0.8), top_p=0.5 keeps {0};
    temperature 0 is argmax."""
    logits = jnp.broadcast_to(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), (512, 4))
    key = jax.random.key(0)
    assert set(np.unique(sample_token(logits, key, temperature=1.0, top_p=0.7)).tolist()) == {0, 1}
    assert set(np.unique(sample_token(logits, key, temperature=1.0, top_p=0.5)).tolist()) == {0}
    assert set(np.unique(sample_token(logits, key, temperature=1.0)).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(sample_token(logits[:2], None), [0, 0])


def test_errors_name_the_argument():
    model, prompt = FixedLogits(jnp.zeros(VOCAB)), _prompt()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, prompt.astype(jnp.float32), 2)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, prompt[0], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, prompt, 4, max_len=8)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="rng"):
        generate(model, prompt, 2, temperature=1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate_by_recomputing(model, prompt, 2, temperature=1.0, top_k=0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_k"):
        sample_token(jnp.zeros((2, VOCAB)), jax.random.key(0), temperature=1.0, top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 2, temperature=1.0, top_p=1.5, rng=jax.random.key(0))
    lm = _model("softmax")
    with pytest.raises(ValueError, match="tokens_t"):
        lm.decode(prompt, lm.init_cache(2, 4))
    np.testing.assert_array_equal(generate(model, prompt, 0), prompt)


def test_model_without_decodable_blocks_says_so():
    """A layer mixer's ``LayerBlock`` has no ``init_cache``/``decode``: a clear NotImplementedError."""
    model = LanguageModel(ModelConfig(VOCAB, f"layer:{causal_layer_names()[0]}", d_model=16, num_layers=1,
                                      num_heads=2), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="LayerBlock"):
        generate(model, _prompt(), 2)


@pytest.mark.slow
def test_bench_generate_smoke(tmp_path):
    """``python -m experiments.bench_generate --smoke``: every program timed, greedy tokens equal, speedups positive."""
    res = bench_generate.main(["--smoke", "--out", str(tmp_path), "--name", "tiny"])
    assert len(res["rows"]) == 8 and all(r["median_s"] > 0 for r in res["rows"])
    assert all(res["greedy_tokens_equal"].values())
    assert set(res["speedup"]) == {"end_to_end_B1", "end_to_end_B2", "per_step_B1", "per_step_B2"}
    assert "## End to end" in (tmp_path / "tiny.md").read_text()
