"""The MQAR task (multi-query associative recall, Zoology: Arora et al. 2023, Sec. 3 and Fig. 2) as batches.

A sequence holds ``N`` key–value pairs ``k_1 v_1 … k_N v_N`` and then, in the rest of the sequence,
each key once more, in random order, at positions drawn with a power-law gap distribution; the model
must output the key's value right after the key. Only those answer positions are scored.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from experiments.lib.training import IGNORE, Batch


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """One MQAR task (Zoology's ``multiquery_ar``).

    Attributes:
      vocab_size: tokens ``V``; keys are drawn from ``[1, V/2)`` and values from ``[V/2, V)``.
      seq_len: sequence length ``T``.
      num_kv_pairs: key–value pairs ``N`` per sequence; ``4N <= T``.
      power_a: exponent ``a`` of the query gap distribution ``p(g) ∝ a g^(a−1)``, ``g = 1..(T − 2N)/2``
        (0.01 in the paper: queries tend to come soon after the pairs).
      random_non_queries: fill the non-query positions after the pairs with random tokens instead of 0
        (the paper's figure-2 runs use 0).
    """

    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = False

    def __post_init__(self):
        if self.seq_len % 2:
            raise ValueError(f"seq_len must be even, got {self.seq_len}")
        if self.num_kv_pairs <= 0 or 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"num_kv_pairs must be in [1, seq_len/4 = {self.seq_len // 4}], got {self.num_kv_pairs}")
        if self.num_kv_pairs >= self.vocab_size // 2:
            raise ValueError(f"vocab_size={self.vocab_size} has {self.vocab_size // 2 - 1} keys, fewer than "
                             f"num_kv_pairs={self.num_kv_pairs}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")


def _distinct(rng: np.random.Generator, batch: int, low: int, high: int, count: int) -> np.ndarray:
    """``[batch, count]`` integers from ``[low, high)``, distinct within each row, uniformly."""
    return np.argsort(rng.random((batch, high - low)), axis=1)[:, :count] + low


def mqar_batch(config: MQARConfig, batch_size: int, seed: Union[int, Sequence[int]]) -> Batch:
    """A batch of MQAR sequences: ``(inputs [B, T] int32, targets [B, T] int32)``.

    Positions ``0..2N−1`` hold ``k_1 v_1 … k_N v_N`` (distinct keys from ``[1, V/2)``, distinct values from
    ``[V/2, V)``). Query ``i`` puts ``k_i`` at position ``2N + 2 g_i`` where the distinct gaps ``g_i`` are
    drawn without replacement with ``p(g) ∝ (g + 1)^(a − 1)``; its target there is ``v_i`` (the next
    token). Every other target is ``IGNORE``. Sampling without replacement uses Gumbel top-k,
    which draws the same distribution as Zoology's sequential ``np.random.choice(replace=False, p=p)``.
    The result is a deterministic function of ``seed`` (an int or a tuple of ints).
    """
    rng = np.random.default_rng(seed)
    V, T, N = config.vocab_size, config.seq_len, config.num_kv_pairs
    keys = _distinct(rng, batch_size, 1, V // 2, N)
    values = _distinct(rng, batch_size, V // 2, V, N)
    space = (T - 2 * N) // 2
    log_p = (config.power_a - 1.0) * np.log(np.arange(1, space + 1))
    gaps = np.argsort(-(log_p + rng.gumbel(size=(batch_size, space))), axis=1)[:, :N]
    if config.random_non_queries:
        inputs = rng.integers(0, V, (batch_size, T))
    else:
        inputs = np.zeros((batch_size, T), np.int64)
    inputs[:, 0:2 * N:2], inputs[:, 1:2 * N:2] = keys, values
    query_positions = 2 * N + 2 * gaps
    np.put_along_axis(inputs, query_positions, keys, axis=1)
    targets = np.full((batch_size, T), IGNORE, np.int64)
    np.put_along_axis(targets, query_positions, values, axis=1)
    return inputs.astype(np.int32), targets.astype(np.int32)
