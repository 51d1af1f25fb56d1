"""MQAR (Zoology) data generator properties and the study's command line."""

import json

import numpy as np
import pytest

from experiments import mqar
from experiments.lib import mqar_data, mqar_runs
from experiments.lib.training import IGNORE

CONFIGS = [mqar_data.MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4),
           mqar_data.MQARConfig(vocab_size=40, seq_len=64, num_kv_pairs=16),
           mqar_data.MQARConfig(vocab_size=128, seq_len=48, num_kv_pairs=6, random_non_queries=True, power_a=1.0)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"V{c.vocab_size}-T{c.seq_len}-N{c.num_kv_pairs}")
def test_every_query_answer_is_the_value_of_that_key_earlier(config):
    B, N = 16, config.num_kv_pairs
    inputs, targets = mqar_data.mqar_batch(config, B, seed=3)
    assert inputs.shape == targets.shape == (B, config.seq_len)
    assert inputs.dtype == targets.dtype == np.int32
    assert inputs.min() >= 0 and inputs.max() < config.vocab_size
    for x, y in zip(inputs, targets):
        keys, values = x[0:2 * N:2], x[1:2 * N:2]
        assert len(set(keys)) == N and len(set(values)) == N, "keys (and values) unique within a sequence"
        assert keys.min() >= 1 and keys.max() < config.vocab_size // 2 <= values.min()
        positions = np.flatnonzero(y != IGNORE)
        assert len(positions) == N and positions.min() >= 2 * N
        assert sorted(x[positions]) == sorted(keys), "each key is queried exactly once"
        for p in positions:
            slot = np.flatnonzero(x[:2 * N:2] == x[p])[0]
            assert 2 * slot + 1 < p and x[2 * slot + 1] == y[p], "answer = value after that key, earlier"
        if not config.random_non_queries:
            rest = np.setdiff1d(np.arange(2 * N, config.seq_len), positions)
            assert np.all(x[rest] == 0)


def test_batches_are_deterministic_by_seed():
    config = CONFIGS[0]
    a, b, c = (mqar_data.mqar_batch(config, 8, seed=s) for s in ((0, 1), (0, 1), (0, 2)))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_power_law_puts_queries_early():
    """``power_a = 0.01`` (the paper's) favours small gaps; ``power_a = 1`` is uniform."""
    def mean_query_position(power_a):
        config = mqar_data.MQARConfig(vocab_size=256, seq_len=128, num_kv_pairs=4, power_a=power_a)
        _, y = mqar_data.mqar_batch(config, 256, seed=0)
        return np.mean(np.nonzero(y != IGNORE)[1])

    assert mean_query_position(0.01) < mean_query_position(1.0) - 10


@pytest.mark.parametrize("kwargs", [dict(seq_len=31), dict(num_kv_pairs=9), dict(vocab_size=16, num_kv_pairs=8),
                                    dict(power_a=0.0)])
def test_invalid_configs_raise(kwargs):
    with pytest.raises(ValueError):
        mqar_data.MQARConfig(**{"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, **kwargs})


def test_cli_smoke_writes_table_json_and_plot(tmp_path):
    rows = mqar.main(["--smoke", "--mechanisms", "softmax", "--kv-pairs", "2", "--no-progress",
                      "--out", str(tmp_path), "--name", "mqar_test"])
    assert [(r["mechanism"], r["num_kv_pairs"]) for r in rows] == [("softmax", 2)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["state_size"] > 0 for r in rows)
    saved = json.loads((tmp_path / "mqar_test.json").read_text())
    assert len(saved["results"]) == 1 and saved["args"]["smoke"]
    assert "| softmax" in (tmp_path / "mqar_test.md").read_text()
    assert (tmp_path / "mqar_test.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_compare_softmax_recalls_better_than_lightning():
    """The quick comparison the main job runs: attention solves MQAR where Lightning's small state falls short."""
    rows = {r["mechanism"]: r for r in mqar_runs.compare(["softmax", "lightning"], quick=True)}
    assert rows["softmax"]["accuracy"] > 0.9
    assert rows["softmax"]["accuracy"] > rows["lightning"]["accuracy"] + 0.2
