"""Passkey / needle task: the generator puts the needle where it says, every causal layer fits the model, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.registry import modules
from experiments import needle
from experiments.lib.model import LanguageModel, ModelConfig, causal_layer_names, layer_spec
from experiments.lib.needle_data import MARK, QUERY, NeedleTask, needle_batch, needle_offset
from experiments.lib.training import IGNORE

TASKS = [NeedleTask(num_keys=4, filler_vocab=8, value_len=1), NeedleTask(),
         NeedleTask(num_keys=3, num_digits=5, value_len=5, filler_vocab=6, filler="repeat")]


def check_row(task: NeedleTask, x: np.ndarray, y: np.ndarray, depth: float) -> None:
    """Brute force: find the one marker, read the needle and the query back, and check every other token."""
    T, m = len(x), task.value_len
    span = T - (2 * m + 3)  # filler tokens: the needle slides over span + 1 start positions
    (start,) = np.flatnonzero(x == MARK)
    (query,) = np.flatnonzero(x == QUERY)
    assert abs(start - depth * span) <= 0.5, "the needle starts at the nearest position to depth · span"
    assert query == T - m - 1 and start + m + 2 <= query
    key, value = x[start + 1], x[start + 2:start + 2 + m]
    assert task.key_start <= key < task.digit_start
    assert np.all((value >= task.digit_start) & (value < task.filler_start))
    assert x[query + 1] == key and np.array_equal(x[query + 2:], value[:-1])
    assert np.array_equal(np.flatnonzero(y != IGNORE), np.arange(T - m, T)), "only the answer positions score"
    assert np.array_equal(y[T - m:], value)
    hay = np.concatenate([x[:start], x[start + m + 2:query]])
    assert len(hay) == span and np.all((hay >= task.filler_start) & (hay < task.vocab_size))
    if task.filler == "repeat":
        assert np.array_equal(hay, np.arange(span) % task.filler_vocab + task.filler_start)


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"m{t.value_len}-{t.filler}")
def test_needle_sits_at_its_depth_and_only_the_answer_is_scored(task):
    for seq_len in (task.min_seq_len(), 23, 64):
        for depth in (0.0, 0.25, 0.5, 0.6, 1.0):
            x, y = needle_batch(task, 3, seq_len, depth, seed=(seq_len, 1))
            assert x.shape == y.shape == (3, seq_len) and x.dtype == y.dtype == np.int32
            for row_x, row_y in zip(x, y):
                check_row(task, row_x, row_y, depth)
    assert needle_offset(64, 0.0, task.value_len) == 0
    assert needle_offset(64, 1.0, task.value_len) == 64 - 2 * task.value_len - 3


def test_random_depths_deterministic_by_seed():
    task = TASKS[1]
    a, b, c = (needle_batch(task, 64, 40, None, seed=s) for s in ((0, 1), (0, 1), (0, 2)))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    starts = np.argmax(a[0] == MARK, axis=1)
    assert starts.min() < 5 and starts.max() > 40 - 7 - 5, "training depths cover the whole range"
    for x, y in zip(*a):
        check_row(task, x, y, np.flatnonzero(x == MARK)[0] / (40 - 7))


@pytest.mark.parametrize("call", [lambda: needle_batch(TASKS[0], 2, 4, 0.5, 0),
                                  lambda: needle_batch(TASKS[0], 2, 16, 1.5, 0),
                                  lambda: NeedleTask(filler="text"), lambda: NeedleTask(value_len=0)])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("name", causal_layer_names())
def test_every_registered_causal_layer_fits_the_model(name):
    """Abstractly (no compile): a causal layer registered later (e.g. ``titans_mac``) is checked here too."""
    config = ModelConfig(vocab_size=30, mixer=f"layer:{name}", d_model=16, num_layers=1, num_heads=2)
    model = nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((2, 24), jnp.int32)
    out = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
    assert out.shape == (2, 24, 30) and out.dtype == jnp.float32


def test_non_causal_and_unknown_layers_are_refused():
    non_causal = [s.name for s in modules("layer") if not s.causal]
    with pytest.raises(ValueError, match="not causal"):
        layer_spec(non_causal[0])
    with pytest.raises(ValueError, match="not a registered layer"):
        layer_spec("nope")
    with pytest.raises(SystemExit):
        needle.parse_args(["--layers", "nope"])


def test_smoke_run_writes_results_and_learns(tmp_path):
    """``--smoke`` (one tiny softmax model, 60 steps at T = 16) writes its JSON, table and heat map, and
    retrieves the digit far above chance (accuracy 1/10, loss ln 10) at the training length."""
    rows = needle.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--name", "needle_test"])
    (row,) = rows
    cells = {(c["length"], c["depth"]): c for c in row["cells"]}
    assert set(cells) == {(16, 0.0), (16, 1.0), (32, 0.0), (32, 1.0)}
    assert min(cells[16, d]["accuracy"] for d in (0.0, 1.0)) > 0.5
    assert max(cells[16, d]["loss"] for d in (0.0, 1.0)) < 0.5 * np.log(10)
    saved = json.loads((tmp_path / "needle_test.json").read_text())
    assert saved["args"]["smoke"] and saved["results"][0]["cells"] == row["cells"]
    assert "| depth" in (tmp_path / "needle_test.md").read_text()
    assert (tmp_path / "needle_test.png").stat().st_size > 0
