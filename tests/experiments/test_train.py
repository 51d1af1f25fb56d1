"""The experiments' shared training utilities: model, loss, training loop, orbax checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.lib import checkpoints, training
from experiments.lib import model as lm

V, T, B = 32, 16, 4
TINY = dict(vocab_size=V, d_model=16, num_layers=1, num_heads=2)


def fixed_batch(step, seed=0):
    """The same random batch every step (memorizable), next-token targets."""
    tokens = np.random.default_rng(seed).integers(0, V, (B, T + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_model_is_causal():
    """BASED blocks (Taylor linear attention, then sliding-window MHA) after the short convolution:
    changing future tokens leaves the past alone."""
    config = lm.ModelConfig(mixer="based", short_conv=3, mixer_options={"window": 4, "feature_dim": 4}, **TINY)
    model = lm.LanguageModel(config, rngs=nnx.Rngs(0))
    x, _ = fixed_batch(0)
    y = x.copy()
    y[:, 10:] = (y[:, 10:] + 1) % V
    a, b = lm.logits(model, x), lm.logits(model, y)
    assert a.shape == (B, T, V) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert float(jnp.abs(a[:, 10:] - b[:, 10:]).max()) > 0


def test_config_rejects_unknown_mixer_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown mixer"):
        lm.ModelConfig(vocab_size=V, mixer="nope")
    with pytest.raises(ValueError, match="d_model"):
        lm.ModelConfig(vocab_size=V, d_model=0)


def test_token_loss_skips_ignored_targets():
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    total, correct, count = training.token_loss(logits, jnp.asarray([[1, training.IGNORE]]))
    np.testing.assert_allclose(float(total), np.log(4.0), rtol=1e-6)
    assert int(correct) == 0 and int(count) == 1


def test_decode_state_size_grows_for_softmax_only():
    soft = lm.ModelConfig(mixer="softmax", **TINY)
    light = lm.ModelConfig(mixer="lightning", **TINY)
    assert lm.decode_state_size(soft, 64) == 2 * lm.decode_state_size(soft, 32) == 2 * 64 * 16
    assert lm.decode_state_size(light, 64) == lm.decode_state_size(light, 32) == 2 * 8 * 8
    transnormer = lm.ModelConfig(mixer="transnormer", **TINY)  # LRPE doubles the key features
    assert lm.decode_state_size(transnormer, 64) == 2 * 16 * 8
    based = lm.ModelConfig(mixer="based", mixer_options={"feature_dim": 4, "window": 8}, **TINY)
    assert lm.decode_state_size(based, 64) == 2 * (1 + 4 + 16) * (8 + 1) + 2 * 8 * 2 * 8


SCHEDULE = training.TrainConfig(steps=12, learning_rate=1e-2, warmup_steps=2, log_every=1)
"""One schedule for the training tests, so they share one compiled step."""


def test_training_lowers_the_loss():
    model = lm.LanguageModel(lm.ModelConfig(mixer="softmax", **TINY), rngs=nnx.Rngs(0))
    history = training.train(model, fixed_batch, SCHEDULE, progress=False)
    assert [h["step"] for h in history] == list(range(1, 13))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


class CountingLM(nnx.Module):
    """Embedding and tied head, with a ``BatchStat`` the forward writes (as routing's k-means centroids are): the
    number of forward calls, and the running mean of the embeddings it saw."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, 8, rngs=rngs)
        self.calls = nnx.BatchStat(jnp.zeros(()))
        self.mean = nnx.BatchStat(jnp.zeros(8))

    def __call__(self, tokens):
        h = self.embed(tokens)
        self.calls[...] = self.calls[...] + 1
        self.mean[...] = 0.5 * self.mean[...] + 0.5 * jax.lax.stop_gradient(h.mean((0, 1)))
        return self.embed.attend(h)


def test_training_carries_state_the_forward_writes():
    """The jitted step returns the non-``Param`` state its forward left (no TraceContextError), into the model."""
    model = CountingLM(nnx.Rngs(0))
    training.train(model, fixed_batch, training.TrainConfig(steps=3, warmup_steps=1), progress=False)
    assert float(model.calls[...]) == 3.0
    assert float(jnp.abs(model.mean[...]).max()) > 0


def test_layer_mixer_builds_layer_blocks():
    """``mixer="layer:<name>"`` puts the registered causal layer in every block; non-causal and unknown ones are
    refused."""
    model = nnx.eval_shape(lambda: lm.LanguageModel(lm.ModelConfig(mixer="layer:rat", **TINY), rngs=nnx.Rngs(0)))
    assert isinstance(model.blocks[0], lm.LayerBlock) and type(model.blocks[0].mixer).__name__ == "RAT"
    assert "layer:rat" in lm.mixer_names() and "layer:pmi" not in lm.mixer_names()
    for name, match in (("layer:pmi", "not causal"), ("layer:nope", "not a registered layer")):
        with pytest.raises(ValueError, match=match):
            lm.ModelConfig(mixer=name, **TINY)


def test_checkpoint_restore_and_resume(tmp_path):
    """Restore into a freshly initialized model gives identical outputs; a resumed run equals an uninterrupted one."""
    config = lm.ModelConfig(mixer="softmax", **TINY)
    uninterrupted = lm.LanguageModel(config, rngs=nnx.Rngs(0))
    training.train(uninterrupted, fixed_batch, SCHEDULE, until=4, progress=False)

    first = lm.LanguageModel(config, rngs=nnx.Rngs(0))
    training.train(first, fixed_batch, SCHEDULE, checkpoint_dir=tmp_path, until=2, progress=False)
    assert checkpoints.latest_step(tmp_path) == 2

    fresh = lm.LanguageModel(config, rngs=nnx.Rngs(1))
    x = fixed_batch(0)[0]
    assert not np.array_equal(np.asarray(lm.logits(fresh, x)), np.asarray(lm.logits(first, x)))
    assert checkpoints.restore_checkpoint(tmp_path, fresh) == 2
    np.testing.assert_array_equal(np.asarray(lm.logits(fresh, x)), np.asarray(lm.logits(first, x)))

    resumed = lm.LanguageModel(config, rngs=nnx.Rngs(1))
    history = training.train(resumed, fixed_batch, SCHEDULE, checkpoint_dir=tmp_path, until=4, progress=False)
    assert [h["step"] for h in history] == [3, 4] and checkpoints.latest_step(tmp_path) == 4
    for a, b in zip(params(resumed), params(uninterrupted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    step, opt_state = checkpoints.restore_checkpoint(tmp_path, fresh, training.init_opt_state(fresh, SCHEDULE))
    adam_count = [x for x in jax.tree.leaves(opt_state) if x.ndim == 0]
    assert step == 4 and adam_count and all(int(c) == 4 for c in adam_count)


def test_restore_without_checkpoint_raises(tmp_path):
    model = lm.LanguageModel(lm.ModelConfig(mixer="softmax", **TINY), rngs=nnx.Rngs(0))
    assert checkpoints.latest_step(tmp_path / "none") is None
    with pytest.raises(FileNotFoundError):
        checkpoints.restore_checkpoint(tmp_path, model)


def test_evaluate_scores_in_inference_mode_and_leaves_the_model_alone():
    """Dropout is off while scoring (the model has no dropout stream, so a training-mode call with a dropout rate
    fails; scoring works and agrees with itself) and the model keeps its training mode; a model without any
    ``deterministic`` flag (a BaseConv stack) evaluates too."""
    dropout = lm.LanguageModel(lm.ModelConfig(mixer="softmax", **TINY), rngs=nnx.Rngs(0))
    dropout.blocks[0].attention.dropout_rate = 0.5
    batches = [fixed_batch(0)]
    assert training.evaluate(dropout, batches) == training.evaluate(dropout, batches)
    assert dropout.blocks[0].attention.deterministic is False
    conv = lm.LanguageModel(lm.ModelConfig(mixer="baseconv", **TINY), rngs=nnx.Rngs(0))
    assert training.evaluate(conv, batches)["tokens"] > 0
