"""In-context regression: the prompts follow y = w·x + ε, tokens and mask are as documented, the baselines match
NumPy's solvers, the model's query n reads only its n pairs, and a smoke run learns."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import icl_regression
from experiments.lib.icl_regression_data import (
    RegressionTask, gd_predictions, gd_step_size, least_squares_predictions, mse_by_context, prompt_mask,
    prompt_tokens, regression_prompts, ridge_predictions)


def test_prompts_follow_the_linear_model_with_gaussian_noise():
    task = RegressionTask(dim=4, noise_std=0.3)
    p = regression_prompts(task, 4000, 3, seed=(0, 1))
    assert p.xs.shape == (4000, 3, 4) and p.ys.shape == (4000, 3) and p.ws.shape == (4000, 4)
    noise = p.ys - np.einsum("bnd,bd->bn", p.xs, p.ws)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.3) < 0.01
    assert abs(p.xs.var() - 1.0) < 0.03 and abs(p.xs.mean()) < 0.02
    assert abs(p.ws.var() - 1 / 4) < 0.01, "w ~ N(0, I/d)"
    np.testing.assert_array_equal(p.ys, regression_prompts(task, 4000, 3, seed=(0, 1)).ys)
    assert not np.array_equal(p.ys, regression_prompts(task, 4000, 3, seed=(0, 2)).ys)
    assert task.ridge_lambda == pytest.approx(0.09 * 4)


def test_tokens_and_mask_brute_force():
    p = regression_prompts(RegressionTask(dim=3), 2, 5, seed=3)
    tokens, mask = prompt_tokens(p.xs, p.ys), prompt_mask(5)
    assert tokens.shape == (2, 10, 4) and tokens.dtype == np.float32 and mask.shape == (10, 10)
    for b in range(2):
        for j in range(5):
            np.testing.assert_allclose(tokens[b, j], np.append(p.xs[b, j], p.ys[b, j]), rtol=1e-6)
            np.testing.assert_allclose(tokens[b, 5 + j], np.append(p.xs[b, j], 0.0), rtol=1e-6)
    for row in range(10):
        for col in range(10):
            if row < 5:
                expected = col <= row
            else:
                expected = col < row - 5
            assert mask[row, col] == expected, (row, col)


def test_baselines_match_numpy_solvers():
    task = RegressionTask(dim=3, noise_std=0.5)
    p = regression_prompts(task, 3, 8, seed=5)
    ls, ridge, gd = (least_squares_predictions(p.xs, p.ys), ridge_predictions(p.xs, p.ys, task.ridge_lambda),
                     gd_predictions(p.xs, p.ys, task))
    for b in range(3):
        assert ls[b, 0] == ridge[b, 0] == gd[b, 0] == 0.0
        for n in range(1, 8):
            X, Y, x = p.xs[b, :n], p.ys[b, :n], p.xs[b, n]
            w_ls = np.linalg.lstsq(X, Y, rcond=None)[0]  # min-norm when n < d
            w_ridge = np.linalg.solve(X.T @ X + task.ridge_lambda * np.eye(3), X.T @ Y)
            eta = n / (n + 3 + 1 + 0.25 * 3)
            w_gd = eta / n * sum(Y[j] * X[j] for j in range(n))
            assert ls[b, n] == pytest.approx(x @ w_ls, rel=1e-8, abs=1e-10)
            assert ridge[b, n] == pytest.approx(x @ w_ridge, rel=1e-8, abs=1e-10)
            assert gd[b, n] == pytest.approx(x @ w_gd, rel=1e-8, abs=1e-10)
    mse, stderr = mse_by_context(ls, p.ys)
    np.testing.assert_allclose(mse, ((ls - p.ys) ** 2).mean(0))
    assert stderr.shape == (8,) and np.all(stderr >= 0)


def test_gd_step_size_minimizes_the_empirical_error():
    task = RegressionTask(dim=5, noise_std=0.5)
    p = regression_prompts(task, 20000, 5, seed=7)
    g = np.einsum("bnd,bn->bd", p.xs[:, :4], p.ys[:, :4]) / 4
    pred = np.einsum("bd,bd->b", g, p.xs[:, 4])
    best = (pred @ p.ys[:, 4]) / (pred @ pred)  # least-squares η on the sample
    assert gd_step_size(task, 4) == pytest.approx(best, rel=0.05)


def check_prefix_only(layers: int) -> None:
    """Changing pair j changes query n's prediction exactly when j < n."""
    p = regression_prompts(RegressionTask(dim=3), 256, 16, seed=0)  # the smoke run's test batch: one compile
    model = icl_regression.new_regressor(3, 16, layers, 2, 4, 0, "reference", nnx.Rngs(layers))
    base = icl_regression.predict(model, p.xs, p.ys)
    assert base.shape == (256, 16)
    ys = p.ys.copy()
    ys[:, 5] += 3.0
    changed = icl_regression.predict(model, p.xs, ys)
    np.testing.assert_array_equal(changed[:, :6], base[:, :6])
    assert np.all(np.abs(changed[:, 6:] - base[:, 6:]) > 1e-6)


def test_model_query_reads_only_the_pairs_before_it():
    """One layer, the smoke run's model shape (its compiled forward is shared with the smoke test)."""
    check_prefix_only(1)


@pytest.mark.slow
def test_two_layer_model_query_reads_only_the_pairs_before_it():
    check_prefix_only(2)


@pytest.mark.parametrize("call", [lambda: RegressionTask(dim=0), lambda: RegressionTask(noise_std=-1.0),
                                  lambda: ridge_predictions(np.zeros((1, 2, 3)), np.zeros((1, 2)), 0.0),
                                  lambda: prompt_tokens(np.zeros((1, 2, 3)), np.zeros((1, 3))),
                                  lambda: regression_prompts(RegressionTask(), 0, 4, 0)])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_bad_model_input_and_flags_are_refused():
    model = nnx.eval_shape(lambda: icl_regression.ICLRegressor(2, d_model=8, num_layers=1, num_heads=1, head_dim=4,
                                                               rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\[B, 2N, 3\]"):
        model(jnp.zeros((1, 5, 3)))
    for flags in (["--models", "0x1"], ["--models", "2"], ["--models", "ax1"], ["--noise", "0"],
                  ["--num-points", "0"]):
        with pytest.raises(SystemExit):
            icl_regression.parse_args(flags)


def test_smoke_run_writes_results_and_learns(tmp_path):
    """``--smoke`` (one tiny one-layer model): its error falls with context length, below the zero predictor."""
    results = icl_regression.main(["--smoke", "--no-progress", "--out", str(tmp_path), "--name", "icl_test"])
    (row,) = results["results"]
    mse, zero = np.asarray(row["mse"]), np.asarray(results["baselines"]["zero"]["mse"])
    n_train = results["args"]["num_points"]
    assert len(mse) == 2 * n_train
    assert mse[n_train - 1] < 0.8 * mse[1], "error falls with the number of in-context examples"
    assert mse[n_train - 1] < 0.8 * zero[n_train - 1], "beats the prior mean"
    saved = json.loads((tmp_path / "icl_test.json").read_text())
    assert saved["args"]["smoke"] and saved["results"][0]["mse"] == row["mse"]
    assert "| n " in (tmp_path / "icl_test.md").read_text()
    assert (tmp_path / "icl_test.png").stat().st_size > 0
