"""The main job (``make demo``): every registered mechanism, checked and timed.

For each entry of ``attnjax.registry.entries()``:

1. checks: each non-reference implementation against the reference on small random causal
   inputs, forward and gradients (dq, dk, dv): max error relative to the reference's max;
2. timing: each implementation and ``jax.nn.dot_product_attention(implementation="xla")`` at a
   few sequence lengths, forward and forward+backward, as ratios to jax.nn measured in this run;
3. a summary table, ``main.json`` and a log-log plot ``main_scaling.png`` in ``--out``.

    python -m experiments.main --seq-lens 256,512,1024,2048 --heads 4 --head-dim 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attnjax
from attnjax import masks, registry
from experiments import common

BASELINE = "jax.nn/xla"
MODES = common.MODES
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}
"""Pass bound on max|actual - reference| / max|reference| per input dtype."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults finish in a few minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=common.parse_ints, default=[256, 512, 1024, 2048],
                   help="comma-separated sequence lengths to time (1k = 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=5.0, help="stop repeating a measurement after this")
    p.add_argument("--check-len", type=int, default=640, help="sequence length of the correctness checks")
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                   help="comma-separated registry names (default: every registered mechanism)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="output directory")
    return p.parse_args(argv)


def selected_entries(names: Optional[Sequence[str]]) -> list[registry.Entry]:
    """Registry entries by name, in registry order (all of them when ``names`` is None)."""
    entries = registry.entries()
    if names is None:
        return entries
    unknown = set(names) - {e.name for e in entries}
    if unknown:
        raise SystemExit(f"unknown mechanisms {sorted(unknown)}; registered: {[e.name for e in entries]}")
    return [e for e in entries if e.name in names]


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


def outputs_and_grads(fn: Callable, q, k, v, w) -> dict[str, np.ndarray]:
    """Forward output and (dq, dk, dv) of ``sum(out * w)``, as float32 numpy arrays."""
    out = jax.jit(fn)(q, k, v)
    dq, dk, dv = jax.jit(common.grad_fn(fn))(q, k, v, w)
    return {n: np.asarray(x, np.float32) for n, x in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv))}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (non-finite values give ``inf``)."""
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def check_entry(entry: registry.Entry, args: argparse.Namespace) -> dict:
    """Each non-reference implementation against the reference, forward and gradients."""
    dtype = jnp.dtype(args.dtype)
    q, k, v = common.random_qkv(jax.random.PRNGKey(0), 2, args.check_len, args.heads, args.head_dim, dtype)
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.float32)
    expected = outputs_and_grads(attention_fn(entry, "reference"), q, k, v, w)
    results = {}
    for impl in entry.implementations:
        if impl == "reference":
            continue
        try:
            actual = outputs_and_grads(attention_fn(entry, impl), q, k, v, w)
        except NotImplementedError as e:
            results[impl] = {"skipped": str(e)}
            continue
        errors = {n: relative_error(actual[n], expected[n]) for n in expected}
        results[impl] = {"max_rel_err": errors, "passed": max(errors.values()) <= TOLERANCE[args.dtype]}
    return results


def run_checks(entries: Sequence[registry.Entry], args: argparse.Namespace) -> dict:
    """Correctness checks of every mechanism, keyed by mechanism name."""
    return {e.name: check_entry(e, args) for e in tqdm(entries, desc="checks", unit="mechanism")}


def timed_implementations(entry: registry.Entry) -> tuple:
    """Implementations worth timing here: Pallas on CPU runs in interpret mode, so it is left out."""
    on_cpu = jax.default_backend() == "cpu"
    return tuple(i for i in entry.implementations if not (on_cpu and i == "pallas"))


def candidates(entries: Sequence[registry.Entry]) -> dict[str, Callable]:
    """Every function to time, by label ``mechanism/implementation``, baseline first."""
    fns = {BASELINE: jax_nn_fn}
    for entry in entries:
        for impl in timed_implementations(entry):
            fns[f"{entry.name}/{impl}"] = attention_fn(entry, impl)
    return fns


def time_one_length(fns: dict[str, Callable], seq_len: int, mode: str, args: argparse.Namespace) -> dict:
    """Median seconds of each function at one length and mode (``None`` if it can't serve it)."""
    qkv = common.random_qkv(jax.random.PRNGKey(seq_len), args.batch, seq_len, args.heads, args.head_dim,
                            jnp.dtype(args.dtype))
    inputs = common.mode_inputs(*qkv, mode)
    thunks, skipped = {}, {}
    for label, fn in fns.items():
        try:
            compiled = common.compile_fn(common.mode_fn(fn, mode), *inputs)
        except NotImplementedError:
            skipped[label] = None
            continue
        thunks[label] = lambda c=compiled: c(*inputs)
    timings = common.time_thunks(thunks, repeats=args.repeats, max_seconds=args.max_seconds)
    return {**skipped, **{label: t.median_s for label, t in timings.items()}}


def run_timings(entries: Sequence[registry.Entry], args: argparse.Namespace) -> dict:
    """``{mode: {label: [seconds per seq len]}}`` plus ratios to the baseline."""
    fns = candidates(entries)
    seconds = {mode: {label: [] for label in fns} for mode in MODES}
    steps = [(t, m) for t in args.seq_lens for m in MODES]
    for seq_len, mode in tqdm(steps, desc="timing", unit="run"):
        for label, s in time_one_length(fns, seq_len, mode, args).items():
            seconds[mode][label].append(s)
    ratios = {mode: {label: [None if s is None else s / b for s, b in zip(times, seconds[mode][BASELINE])]
                     for label, times in seconds[mode].items()} for mode in MODES}
    return {"seq_lens": list(args.seq_lens), "seconds": seconds, "ratio_to_baseline": ratios}


def check_cell(label: str, checks: dict) -> str:
    """The check column of one timed label."""
    name, _, impl = label.partition("/")
    check = checks.get(name, {}).get(impl)
    if label == BASELINE or check is None:
        return "baseline" if label == BASELINE else impl
    if "skipped" in check:
        return "skipped"
    return f"{'pass' if check['passed'] else 'FAIL'} ({max(check['max_rel_err'].values()):.1e})"


def summary_rows(checks: dict, timings: dict) -> list[list[str]]:
    """One row per timed label: check result, then the time ratio to jax.nn per length and mode."""
    rows = []
    for label in timings["seconds"]["fwd"]:
        ratios = [timings["ratio_to_baseline"][m][label][i] for i in range(len(timings["seq_lens"])) for m in MODES]
        rows.append([label, check_cell(label, checks), *("n/a" if r is None else f"{r:.2f}x" for r in ratios)])
    return rows


def summary_table(checks: dict, timings: dict) -> str:
    """The markdown summary: checks and time / jax.nn time per length (fwd, fwd+bwd)."""
    headers = ["mechanism/impl", "check (max rel err)"]
    headers += [f"T={t} {m.replace('_', '+')}" for t in timings["seq_lens"] for m in MODES]
    return common.markdown_table(headers, summary_rows(checks, timings))


def plot_scaling(timings: dict, path: Path) -> Path:
    """Log-log time vs T, one line per mechanism/implementation and jax.nn; fwd and fwd+bwd."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(MODES), figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, MODES):
        for label, times in timings["seconds"][mode].items():
            pts = [(t, s) for t, s in zip(timings["seq_lens"], times) if s is not None]
            if pts:
                ax.loglog(*zip(*pts), "o-" if label != BASELINE else "k--", label=label)
        ax.set(title=mode.replace("_", "+"), xlabel="sequence length T", ylabel="median seconds")
        common.label_x(ax, timings["seq_lens"])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"attention time vs T on {common.device_info()['device_kind']} (causal)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def failures(checks: dict) -> list[str]:
    """``mechanism/implementation`` of every check that did not pass (skips are not failures)."""
    return [f"{name}/{impl}" for name, by_impl in checks.items() for impl, r in by_impl.items()
            if not r.get("passed", "skipped" in r)]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run checks and timings for every registered mechanism; write JSON and plot; return results."""
    args = parse_args(argv)
    entries = selected_entries(args.mechanisms)
    checks = run_checks(entries, args)
    timings = run_timings(entries, args)
    print(summary_table(checks, timings))
    results = {"device": common.device_info(), "settings": common.jsonable_args(args), "baseline": BASELINE,
               "mechanisms": {e.name: {"family": e.family, "paper": e.paper, "implementations": list(e.implementations),
                                       "mask": "causal" if mask_for(e) else "none", "checks": checks[e.name]}
                              for e in entries},
               "timings": timings}
    json_path = common.write_json(results, "main.json", args.out)
    plot_path = plot_scaling(timings, Path(args.out) / "main_scaling.png")
    failed = failures(checks)
    print(f"checks failed: {', '.join(failed)}" if failed else "all checks passed")
    print(f"wrote {json_path} and {plot_path}")
    return results


if __name__ == "__main__":
    outcome = main()
    raise SystemExit(1 if failures({n: m["checks"] for n, m in outcome["mechanisms"].items()}) else 0)
