"""In-context linear regression: prompts, their token layout, and the closed-form baselines.

The task of He, Pan, Chen & Yang 2025 ("In-Context Linear Regression Demystified", ICML 2025; its setup,
"data distribution"), as the official code draws it (``XintianPan/ICL_linear``, ``utils/data_utils.py``,
``LinearReg``): per prompt a task vector ``w ~ N(0, I_d / d)`` (the notebook's text writes ``N(0, I_d)``;
the code scales by ``1/d``, followed here), covariates ``x_i ~ N(0, I_d)`` and responses
``y_i = w·x_i + ε_i``, ``ε_i ~ N(0, σ²)``. A prompt of ``N`` pairs scores a prediction of ``y_n`` from the
``n`` pairs before it for every ``n = 0 … N − 1`` (the every-prefix objective of Garg et al. 2022, "What Can
Transformers Learn In-Context?"); the paper scores one query after a fixed number of pairs.

Token layout (the paper's embedding: ``z_i = [x_i; y_i]`` for a context pair and ``z_q = [x_q; 0]`` for the
query, which does not attend to itself): ``prompt_tokens`` lays out ``2N`` tokens of ``d + 1`` features, the
``N`` context tokens ``[x_j, y_j]`` then the ``N`` query tokens ``[x_n, 0]``, and ``prompt_mask`` lets
context token ``j`` see context tokens ``≤ j`` and query token ``n`` see context tokens ``< n`` only (no
query sees another query or itself). In a one-layer model the query token ``n`` is then exactly the paper's
query over a prompt of ``n`` pairs; query 0 sees nothing (attention returns 0 for an empty row).

Baselines in closed form, per prefix ``n`` (``X_n``: the first ``n`` covariates as rows, ``Y_n`` their
responses): least squares with the minimum-norm solution ``ŵ = X_n⁺ Y_n`` (interpolates when ``n ≤ d``);
ridge ``ŵ = (X_nᵀX_n + λ I)⁻¹ X_nᵀ Y_n`` with the Bayes-optimal ``λ = σ² · d`` (noise variance times the
prior precision ``d``: ridge with that λ is the posterior mean of ``w``, so it has the least expected squared
error of all predictors); one step of gradient descent on the in-context squared loss from ``w = 0``,
``ŵ = (η/n) X_nᵀ Y_n`` (what one linear self-attention layer can compute, von Oswald et al. 2023,
"Transformers Learn In-Context by Gradient Descent", Prop. 1; the paper's abstract says trained multi-head
softmax attention approximately implements a "debiased" form of it), with the step ``η`` of least expected
error at each ``n`` (``gd_step_size``); and the zero predictor (the prior mean, error ``1 + σ²``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from attnjax.checks import check_positive


@dataclasses.dataclass(frozen=True)
class RegressionTask:
    """The distribution of in-context regression prompts.

    Attributes:
      dim: covariate dimension ``d``.
      noise_std: noise standard deviation ``σ`` of ``y = w·x + ε`` (default ``σ² = 0.1``, the paper's code).
    """

    dim: int = 5
    noise_std: float = 0.1 ** 0.5

    def __post_init__(self):
        check_positive(dim=self.dim)
        if not self.noise_std >= 0:
            raise ValueError(f"RegressionTask.noise_std must be >= 0, got {self.noise_std}")

    @property
    def prior_var(self) -> float:
        """Variance of each entry of ``w``: ``1 / d`` (so ``E[(w·x)²] = 1``)."""
        return 1.0 / self.dim

    @property
    def ridge_lambda(self) -> float:
        """The Bayes-optimal ridge penalty ``σ² / prior_var = σ² · d``."""
        return self.noise_std ** 2 / self.prior_var

    @property
    def token_dim(self) -> int:
        """Features per token, ``[x, y]``: ``d + 1``."""
        return self.dim + 1


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A batch of prompts: ``xs [B, N, d]``, ``ys [B, N]``, task vectors ``ws [B, d]``, all float64."""

    xs: np.ndarray
    ys: np.ndarray
    ws: np.ndarray


def regression_prompts(task: RegressionTask, batch_size: int, num_points: int,
                       seed: Union[int, Sequence[int]]) -> Prompts:
    """``batch_size`` prompts of ``num_points`` pairs each, a deterministic function of the arguments.

    ``w ~ N(0, I_d/d)`` per prompt, ``x ~ N(0, I_d)`` and ``y = w·x + ε``, ``ε ~ N(0, σ²)`` per pair.
    ``seed`` is an int or a tuple of ints.
    """
    check_positive(batch_size=batch_size, num_points=num_points)
    rng = np.random.default_rng(seed)
    ws = rng.standard_normal((batch_size, task.dim)) * np.sqrt(task.prior_var)
    xs = rng.standard_normal((batch_size, num_points, task.dim))
    ys = np.einsum("bnd,bd->bn", xs, ws) + task.noise_std * rng.standard_normal((batch_size, num_points))
    return Prompts(xs, ys, ws)


def prompt_tokens(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Tokens ``[B, 2N, d + 1]`` float32: context ``[x_j, y_j]`` for ``j < N``, then queries ``[x_n, 0]``."""
    if xs.ndim != 3 or ys.shape != xs.shape[:2]:
        raise ValueError(f"xs must be [B, N, d] and ys [B, N], got xs {xs.shape} and ys {ys.shape}")
    context = np.concatenate([xs, ys[..., None]], axis=-1)
    queries = np.concatenate([xs, np.zeros_like(ys)[..., None]], axis=-1)
    return np.concatenate([context, queries], axis=1).astype(np.float32)


def prompt_mask(num_points: int) -> np.ndarray:
    """Bool ``[2N, 2N]`` (True = attend): context ``j`` sees context ``≤ j``; query ``n`` sees context ``< n``."""
    check_positive(num_points=num_points)
    i = np.arange(num_points)
    mask = np.zeros((2 * num_points, 2 * num_points), bool)
    mask[:num_points, :num_points] = i[None, :] <= i[:, None]
    mask[num_points:, :num_points] = i[None, :] < i[:, None]
    return mask


def least_squares_predictions(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``[B, N]``: entry ``n`` predicts ``y_n`` by ``x_n · X_n⁺ Y_n`` (min-norm least squares on the first
    ``n`` pairs; 0 for ``n = 0``)."""
    out = np.zeros(ys.shape)
    for n in range(1, ys.shape[1]):
        w = np.einsum("bdn,bn->bd", np.linalg.pinv(xs[:, :n]), ys[:, :n])
        out[:, n] = np.einsum("bd,bd->b", xs[:, n], w)
    return out


def ridge_predictions(xs: np.ndarray, ys: np.ndarray, lam: float) -> np.ndarray:
    """``[B, N]``: entry ``n`` predicts ``y_n`` by ``x_n · (X_nᵀX_n + λI)⁻¹ X_nᵀ Y_n`` (0 for ``n = 0``).

    ``lam`` must be positive (``lam = 0`` is least squares, ``least_squares_predictions``).
    """
    if not lam > 0:
        raise ValueError(f"lam must be positive (use least_squares_predictions for lam = 0), got {lam}")
    B, N, d = xs.shape
    out = np.zeros(ys.shape)
    for n in range(1, N):
        gram = np.einsum("bnd,bne->bde", xs[:, :n], xs[:, :n]) + lam * np.eye(d)
        w = np.linalg.solve(gram, np.einsum("bnd,bn->bd", xs[:, :n], ys[:, :n])[..., None])[..., 0]
        out[:, n] = np.einsum("bd,bd->b", xs[:, n], w)
    return out


def gd_step_size(task: RegressionTask, n: np.ndarray) -> np.ndarray:
    """The step ``η`` of one GD step (``gd_predictions``) with the least expected squared error at context ``n``.

    With ``g = (1/n) X_nᵀ Y_n`` and ``ŷ = η g·x_q``: ``η* = E[wᵀΣ̂w] / E|g|²`` where, for Gaussian ``x``,
    ``E[Σ̂²] = (1 + (d + 1)/n) I``, so ``E|g|² = dτ²(1 + (d + 1)/n) + σ²d/n`` and ``E[wᵀΣ̂w] = dτ²``
    (``τ² = 1/d`` the prior variance). ``n = 0`` gives 0.
    """
    n = np.asarray(n, np.float64)
    d, signal = task.dim, task.dim * task.prior_var
    safe = np.maximum(n, 1.0)
    eta = signal / (signal * (1 + (d + 1) / safe) + task.noise_std ** 2 * d / safe)
    return np.where(n > 0, eta, 0.0)


def gd_predictions(xs: np.ndarray, ys: np.ndarray, task: RegressionTask) -> np.ndarray:
    """``[B, N]``: entry ``n`` predicts ``y_n`` by ``η_n x_n · (1/n) Σ_{j<n} y_j x_j`` (one GD step from 0 on the
    first ``n`` pairs, ``η_n = gd_step_size(task, n)``; 0 for ``n = 0``)."""
    N = ys.shape[1]
    sums = np.cumsum(ys[..., None] * xs, axis=1)  # [B, N, d]: Σ_{j ≤ n} y_j x_j
    prefix = np.concatenate([np.zeros_like(sums[:, :1]), sums[:, :-1]], axis=1)  # Σ_{j < n}
    n = np.arange(N)
    scale = gd_step_size(task, n) / np.maximum(n, 1)
    return np.einsum("bnd,bnd->bn", prefix, xs) * scale


def mse_by_context(predictions: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared error against ``ys`` per context length ``n`` (``[N]``) and its standard error (``[N]``)."""
    err = (np.asarray(predictions, np.float64) - ys) ** 2
    return err.mean(0), err.std(0, ddof=1) / np.sqrt(err.shape[0])
