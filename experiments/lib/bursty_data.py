"""The bursty in-context classification task of Reddy 2023, as batches of real-valued token sequences.

G. Reddy, "The mechanistic basis of data dependence and abrupt learning in an in-context classification task"
(ICLR 2024, arXiv:2312.03002), after Chan et al. 2022 ("Data distributional properties drive emergent
in-context learning in transformers"). The paper's full text was not available here: this follows its abstract's
parameters (K, L, N, B, ε, α, p_B) and the official code (``datasets_v2.generate_input_seqs``) for every detail:

- ``K`` classes with means ``μ_k ~ N(0, I_D / D)`` and ``L`` labels with vectors ``ℓ_l ~ N(0, I_D / D)``;
  class ``k`` has label ``k mod L`` (official code: ``np.tile(np.arange(L), K // L)``, so ``L`` divides ``K``).
- An item of class ``k`` is ``x = (μ_k + ε η) / √(1 + ε²)``, ``η ~ N(0, I_D / D)`` (within-class noise ``ε``).
- Classes are drawn from the rank-frequency law ``f(k) ∝ k^(−α)``, ``k = 1 … K`` (Zipf exponent ``α``).
- A sequence is ``x_1, ℓ_1, …, x_N, ℓ_N, x_q``: ``N`` item–label pairs and a query item; the target is the
  query's label (``L``-way classification). With probability ``p_B`` the sequence is *bursty*: ``N / B``
  classes drawn from ``f``, each with ``B`` items (independent noise) in a random order, and the query's class is
  one of them; otherwise the ``N`` items and the query are drawn i.i.d. from ``f``. The ``N / B`` classes are
  drawn with replacement, as in the official code, so a class drawn twice has ``2B`` items.
- Every token is ``[one-hot position (P) ‖ content (D)]`` with ``P = 2·N_max + 1``; the ``2N + 1`` positions of
  a sequence start at a random shift in ``[0, P − 2N − 1]`` (official code, ``Nmax = 32``: ``P = 65``).

Test splits (the official training script's four test sets):

- ``"train"``: the training distribution (``p_B``, ``B``, ``α``), on the training classes.
- ``"in_context"`` (official ``IC``): bursty (``p_B = 1``) sequences of *novel* classes (fresh means), each given
  a uniformly drawn label; only the context tells the label.
- ``"swapped"`` (official ``IC2``, ``flip_labels``): bursty sequences of training classes whose labels are all
  moved to ``(label + 1) mod L``, in the context and in the target: in-weights memory gives the wrong answer.
- ``"in_weights"`` (official ``IW``): ``p_B = 0``, items and query i.i.d. from ``f`` on the training classes
  (so the query's class is in the context only by chance, probability about ``N·Σf²``); the target is the
  query class's training label.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

SPLITS = ("train", "in_context", "swapped", "in_weights")
"""The sequence distributions of ``bursty_batch`` (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class BurstyTask:
    """The task's parameters (symbols as in Reddy 2023 and its official code).

    Attributes:
      num_classes: ``K``, a multiple of ``num_labels``.
      num_labels: ``L``.
      context: ``N`` item–label pairs before the query.
      burstiness: ``B``, items per class in a bursty context; divides ``N`` and ``B < N``.
      p_bursty: ``p_B``, the fraction of bursty training sequences.
      alpha: ``α``, the rank-frequency exponent of the classes (0: uniform).
      eps: ``ε``, the within-class noise.
      dim: ``D``, features of an item or label vector.
      max_context: ``N_max``; the one-hot positions have ``P = 2·N_max + 1`` dimensions (``>= N``).
    """

    num_classes: int = 512
    num_labels: int = 32
    context: int = 8
    burstiness: int = 4
    p_bursty: float = 1.0
    alpha: float = 0.0
    eps: float = 0.1
    dim: int = 63
    max_context: int = 32

    def __post_init__(self):
        for name in ("num_classes", "num_labels", "context", "burstiness", "dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BurstyTask.{name} must be positive, got {getattr(self, name)}")
        if self.num_classes % self.num_labels:
            raise ValueError(f"BurstyTask.num_classes ({self.num_classes}) must be a multiple of num_labels "
                             f"({self.num_labels}): class k has label k mod L")
        if self.context % self.burstiness or self.burstiness >= self.context:
            raise ValueError(f"BurstyTask.burstiness ({self.burstiness}) must divide context ({self.context}) "
                             "and be smaller than it")
        if not 0.0 <= self.p_bursty <= 1.0:
            raise ValueError(f"BurstyTask.p_bursty must be in [0, 1], got {self.p_bursty}")
        if self.alpha < 0 or self.eps < 0:
            raise ValueError(f"BurstyTask.alpha and eps must be >= 0, got {self.alpha}, {self.eps}")
        if self.max_context < self.context:
            raise ValueError(f"BurstyTask.max_context ({self.max_context}) must be >= context ({self.context})")

    @property
    def seq_len(self) -> int:
        """Tokens per sequence, ``2N + 1``."""
        return 2 * self.context + 1

    @property
    def positions(self) -> int:
        """One-hot position dimensions ``P = 2·N_max + 1``."""
        return 2 * self.max_context + 1

    @property
    def features(self) -> int:
        """Features per token, ``P + D``."""
        return self.positions + self.dim


def class_frequencies(num_classes: int, alpha: float) -> np.ndarray:
    """The rank-frequency law ``f(k) = k^(−α) / Σ_j j^(−α)``, ``k = 1 … K``: float64 ``[K]``."""
    f = np.arange(1, num_classes + 1, dtype=np.float64) ** -alpha
    return f / f.sum()


@dataclasses.dataclass(frozen=True)
class Mixture:
    """One draw of the task's vectors (fixed for a whole run).

    Attributes:
      class_means: ``μ_k``, float64 ``[K, D]``.
      label_vectors: ``ℓ_l``, float64 ``[L, D]``.
      class_labels: the label of each class, ``k mod L``, int64 ``[K]``.
    """

    class_means: np.ndarray
    label_vectors: np.ndarray
    class_labels: np.ndarray


def make_mixture(task: BurstyTask, seed: Union[int, Sequence[int]]) -> Mixture:
    """Class means and label vectors ``~ N(0, I_D / D)``, labels ``k mod L``; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scale = task.dim ** -0.5
    return Mixture(class_means=rng.normal(size=(task.num_classes, task.dim)) * scale,
                   label_vectors=rng.normal(size=(task.num_labels, task.dim)) * scale,
                   class_labels=np.arange(task.num_classes) % task.num_labels)


@dataclasses.dataclass(frozen=True)
class BurstyBatch:
    """A batch of sequences ``x_1, ℓ_1, …, x_N, ℓ_N, x_q``.

    Attributes:
      inputs: float32 ``[S, 2N + 1, P + D]`` (``[one-hot position ‖ content]`` per token).
      targets: the query's label, int32 ``[S, 1]`` (the label-space answer at the last position).
      item_classes: the class of each context item and of the query, int64 ``[S, N + 1]``; novel classes
        (``"in_context"``) get ids ``K, K + 1, …`` (unique within the batch).
      item_labels: the label each context item shows and the query's target, int64 ``[S, N + 1]``.
      bursty: which sequences are bursty, bool ``[S]``.
      shifts: the position offset of each sequence, int64 ``[S]``.
    """

    inputs: np.ndarray
    targets: np.ndarray
    item_classes: np.ndarray
    item_labels: np.ndarray
    bursty: np.ndarray
    shifts: np.ndarray

    def query_matches(self) -> np.ndarray:
        """bool ``[S, N]``: which context items have the query's class (the label after each is what an
        induction head copies)."""
        return self.item_classes[:, :-1] == self.item_classes[:, -1:]


def _bursty_classes(rng: np.random.Generator, task: BurstyTask, size: int, draw) -> np.ndarray:
    """``[size, N + 1]``: ``N / B`` classes from ``draw(shape)``, each ``B`` times in random order, then the query
    class, one of the context's classes."""
    n, b = task.context, task.burstiness
    chosen = draw((size, n // b))
    context = np.tile(chosen, b)
    context = np.take_along_axis(context, rng.permuted(np.tile(np.arange(n), (size, 1)), axis=1), axis=1)
    query = chosen[np.arange(size), rng.integers(0, n // b, size)]
    return np.concatenate([context, query[:, None]], axis=1)


def bursty_batch(task: BurstyTask, mixture: Mixture, size: int, split: str,
                 seed: Union[int, Sequence[int]]) -> BurstyBatch:
    """``size`` sequences of ``split`` (one of ``SPLITS``), a deterministic function of the arguments.

    See the module docstring for each split. The query's target is its label (``"swapped"``: the moved label
    ``(label + 1) mod L``, which the context also shows).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if mixture.class_means.shape != (task.num_classes, task.dim) or mixture.label_vectors.shape != (
            task.num_labels, task.dim):
        raise ValueError(f"mixture shapes {mixture.class_means.shape}, {mixture.label_vectors.shape} do not match "
                         f"the task's (K, D) = {(task.num_classes, task.dim)}, (L, D) = {(task.num_labels, task.dim)}")
    rng = np.random.default_rng(seed)
    n, K, D = task.context, task.num_classes, task.dim
    cdf = np.cumsum(class_frequencies(K, task.alpha))

    def draw(shape):  # inverse-CDF sampling of f
        return np.minimum(np.searchsorted(cdf, rng.random(shape), side="right"), K - 1)

    means, labels = mixture.class_means, mixture.class_labels
    if split == "in_context":
        classes = _bursty_classes(rng, task, size, lambda shape: K + np.arange(np.prod(shape)).reshape(shape))
        novel = rng.normal(size=(size * (n // task.burstiness), D)) * D ** -0.5
        means = np.concatenate([means, novel])
        labels = np.concatenate([labels, rng.integers(0, task.num_labels, len(novel))])
        bursty = np.ones(size, bool)
    else:
        p_bursty = {"train": task.p_bursty, "swapped": 1.0, "in_weights": 0.0}[split]
        bursty = rng.random(size) < p_bursty
        classes = draw((size, n + 1))
        classes[bursty] = _bursty_classes(rng, task, int(bursty.sum()), draw)
        if split == "swapped":
            labels = (labels + 1) % task.num_labels
    noise = rng.normal(size=(size, n + 1, D)) * D ** -0.5
    items = (means[classes] + task.eps * noise) / np.sqrt(1 + task.eps ** 2)
    item_labels = labels[classes]
    content = np.empty((size, task.seq_len, D))
    content[:, 0::2] = items
    content[:, 1::2] = mixture.label_vectors[item_labels[:, :-1]]
    shifts = rng.integers(0, task.positions - task.seq_len + 1, size)
    position = np.zeros((size, task.seq_len, task.positions))
    position[np.arange(size)[:, None], np.arange(task.seq_len), shifts[:, None] + np.arange(task.seq_len)] = 1.0
    inputs = np.concatenate([position, content], axis=-1).astype(np.float32)
    return BurstyBatch(inputs=inputs, targets=item_labels[:, -1:].astype(np.int32), item_classes=classes,
                       item_labels=item_labels, bursty=bursty, shifts=shifts)
