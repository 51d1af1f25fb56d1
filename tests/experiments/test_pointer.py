"""Pointer-network tasks: the hull and sort targets against brute force, the decoder's allowed positions, greedy
decoding against teacher forcing, and a smoke run that learns."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import pointer
from experiments.lib.pointer_data import START, PointerInputs, convex_hull, pointer_batch, polygon_area
from experiments.lib.training import IGNORE


def brute_force_hull_edges(points: np.ndarray) -> set[tuple[int, int]]:
    """O(n³): ``(i, j)`` is a counter-clockwise hull edge iff every other point lies strictly left of ``i → j``."""
    edges = set()
    for i, j in itertools.permutations(range(len(points)), 2):
        d = points[j] - points[i]
        others = np.delete(points, [i, j], axis=0) - points[i]
        if np.all(d[0] * others[:, 1] - d[1] * others[:, 0] > 0):
            edges.add((i, j))
    return edges


@pytest.mark.parametrize("n", [3, 4, 7, 12])
def test_hull_targets_against_brute_force(n):
    inputs, targets = pointer_batch("hull", 16, n, seed=(n, 3))
    assert inputs.points.shape == (16, n, 2) and targets.shape == inputs.previous.shape == (16, n + 1)
    for points, target, previous in zip(inputs.points.astype(np.float64), targets, inputs.previous):
        edges = brute_force_hull_edges(points)
        length = int(np.sum(target != IGNORE))
        cycle = list(target[:length])
        assert cycle[0] == cycle[-1] == min(i for e in edges for i in e), "starts and closes at the lowest index"
        assert set(zip(cycle[:-1], cycle[1:])) == edges, "consecutive vertices are exactly the CCW hull edges"
        assert len(edges) == length - 1 and np.all(target[length:] == IGNORE)
        assert previous[0] == START and np.array_equal(previous[1:], target[:-1])


def test_polygon_area_and_area_coverage():
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5]])
    assert polygon_area(square, [0, 1, 2, 3]) == 1.0 and polygon_area(square, [3, 2, 1, 0]) == -1.0
    assert polygon_area(square, [0, 1, 3, 2]) == 0.0, "a self-intersecting bow tie: its two halves cancel"
    target = np.array([[0, 1, 2, 3, 0, IGNORE]])
    missed = np.array([[0, 1, 2, 0, IGNORE, IGNORE]])
    assert pointer.area_coverage(square[None], target, target) == 1.0
    assert pointer.area_coverage(square[None], missed, target) == 0.5


def test_sort_targets_are_the_sorting_permutation():
    inputs, targets = pointer_batch("sort", 8, 11, seed=1)
    for x, target, previous in zip(inputs.points[..., 0], targets, inputs.previous):
        assert sorted(target) == list(range(11)) and np.all(np.diff(x[target]) > 0)
        assert previous[0] == START and np.array_equal(previous[1:], target[:-1])
    again = pointer_batch("sort", 8, 11, seed=1)
    assert np.array_equal(again[0].points, inputs.points) and np.array_equal(again[1], targets)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="task"):
        pointer_batch("tsp", 2, 5, 0)
    with pytest.raises(ValueError, match="n must be"):
        pointer_batch("hull", 2, 2, 0)
    with pytest.raises(ValueError, match="collinear"):
        convex_hull(np.array([[0, 0], [1, 1], [2, 2]], np.float64))
    with pytest.raises(SystemExit):
        pointer.parse_args(["--tasks", "tsp"])


@pytest.mark.parametrize("closes", [False, True])
def test_allowed_mask_against_brute_force(closes):
    n, L = 6, 7
    previous = np.full((3, L), IGNORE)
    previous[0, 1:] = [2, 0, 5, 1, 2, IGNORE]  # a hull that closes at step 5
    previous[1, 1:] = [4, 3, 1, 0, 5, 2]
    previous[2, 1:3] = [1, 3]
    mask = np.asarray(pointer.allowed_mask(jnp.asarray(previous), n, closes))
    for b, i, j in np.ndindex(3, L, n):
        expected = j not in previous[b, :i + 1] or (closes and i >= 3 and j == previous[b, 1])
        assert mask[b, i, j] == expected, (b, i, j)


@pytest.mark.slow
def test_greedy_decoding_equals_teacher_forcing_on_its_own_choices():
    """The step-by-step decoder (LSTM cell, one pointer step) and the teacher-forced scan agree: fed the greedy
    choices back as ``previous``, the teacher-forced argmax repeats every choice up to where the hull closes. No
    encoder blocks (compile time; both paths share the encoder)."""
    model = pointer.PointerNet(2, 8, 0, 2, mlp_ratio=1, mechanism="softmax", closes=True, rngs=nnx.Rngs(0))
    points = jnp.asarray(np.random.default_rng(0).random((4, 6, 2), np.float32))

    @nnx.jit
    def both(model, points):
        choices = model.greedy(points, 7)
        previous = jnp.concatenate([jnp.full((4, 1), START, jnp.int32), choices[:, :-1]], axis=1)
        return choices, jnp.argmax(model(PointerInputs(points, previous)), axis=-1)

    choices, forced = map(np.asarray, both(model, points))
    valid = choices != IGNORE
    assert valid[:, :4].all(), "at least three vertices and a closing step before the hull can end"
    assert np.array_equal(forced[valid], choices[valid])


def test_smoke_run_writes_results_and_learns(tmp_path):
    """``--smoke`` (one tiny sorting model, 80 steps at n = 5; here without encoder blocks, for the suite's time):
    the training loss falls by half and greedy decoding gets most steps right (a uniformly random
    permutation gets 1/5 of the steps right at n = 5)."""
    (row,) = pointer.main(["--smoke", "--num-layers", "0", "--no-progress", "--out", str(tmp_path),
                           "--name", "pointer_test"])
    assert row["final_train_loss"] < 0.5 * row["first_train_loss"]
    (test,) = row["tests"]
    assert test["n"] == 5 and test["per_step"] > 0.6
    saved = json.loads((tmp_path / "pointer_test.json").read_text())
    assert saved["args"]["smoke"] and saved["results"][0]["tests"] == row["tests"]
    assert "| n" in (tmp_path / "pointer_test.md").read_text()
    assert (tmp_path / "pointer_test.png").stat().st_size > 0
