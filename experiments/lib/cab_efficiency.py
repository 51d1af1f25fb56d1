"""CAB's efficiency length, and the whole CAB run (pattern checks, then efficiency lengths).

The efficiency length of a mechanism in a pattern is the shortest T of the candidate lengths from
which its fastest implementation (the one ``implementation="auto"`` would pick) beats softmax
``xla`` (FlashAttention-2 in XLA) in the same pattern at every longer T measured, separately on
time (median of interleaved runs) and on peak memory (XLA's compiled memory analysis: arguments +
outputs + temporaries).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from tqdm import tqdm

from attnjax import dispatch, registry
from experiments.lib.cab_patterns import CABSettings, Pattern, attention_fn, check_entry, with_outcome
from experiments.lib.cli import selected_entries
from experiments.lib.measure import compile_fn, memory_of, time_thunks
from experiments.lib.outcomes import error_text
from experiments.lib.report import markdown_table
from experiments.lib.workload import host_random_qkv, mode_fn, mode_inputs

BASELINE_MECHANISM, BASELINE_IMPLEMENTATION = "softmax", "xla"


def efficiency_implementation(run: dict) -> Optional[str]:
    """What ``implementation="auto"`` picks on this backend among those that ran the pattern."""
    ran = with_outcome(run["implementations"], "ok")
    return next((i for i in dispatch.auto_order() if i in ran), None)


def _predicted(last: Optional[tuple[int, float]], seq_len: int) -> float:
    """One run's time at ``seq_len``, quadratic from the last timed ``(T, seconds)`` (0 if none)."""
    return 0.0 if last is None else last[1] * (seq_len / last[0]) ** 2


def stays_ahead_from(points: Sequence[dict], key: str) -> Optional[int]:
    """The shortest measured T from which ``point[key] < 1`` at every longer measured T (None if the
    longest measured T is not ahead): CAB's efficiency length, robust to a lucky win at one short T."""
    measured = [p for p in points if key in p]
    length = None
    for p in reversed(measured):
        if p[key] >= 1:
            break
        length = p["T"]
    return length


def efficiency_length(entry: registry.Entry, pattern: Pattern, implementation: str, settings: CABSettings,
                      baseline_cache: dict) -> dict:
    """CAB's efficiency length of one mechanism against softmax ``xla`` in one pattern, on time and on memory.

    At every T both are compiled (peak memory from the compiled analysis: nothing is allocated) and
    timed interleaved, until the predicted single run of either side exceeds ``settings.time_budget_s``
    (memory goes on to the last T). The lengths are ``stays_ahead_from`` the measured points.
    """
    mech = mode_fn(attention_fn(entry.config(), pattern, implementation), settings.mode)
    base = mode_fn(attention_fn(registry.get(BASELINE_MECHANISM)(), pattern, BASELINE_IMPLEMENTATION), settings.mode)
    out = {"pattern": pattern.name, "implementation": implementation, "mode": settings.mode, "time_stopped": None,
           "points": []}
    last_mech = last_base = None
    for seq_len in settings.seq_lens:
        kv_len = max(1, round(seq_len * settings.cross_ratio)) if pattern.cross else seq_len
        xs = mode_inputs(*host_random_qkv(seq_len, settings.batch, seq_len, settings.heads, settings.head_dim,
                                          kv_len=kv_len), settings.mode)
        try:
            compiled = compile_fn(mech, *xs)
        except Exception as e:  # noqa: BLE001 - recorded; the sweep of this mechanism ends here
            out["error"] = f"T={seq_len}: {error_text(e)}"
            break
        key = (pattern.name, seq_len, kv_len, settings.mode)
        if key not in baseline_cache:
            baseline_cache[key] = compile_fn(base, *xs)
        base_compiled = baseline_cache[key]
        mem, base_mem = memory_of(compiled), memory_of(base_compiled)
        point = {"T": seq_len, "S": kv_len, "peak": mem.peak, "baseline_peak": base_mem.peak,
                 "memory_ratio": mem.peak / base_mem.peak}
        over = max(_predicted(last_mech, seq_len), _predicted(last_base, seq_len))
        if out["time_stopped"] is None and over > settings.time_budget_s:
            out["time_stopped"] = f"T={seq_len}: predicted {over:.1f} s per run > {settings.time_budget_s:g} s"
        if out["time_stopped"] is None:
            t = time_thunks({"mech": lambda: compiled(*xs), "base": lambda: base_compiled(*xs)},
                            repeats=settings.repeats, max_seconds=settings.max_seconds)
            last_mech, last_base = (seq_len, t["mech"].median_s), (seq_len, t["base"].median_s)
            point.update(seconds=t["mech"].median_s, baseline_seconds=t["base"].median_s,
                         time_ratio=t["mech"].median_s / t["base"].median_s, repeats=t["mech"].repeats)
        out["points"].append(point)
    out["time_length"] = stays_ahead_from(out["points"], "time_ratio")
    out["memory_length"] = stays_ahead_from(out["points"], "memory_ratio")
    return out


def run_efficiency(entry: registry.Entry, checks: dict, settings: CABSettings, baseline_cache: dict) -> dict:
    """Efficiency length of one mechanism in each of ``settings.efficiency_patterns`` it runs."""
    results = {}
    for pattern in settings.efficiency_patterns:
        run = checks["patterns"][pattern.name]
        impl = efficiency_implementation(run) if run["status"] == "ok" else None
        if impl is None:
            results[pattern.name] = {"skipped": f"pattern {run['status']}"}
        elif (entry.name, impl) == (BASELINE_MECHANISM, BASELINE_IMPLEMENTATION):
            results[pattern.name] = {"skipped": "the baseline itself", "implementation": impl}
        else:
            results[pattern.name] = efficiency_length(entry, pattern, impl, settings, baseline_cache)
    return results


def run(settings: CABSettings, deadline: Optional[float] = None) -> dict:
    """Pattern checks and efficiency lengths of every selected mechanism, keyed by name.

    With a ``deadline`` (a ``time.perf_counter()`` value), mechanisms not started by then are left out.
    """
    entries = selected_entries(settings.mechanisms)
    results, baseline_cache = {}, {}
    bar = tqdm(entries, desc="cab", unit="mechanism")
    for entry in bar:
        if deadline is not None and time.perf_counter() > deadline:
            break
        bar.set_postfix(mechanism=entry.name)
        checks = check_entry(entry, settings)
        checks["efficiency"] = run_efficiency(entry, checks, settings, baseline_cache)
        results[entry.name] = checks
    return results


def _length_cell(eff: dict, kind: str) -> str:
    """``"T (r x)"`` for a length found, ``"> T (r x at T)"`` when the longest measured T is not ahead."""
    length, ratio_key = eff[f"{kind}_length"], f"{kind}_ratio"
    measured = [p for p in eff["points"] if ratio_key in p]
    if length is not None:
        return f"{length} ({next(p[ratio_key] for p in measured if p['T'] == length):.2f}x)"
    if not measured:
        return f"not measured ({eff.get('error', '')})"
    return f"> {measured[-1]['T']} ({measured[-1][ratio_key]:.2f}x at {measured[-1]['T']})"


def _ratios_cell(eff: dict, kind: str) -> str:
    return " ".join(f"{p['T']}:{p[f'{kind}_ratio']:.2f}" for p in eff["points"] if f"{kind}_ratio" in p)


def efficiency_table(results: dict) -> str:
    """One row per mechanism and measured pattern: implementation, efficiency lengths, ratios by T."""
    rows = []
    for name, r in results.items():
        for pattern, eff in r["efficiency"].items():
            if "skipped" in eff:
                rows.append([name, pattern, eff.get("implementation", "-"), f"- ({eff['skipped']})", "-", "-", "-"])
            else:
                rows.append([name, pattern, eff["implementation"], _length_cell(eff, "time"),
                             _length_cell(eff, "memory"), _ratios_cell(eff, "time"), _ratios_cell(eff, "memory")])
    return markdown_table(["mechanism", "pattern", "impl", "time efficiency length", "memory efficiency length",
                           "time / softmax xla, by T", "peak memory / softmax xla, by T"], rows)
