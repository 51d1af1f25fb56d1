"""Timing and memory measurement: compile once, time interleaved runs, read XLA's memory analysis."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping, Optional

import jax

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's compiled memory analysis of one function, in bytes.

    ``peak`` = arguments + outputs + temporaries - aliased buffers; ``extra`` = temporaries, the
    memory the computation needs beyond its inputs and outputs.
    """

    argument: int
    output: int
    temp: int
    alias: int

    @property
    def peak(self) -> int:
        """Arguments + outputs + temporaries - aliased buffers."""
        return self.argument + self.output + self.temp - self.alias

    @property
    def extra(self) -> int:
        """Temporaries: what the computation needs beyond its inputs and outputs."""
        return self.temp

    def as_dict(self) -> dict:
        """The four sizes plus ``peak`` and ``extra``, JSON-ready."""
        return dict(dataclasses.asdict(self), peak=self.peak, extra=self.extra)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median wall time of ``repeats`` runs after warmup, in seconds."""

    median_s: float
    repeats: int


def compile_fn(fn: Callable, *args) -> jax.stages.Compiled:
    """``jax.jit(fn)`` lowered and compiled for ``args``; compiling allocates nothing."""
    return jax.jit(fn).lower(*args).compile()


def memory_of(compiled: jax.stages.Compiled) -> Memory:
    """The compiled executable's memory analysis (no run needed)."""
    m = compiled.memory_analysis()
    return Memory(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                  temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes)


def time_thunks(thunks: Mapping[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1,
                max_seconds: Optional[float] = None) -> dict[str, Timing]:
    """Median time of each zero-argument function, interleaved round by round.

    Interleaving spreads background load evenly over the functions, so their ratios are fairer
    than back-to-back loops. After ``warmup`` rounds, up to ``repeats`` timed rounds run; rounds
    stop early (at least one is kept) once the timed rounds pass ``max_seconds`` in total.
    """
    for _ in range(warmup):
        for thunk in thunks.values():
            jax.block_until_ready(thunk())
    samples: dict[str, list[float]] = {name: [] for name in thunks}
    start = time.perf_counter()
    for _ in range(max(repeats, 1)):
        for name, thunk in thunks.items():
            t0 = time.perf_counter()
            jax.block_until_ready(thunk())
            samples[name].append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return {name: Timing(statistics.median(s), len(s)) for name, s in samples.items()}


def time_fn(fn: Callable, *args, repeats: int = 5, warmup: int = 1,
            max_seconds: Optional[float] = None) -> Timing:
    """Median time of the jitted ``fn(*args)``, compile excluded."""
    compiled = compile_fn(fn, *args)
    return time_thunks({"fn": lambda: compiled(*args)}, repeats=repeats, warmup=warmup,
                       max_seconds=max_seconds)["fn"]


def measure_paths(fns: Mapping[str, Callable], *args, budget_bytes: float, repeats: int = 5,
                  max_seconds: Optional[float] = None) -> dict[str, tuple[Memory, Optional[Timing]]]:
    """Compile each ``fn(*args)``, read its memory, and time (interleaved) those whose peak fits the budget.

    Returns ``{path: (memory, timing)}`` in ``fns``' order; ``timing`` is None for a path over ``budget_bytes``.
    """
    compiled = {path: compile_fn(fn, *args) for path, fn in fns.items()}
    memories = {path: memory_of(c) for path, c in compiled.items()}
    thunks = {path: (lambda c=c: c(*args)) for path, c in compiled.items() if memories[path].peak <= budget_bytes}
    timings = time_thunks(thunks, repeats=repeats, max_seconds=max_seconds)
    return {path: (memories[path], timings.get(path)) for path in fns}
