"""The main job (``make demo``): every registered mechanism, checked and timed.

For each entry of ``attnjax.registry.entries()``:

1. checks: each non-reference implementation against the reference on random inputs (causal
   when the mechanism takes a mask), forward and gradients (dq, dk, dv), by the test suite's
   conformance checks (``attnjax.testing.conformance``) at the demo's sizes: relative RMS error. A mechanism whose reference does not take these inputs
   (other shapes, e.g. one query per head) is skipped with the reason;
2. timing: the implementation ``implementation="auto"`` picks (``--timed all``: every one; Pallas
   is left out on CPU, where it runs in interpret mode) and
   ``jax.nn.dot_product_attention(implementation="xla")`` at a few sequence lengths, forward and
   forward+backward, as ratios to jax.nn measured in this run; a path whose predicted single run
   exceeds ``--time-budget-s`` is not timed at longer lengths;
3. MQAR (``experiments.lib.mqar_runs.compare``, quick setting): a short associative-recall run of
   ``--mqar-mechanisms`` (softmax, lightning and BASED's linear part by default);
4. CAB patterns (``experiments.lib.cab_efficiency.run``, small sizes): which of noncausal/causal self/cross attention
   each mechanism serves, checked by running it; with ``--cab-seq-lens``, also its efficiency length
   against softmax xla (the full CAB run is ``python -m experiments.cab``);
5. a summary (printed and ``main.md``), ``main.json`` and a log-log plot ``main_scaling.png`` in ``--out``.

A mechanism whose reference needs more than ``--check-memory-gib`` at ``--check-len`` (a cubic
reference, say) is checked at half the length, and so on. No new mechanism or length is started
after ``--max-minutes``; what was left out is listed. Defaults finish in under 10 minutes on a
2-core CPU; on GPU/TPU scale up with flags, e.g.

    python -m experiments.main --seq-lens 1k,2k,4k,8k,16k --heads 16 --head-dim 128 --batch 4 \
        --dtype bfloat16 --timed all --cab-seq-lens 1k,2k,4k,8k,16k,32k --max-minutes 60
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

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
MODES = workload.MODES
MIN_CHECK_LEN = 64


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults finish in a few minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=cli.parse_ints, default=[256, 512, 1024],
                   help="comma-separated sequence lengths to time (1k = 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=sorted(accuracy.TOLERANCE))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=5.0, help="stop repeating a measurement after this")
    p.add_argument("--time-budget-s", type=float, default=2.0,
                   help="time a path at the next length only while its predicted single run (quadratic) fits")
    p.add_argument("--timed", choices=("auto", "all"), default="auto",
                   help="time the implementation 'auto' picks per mechanism, or all of them")
    p.add_argument("--check-len", type=int, default=640, help="sequence length of the correctness checks")
    p.add_argument("--check-memory-gib", type=float, default=2.0,
                   help="halve a mechanism's check length while its reference needs more memory than this")
    p.add_argument("--mqar-mechanisms", type=lambda s: [m for m in s.split(",") if m],
                   default=["softmax", "lightning", "based_linear"],
                   help="comma-separated mechanisms for the short MQAR comparison (empty: skip it)")
    p.add_argument("--cab", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the CAB pattern checks and efficiency lengths (experiments.cab)")
    p.add_argument("--cab-seq-lens", type=cli.parse_ints, default=None,
                   help="also measure CAB efficiency lengths (causal self, fwd) at these T (default: not measured "
                        "here; see experiments/cab.py)")
    p.add_argument("--max-minutes", type=float, default=9.0,
                   help="start no new mechanism or length after this many minutes (what is left out is listed)")
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                   help="comma-separated registry names (default: every registered mechanism)")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="output directory")
    return p.parse_args(argv)


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


def check_case(entry: registry.Entry, seq_len: int, args: argparse.Namespace) -> conformance.Case:
    """The request of the correctness checks: batch 2, ``seq_len`` tokens, causal when masks are supported."""
    return conformance.Case("main", B=2, T=seq_len, S=seq_len, Hq=args.heads, Hkv=args.heads, D=args.head_dim,
                            Dv=args.head_dim, causal="mask" in entry.supports)


def reference_outputs(entry: registry.Entry, args: argparse.Namespace) -> tuple[conformance.Case, dict]:
    """The check's case and the reference's outputs and gradients (``attnjax.testing.conformance``) at
    ``--check-len``, halved (down to ``MIN_CHECK_LEN``) while the compiled reference needs more than
    ``--check-memory-gib`` (a cubic reference, say); ``MemoryError`` below that."""
    seq_len, budget = args.check_len, args.check_memory_gib * measure.GIB
    while True:
        case = check_case(entry, seq_len, args)
        compiled, arrays = conformance.compiled_outputs_and_grads(entry.config(), "reference", case,
                                                                  jnp.dtype(args.dtype))
        peak = measure.memory_of(compiled).peak
        if peak <= budget:
            return case, compiled(arrays)
        if seq_len <= MIN_CHECK_LEN:
            raise MemoryError(f"needs {report.format_bytes(peak)} > {report.format_bytes(budget)}")
        seq_len = max(MIN_CHECK_LEN, seq_len // 2)


def check_entry(entry: registry.Entry, args: argparse.Namespace) -> dict:
    """Each non-reference implementation against the reference, forward and gradients, through the
    conformance checks of the test suite (``attnjax.testing.conformance.relative_errors``).

    ``{impl: {"T", "max_rel_err", "passed"} | {"skipped": reason} | {"error", "passed": False}}``; a
    ``"reference"`` key appears only when the reference itself does not run (then all is skipped).
    """
    others = [i for i in entry.implementations if i != "reference"]
    try:
        case, expected = reference_outputs(entry, args)
    except (conformance.CaseNotDefined, MemoryError) + outcomes.DECLINED + outcomes.REJECTED as e:
        reason = (f"the reference does not take q, k, v [2, T, {args.heads}, {args.head_dim}], mask "
                  f"{mask_for(entry)}, T <= {args.check_len}: {outcomes.error_text(e)}")
        return {"reference": {"skipped": reason}, **{i: {"skipped": "no reference to compare with"} for i in others}}
    except Exception as e:  # noqa: BLE001 - a failure of this mechanism, recorded; the demo goes on
        return {"reference": {"error": outcomes.error_text(e), "passed": False}}
    results = {}
    for impl in others:
        try:
            errors = conformance.relative_errors(entry.config(), impl, case, jnp.dtype(args.dtype), expected=expected)
        except outcomes.DECLINED as e:
            results[impl] = {"skipped": outcomes.error_text(e)}
            continue
        except Exception as e:  # noqa: BLE001 - the reference runs these inputs, so this is a failure
            results[impl] = {"error": outcomes.error_text(e), "passed": False}
            continue
        results[impl] = {"T": case.T, "max_rel_err": errors,
                         "passed": max(errors.values()) <= accuracy.TOLERANCE[args.dtype]}
    return results


def run_checks(entries: Sequence[registry.Entry], args: argparse.Namespace, deadline: float) -> dict:
    """Correctness checks of every mechanism, keyed by mechanism name (skipped past the ``deadline``)."""
    checks = {}
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


def time_one_length(fns: dict[str, Callable], seq_len: int, mode: str, args: argparse.Namespace,
                    last: dict) -> tuple[dict, dict]:
    """Median seconds of each function at one length and mode, and why the others were not timed.

    ``last`` maps a label to its last timed ``(T, seconds)`` in this mode and is updated in place.
    """
    qkv = workload.host_random_qkv(seq_len, args.batch, seq_len, args.heads, args.head_dim, jnp.dtype(args.dtype))
    inputs = workload.mode_inputs(*qkv, mode)
    thunks, skipped = {}, {}
    for label, fn in fns.items():
        predicted = predicted_seconds(last.get(label), seq_len)
        if label != BASELINE and predicted is not None and predicted > args.time_budget_s:
            skipped[label] = f"predicted {predicted:.1f} s per run > {args.time_budget_s:g} s"
            continue
        try:
            compiled = measure.compile_fn(workload.mode_fn(fn, mode), *inputs)
        except Exception as e:  # noqa: BLE001 - recorded as not timed; the demo goes on
            skipped[label] = outcomes.error_text(e)
            continue
        thunks[label] = lambda c=compiled: c(*inputs)
    timings = measure.time_thunks(thunks, repeats=args.repeats, max_seconds=args.max_seconds)
    for label, t in timings.items():
        last[label] = (seq_len, t.median_s)
    return {**{label: None for label in skipped}, **{label: t.median_s for label, t in timings.items()}}, skipped


def run_timings(entries: Sequence[registry.Entry], checks: dict, args: argparse.Namespace, deadline: float) -> dict:
    """``{mode: {label: [seconds per seq len]}}`` plus ratios to the baseline and skip reasons.

    Lengths not started by the ``deadline`` are left untimed (``None``, with the reason)."""
    fns = candidates(entries, checks, args.timed)
    seconds = {mode: {label: [] for label in fns} for mode in MODES}
    skipped = {mode: {} for mode in MODES}
    last = {mode: {} for mode in MODES}
    steps = [(t, m) for t in args.seq_lens for m in MODES]
    for seq_len, mode in tqdm(steps, desc="timing", unit="run"):
        if time.perf_counter() > deadline:
            times, reasons = {}, dict.fromkeys(fns, f"not run: past --max-minutes {args.max_minutes:g}")
        else:
            times, reasons = time_one_length(fns, seq_len, mode, args, last[mode])
        for label in fns:
            seconds[mode][label].append(times.get(label))
        for label, reason in reasons.items():
            skipped[mode].setdefault(label, {})[seq_len] = reason
    ratios = {mode: {label: [None if s is None or b is None else s / b
                             for s, b in zip(times, seconds[mode][BASELINE])]
                     for label, times in seconds[mode].items()} for mode in MODES}
    return {"seq_lens": list(args.seq_lens), "seconds": seconds, "ratio_to_baseline": ratios, "skipped": skipped}


def check_cell(label: str, checks: dict, check_len: int) -> str:
    """The check column of one timed label."""
    name, _, impl = label.partition("/")
    check = checks.get(name, {}).get(impl)
    if label == BASELINE or check is None:
        return "baseline" if label == BASELINE else impl
    if "skipped" in check:
        return "skipped"
    if "error" in check:
        return "FAIL (error)"
    at = f", T={check['T']}" if check["T"] != check_len else ""
    return f"{'pass' if check['passed'] else 'FAIL'} ({max(check['max_rel_err'].values()):.1e}{at})"


def summary_rows(checks: dict, timings: dict, check_len: int) -> list[list[str]]:
    """One row per timed label: check result, then the time ratio to jax.nn per length and mode."""
    rows = []
    for label in timings["seconds"]["fwd"]:
        ratios = [timings["ratio_to_baseline"][m][label][i] for i in range(len(timings["seq_lens"])) for m in MODES]
        cells = ["n/a" if r is None else f"{r:.2f}x" for r in ratios]
        rows.append([label, check_cell(label, checks, check_len), *cells])
    return rows


def summary_table(checks: dict, timings: dict, check_len: int) -> str:
    """The markdown summary: checks and time / jax.nn time per length (fwd, fwd+bwd)."""
    headers = ["mechanism/impl", "check (max rel err)"]
    headers += [f"T={t} {m.replace('_', '+')}" for t in timings["seq_lens"] for m in MODES]
    return report.markdown_table(headers, summary_rows(checks, timings, check_len))


def check_notes(checks: dict, timed: Sequence[str]) -> list[str]:
    """Markdown lines: every check that was skipped or failed with an error, and every untimed mechanism."""
    lines = [f"- `{name}/{impl}`: {r.get('skipped') or 'error: ' + r['error']}"
             for name, by_impl in checks.items() for impl, r in by_impl.items() if "skipped" in r or "error" in r]
    untimed = [name for name in checks if not any(label.partition("/")[0] == name for label in timed)]
    if untimed:
        lines.append(f"- not timed (no implementation ran the checks): {', '.join(untimed)}")
    return lines


def plot_scaling(timings: dict, path: Path) -> Path:
    """Log-log time vs T, one line per mechanism/implementation and jax.nn; fwd and fwd+bwd."""
    plt = plots.plt
    labels = list(timings["seconds"]["fwd"])
    fig, axes = plt.subplots(1, len(MODES), figsize=(11, 4.2 + 0.2 * -(-len(labels) // 4)), sharey=True,
                             layout="constrained")
    markers = "os^vD<>ph*"
    for ax, mode in zip(axes, MODES):
        for i, (label, times) in enumerate(timings["seconds"][mode].items()):
            pts = [(t, s) for t, s in zip(timings["seq_lens"], times) if s is not None]
            style = (dict(color="k", ls="--") if label == BASELINE
                     else dict(color=f"C{i % 10}", marker=markers[i // 10 % 10]))
            if pts:
                ax.loglog(*zip(*pts), label=label if mode == MODES[0] else None, **style)
        ax.set(title=mode.replace("_", "+"), xlabel="sequence length T", ylabel="median seconds")
        plots.label_x(ax, timings["seq_lens"])
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=4, fontsize=7)
    fig.suptitle(f"attention time vs T on {host.device_info()['device_kind']} (causal where supported)")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def summary_markdown(sections: Sequence[tuple[str, str]], device: dict, load: tuple[dict, dict]) -> str:
    """The summary markdown: one ``## title`` per section."""
    lines = [f"# attnjax main job ({device['device_kind']}, jax {device['jax_version']})", "",
             host.load_note(*load), ""]
    for title, body in sections:
        lines += [f"## {title}", "", body, ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run checks, timings and CAB for every registered mechanism; write JSON, markdown and plot; return results."""
    args = parse_args(argv)
    entries = cli.selected_entries(args.mechanisms)
    device, load_before, started = host.device_info(), host.machine_load(), time.perf_counter()
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
    notes = check_notes(checks, list(timings["seconds"]["fwd"]))
    sections.append((f"Checks against the reference (T={args.check_len} unless noted) and time / jax.nn "
                     f"(B={args.batch}, H={args.heads}, D={args.head_dim}, {args.dtype}, causal where supported)",
                     summary_table(checks, timings, args.check_len) + ("\n\n" + "\n".join(notes) if notes else "")))

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
    summary = summary_markdown(sections, device, (load_before, host.machine_load()))
    print(summary)
    out = Path(args.out)
    json_path = report.write_json(results, "main.json", out)
    (out / "main.md").write_text(summary)
    plot_path = plot_scaling(timings, out / "main_scaling.png")
    failed = failures(checks) + results.get("cab", {}).get("failures", [])
    print(f"checks failed: {', '.join(failed)}" if failed else "all checks passed")
    print(f"wrote {json_path}, {out / 'main.md'} and {plot_path} in {results['elapsed_s']['total']:.0f} s")
    return results


def failed_anything(results: dict) -> bool:
    """Whether a correctness check or a CAB claim failed."""
    return bool(failures({n: m["checks"] for n, m in results["mechanisms"].items()})
                or results.get("cab", {}).get("failures"))


if __name__ == "__main__":
    raise SystemExit(1 if failed_anything(main()) else 0)
