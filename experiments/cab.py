"""CAB attention patterns: every registered mechanism in the four patterns, and its efficiency length.

CAB (Zhang et al., "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling", ICML 2023)
sorts attention into four patterns, {noncausal, causal} x {self, cross}: noncausal self (NS),
causal self (CS), noncausal cross (NC, ``T != S``) and causal cross (CC, ``T != S``, bottom-right
aligned as everywhere in attnjax). For each entry of ``attnjax.registry.entries()`` this harness

1. reads what the registry claims: a causal pattern needs the ``"mask"`` option (``masks.Causal()``),
   a cross pattern the ``"cross"`` option;
2. checks the claim by running every implementation through ``attnjax.attention`` in each pattern
   at a small size, comparing each output with the ``reference`` implementation's. A claimed
   pattern must run; an unclaimed one must raise ``NotImplementedError`` or ``ValueError``. An
   implementation may decline a pattern another one serves (``NotImplementedError``, what
   ``implementation="auto"`` falls back on). The registry has no way to say "causal only" (e.g. a
   decay that needs a causal mask): a mechanism that declines noncausal self but runs causal self
   is recorded as causal-only, and its noncausal patterns are then not expected to run. In causal
   patterns every implementation also passes a causality test (earlier outputs must not change when
   the keys they cannot see change); a mechanism that runs no pattern at all with standard
   ``[B, T, H, D]`` inputs (e.g. one query per head) is marked n/a rather than failed;
3. measures CAB's *efficiency length*: the shortest T of ``--seq-lens`` from which the mechanism's
   fastest implementation (the one ``implementation="auto"`` would pick) beats softmax ``xla``
   (FlashAttention-2 in XLA) in the same pattern at every longer T measured, separately on time
   (median of interleaved runs) and on peak memory (XLA's compiled memory analysis: arguments +
   outputs + temporaries).

Every cell is handled on its own: a mechanism that takes other shapes or raises is recorded with
the reason and the table goes on. Writes ``<name>.json`` and ``<name>.md`` in ``--out``.

    python -m experiments.cab --seq-lens 256,512,1k,2k,4k,8k,16k --heads 4 --head-dim 64
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attnjax
from attnjax import dispatch, masks, registry
from experiments import common

BASELINE_MECHANISM, BASELINE_IMPLEMENTATION = "softmax", "xla"
CAUSALITY_TOLERANCE = 1e-5
"""Relative change of earlier outputs above which a perturbation of later keys counts as seen."""
DECLINED, REJECTED = (NotImplementedError,), (ValueError, TypeError)
"""How a mechanism says no: ``NotImplementedError`` declines a pattern (``auto`` falls back on it);
``ValueError``/``TypeError`` rejects the inputs."""


@dataclasses.dataclass(frozen=True)
class Pattern:
    """One CAB attention pattern."""

    name: str
    short: str
    causal: bool
    cross: bool

    @property
    def needs(self) -> frozenset:
        """The ``registry.OPTIONS`` a mechanism must support to serve this pattern."""
        return frozenset({"mask"} if self.causal else set()) | frozenset({"cross"} if self.cross else set())

    def mask(self) -> Optional[masks.Mask]:
        """``masks.Causal()`` for the causal patterns, else no mask."""
        return masks.Causal() if self.causal else None


PATTERNS = (Pattern("noncausal_self", "NS", False, False), Pattern("causal_self", "CS", True, False),
            Pattern("noncausal_cross", "NC", False, True), Pattern("causal_cross", "CC", True, True))
PATTERN_BY_NAME = {p.name: p for p in PATTERNS}


def parse_patterns(text: str) -> list[Pattern]:
    """``"noncausal_self,CS"`` -> Patterns (full names or CAB's two-letter codes)."""
    by_key = {**PATTERN_BY_NAME, **{p.short.lower(): p for p in PATTERNS}}
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in by_key]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown patterns {unknown}; choose from {[p.name for p in PATTERNS]}")
    return [by_key[n] for n in names]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the CPU run kept in ``experiments/results``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                   help="comma-separated registry names (default: every registered mechanism)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--check-len", type=int, default=48, help="query length T of the pattern checks")
    p.add_argument("--cross-len", type=int, default=80, help="key length S of the cross patterns' checks")
    p.add_argument("--seq-lens", type=common.parse_ints, default=[256, 512, 1024, 2048, 4096, 8192, 16384],
                   help="candidate efficiency lengths T, ascending (1k = 1024)")
    p.add_argument("--efficiency-patterns", type=parse_patterns, default=parse_patterns("noncausal_self,causal_self"),
                   help="patterns in which the efficiency length is measured (names or NS/CS/NC/CC)")
    p.add_argument("--cross-ratio", type=float, default=0.5, help="S = T * ratio in cross efficiency patterns")
    p.add_argument("--mode", choices=common.MODES, default="fwd", help="time the forward, or forward+backward")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=5.0, help="stop repeating a measurement after this")
    p.add_argument("--time-budget-s", type=float, default=3.0,
                   help="time at T only while each side's predicted single run (quadratic from the last T) fits")
    p.add_argument("--with-pallas", action=argparse.BooleanOptionalAction, default=None,
                   help="also run Pallas implementations (default: on GPU/TPU only; CPU would use interpret mode)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    p.add_argument("--name", default=f"cab_{jax.default_backend()}", help="output file stem")
    args = p.parse_args(argv)
    if args.with_pallas is None:
        args.with_pallas = jax.default_backend() in common.ACCELERATORS
    if list(args.seq_lens) != sorted(args.seq_lens):
        p.error(f"--seq-lens must be ascending, got {args.seq_lens}")
    return args


def attention_fn(config, pattern: Pattern, implementation: str) -> Callable:
    """``(q, k, v) -> out`` of one mechanism config and implementation in one pattern."""
    mask = pattern.mask()
    return lambda q, k, v: attnjax.attention(q, k, v, mechanism=config, mask=mask, implementation=implementation)


def checked_implementations(entry: registry.Entry, with_pallas: bool) -> tuple:
    """The implementations run in the pattern checks (Pallas only when asked)."""
    return tuple(i for i in entry.implementations if with_pallas or i != "pallas")


def error_text(e: Exception) -> str:
    """``"Type: first line of the message"`` (at most 300 characters), for tables and JSON."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def attempt(fn: Callable, q, k, v) -> tuple[Optional[np.ndarray], dict]:
    """Run ``fn(q, k, v)`` (already jitted): the float32 output (or None) and what happened.

    Any exception is caught and recorded (``declined``, ``rejected`` or ``error``): one cell of the
    table must never stop the others.
    """
    try:
        out = np.asarray(fn(q, k, v), np.float32)
    except DECLINED as e:
        return None, {"outcome": "declined", "error": error_text(e)}
    except REJECTED as e:
        return None, {"outcome": "rejected", "error": error_text(e)}
    except Exception as e:  # noqa: BLE001 - recorded as a failure of this cell, the harness goes on
        return None, {"outcome": "error", "error": error_text(e)}
    expected_shape = q.shape[:3] + v.shape[3:]
    if out.shape != expected_shape:
        return None, {"outcome": "error", "error": f"output shape {out.shape}, expected {expected_shape}"}
    if not np.all(np.isfinite(out)):
        return None, {"outcome": "error", "error": "non-finite output"}
    return out, {"outcome": "ok"}


def future_split(q_len: int, kv_len: int) -> Optional[tuple[int, int]]:
    """``(c, f)``: under causal bottom-right alignment queries ``0..c`` see no key ``>= f``.

    ``c = T // 2``, ``f = c + S - T + 1``; None when every key is visible to query ``c``.
    """
    c = q_len // 2
    first_hidden = c + kv_len - q_len + 1
    return (c, first_hidden) if 0 < first_hidden < kv_len else None


def sees_future(fn: Callable, out: np.ndarray, q, k, v) -> Optional[bool]:
    """Do the outputs of queries ``0..c`` change when keys/values ``>= f`` change (``future_split``)?

    The causality test of a mechanism (CAB's repository has one too): True for a causal pattern is a
    leak; False for a noncausal pattern means the mechanism ignores later keys anyway. None if the
    split is empty or the perturbed run fails.
    """
    split = future_split(q.shape[1], k.shape[1])
    if split is None:
        return None
    c, first_hidden = split
    rng = np.random.default_rng(7)

    def perturb(x):
        x = np.array(x)
        x[:, first_hidden:] = rng.standard_normal(x[:, first_hidden:].shape)
        return jnp.asarray(x)

    perturbed, _ = attempt(fn, q, perturb(k), perturb(v))
    if perturbed is None:
        return None
    return common.relative_error(perturbed[:, :c + 1], out[:, :c + 1]) > CAUSALITY_TOLERANCE


def run_pattern(entry: registry.Entry, pattern: Pattern, args: argparse.Namespace) -> dict:
    """Every checked implementation of one mechanism in one pattern, compared with the reference.

    In causal patterns every implementation that runs is also checked for a causality leak
    (``sees_future``); in noncausal ones the reference is checked for ignoring later keys.
    """
    kv_len = args.cross_len if pattern.cross else args.check_len
    q, k, v = common.host_random_qkv(0, args.batch, args.check_len, args.heads, args.head_dim, kv_len=kv_len)
    config = entry.config()
    outputs, results, ignores_later_keys = {}, {}, None
    for impl in checked_implementations(entry, args.with_pallas):
        fn = jax.jit(attention_fn(config, pattern, impl))
        out, results[impl] = attempt(fn, q, k, v)
        if out is None:
            continue
        outputs[impl] = out
        if pattern.causal and sees_future(fn, out, q, k, v):
            results[impl].update(outcome="error", error="causality leak: earlier queries see later keys")
        elif not pattern.causal and impl == "reference":
            sees = sees_future(fn, out, q, k, v)
            ignores_later_keys = None if sees is None else not sees
    reference = outputs.get("reference")
    for impl, out in outputs.items():
        if impl == "reference" or results[impl]["outcome"] != "ok":
            continue
        if reference is None:
            results[impl]["unverified"] = "the reference did not run"
            continue
        err = common.relative_error(out, reference)
        results[impl]["max_rel_err"] = err
        if err > common.TOLERANCE["float32"]:
            results[impl].update(outcome="error", error=f"differs from the reference: max rel err {err:.2e}")
    return {"T": args.check_len, "S": kv_len, "claimed": pattern.needs <= entry.supports,
            "ignores_later_keys": ignores_later_keys, "implementations": results}


def _with(results: dict, outcome: str) -> list[str]:
    return [i for i, r in results.items() if r["outcome"] == outcome]


def causal_only(runs: dict) -> bool:
    """Declines noncausal self with ``NotImplementedError`` everywhere, yet runs causal self."""
    ns, cs = runs["noncausal_self"]["implementations"], runs["causal_self"]["implementations"]
    return bool(ns) and len(_with(ns, "declined")) == len(ns) and bool(_with(cs, "ok"))


def runs_nowhere(runs: dict) -> bool:
    """Every implementation declined or rejected every pattern (none crashed): the mechanism does not
    take the standard inputs (e.g. one query per head)."""
    outcomes = {r["outcome"] for run in runs.values() for r in run["implementations"].values()}
    return bool(outcomes) and outcomes <= {"declined", "rejected"}


def verdict(run: dict, pattern: Pattern, is_causal_only: bool) -> tuple[str, str]:
    """``(status, reason)``: status ``ok``, ``unsupported`` (as declared) or ``FAIL``."""
    impls = run["implementations"]
    ran, errors, rejected = _with(impls, "ok"), _with(impls, "error"), _with(impls, "rejected")
    if errors:
        return "FAIL", "; ".join(f"{i}: {impls[i]['error']}" for i in errors)
    if ran and rejected:
        return "FAIL", "; ".join(f"{i} raised {impls[i]['error']} where {ran[0]} runs" for i in rejected)
    first_refusal = next((impls[i]["error"] for i in impls if i not in ran), "")
    if ran:
        if not run["claimed"]:
            return "FAIL", f"runs ({', '.join(ran)}) although the registry does not claim {sorted(pattern.needs)}"
        declined = _with(impls, "declined")
        return "ok", f"{', '.join(declined)} declined" if declined else ""
    if not run["claimed"]:
        return "unsupported", f"not claimed (needs {sorted(pattern.needs)}); {first_refusal}"
    if is_causal_only and not pattern.causal:
        return "unsupported", f"causal-only (found by running; the registry cannot say so); {first_refusal}"
    return "FAIL", f"claimed but no implementation ran: {first_refusal}"


def check_entry(entry: registry.Entry, args: argparse.Namespace) -> dict:
    """The four patterns of one mechanism: claims, per-implementation outcomes and verdicts."""
    runs = {p.name: run_pattern(entry, p, args) for p in PATTERNS}
    only_causal, nowhere = causal_only(runs), runs_nowhere(runs)
    for p in PATTERNS:
        if nowhere:
            first = next((r["error"] for r in runs[p.name]["implementations"].values() if "error" in r), "")
            status, reason = "n/a", f"runs no pattern with q [B, T, H, D], k, v [B, S, H, D]: {first}"
        else:
            status, reason = verdict(runs[p.name], p, only_causal)
        if status == "ok" and runs[p.name]["ignores_later_keys"]:
            reason = "; ".join(filter(None, [reason, "ignores later keys without a mask: acts causal"]))
        runs[p.name].update(status=status, reason=reason)
    return {"family": entry.family, "paper": entry.paper, "supports": sorted(entry.supports),
            "causal_only": only_causal, "runs_nowhere": nowhere, "patterns": runs}


def efficiency_implementation(run: dict) -> Optional[str]:
    """What ``implementation="auto"`` picks on this backend among those that ran the pattern."""
    ran = _with(run["implementations"], "ok")
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


def efficiency_length(entry: registry.Entry, pattern: Pattern, implementation: str, args: argparse.Namespace,
                      baseline_cache: dict) -> dict:
    """CAB's efficiency length of one mechanism against softmax ``xla`` in one pattern, on time and on memory.

    At every T both are compiled (peak memory from the compiled analysis: nothing is allocated) and
    timed interleaved, until the predicted single run of either side exceeds ``args.time_budget_s``
    (memory goes on to the last T). The lengths are ``stays_ahead_from`` the measured points.
    """
    mech = common.mode_fn(attention_fn(entry.config(), pattern, implementation), args.mode)
    base = common.mode_fn(attention_fn(registry.get(BASELINE_MECHANISM)(), pattern, BASELINE_IMPLEMENTATION),
                          args.mode)
    out = {"pattern": pattern.name, "implementation": implementation, "mode": args.mode, "time_stopped": None,
           "points": []}
    last_mech = last_base = None
    for seq_len in args.seq_lens:
        kv_len = max(1, round(seq_len * args.cross_ratio)) if pattern.cross else seq_len
        xs = common.mode_inputs(*common.host_random_qkv(seq_len, args.batch, seq_len, args.heads, args.head_dim,
                                                        kv_len=kv_len), args.mode)
        try:
            compiled = common.compile_fn(mech, *xs)
        except Exception as e:  # noqa: BLE001 - recorded; the sweep of this mechanism ends here
            out["error"] = f"T={seq_len}: {error_text(e)}"
            break
        key = (pattern.name, seq_len, kv_len, args.mode)
        if key not in baseline_cache:
            baseline_cache[key] = common.compile_fn(base, *xs)
        base_compiled = baseline_cache[key]
        mem, base_mem = common.memory_of(compiled), common.memory_of(base_compiled)
        point = {"T": seq_len, "S": kv_len, "peak": mem.peak, "baseline_peak": base_mem.peak,
                 "memory_ratio": mem.peak / base_mem.peak}
        over = max(_predicted(last_mech, seq_len), _predicted(last_base, seq_len))
        if out["time_stopped"] is None and over > args.time_budget_s:
            out["time_stopped"] = f"T={seq_len}: predicted {over:.1f} s per run > {args.time_budget_s:g} s"
        if out["time_stopped"] is None:
            t = common.time_thunks({"mech": lambda: compiled(*xs), "base": lambda: base_compiled(*xs)},
                                   repeats=args.repeats, max_seconds=args.max_seconds)
            last_mech, last_base = (seq_len, t["mech"].median_s), (seq_len, t["base"].median_s)
            point.update(seconds=t["mech"].median_s, baseline_seconds=t["base"].median_s,
                         time_ratio=t["mech"].median_s / t["base"].median_s, repeats=t["mech"].repeats)
        out["points"].append(point)
    out["time_length"] = stays_ahead_from(out["points"], "time_ratio")
    out["memory_length"] = stays_ahead_from(out["points"], "memory_ratio")
    return out


def run_efficiency(entry: registry.Entry, checks: dict, args: argparse.Namespace, baseline_cache: dict) -> dict:
    """Efficiency length of one mechanism in each of ``args.efficiency_patterns`` it runs."""
    results = {}
    for pattern in args.efficiency_patterns:
        run = checks["patterns"][pattern.name]
        impl = efficiency_implementation(run) if run["status"] == "ok" else None
        if impl is None:
            results[pattern.name] = {"skipped": f"pattern {run['status']}"}
        elif (entry.name, impl) == (BASELINE_MECHANISM, BASELINE_IMPLEMENTATION):
            results[pattern.name] = {"skipped": "the baseline itself", "implementation": impl}
        else:
            results[pattern.name] = efficiency_length(entry, pattern, impl, args, baseline_cache)
    return results


def run(args: argparse.Namespace, deadline: Optional[float] = None) -> dict:
    """Pattern checks and efficiency lengths of every selected mechanism, keyed by name.

    With a ``deadline`` (a ``time.perf_counter()`` value), mechanisms not started by then are left out.
    """
    entries = common.selected_entries(args.mechanisms)
    results, baseline_cache = {}, {}
    bar = tqdm(entries, desc="cab", unit="mechanism")
    for entry in bar:
        if deadline is not None and time.perf_counter() > deadline:
            break
        bar.set_postfix(mechanism=entry.name)
        checks = check_entry(entry, args)
        checks["efficiency"] = run_efficiency(entry, checks, args, baseline_cache)
        results[entry.name] = checks
    return results


def failures(results: dict) -> list[str]:
    """``mechanism/pattern`` of every pattern whose claim did not hold."""
    return [f"{name}/{p}" for name, r in results.items() for p, run in r["patterns"].items() if run["status"] == "FAIL"]


def _pattern_cell(run: dict) -> str:
    status = run["status"]
    if status == "ok":
        errs = [r["max_rel_err"] for r in run["implementations"].values() if "max_rel_err" in r]
        ran = [i for i, r in run["implementations"].items() if r["outcome"] == "ok"]
        causal = ", acts causal" if run["ignores_later_keys"] else ""
        return f"ok ({len(ran)} impl{'s' * (len(ran) > 1)}" + (f", err {max(errs):.0e}" if errs else "") + causal + ")"
    if status == "unsupported":
        return "causal-only" if run["reason"].startswith("causal-only") else "unsupported"
    return status


def _claims_cell(result: dict) -> str:
    return " ".join(p.short for p in PATTERNS if result["patterns"][p.name]["claimed"])


def pattern_table(results: dict) -> str:
    """One row per mechanism: claimed patterns, then the verdict of each pattern."""
    rows = [[name, r["family"], _claims_cell(r), *(_pattern_cell(r["patterns"][p.name]) for p in PATTERNS)]
            for name, r in results.items()]
    return common.markdown_table(["mechanism", "family", "claims", *(f"{p.short} ({p.name})" for p in PATTERNS)],
                                 rows)


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
    return common.markdown_table(["mechanism", "pattern", "impl", "time efficiency length", "memory efficiency length",
                                  "time / softmax xla, by T", "peak memory / softmax xla, by T"], rows)


def notes(results: dict) -> list[str]:
    """One line per pattern that did not simply run (one per mechanism that runs nowhere): the reason."""
    lines = []
    for name, r in results.items():
        runs = [(p, r["patterns"][p.name]) for p in PATTERNS]
        for p, run in runs[:1] if r["runs_nowhere"] else runs:
            if run["reason"]:
                lines.append(f"- `{name}` {'all patterns' if r['runs_nowhere'] else p.short}: {run['status']} - "
                             f"{run['reason']}")
    return lines


def markdown_report(results: dict, args: argparse.Namespace, device: dict, load: tuple[dict, dict]) -> str:
    """The markdown file: setup, the pattern table, the efficiency table and the reasons."""
    failed = failures(results)
    skipped = [name for name, r in results.items() if r["runs_nowhere"]]
    return "\n".join([
        f"# CAB attention patterns and efficiency lengths ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, "
        f"jax {device['jax_version']}. {common.load_note(*load)}",
        "",
        "## Patterns",
        "",
        f"Each implementation{'' if args.with_pallas else ' except Pallas'} runs through `attnjax.attention` with "
        f"B={args.batch}, H={args.heads}, D={args.head_dim}, float32, T={args.check_len} (self) and "
        f"S={args.cross_len} (cross; causal cross is bottom-right aligned). *claims*: the patterns the registry's "
        "`supports` allows (causal needs `mask`, cross needs `cross`). *ok*: it ran and every implementation "
        f"matches the reference within {common.TOLERANCE['float32']:g} (max error relative to the reference's max); "
        "*unsupported*: unclaimed and it raised NotImplementedError/ValueError as it should; *causal-only*: claimed, "
        "but the mechanism declines every noncausal input (which the registry cannot express); *FAIL*: a claim that "
        "does not hold or an error (including a causality leak: in causal patterns the outputs of the first half "
        "of the queries must not change when the keys and values they cannot see change). *acts causal*: without a "
        "mask the outputs ignore later keys anyway.",
        "",
        pattern_table(results),
        "",
        f"Claims checked: {'all hold' if not failed else 'FAILED for ' + ', '.join(failed)}."
        + (f" Not checked (*n/a*, no pattern runs with these inputs): {', '.join(skipped)}." if skipped else ""),
        "",
        "## Efficiency length",
        "",
        f"The shortest T in {list(args.seq_lens)} from which the mechanism's `auto` implementation beats softmax "
        "`xla` (blocked FlashAttention-2 in XLA, O(T) memory) in the same pattern at every longer T measured, "
        f"{args.mode.replace('_', '+')}, "
        f"B={args.batch}, H={args.heads}, D={args.head_dim}, float32"
        + (f", S = {args.cross_ratio:g} T in cross patterns" if any(p.cross for p in args.efficiency_patterns) else "")
        + ". Time: medians of interleaved runs, measured in this run; timing stops when a predicted single run "
        f"exceeds {args.time_budget_s:g} s. Memory: peak of XLA's compiled memory analysis, at every T. `> T (r at "
        "T)`: not ahead at the longest T measured, with its ratio.",
        "",
        efficiency_table(results),
        "",
        "## Reasons",
        "",
        *(notes(results) or ["- none"]),
        "",
    ])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the harness; write JSON and markdown; print the report; return the results."""
    args = parse_args(argv)
    device, before = common.device_info(), common.machine_load()
    results = run(args)
    load = (before, common.machine_load())
    report = markdown_report(results, args, device, load)
    print(report)
    settings = dict(common.jsonable_args(args), efficiency_patterns=[p.name for p in args.efficiency_patterns])
    data = {"device": device, "load": {"before": load[0], "after": load[1]}, "settings": settings,
            "baseline": f"{BASELINE_MECHANISM}/{BASELINE_IMPLEMENTATION}", "mechanisms": results,
            "failures": failures(results)}
    out = Path(args.out)
    common.write_json(data, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(report)
    print(f"wrote {out / args.name}.{{json,md}}")
    return data


if __name__ == "__main__":
    raise SystemExit(1 if main()["failures"] else 0)
