"""Byte-level LM study: the stdlib corpus split, batches, evaluation windows and the command line."""

import json

import numpy as np
import pytest

from experiments import lm_bytes
from experiments.lib.training import IGNORE


@pytest.fixture
def source_tree(tmp_path):
    """A small tree of .py files, plus files the corpus must skip."""
    root = tmp_path / "lib"
    for i in range(40):
        path = root / f"pkg{i % 4}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"# module {i}\n".encode() + bytes(range(32, 127)) * 3)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_text("x = 1\n")
    (root / "pkg0" / "notes.txt").write_text("not python\n")
    return root


def test_stdlib_split_is_deterministic_disjoint_and_complete():
    files = lm_bytes.source_files(lm_bytes.stdlib_root())
    assert len(files) > 100 and files == sorted(files)
    assert not any(f.startswith("site-packages/") for f in files)
    valid = [f for f in files if lm_bytes.in_validation(f, 0.05)]
    assert valid == [f for f in files if lm_bytes.in_validation(f, 0.05)]
    assert 0.01 < len(valid) / len(files) < 0.1
    assert set(valid) == {f for f in files if lm_bytes.in_validation(f, 0.05)} and len(set(valid)) == len(valid)


def test_load_corpus_reads_bytes_in_order_and_splits_by_path(source_tree):
    corpus = lm_bytes.load_corpus(source_tree, valid_fraction=0.3)
    assert not set(corpus.train_files) & set(corpus.valid_files)
    assert sorted(corpus.train_files + corpus.valid_files) == lm_bytes.source_files(source_tree)
    assert len(lm_bytes.source_files(source_tree)) == 40  # site-packages and .txt skipped
    expected = b"".join((source_tree / f).read_bytes() + lm_bytes.SEPARATOR for f in corpus.valid_files)
    assert corpus.valid.dtype == np.uint8 and corpus.valid.tobytes() == expected
    again = lm_bytes.load_corpus(source_tree, valid_fraction=0.3)
    np.testing.assert_array_equal(again.train, corpus.train)


def test_train_batch_targets_are_the_next_bytes_and_deterministic():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    x, y = lm_bytes.train_batch(data, 4, 16, seed=(0, 5))
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal((x[:, 0] + 1) % 256, y[:, 0])
    np.testing.assert_array_equal(lm_bytes.train_batch(data, 4, 16, seed=(0, 5))[0], x)


def test_every_window_length_scores_the_same_bytes():
    data = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    windows = lm_bytes.eval_windows(data, 64, 5)
    assert windows.shape == (5, 65)
    scored = []
    for length in (16, 32, 64):
        x, y = lm_bytes.split_windows(windows, length)
        assert x.shape == (5 * 64 // length, length)
        scored.append(np.sort(y.ravel()))
    np.testing.assert_array_equal(scored[0], scored[1])
    np.testing.assert_array_equal(scored[0], scored[2])
    _, y = lm_bytes.split_windows(windows, 64, score_last=16)
    assert np.all(y[:, :48] == IGNORE) and np.all(y[:, 48:] != IGNORE)


def test_cli_smoke_writes_table_and_json(source_tree, tmp_path):
    out = tmp_path / "out"
    rows = lm_bytes.main(["--smoke", "--mechanisms", "softmax", "--root", str(source_tree), "--valid-fraction",
                          "0.3", "--no-progress", "--out", str(out), "--name", "lm_test"])
    (row,) = rows
    assert set(row["bpb"]) == {"1T", "2T", "4T"} and set(row["bpb_last_T"]) == {"2T", "4T"}
    assert all(0 < v < 16 for v in row["bpb"].values())
    saved = json.loads((out / "lm_test.json").read_text())
    assert saved["corpus"]["valid_files"] > 0 and saved["results"][0]["mechanism"] == "softmax"
    assert "| softmax" in (out / "lm_test.md").read_text()
