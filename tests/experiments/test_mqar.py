"""MQAR (Zoology) across families: the data generator, the mixed batches, the state-size rule, the CLI."""

import json

import numpy as np
import pytest
from flax import nnx

from attnjax.nn.registry import modules
from experiments import mqar
from experiments.lib import mqar_data, mqar_runs
from experiments.lib.model import LanguageModel, ModelConfig
from experiments.lib.training import IGNORE

CONFIGS = [mqar_data.MQARConfig(vocab_size=64, seq_len=32, num_kv_pairs=4),
           mqar_data.MQARConfig(vocab_size=40, seq_len=64, num_kv_pairs=16),
           mqar_data.MQARConfig(vocab_size=128, seq_len=48, num_kv_pairs=6, random_non_queries=True, power_a=1.0)]


def check_sequence(x: np.ndarray, y: np.ndarray, n: int, config: mqar_data.MQARConfig) -> None:
    """Brute force: the pairs lead, each key is queried once later, and its target is the value after it."""
    keys, values = x[0:2 * n:2], x[1:2 * n:2]
    assert len(set(keys)) == n and len(set(values)) == n, "keys (and values) unique within a sequence"
    assert keys.min() >= 1 and keys.max() < config.vocab_size // 2 <= values.min()
    positions = np.flatnonzero(y != IGNORE)
    assert len(positions) == n and positions.min() >= 2 * n
    assert sorted(x[positions]) == sorted(keys), "each key is queried exactly once"
    for p in positions:
        slot = np.flatnonzero(x[:2 * n:2] == x[p])[0]
        assert 2 * slot + 1 < p and x[2 * slot + 1] == y[p], "answer = value after that key, earlier"
    if not config.random_non_queries:
        rest = np.setdiff1d(np.arange(2 * n, config.seq_len), positions)
        assert np.all(x[rest] == 0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"V{c.vocab_size}-T{c.seq_len}-N{c.num_kv_pairs}")
def test_every_query_answer_is_the_value_of_that_key_earlier(config):
    inputs, targets = mqar_data.mqar_batch(config, 16, seed=3)
    assert inputs.shape == targets.shape == (16, config.seq_len)
    assert inputs.dtype == targets.dtype == np.int32
    assert inputs.min() >= 0 and inputs.max() < config.vocab_size
    for x, y in zip(inputs, targets):
        check_sequence(x, y, config.num_kv_pairs, config)


def test_mixed_batch_has_equal_parts_of_each_pair_count():
    settings = mqar_runs.MQARSettings(kv_pairs=(2, 4, 8), seq_len=32, vocab_size=64)
    inputs, targets = mqar_runs.mixed_batch(settings, 8, (0, 5))
    counts = (targets != IGNORE).sum(axis=1)
    assert counts.tolist() == [2, 2, 2, 4, 4, 4, 8, 8], "8 = 3 + 3 + 2 sequences, in kv_pairs order"
    for x, y, n in zip(inputs, targets, counts):
        check_sequence(x, y, int(n), mqar_runs.task(settings, int(n)))


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


def abstract_model(mixer: str) -> LanguageModel:
    config = ModelConfig(vocab_size=16, mixer=mixer, d_model=16, num_layers=2, num_heads=2, head_dim=8,
                         mlp_ratio=0, short_conv=3)
    return nnx.eval_shape(lambda: LanguageModel(config, rngs=nnx.Rngs(0)))


def test_state_size_by_hand():
    """Softmax keeps keys and values (2 blocks × 2·T·H·D, grows with T); Lightning an H × D × D state per block;
    sigmoid (no decode) is given its keys and values; the short convolutions' buffers are not counted."""
    T, H, D = 12, 2, 8
    assert mqar_runs.state_size(abstract_model("softmax"), T) == (2 * 2 * T * H * D, "cache")
    assert mqar_runs.state_size(abstract_model("softmax"), 2 * T) == (2 * 2 * 2 * T * H * D, "cache")
    assert mqar_runs.state_size(abstract_model("lightning"), T) == (2 * H * D * D, "cache")
    assert mqar_runs.state_size(abstract_model("lightning"), 2 * T) == (2 * H * D * D, "cache")
    assert mqar_runs.state_size(abstract_model("sigmoid"), T) == (2 * 2 * T * H * D, "kv")


def test_candidates_skip_the_non_causal_with_a_reason():
    rows = {c.label: c for c in mqar_runs.candidates()}
    assert all(c.family in mqar_runs.FAMILIES for c in rows.values())
    for spec in modules("layer"):
        assert (rows[f"layer:{spec.name}"].skip is None) == spec.causal
    assert "no causal form" in rows["inline"].skip and rows["softmax"].skip is None
    assert rows["layer:titans_mac"].family == rows["layer:rat"].family == "memory"
    assert rows["block:baseconv"].skip is None


def test_all_selects_every_candidate_that_can_train():
    args = mqar.parse_args(["--smoke", "--all"])
    chosen = mqar_runs.models(mqar.cli.settings_from(mqar_runs.MQARSettings, args))
    assert sorted(c.label for c in chosen) == sorted(c.label for c in mqar_runs.candidates() if c.skip is None)
    assert {"softmax", "layer:titans_mac", "layer:rat", "block:zoology_hybrid"} <= {c.label for c in chosen}


def test_sweep_records_a_model_that_fails_and_goes_on(monkeypatch):
    def run_one(settings, model, d_model):
        if model.name == "lightning":
            raise NotImplementedError("no causal path at T=3")
        return [{"mechanism": model.label}]

    monkeypatch.setattr(mqar_runs, "run_one", run_one)
    skipped = []
    settings = mqar_runs.MQARSettings(mechanisms=("lightning", "softmax"), progress=False)
    assert mqar_runs.sweep(settings, skipped=skipped) == [{"mechanism": "softmax"}]
    assert skipped == [{"mechanism": "lightning", "family": "linear / recurrent", "d_model": 64,
                        "reason": "NotImplementedError: no causal path at T=3"}]


@pytest.mark.parametrize("argv", [["--mechanisms", "nope"], ["--layers", "pmi"], ["--mechanisms", "", "--layers", ""]])
def test_cli_rejects_unknown_non_causal_or_no_models(argv):
    with pytest.raises(SystemExit):
        mqar.parse_args(["--smoke", *argv])


def test_cli_smoke_writes_table_json_and_plot_and_the_loss_falls(tmp_path):
    rows = mqar.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--name", "mqar_test"])
    assert [(r["mechanism"], r["num_kv_pairs"]) for r in rows] == [("softmax", 2), ("softmax", 4)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["state_size"] == 2 * 16 * 2 * 8 for r in rows)
    history = rows[0]["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 0.3, "training lowers the loss"
    saved = json.loads((tmp_path / "mqar_test.json").read_text())
    assert len(saved["results"]) == 2 and saved["args"]["smoke"]
    assert any(c["name"] == "pmi" for c in saved["left_out"])
    page = (tmp_path / "mqar_test.md").read_text()
    assert "| softmax" in page and "layer:pmi" in page and "Zoology" in page
    assert "This run at N = 4: state growing with T (a KV cache): softmax (d 16, 512 floats)" in page
    assert (tmp_path / "mqar_test.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_compare_softmax_recalls_better_than_lightning():
    """The quick comparison the main job runs: attention solves MQAR where Lightning's small state falls short."""
    rows = {r["mechanism"]: r for r in mqar_runs.compare(["softmax", "lightning"], quick=True)}
    assert rows["softmax"]["accuracy"] > 0.9
    assert rows["softmax"]["accuracy"] > rows["lightning"]["accuracy"] + 0.2


def test_many_models_plot_by_family_and_the_summary_reads_the_claim(tmp_path):
    """More than ``MAX_LINES`` models in a family: one panel per pair count, a point per model; the summary
    counts KV-cache and fixed-state models and ranks the fixed ones' accuracy by state size."""
    rows = [{"mechanism": f"m{i}", "family": "linear / recurrent", "d_model": 64, "num_kv_pairs": 8,
             "state_size": 2 ** (i + 6), "state_grows": False, "accuracy": i / 10} for i in range(mqar.MAX_LINES + 1)]
    rows.append({**rows[0], "mechanism": "softmax", "family": "softmax-like", "state_grows": True, "accuracy": 1.0})
    mqar.plot(rows, tmp_path / "many.png")
    assert (tmp_path / "many.png").stat().st_size > 0
    assert mqar.reading(rows).endswith(
        "At N = 8: 1 KV-cache models, median accuracy 1.00, 1 at >= 0.9; 9 fixed-state models, median accuracy "
        "0.40, 0 at >= 0.9; over the fixed-state models, Spearman rank correlation of state size with accuracy 1.00.")
