"""Bursty in-context classification (Reddy 2023): the generator against brute force, the attention scores on
hand-built maps, the transition step, and the ``--smoke`` run."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import induction
from experiments.lib.bursty_data import SPLITS, BurstyTask, bursty_batch, class_frequencies, make_mixture

TASK = BurstyTask(num_classes=64, num_labels=8, context=6, burstiness=3, p_bursty=0.5, alpha=1.0, eps=0.05,
                  dim=16, max_context=8)
MIXTURE = make_mixture(TASK, 0)


def nearest(vectors: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Brute force: the index of the nearest row of ``table`` for each vector."""
    return np.argmin(((vectors[..., None, :] - table) ** 2).sum(-1), axis=-1)


@pytest.mark.parametrize("split", SPLITS)
def test_sequences_decode_back_to_their_classes_labels_and_positions(split):
    """Decode every token by brute force: positions are one-hot after the shift, items are nearest to their class
    mean, each label token is the label vector of its item's (moved, for "swapped") label, the target is the
    query's label, and bursty contexts hold N/B classes B times each, the query's class among them."""
    b = bursty_batch(TASK, MIXTURE, 200, split, seed=(1, SPLITS.index(split)))
    P, T, n = TASK.positions, TASK.seq_len, TASK.context
    assert b.inputs.shape == (200, T, P + TASK.dim) and b.inputs.dtype == np.float32
    position, content = b.inputs[..., :P], b.inputs[..., P:].astype(np.float64)
    np.testing.assert_array_equal(position.argmax(-1), b.shifts[:, None] + np.arange(T))
    np.testing.assert_array_equal(position.sum(-1), 1.0)
    items, label_tokens = content[:, 0::2], content[:, 1:-1:2]
    np.testing.assert_allclose(label_tokens, MIXTURE.label_vectors[b.item_labels[:, :-1]], atol=1e-6)
    np.testing.assert_array_equal(b.targets[:, 0], b.item_labels[:, -1])
    if split == "in_context":
        assert np.all(b.item_classes >= TASK.num_classes), "novel classes only"
    else:
        assert np.all(b.item_classes < TASK.num_classes)
        np.testing.assert_array_equal(nearest(items, MIXTURE.class_means), b.item_classes)
        shift = 1 if split == "swapped" else 0
        np.testing.assert_array_equal(b.item_labels, (MIXTURE.class_labels[b.item_classes] + shift) % TASK.num_labels)
    for row in range(200):
        classes, counts = np.unique(b.item_classes[row, :-1], return_counts=True)
        if b.bursty[row]:  # N/B classes drawn with replacement (official code): B items each, 2B if drawn twice
            assert np.all(counts % TASK.burstiness == 0) and counts.sum() == n
            query = b.item_classes[row, -1]
            assert query in classes and b.query_matches()[row].sum() == counts[classes == query][0]
            labels = dict(zip(b.item_classes[row], b.item_labels[row]))
            assert b.targets[row, 0] == labels[b.item_classes[row, -1]], "the context shows the query's label"
    expected_bursty = {"train": 0.5, "in_context": 1.0, "swapped": 1.0, "in_weights": 0.0}[split]
    assert abs(b.bursty.mean() - expected_bursty) < 0.12


def test_novel_classes_decode_within_their_own_sequence():
    b = bursty_batch(TASK, MIXTURE, 50, "in_context", seed=3)
    for row in range(50):
        ids = np.unique(b.item_classes[row])
        items = b.inputs[row, 0::2, TASK.positions:].astype(np.float64)
        groups = [items[b.item_classes[row] == c] for c in ids]
        centers = np.stack([g.mean(0) for g in groups])
        np.testing.assert_array_equal(ids[nearest(items, centers)], b.item_classes[row])


def test_class_frequencies_follow_zipf():
    f = class_frequencies(64, 1.0)
    np.testing.assert_allclose(f, (1 / np.arange(1, 65)) / np.sum(1 / np.arange(1, 65)))
    np.testing.assert_allclose(class_frequencies(5, 0.0), 0.2)
    b = bursty_batch(TASK, MIXTURE, 4000, "in_weights", seed=5)
    counts = np.bincount(b.item_classes.ravel(), minlength=64)
    expected = f * counts.sum()
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 64 + 5 * np.sqrt(2 * 64), f"chi² {chi2:.0f} for 63 degrees of freedom"
    assert counts[0] > 4 * counts[7], "rank 1 is far more frequent than rank 8 under α = 1"


def test_deterministic_by_seed_and_bad_arguments_raise():
    a, b, c = (bursty_batch(TASK, MIXTURE, 8, "train", seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, c.inputs)
    for bad in (dict(num_classes=60), dict(burstiness=4), dict(burstiness=6), dict(p_bursty=1.5),
                dict(max_context=3)):
        with pytest.raises(ValueError):
            BurstyTask(**{**TASK.__dict__, **bad})
    with pytest.raises(ValueError, match="split"):
        bursty_batch(TASK, MIXTURE, 4, "test", seed=0)
    for flags in (["--burstiness", "3"], ["--num-layers", "1"], ["--num-heads", "3"], ["--num-classes", "100"]):
        with pytest.raises(SystemExit):
            induction.parse_args(flags)
    model = nnx.eval_shape(lambda: induction.AttentionOnlyClassifier(TASK.features, 8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\[S, T, features\]"):
        model(jnp.zeros((TASK.seq_len, TASK.features)))


def hand_built_map(S=2, H=2, N=3):
    """Uniform causal rows; head 0 of layer 1 is a perfect previous-token head on label rows, head 0 of layer 2
    puts all of the query's attention on the labels after items of the query's class."""
    T = 2 * N + 1
    m = np.tril(np.ones((S, H, T, T)))
    m /= m.sum(-1, keepdims=True)
    for i in range(N):
        m[:, 0, 2 * i + 1] = 0.0
        m[:, 0, 2 * i + 1, 2 * i] = 1.0
    matches = np.array([[True, False, True], [False, True, False]])[:S]
    query = np.zeros((S, T))
    query[:, 1:-1:2] = matches / matches.sum(1, keepdims=True)
    m[:, 0, -1] = query
    return m, matches


def test_scores_on_a_hand_built_map():
    m, matches = hand_built_map()
    previous = induction.previous_token_score(m)
    np.testing.assert_allclose(previous, [1.0, np.mean([1 / 2, 1 / 4, 1 / 6])])
    score = induction.induction_score(m, matches)
    np.testing.assert_allclose(score, [1.0, np.mean([2 / 7, 1 / 7])])
    with pytest.raises(ValueError, match="matches"):
        induction.induction_score(m, matches[:, :2])


def test_crossing_step():
    steps = [0, 10, 20, 30, 40]
    assert induction.crossing_step(steps, [0.1, 0.1, 0.2, 0.9, 0.9], 0.1) == 30
    assert induction.crossing_step(steps, [0.1, 0.6, 0.9, 0.9, 0.9], 0.1) == 10
    assert induction.crossing_step(steps, [0.1, 0.1, 0.1, 0.1, 0.12], 0.1) is None


def test_smoke_run_writes_results_and_learns(tmp_path):
    """``--smoke`` (K = 32, L = 8, N = 4, 60 steps) writes JSON, table and figure; the training loss (batch and
    held-out) falls and the model beats chance on the training distribution."""
    result = induction.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--name", "induction_test"])
    history = result["history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert [h["step"] for h in history] == [0, 20, 40, 60]
    assert losses[-1] < losses[0] < np.log(8) + 0.5
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3, "held-out loss falls"
    assert history[-1]["train_accuracy"] > 2 * result["chance"]
    assert all(0 <= h["induction"] <= 1 and 0 <= h["previous_token"] <= 1 for h in history)
    saved = json.loads((tmp_path / "induction_test.json").read_text())
    assert saved["args"]["smoke"] and saved["result"]["history"] == history
    assert "| step" in (tmp_path / "induction_test.md").read_text()
    assert (tmp_path / "induction_test.png").stat().st_size > 0
