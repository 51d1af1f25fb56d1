"""The passkey / needle-in-a-haystack task as token batches.

Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", Sec. 4.2 and App. E): a long filler text
hides one line "the pass key is <digits>. Remember it.", and the prompt ends "What is the pass key?"; the
model must produce the digits. The needle-in-a-haystack tests (Kamradt 2023; Hsieh et al. 2024, "RULER",
Sec. 3.1 "NIAH single") put the needle at a chosen relative depth of the context and score retrieval over a
depth × length grid. Here, in tokens (``NeedleTask.vocab_size`` of them)::

    haystack[:o]  MARK key v_1 … v_m  haystack[o:]  QUERY key v_1 … v_{m-1}
                  └──── the needle ───┘             └──── the query ────┘

``MARK`` and ``QUERY`` are two reserved tokens, ``key`` one of ``num_keys`` key tokens, ``v_1 … v_m`` the
value, ``m = value_len`` digits from ``num_digits`` digit tokens, and the haystack filler tokens from their
own ``filler_vocab`` tokens, so the marker, key and digits occur nowhere else. The last ``m`` positions are
scored, teacher-forced: the target at the query's ``key`` is ``v_1``, at ``v_j`` it is ``v_{j+1}``; every
other target is ``IGNORE``. A sequence has exactly ``seq_len`` tokens. The needle starts at
``needle_offset(seq_len, depth, value_len)``: depth 0 puts it first in the sequence, depth 1 right before
the query.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from experiments.lib.training import IGNORE, Batch

MARK = 0
"""Token that opens the needle ("the pass key is")."""
QUERY = 1
"""Token that opens the query ("what is the pass key?")."""
FILLERS = ("random", "repeat")
"""Haystack kinds: i.i.d. uniform filler tokens, or the filler vocabulary cycled in order (like the passkey
paper's repeated "The grass is green. The sky is blue. …" lines)."""


@dataclasses.dataclass(frozen=True)
class NeedleTask:
    """The vocabulary and shape of a needle task; the length and depth are arguments of ``needle_batch``.

    Attributes:
      num_keys: key tokens; each sequence draws one uniformly.
      num_digits: digit tokens (10: decimal digits).
      value_len: digits ``m`` in the value; each is drawn uniformly (chance accuracy ``1/num_digits`` per digit).
      filler_vocab: filler tokens of the haystack.
      filler: ``"random"`` or ``"repeat"`` (see ``FILLERS``).
    """

    num_keys: int = 16
    num_digits: int = 10
    value_len: int = 2
    filler_vocab: int = 32
    filler: str = "random"

    def __post_init__(self):
        for name in ("num_keys", "num_digits", "value_len", "filler_vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NeedleTask.{name} must be positive, got {getattr(self, name)}")
        if self.filler not in FILLERS:
            raise ValueError(f"NeedleTask.filler must be one of {FILLERS}, got {self.filler!r}")

    @property
    def key_start(self) -> int:
        """First key token (keys are ``key_start .. key_start + num_keys − 1``)."""
        return 2

    @property
    def digit_start(self) -> int:
        """First digit token."""
        return self.key_start + self.num_keys

    @property
    def filler_start(self) -> int:
        """First filler token."""
        return self.digit_start + self.num_digits

    @property
    def vocab_size(self) -> int:
        """Tokens in all: marker, query, keys, digits, fillers."""
        return self.filler_start + self.filler_vocab

    @property
    def needle_len(self) -> int:
        """``MARK key v_1 … v_m``: ``m + 2`` tokens."""
        return self.value_len + 2

    @property
    def query_len(self) -> int:
        """``QUERY key v_1 … v_{m−1}``: ``m + 1`` tokens."""
        return self.value_len + 1

    def min_seq_len(self) -> int:
        """The shortest sequence that holds the needle and the query (an empty haystack)."""
        return self.needle_len + self.query_len


def needle_offset(seq_len: int, depth: Union[float, np.ndarray], value_len: int) -> np.ndarray:
    """Where the needle starts: ``round(depth · (seq_len − (2m + 3)))``, ``m = value_len``.

    ``seq_len − (2m + 3)`` filler tokens share the space before the query with the needle; depth 0 puts the
    needle at position 0, depth 1 ends it right before ``QUERY``. Rounds half to even (``np.rint``).
    """
    depth = np.asarray(depth, np.float64)
    if np.any((depth < 0) | (depth > 1)):
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return np.rint(depth * (seq_len - (2 * value_len + 3))).astype(np.int64)


def needle_batch(task: NeedleTask, batch_size: int, seq_len: int, depth: Optional[float],
                 seed: Union[int, Sequence[int]]) -> Batch:
    """A batch of needle sequences: ``(inputs [B, seq_len] int32, targets [B, seq_len] int32)``.

    Each row draws its key, its ``m`` digits and its haystack; the needle starts at
    ``needle_offset(seq_len, depth, m)``, or, with ``depth=None``, at a depth drawn uniformly from ``[0, 1]``
    per row (training). Targets are ``IGNORE`` except at the last ``m`` positions, whose targets are the
    value's digits ``v_1 … v_m`` (the loss and accuracy mask). A deterministic function of
    ``(task, batch_size, seq_len, depth, seed)``; ``seed`` is an int or a tuple of ints.
    """
    if seq_len < task.min_seq_len():
        raise ValueError(f"seq_len must be >= {task.min_seq_len()} for value_len={task.value_len}, got {seq_len}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng(seed)
    m, B = task.value_len, batch_size
    keys = rng.integers(0, task.num_keys, B) + task.key_start
    values = rng.integers(0, task.num_digits, (B, m)) + task.digit_start
    depths = rng.random(B) if depth is None else np.full(B, depth)
    offsets = needle_offset(seq_len, depths, m)
    hay_len = seq_len - task.min_seq_len()
    if task.filler == "random":
        hay = rng.integers(0, task.filler_vocab, (B, hay_len))
    else:
        hay = np.broadcast_to(np.arange(hay_len) % task.filler_vocab, (B, hay_len))
    hay = hay + task.filler_start
    needles = np.concatenate([np.full((B, 1), MARK), keys[:, None], values], axis=1)
    # Row b: hay[:o], needle, hay[o:], then the query. Scatter the needle into slots o .. o + m + 1 and the hay
    # into the remaining slots before the query, in order.
    pre = np.arange(seq_len - task.query_len)
    in_needle = (pre >= offsets[:, None]) & (pre < offsets[:, None] + task.needle_len)
    body = np.empty((B, len(pre)), np.int64)
    body[in_needle] = needles.reshape(-1)
    body[~in_needle] = hay.reshape(-1)
    query = np.concatenate([np.full((B, 1), QUERY), keys[:, None], values[:, :-1]], axis=1)
    inputs = np.concatenate([body, query], axis=1)
    targets = np.full((B, seq_len), IGNORE, np.int64)
    targets[:, seq_len - m:] = values
    return inputs.astype(np.int32), targets.astype(np.int32)

