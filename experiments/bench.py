"""Kernel and scaling benchmarks (E6): one entry point for every per-mechanism benchmark.

Runs each benchmark script ``experiments/bench_*.py`` that is present (``bench_softmax``,
``bench_linear``, ``bench_alternatives`` first, then any other, in name order; a script that is not
there is reported as missing) as its own process, ``python -m experiments.<module>``: the scripts are
leaves, none imports another. Each takes ``--out``, ``--name`` and ``--smoke``, times its paths
against ``jax.nn.dot_product_attention`` or blocked softmax in its own run, and writes its own JSON,
markdown and log-log plots; this one reads the JSON back. Then, in this same run, for every timed row:

- **attention FLOPs**: the row's ``"flops"`` if the module gives one, else
  ``experiments.lib.flops.attention_flops``: ``4·B·H·T·S·D`` for the forward (``QK^T`` and ``PV``, 2 FLOPs per
  multiply-add), halved when causal, ×3.5 for forward+backward (FlashAttention-2's convention:
  the backward is 2.5 forwards). ``S = T`` and causal unless the row says otherwise (``"S"``,
  ``"causal"``), as in ``bench_softmax`` and ``bench_linear``. For subquadratic paths this is the
  dense-equivalent work, so their rate can pass the matmul's;
- **achieved rate** = FLOPs / median time, and its **fraction of a plain ``jnp.matmul``** of the same
  FLOPs (a square ``n×n @ n×n`` with ``2n³`` ≈ the row's FLOPs, in the benchmark's dtype), timed
  here on the same device.

Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (log-log achieved FLOP/s vs T, one panel
per module, with the matmul's rate at the same FLOPs) in ``--out`` (under ``--smoke``, by default,
in the smoke directory that git ignores).

    python -m experiments.bench              # every benchmark at its defaults (long on CPU)
    python -m experiments.bench --smoke      # tiny sizes: under a minute on CPU
    python -m experiments.bench --seq-lens 1k,4k,16k --heads 16 --head-dim 128 --dtype bfloat16   # GPU/TPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.lib import cli, flops, host, measure, plots, report
from experiments.lib.workload import MODES

KNOWN = ("bench_softmax", "bench_linear", "bench_alternatives")
"""Benchmark modules run first, in this order; other ``experiments/bench_*.py`` modules follow."""
EXPERIMENTS_DIR = Path(__file__).resolve().parent
"""Where the benchmark scripts are; its parent is the directory they run from."""
FORWARDED = ("seq_lens", "batch", "heads", "head_dim", "dtype")
"""Flags passed on to every module when given (each benchmark module has them)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", type=lambda s: s.split(","), default=None,
                   help="comma-separated module names (default: every experiments/bench_*.py)")
    p.add_argument("--seq-lens", default=None, help="passed on to every module (e.g. 1k,2k,4k)")
    p.add_argument("--batch", default=None, help="passed on to every module")
    p.add_argument("--heads", default=None, help="passed on to every module")
    p.add_argument("--head-dim", default=None, help="passed on to every module")
    p.add_argument("--dtype", default=None, help="passed on to every module")
    p.add_argument("--matmul-repeats", type=int, default=5, help="timed runs of each reference matmul (median)")
    p.add_argument("--matmul-max-seconds", type=float, default=10.0, help="stop repeating a matmul after this")
    cli.add_output_flags(p, "bench")
    args = cli.parse_with_smoke(p, argv, {})
    args.out = Path(args.out).resolve()
    return args


def module_names() -> list[str]:
    """``KNOWN`` (present or not: a missing one is reported), then the other ``experiments/bench_*.py``."""
    present = {path.stem for path in EXPERIMENTS_DIR.glob("bench_*.py")}
    return list(KNOWN) + sorted(present - set(KNOWN))


def module_stem(name: str, smoke: bool) -> str:
    """The output file stem a module gets: ``<module>_<backend>[_smoke]``."""
    return f"{name}_{jax.default_backend()}" + ("_smoke" if smoke else "")


def module_argv(args: argparse.Namespace, name: str) -> list[str]:
    """The flags module ``name`` gets: ``--out``, ``--name`` (``module_stem``), ``--smoke`` and the forwarded
    ones that were given."""
    argv = ["--out", str(args.out), "--name", module_stem(name, args.smoke)] + (["--smoke"] if args.smoke else [])
    for flag in FORWARDED:
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


def run_module(name: str, argv: Sequence[str], result: Path) -> dict:
    """Run one benchmark script as ``python -m experiments.<name> <argv>`` and read the JSON it writes to
    ``result``: ``{"status": "ok", "results", "elapsed_s"}``, or why it did not run (``"missing"``, ``"error"``).

    Its output goes to this process's terminal. Nothing a module does stops the others: a nonzero exit
    (a flag the module lacks, say) is recorded as ``"error"``.
    """
    if not (EXPERIMENTS_DIR / f"{name}.py").exists():
        return {"status": "missing", "error": f"no module experiments.{name}"}
    started = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", f"experiments.{name}", *argv], cwd=EXPERIMENTS_DIR.parent).returncode
    if code != 0:
        return {"status": "error", "error": f"exited with {code} on argv {list(argv)} (its output is above)"}
    if not result.exists():
        return {"status": "error", "error": f"wrote no {result}"}
    return {"status": "ok", "results": json.loads(result.read_text()), "elapsed_s": time.perf_counter() - started}


def row_flops(row: dict, settings: dict) -> Optional[float]:
    """A row's attention FLOPs: its own ``"flops"``, else ``flops.attention_flops`` from the settings."""
    if row.get("flops") is not None:
        return float(row["flops"])
    if not all(k in settings for k in ("batch", "heads", "head_dim")):
        return None
    T = row["T"]
    return flops.attention_flops(settings["batch"], settings["heads"], T, row.get("S", T), settings["head_dim"],
                                  causal=row.get("causal", settings.get("causal", True)), mode=row["mode"])


class MatmulRates:
    """FLOP/s of a plain square ``jnp.matmul`` per FLOP count, timed once per size and cached."""

    def __init__(self, repeats: int, max_seconds: float):
        self.repeats, self.max_seconds, self.by_size = repeats, max_seconds, {}

    def rate(self, work: float, dtype: str) -> dict:
        """``{"n", "flops", "seconds", "flops_per_s"}`` of the matmul closest to ``work`` FLOPs."""
        fn, (a, b), exact = flops.matmul_for_flops(work, jnp.dtype(dtype))
        key = (a.shape[0], dtype)
        if key not in self.by_size:
            t = measure.time_fn(fn, a, b, repeats=self.repeats, max_seconds=self.max_seconds)
            self.by_size[key] = {"n": a.shape[0], "dtype": dtype, "flops": exact, "seconds": t.median_s,
                                 "flops_per_s": exact / t.median_s}
        return self.by_size[key]


def flop_rows(name: str, results: dict, matmul: MatmulRates) -> list[dict]:
    """Every timed row of one module with its FLOPs, achieved rate and fraction of the matmul rate."""
    settings = results.get("settings", {})
    dtype = settings.get("dtype", "float32")
    out = []
    for row in results.get("rows", []):
        seconds, work = row.get("median_s"), None
        if seconds:
            work = row_flops(row, settings)
        if not work:
            continue
        ref = matmul.rate(work, dtype)
        achieved = work / seconds
        out.append({"module": name, "T": row["T"], "mode": row["mode"], "path": row["path"], "median_s": seconds,
                    "flops": work, "flops_per_s": achieved, "matmul_n": ref["n"],
                    "matmul_flops_per_s": ref["flops_per_s"], "fraction_of_matmul": achieved / ref["flops_per_s"]})
    return out


def flop_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per timed row of one module."""
    return report.markdown_table(
        ["T", "mode", "path", "median time", "attention GFLOP", "achieved GFLOP/s", "matmul GFLOP/s (n)",
         "fraction of matmul"],
        [[r["T"], r["mode"].replace("_", "+"), r["path"], f"{r['median_s'] * 1e3:.2f} ms", f"{r['flops'] / 1e9:.3g}",
          f"{r['flops_per_s'] / 1e9:.3g}", f"{r['matmul_flops_per_s'] / 1e9:.3g} ({r['matmul_n']})",
          f"{r['fraction_of_matmul']:.3f}"] for r in rows])


def plot(by_module: dict[str, list[dict]], path: Path, title: str) -> Optional[Path]:
    """Log-log achieved FLOP/s vs T per module (one line per path and mode), matmul rate dashed."""
    modules = [m for m, rows in by_module.items() if rows]
    if not modules:
        return None
    plt = plots.plt
    fig, axes = plt.subplots(1, len(modules), figsize=(6.5 * len(modules), 4.8), squeeze=False)
    for ax, module in zip(axes[0], modules):
        rows = by_module[module]
        series = dict.fromkeys((r["path"], r["mode"]) for r in rows)
        for i, (p, mode) in enumerate(series):
            pts = sorted((r["T"], r["flops_per_s"] / 1e9) for r in rows if (r["path"], r["mode"]) == (p, mode))
            ax.loglog(*zip(*pts), "o-" if mode == "fwd" else "s--", color=f"C{i % 10}",
                      label=f"{p} {mode.replace('_', '+')}")
        for mode, style in zip(MODES, (":", "-.")):
            pts = sorted({(r["T"], r["matmul_flops_per_s"] / 1e9) for r in rows if r["mode"] == mode})
            if pts:
                ax.loglog(*zip(*pts), style, color="k", label=f"matmul, same FLOPs as {mode.replace('_', '+')}")
        seq_lens = sorted({r["T"] for r in rows})
        plots.label_x(ax, seq_lens)
        ax.set(title=module, xlabel="T", ylabel="achieved GFLOP/s (attention FLOPs / time)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_report(modules: dict, by_module: dict, args: argparse.Namespace, device: dict,
                    load: tuple[dict, dict]) -> str:
    """The markdown file: setup, formula, module status and one FLOP-rate table per module."""
    lines = [
        f"# Benchmarks: achieved FLOP rate vs a plain matmul ({device['device_kind']}"
        + (", smoke sizes" if args.smoke else "") + ")",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, jax "
        f"{device['jax_version']}. {host.load_note(*load)}",
        "",
        "Attention FLOPs per row: `4·B·H·T·S·D` forward (S = T), halved for causal, x"
        f"{flops.FWD_BWD_FLOP_FACTOR:g} for forward+backward (FlashAttention-2's convention), unless the module "
        "gives the row's FLOPs. Subquadratic paths are credited the dense-equivalent work, so their fraction can "
        "exceed 1. *fraction of matmul* = achieved FLOP/s over the FLOP/s of a square `jnp.matmul` of the same "
        "FLOPs (n x n @ n x n, 2n^3 FLOPs), timed in this run on this device. Each module's own report "
        "(time and memory against jax.nn or softmax, log-log plots) sits next to this file.",
        "",
        report.markdown_table(["module", "status", "seconds", "timed rows", "detail"],
                              [[m, r["status"], f"{r['elapsed_s']:.0f}" if "elapsed_s" in r else "-",
                                len(by_module.get(m, [])), r.get("error", "")] for m, r in modules.items()]),
        "",
    ]
    for module, rows in by_module.items():
        if rows:
            lines += [f"## {module}", "", flop_table(rows), ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run every benchmark module, then the FLOP-rate comparison; write JSON, markdown and PNG."""
    args = parse_args(argv)
    device, before = host.device_info(), host.machine_load()
    names = args.modules or module_names()
    modules = {}
    for name in tqdm(names, desc="bench", unit="module"):
        modules[name] = run_module(name, module_argv(args, name), args.out / f"{module_stem(name, args.smoke)}.json")
    matmul = MatmulRates(args.matmul_repeats, args.matmul_max_seconds)
    by_module = {name: flop_rows(name, r["results"], matmul) for name, r in modules.items() if r["status"] == "ok"}
    load = (before, host.machine_load())
    md = markdown_report(modules, by_module, args, device, load)
    print(md)
    out = args.out
    data = {"device": device, "load": {"before": load[0], "after": load[1]}, "settings": report.jsonable_args(args),
            "flop_formula": "4*B*H*T*S*D fwd, /2 causal, *3.5 fwd+bwd (unless the row gives flops)",
            "modules": {name: {k: v for k, v in r.items() if k != "results"} for name, r in modules.items()},
            "rows": [row for rows in by_module.values() for row in rows],
            "matmul": list(matmul.by_size.values())}
    report.write_json(data, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(md)
    png = plot(by_module, out / f"{args.name}.png",
               f"achieved attention FLOP/s vs T on {device['device_kind']} (dashed/dotted: plain matmul, same FLOPs)")
    print(f"wrote {out / args.name}.{{json,md}}" + (f" and {png}" if png else ""))
    return data


if __name__ == "__main__":
    outcome = main()
    raise SystemExit(1 if any(m["status"] == "error" for m in outcome["modules"].values()) else 0)
