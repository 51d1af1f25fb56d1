"""The main job (``make demo``): every registered mechanism, checked and timed, in about two minutes on 2 CPU cores.

For each entry of ``attnjax.registry.entries()``:

1. checks: each implementation against the reference, forward and gradients (dq, dk, dv), by the test
   suite's conformance checks (``attnjax.testing.conformance``): relative RMS error. By default on the
   suite's ``core`` request (B=2, T=21, S=29 where cross-attention is supported, GQA, causal where masks
   are, tiles of 8 so the lengths span several tiles); with ``--check-len`` on ``[2, T, heads, head_dim]``
   at the mechanism's default tiles. The checks compile with most XLA optimizations off, as the test suite
   does (``unoptimized_compiles``). Pallas is checked on GPU/TPU (on CPU it runs in interpret mode: its own
   tests cover it; ``--check-pallas`` forces it). A mechanism whose reference does not take the request is
   skipped with the reason;
2. timing: the implementation ``implementation="auto"`` picks (``--timed all``: every one; Pallas is left
   out on CPU) and ``jax.nn.dot_product_attention(implementation="xla")`` at one length (``--seq-lens``,
   default 1024) as ratios to jax.nn measured in this run, interleaved. A path is not timed when XLA's cost
   analysis gives it more than ``--max-cost-ratio`` times jax.nn's flops or bytes (a cubic mechanism),
   when its predicted run (quadratic from the previous length) exceeds ``--time-budget-s``, and it is
   run only once when its first run does;
3. MQAR (``experiments.lib.mqar_runs.compare``, quick setting): a short associative-recall run of
   ``--mqar-mechanisms`` (softmax and lightning by default);
4. with ``--cab`` (on under ``--full``): the CAB patterns (``experiments.lib.cab_efficiency.run``);
5. a one-page summary (printed and ``<name>.md``), ``<name>.json`` and ``<name>.png`` in ``--out``: time
   ratios to jax.nn in small multiples, one panel per family.

No new mechanism or length is started after ``--max-minutes`` (a safety net for a loaded machine: the
default work takes about two minutes on 2 idle cores); what was left out is listed.
``--full`` is the longer study (checks at T=640 with Pallas, three lengths, forward and backward, three
MQAR mechanisms, CAB; about 10 minutes on 2 cores) written as ``main_full_<backend>.*``. On GPU/TPU scale
up with flags, e.g.

    python -m experiments.main --full --seq-lens 1k,2k,4k,8k,16k --heads 16 --head-dim 128 --batch 4 \
        --dtype bfloat16 --timed all --cab-seq-lens 1k,2k,4k,8k,16k,32k --max-minutes 60
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

import attnjax
from attnjax import dispatch, masks, registry
from attnjax.testing import conformance
from experiments.lib import (accuracy, cab_efficiency, cab_patterns, cli, host, measure, mqar_runs, outcomes, plots,
                             report, workload)
from experiments.lib.cab_patterns import PATTERN_BY_NAME, CABSettings

BASELINE = "jax.nn/xla"
MIN_CHECK_LEN = 64

FULL = dict(seq_lens=[256, 512, 1024], modes=list(workload.MODES), repeats=5, max_seconds=5.0, check_len=640,
            check_pallas=True, mqar_mechanisms=["softmax", "lightning", "based_linear"], cab=True, max_minutes=9.0,
            name=f"main_full_{jax.default_backend()}")
"""The defaults ``--full`` sets (explicit flags still win): the study ``make demo`` ran before it was cut to
about two minutes."""


def parse_modes(text: str) -> list[str]:
    """``"fwd,fwd_bwd"`` -> ``["fwd", "fwd_bwd"]``, each one of ``workload.MODES``."""
    modes = [m for m in text.split(",") if m]
    unknown = set(modes) - set(workload.MODES)
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes must be a comma-separated subset of {workload.MODES}, got {text!r}")
    return modes


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults finish in about two minutes on a 2-core CPU, ``--full`` in about ten."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="the longer study: " + ", ".join(f"{k}={v}" for k, v in FULL.items()))
    p.add_argument("--seq-lens", type=cli.parse_ints, default=[1024],
                   help="comma-separated sequence lengths to time (1k = 1024)")
    p.add_argument("--modes", type=parse_modes, default=["fwd"],
                   help="what is timed: fwd (the forward), fwd_bwd (forward and gradients), or both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=sorted(accuracy.TOLERANCE))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=2.0, help="stop repeating a measurement after this")
    p.add_argument("--time-budget-s", type=float, default=2.0,
                   help="a path whose single run takes (or is predicted, quadratic from the last length, to take) "
                        "longer than this is run once (or not at all)")
    p.add_argument("--max-cost-ratio", type=float, default=30.0,
                   help="do not time a path that XLA's cost analysis gives more than this many times jax.nn's "
                        "flops or bytes accessed")
    p.add_argument("--timed", choices=("auto", "all"), default="auto",
                   help="time the implementation 'auto' picks per mechanism, or all of them")
    p.add_argument("--check-len", type=int, default=None,
                   help="check on [2, T, heads, head_dim] at the default tiles (default: the test suite's small "
                        "'core' request at tiles of 8)")
    p.add_argument("--check-memory-gib", type=float, default=2.0,
                   help="with --check-len: halve a mechanism's check length while its reference needs more memory "
                        "than this")
    p.add_argument("--check-pallas", action=argparse.BooleanOptionalAction, default=None,
                   help="also check Pallas paths (default: on GPU/TPU; on CPU they run in interpret mode)")
    p.add_argument("--mqar-mechanisms", type=lambda s: [m for m in s.split(",") if m],
                   default=["softmax", "lightning"],
                   help="comma-separated mechanisms for the short MQAR comparison (empty: skip it)")
    p.add_argument("--cab", action=argparse.BooleanOptionalAction, default=False,
                   help="also run the CAB pattern checks (experiments.cab)")
    p.add_argument("--cab-seq-lens", type=cli.parse_ints, default=None,
                   help="with --cab, also measure CAB efficiency lengths (causal self, fwd) at these T")
    p.add_argument("--max-minutes", type=float, default=6.0,
                   help="start no new mechanism or length after this many minutes (what is left out is listed)")
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                   help="comma-separated registry names (default: every registered mechanism)")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="output directory")
    p.add_argument("--name", default=f"main_{jax.default_backend()}", help="output file stem")
    args = p.parse_args(argv)
    if args.full:
        p.set_defaults(**FULL)
        args = p.parse_args(argv)
    if args.check_pallas is None:
        args.check_pallas = jax.default_backend() in cli.ACCELERATORS
    return args


def mask_for(entry: registry.Entry) -> Optional[masks.Mask]:
    """Causal, for mechanisms that take a mask."""
    return masks.Causal() if "mask" in entry.supports else None


def attention_fn(entry: registry.Entry, implementation: str) -> Callable:
    """``(q, k, v) -> out`` for one mechanism's default config and one implementation."""
    config, mask = entry.config(), mask_for(entry)
    return lambda q, k, v: attnjax.attention(q, k, v, mechanism=config, mask=mask, implementation=implementation)


def jax_nn_fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The baseline: ``jax.nn.dot_product_attention``, causal (T == S, so alignment agrees)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def check_request(entry: registry.Entry, args: argparse.Namespace, seq_len: Optional[int] = None
                  ) -> tuple[object, conformance.Case]:
    """The config and request of the correctness checks.

    Without ``--check-len``: the test suite's ``core`` case (``conformance.cases``) of the config with
    tiles of 8 (``conformance.small_tiles``). With it: batch 2, ``seq_len`` (default ``--check-len``)
    tokens, ``--heads`` and ``--head-dim``, causal when masks are supported, the default config.
    """
    if args.check_len is None:
        config = conformance.small_tiles(entry.config())
        return config, next(c for c in conformance.cases(config) if c.name == "core")
    seq_len = args.check_len if seq_len is None else seq_len
    return entry.config(), conformance.Case("main", B=2, T=seq_len, S=seq_len, Hq=args.heads, Hkv=args.heads,
                                            D=args.head_dim, Dv=args.head_dim, causal="mask" in entry.supports)


def describe_request(args: argparse.Namespace) -> str:
    """The check request in words, for the summary."""
    if args.check_len is None:
        return ("the test suite's core request (B=2, T=21, S=29 where cross-attention is supported, Hq=4, Hkv=2 "
                "where GQA is, D=8, causal where masks are; tiles of 8)")
    return f"B=2, T={args.check_len} unless noted, H={args.heads}, D={args.head_dim}, causal where supported"


def reference_outputs(entry: registry.Entry, args: argparse.Namespace) -> tuple[object, conformance.Case, dict]:
    """The check's config, case, and the reference's outputs and gradients (``attnjax.testing.conformance``).

    With ``--check-len``, the length is halved (down to ``MIN_CHECK_LEN``) while the compiled reference
    needs more than ``--check-memory-gib`` (a cubic reference, say); ``MemoryError`` below that."""
    config, case = check_request(entry, args)
    budget = args.check_memory_gib * measure.GIB
    while True:
        compiled, arrays = conformance.compiled_outputs_and_grads(config, "reference", case, jnp.dtype(args.dtype))
        peak = measure.memory_of(compiled).peak
        if peak <= budget:
            return config, case, compiled(arrays)
        if args.check_len is None or case.T <= MIN_CHECK_LEN:
            raise MemoryError(f"needs {report.format_bytes(peak)} > {report.format_bytes(budget)}")
        config, case = check_request(entry, args, max(MIN_CHECK_LEN, case.T // 2))


def check_entry(entry: registry.Entry, args: argparse.Namespace) -> dict:
    """Each non-reference implementation against the reference, forward and gradients, through the
    conformance checks of the test suite (``attnjax.testing.conformance.relative_errors``).

    ``{impl: {"T", "max_rel_err", "passed"} | {"skipped": reason} | {"error", "passed": False}}``; a
    ``"reference"`` key appears only when the reference itself does not run (then all is skipped).
    Pallas paths are skipped unless ``--check-pallas``.
    """
    others = [i for i in entry.implementations if i != "reference"]
    try:
        config, case, expected = reference_outputs(entry, args)
    except (conformance.CaseNotDefined, MemoryError) + outcomes.DECLINED + outcomes.REJECTED as e:
        reason = f"the reference does not take the check's request ({describe_request(args)}): {outcomes.error_text(e)}"
        return {"reference": {"skipped": reason}, **{i: {"skipped": "no reference to compare with"} for i in others}}
    except Exception as e:  # noqa: BLE001 - a failure of this mechanism, recorded; the demo goes on
        return {"reference": {"error": outcomes.error_text(e), "passed": False}}
    results = {}
    for impl in others:
        if impl == "pallas" and not args.check_pallas:
            results[impl] = {"skipped": "Pallas on CPU runs in interpret mode (its tests check it; --check-pallas)"}
            continue
        try:
            errors = conformance.relative_errors(config, impl, case, jnp.dtype(args.dtype), expected=expected)
        except outcomes.DECLINED as e:
            results[impl] = {"skipped": outcomes.error_text(e)}
            continue
        except Exception as e:  # noqa: BLE001 - the reference runs these inputs, so this is a failure
            results[impl] = {"error": outcomes.error_text(e), "passed": False}
            continue
        results[impl] = {"T": case.T, "max_rel_err": errors,
                         "passed": max(errors.values()) <= accuracy.TOLERANCE[args.dtype]}
    return results


@contextlib.contextmanager
def unoptimized_compiles() -> Iterator[None]:
    """XLA compiles with most optimizations off (``jax_disable_most_optimizations``) inside, as in the test
    suite: the checks' requests are small, so compiling dominates, and this halves their CPU time. The
    previous setting is restored on exit (the timings run optimized code)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def run_checks(entries: Sequence[registry.Entry], args: argparse.Namespace, deadline: float) -> dict:
    """Correctness checks of every mechanism (``unoptimized_compiles``), keyed by mechanism name (skipped
    past the ``deadline``)."""
    checks = {}
    with unoptimized_compiles():
        for entry in tqdm(entries, desc="checks", unit="mechanism"):
            if time.perf_counter() > deadline:
                checks[entry.name] = {"reference": {"skipped": f"not run: past --max-minutes {args.max_minutes:g}"}}
            else:
                checks[entry.name] = check_entry(entry, args)
    return checks


def timed_implementations(entry: registry.Entry, checks: dict, which: str) -> tuple:
    """Implementations to time: those whose check was not skipped (Pallas is left out on CPU, where it
    runs in interpret mode); with ``which="auto"`` only the first of them in ``dispatch.auto_order()``."""
    on_cpu = jax.default_backend() == "cpu"
    if "reference" in checks:
        return ()
    usable = [i for i in entry.implementations if not (on_cpu and i == "pallas") and "skipped" not in checks.get(i, {})]
    if which == "all":
        return tuple(usable)
    return tuple(i for i in dispatch.auto_order() if i in usable)[:1]


def candidates(entries: Sequence[registry.Entry], checks: dict, which: str) -> dict[str, Callable]:
    """Every function to time, by label ``mechanism/implementation``, baseline first."""
    fns = {BASELINE: jax_nn_fn}
    for entry in entries:
        for impl in timed_implementations(entry, checks[entry.name], which):
            fns[f"{entry.name}/{impl}"] = attention_fn(entry, impl)
    return fns


def predicted_seconds(last: Optional[tuple[int, float]], seq_len: int) -> Optional[float]:
    """One run's time at ``seq_len``, quadratic from the last timed ``(T, seconds)``."""
    return None if last is None else last[1] * (seq_len / last[0]) ** 2


def cost(compiled: jax.stages.Compiled) -> tuple[float, float]:
    """``(flops, bytes accessed)`` of a compiled function by XLA's cost analysis (a loop body counts once,
    so a scanned path's cost is a lower bound)."""
    analysis = compiled.cost_analysis() or {}
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def cost_ratio(compiled: jax.stages.Compiled, baseline: tuple[float, float]) -> float:
    """The larger of the flops and bytes-accessed ratios of ``compiled`` to the ``baseline``'s ``cost``."""
    return max(c / b for c, b in zip(cost(compiled), baseline) if b > 0)


def time_one_length(fns: dict[str, Callable], seq_len: int, mode: str, args: argparse.Namespace,
                    last: dict) -> tuple[dict, dict, dict]:
    """Median seconds of each function at one length and mode, their runs, and why the others were not timed.

    A function is left out when its predicted run (``last``: label -> last timed ``(T, seconds)`` in
    this mode, updated in place) exceeds ``--time-budget-s`` or its ``cost_ratio`` to the baseline
    exceeds ``--max-cost-ratio``. Each other function runs once (timed); those whose run exceeds
    ``--time-budget-s`` keep that run, the rest are timed in interleaved rounds (``measure.time_thunks``).
    """
    qkv = workload.host_random_qkv(seq_len, args.batch, seq_len, args.heads, args.head_dim, jnp.dtype(args.dtype))
    inputs = workload.mode_inputs(*qkv, mode)
    compiled, skipped = {}, {}
    for label, fn in fns.items():
        predicted = predicted_seconds(last.get(label), seq_len)
        if label != BASELINE and predicted is not None and predicted > args.time_budget_s:
            skipped[label] = f"predicted {predicted:.1f} s per run > {args.time_budget_s:g} s"
            continue
        try:
            compiled[label] = measure.compile_fn(workload.mode_fn(fn, mode), *inputs)
        except Exception as e:  # noqa: BLE001 - recorded as not timed; the demo goes on
            skipped[label] = outcomes.error_text(e)
            continue
        if label != BASELINE and BASELINE in compiled:
            ratio = cost_ratio(compiled[label], cost(compiled[BASELINE]))
            if ratio > args.max_cost_ratio:
                skipped[label] = f"XLA cost analysis: {ratio:.0f}x jax.nn's flops or bytes > {args.max_cost_ratio:g}"
                del compiled[label]
    first = {}
    for label, c in compiled.items():
        start = time.perf_counter()
        jax.block_until_ready(c(*inputs))
        first[label] = time.perf_counter() - start
    slow = {label for label, s in first.items() if s > args.time_budget_s and label != BASELINE}
    thunks = {label: (lambda c=c: c(*inputs)) for label, c in compiled.items() if label not in slow}
    timings = measure.time_thunks(thunks, repeats=args.repeats, warmup=0, max_seconds=args.max_seconds)
    seconds = {**{label: first[label] for label in slow}, **{label: t.median_s for label, t in timings.items()}}
    runs = {**dict.fromkeys(slow, 1), **{label: t.repeats for label, t in timings.items()}}
    for label, s in seconds.items():
        last[label] = (seq_len, s)
    return {**{label: None for label in skipped}, **seconds}, runs, skipped


def run_timings(entries: Sequence[registry.Entry], checks: dict, args: argparse.Namespace, deadline: float) -> dict:
    """``{mode: {label: [seconds per seq len]}}`` plus ratios to the baseline, runs and skip reasons.

    Lengths not started by the ``deadline`` are left untimed (``None``, with the reason)."""
    fns = candidates(entries, checks, args.timed)
    seconds = {mode: {label: [] for label in fns} for mode in args.modes}
    runs = {mode: {label: [] for label in fns} for mode in args.modes}
    skipped = {mode: {} for mode in args.modes}
    last = {mode: {} for mode in args.modes}
    steps = [(t, m) for t in args.seq_lens for m in args.modes]
    for seq_len, mode in tqdm(steps, desc="timing", unit="length"):
        if time.perf_counter() > deadline:
            times, counts, reasons = {}, {}, dict.fromkeys(fns, f"not run: past --max-minutes {args.max_minutes:g}")
        else:
            times, counts, reasons = time_one_length(fns, seq_len, mode, args, last[mode])
        for label in fns:
            seconds[mode][label].append(times.get(label))
            runs[mode][label].append(counts.get(label, 0))
        for label, reason in reasons.items():
            skipped[mode].setdefault(label, {})[seq_len] = reason
    ratios = {mode: {label: [None if s is None or b is None else s / b
                             for s, b in zip(times, seconds[mode][BASELINE])]
                     for label, times in seconds[mode].items()} for mode in args.modes}
    return {"seq_lens": list(args.seq_lens), "modes": list(args.modes), "seconds": seconds, "runs": runs,
            "ratio_to_baseline": ratios, "skipped": skipped}


def check_cell(label: str, checks: dict, check_len: Optional[int]) -> str:
    """The check column of one timed label."""
    name, _, impl = label.partition("/")
    check = checks.get(name, {}).get(impl)
    if label == BASELINE or check is None:
        return "baseline" if label == BASELINE else impl
    if "skipped" in check:
        return "skipped"
    if "error" in check:
        return "FAIL (error)"
    at = f", T={check['T']}" if check_len is not None and check["T"] != check_len else ""
    return f"{'pass' if check['passed'] else 'FAIL'} ({max(check['max_rel_err'].values()):.1e}{at})"


def checked_paths(by_impl: dict) -> str:
    """The check column of one mechanism: each path checked, passed or not, e.g. ``xla, recurrent: pass``."""
    done = {impl: r for impl, r in by_impl.items() if "skipped" not in r}
    if not done:
        return "skipped"
    failed = [impl for impl, r in done.items() if not r.get("passed")]
    worst = max((max(r["max_rel_err"].values()) for r in done.values() if "max_rel_err" in r), default=None)
    verdict = f"FAIL: {', '.join(failed)}" if failed else "pass"
    return f"{', '.join(done)}: {verdict}" + (f" ({worst:.0e})" if worst is not None else "")


def ratio_cells(label: str, timings: dict) -> list[str]:
    """Time / jax.nn time of one label per length and mode (``n/a`` when not timed; ``*`` after a single run)."""
    cells = []
    for i in range(len(timings["seq_lens"])):
        for mode in timings["modes"]:
            r = timings["ratio_to_baseline"][mode][label][i]
            cells.append("n/a" if r is None else f"{r:.2f}x" + ("*" if timings["runs"][mode][label][i] == 1 else ""))
    return cells


def ratio_headers(timings: dict) -> list[str]:
    """The ratio column headers: ``T=1024 fwd``, ..."""
    return [f"T={t} {m.replace('_', '+')}" for t in timings["seq_lens"] for m in timings["modes"]]


def summary_rows(checks: dict, timings: dict, families: dict, check_len: Optional[int]) -> list[list[str]]:
    """One row per timed label: family, check result, then the time ratio to jax.nn per length and mode."""
    return [[label, families.get(label.partition("/")[0], ""), check_cell(label, checks, check_len),
             *ratio_cells(label, timings)] for label in timings["seconds"][timings["modes"][0]]]


def summary_table(checks: dict, timings: dict, families: dict, check_len: Optional[int]) -> str:
    """The markdown table of every timed path: check and time / jax.nn time per length and mode."""
    headers = ["mechanism/impl", "family", "check (max rel err)", *ratio_headers(timings)]
    return report.markdown_table(headers, summary_rows(checks, timings, families, check_len))


def family_rows(checks: dict, timings: dict, families: dict) -> list[list[str]]:
    """One row per family: mechanisms, paths checked and passed, and the range of time / jax.nn at the
    last timed length of the first mode."""
    mode = timings["modes"][0]
    rows = []
    for family in dict.fromkeys(families.values()):
        names = [n for n, f in families.items() if f == family]
        done = [r for n in names for r in checks[n].values() if "skipped" not in r]
        ratios = {label: r[-1] for label, r in timings["ratio_to_baseline"][mode].items()
                  if label != BASELINE and families.get(label.partition("/")[0]) == family and r[-1] is not None}
        span = "n/a"
        if ratios:
            lo, hi = min(ratios, key=ratios.get), max(ratios, key=ratios.get)
            span = (f"{ratios[lo]:.2f}x ({lo.partition('/')[0]})" if len(ratios) == 1 else
                    f"{ratios[lo]:.2f}x ({lo.partition('/')[0]}) to {ratios[hi]:.2f}x ({hi.partition('/')[0]}), "
                    f"median {statistics.median(ratios.values()):.2f}x over {len(ratios)}")
        rows.append([family, len(names), f"{sum(bool(r.get('passed')) for r in done)}/{len(done)}", span])
    return rows


def check_notes(checks: dict, timings: dict) -> list[str]:
    """Markdown lines: every check that was skipped (Pallas skips summed up) or failed with an error,
    every path not timed and why, and every untimed mechanism."""
    pallas = [name for name, by_impl in checks.items()
              if "Pallas on CPU" in by_impl.get("pallas", {}).get("skipped", "")]
    lines = [f"- `{name}/{impl}`: {r.get('skipped') or 'error: ' + r['error']}"
             for name, by_impl in checks.items() for impl, r in by_impl.items()
             if ("skipped" in r or "error" in r) and not (impl == "pallas" and name in pallas)]
    if pallas:
        lines.append(f"- Pallas paths not checked here ({len(pallas)} mechanisms): on CPU they run in interpret mode; "
                     "their tests check them, and `--check-pallas` does here")
    for mode, by_label in timings["skipped"].items():
        for label, reasons in by_label.items():
            lines += [f"- `{label}` not timed at T={t} {mode.replace('_', '+')}: {why}" for t, why in reasons.items()]
    timed = list(timings["seconds"][timings["modes"][0]])
    untimed = [name for name in checks if not any(label.partition("/")[0] == name for label in timed)]
    if untimed:
        lines.append(f"- not timed (no implementation ran the checks): {', '.join(untimed)}")
    return lines


def plot_ratios(timings: dict, families: dict, path: Path, title: str) -> Path:
    """Small multiples, one panel per family: time / jax.nn time of each timed path, one bar per length and mode."""
    labels = [label for label in timings["seconds"][timings["modes"][0]] if label != BASELINE]
    names = [label.partition("/")[0] for label in labels]
    panels = {}
    for label, name in zip(labels, names):
        shown = name if names.count(name) == 1 else label
        panels.setdefault(families[name], {})[shown] = [timings["ratio_to_baseline"][m][label][i]
                                                        for i in range(len(timings["seq_lens"]))
                                                        for m in timings["modes"]]
    series = [f"T={t} {m.replace('_', '+')}" for t in timings["seq_lens"] for m in timings["modes"]]
    return plots.ratio_panels(panels, series, path, title=title, ylabel="time / jax.nn time",
                              reference_label="jax.nn.dot_product_attention (xla) = 1")


def failures(checks: dict) -> list[str]:
    """``mechanism/implementation`` of every check that did not pass (skips are not failures)."""
    return [f"{name}/{impl}" for name, by_impl in checks.items() for impl, r in by_impl.items()
            if not r.get("passed", "skipped" in r)]


def run_cab(entries: Sequence[registry.Entry], args: argparse.Namespace,
            deadline: Optional[float] = None) -> tuple[dict, CABSettings]:
    """The CAB run (``experiments.lib.cab_efficiency.run``) at this job's sizes: the four patterns, and, with
    ``--cab-seq-lens``, the efficiency length in causal self attention (fwd). Mechanisms not started by the
    ``deadline`` are left out."""
    settings = CABSettings(mechanisms=[e.name for e in entries], batch=args.batch, heads=args.heads,
                           head_dim=args.head_dim, seq_lens=args.cab_seq_lens or args.seq_lens,
                           efficiency_patterns=[PATTERN_BY_NAME["causal_self"]] if args.cab_seq_lens else [],
                           repeats=args.repeats, max_seconds=args.max_seconds, time_budget_s=args.time_budget_s,
                           with_pallas=jax.default_backend() in cli.ACCELERATORS)
    return cab_efficiency.run(settings, deadline), settings


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (on a shared machine, the work done, unlike wall time)."""
    times = os.times()
    return times.user + times.system


def summary_markdown(sections: Sequence[tuple[str, str]], device: dict, load: tuple[dict, dict],
                     elapsed: dict, cpu_s: float) -> str:
    """The summary markdown: the device, load and time taken, then one ``## title`` per section."""
    took = ", ".join(f"{k} {v:.0f} s" for k, v in elapsed.items() if k != "total")
    lines = [f"# attnjax main job ({device['device_kind']}, jax {device['jax_version']})", "",
             host.load_note(*load), f"Took {elapsed['total']:.0f} s of wall time ({took}) and {cpu_s:.0f} s of CPU "
             "time since the imports.", ""]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run checks, timings, MQAR (and CAB) for every registered mechanism; write JSON, markdown and plot."""
    args = parse_args(argv)
    entries = cli.selected_entries(args.mechanisms)
    families = {e.name: e.family for e in entries}
    device, load_before = host.device_info(), host.machine_load()
    started, cpu_before = time.perf_counter(), cpu_seconds()
    deadline = started + 60 * args.max_minutes
    results = {"device": device, "settings": report.jsonable_args(args), "baseline": BASELINE, "elapsed_s": {}}
    sections = []

    def lap(name: str) -> None:
        results["elapsed_s"][name] = time.perf_counter() - started - sum(results["elapsed_s"].values())

    checks = run_checks(entries, args, deadline)
    lap("checks")
    timings = run_timings(entries, checks, args, deadline)
    lap("timings")
    results["mechanisms"] = {e.name: {"family": e.family, "paper": e.paper, "implementations": list(e.implementations),
                                      "mask": "causal" if mask_for(e) else "none", "checks": checks[e.name]}
                             for e in entries}
    results["timings"] = timings
    failed = failures(checks)
    checked = sum("skipped" not in r for by_impl in checks.values() for r in by_impl.values())
    sizes = f"B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, causal where supported"
    sections.append((
        "Summary by family",
        f"{len(entries)} mechanisms; {checked} implementations checked against their references (forward and "
        f"gradients dq, dk, dv) on {describe_request(args)}: "
        + (f"**failed: {', '.join(failed)}**" if failed else "all pass") + f". Time / jax.nn time: {sizes}, "
        f"T={timings['seq_lens'][-1]} {timings['modes'][0].replace('_', '+')} (below 1: faster than jax.nn).\n\n"
        + report.markdown_table(["family", "mechanisms", "checks passed", "time / jax.nn"],
                                family_rows(checks, timings, families))))
    notes = check_notes(checks, timings)
    sections.append((f"Every timed path ({sizes}; `*`: one run)",
                     summary_table(checks, timings, families, args.check_len)
                     + ("\n\n" + "\n".join(notes) if notes else "")))

    if args.mqar_mechanisms:
        if time.perf_counter() < deadline:
            rows = mqar_runs.compare(args.mqar_mechanisms, quick=True)
            lap("mqar")
            results["mqar"] = rows
            quick = mqar_runs.quick_settings(args.mqar_mechanisms)
            sections.append((f"MQAR recall (d_model {quick.d_models[0]}, T={quick.seq_len}, {quick.steps} steps; "
                             "the full sweep is python -m experiments.mqar)", mqar_runs.table(rows)))
        else:
            sections.append(("MQAR recall", "Not run (past --max-minutes)."))

    if args.cab:
        cab_results, cab_args = run_cab(entries, args, deadline)
        lap("cab")
        left_out = [e.name for e in entries if e.name not in cab_results]
        results["cab"] = {"settings": cab_args.as_dict(), "mechanisms": cab_results,
                          "failures": cab_patterns.failures(cab_results), "left_out": left_out}
        sections.append((f"CAB patterns (T={cab_args.check_len}, S={cab_args.cross_len}; "
                         "see experiments/cab.py for the legend)",
                         cab_patterns.pattern_table(cab_results)
                         + (f"\n\nNot run (past --max-minutes): {', '.join(left_out)}" if left_out else "")))
        if cab_args.efficiency_patterns:
            sections.append((f"CAB efficiency length vs softmax xla (causal self, fwd, T in {list(cab_args.seq_lens)})",
                             cab_efficiency.efficiency_table(cab_results)))

    results["elapsed_s"]["total"] = time.perf_counter() - started
    results["cpu_s"] = cpu_seconds() - cpu_before
    summary = summary_markdown(sections, device, (load_before, host.machine_load()), results["elapsed_s"],
                               results["cpu_s"])
    print(summary)
    out = Path(args.out)
    json_path = report.write_json(results, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(summary)
    plot_path = plot_ratios(timings, families, out / f"{args.name}.png",
                            f"time relative to jax.nn.dot_product_attention on {device['device_kind']} ({sizes})")
    failed += results.get("cab", {}).get("failures", [])
    print(f"checks failed: {', '.join(failed)}" if failed else "all checks passed")
    print(f"wrote {json_path}, {out / args.name}.md and {plot_path} in {results['elapsed_s']['total']:.0f} s")
    return results


def failed_anything(results: dict) -> bool:
    """Whether a correctness check or a CAB claim failed."""
    return bool(failures({n: m["checks"] for n, m in results["mechanisms"].items()})
                or results.get("cab", {}).get("failures"))


if __name__ == "__main__":
    raise SystemExit(1 if failed_anything(main()) else 0)
