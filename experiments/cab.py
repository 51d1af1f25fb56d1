"""CAB attention patterns: every registered mechanism in the four patterns, and its efficiency length.

CAB (Zhang et al., "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling", ICML 2023)
sorts attention into four patterns, {noncausal, causal} x {self, cross}. For each entry of
``attnjax.registry.entries()`` this harness

1. checks what the registry claims by running every implementation in each pattern at a small
   size against the reference, with a causality test in the causal patterns
   (``experiments.lib.cab_patterns``);
2. measures CAB's *efficiency length*: the shortest T of ``--seq-lens`` from which the mechanism's
   fastest implementation beats softmax ``xla`` in the same pattern at every longer T measured, on
   time and on peak memory (``experiments.lib.cab_efficiency``).

Every cell is handled on its own: a mechanism that takes other shapes or raises is recorded with
the reason and the table goes on. Writes ``<name>.json`` and ``<name>.md`` in ``--out``.

    python -m experiments.cab --seq-lens 256,512,1k,2k,4k,8k,16k --heads 4 --head-dim 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import jax

from experiments.lib import cab_efficiency, cab_patterns, cli, host, report
from experiments.lib.accuracy import TOLERANCE
from experiments.lib.cab_patterns import PATTERNS, CABSettings
from experiments.lib.workload import MODES

DEFAULT = CABSettings()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults (``CABSettings``) are the CPU run kept in ``experiments/results``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=lambda s: s.split(","), default=None,
                   help="comma-separated registry names (default: every registered mechanism)")
    p.add_argument("--batch", type=int, default=DEFAULT.batch)
    p.add_argument("--heads", type=int, default=DEFAULT.heads)
    p.add_argument("--head-dim", type=int, default=DEFAULT.head_dim)
    p.add_argument("--check-len", type=int, default=DEFAULT.check_len, help="query length T of the pattern checks")
    p.add_argument("--cross-len", type=int, default=DEFAULT.cross_len,
                   help="key length S of the cross patterns' checks")
    p.add_argument("--seq-lens", type=cli.parse_ints, default=list(DEFAULT.seq_lens),
                   help="candidate efficiency lengths T, ascending (1k = 1024)")
    p.add_argument("--efficiency-patterns", type=cab_patterns.parse_patterns,
                   default=list(DEFAULT.efficiency_patterns),
                   help="patterns in which the efficiency length is measured (names or NS/CS/NC/CC)")
    p.add_argument("--cross-ratio", type=float, default=DEFAULT.cross_ratio,
                   help="S = T * ratio in cross efficiency patterns")
    p.add_argument("--mode", choices=MODES, default=DEFAULT.mode, help="time the forward, or forward+backward")
    p.add_argument("--repeats", type=int, default=DEFAULT.repeats, help="timed runs per measurement (median)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT.max_seconds,
                   help="stop repeating a measurement after this")
    p.add_argument("--time-budget-s", type=float, default=DEFAULT.time_budget_s,
                   help="time at T only while each side's predicted single run (quadratic from the last T) fits")
    cli.add_pallas_flag(p, "the Pallas implementations")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="output directory")
    p.add_argument("--name", default=f"cab_{jax.default_backend()}", help="output file stem")
    args = p.parse_args(argv)
    if args.with_pallas is None:
        args.with_pallas = jax.default_backend() in cli.ACCELERATORS
    if list(args.seq_lens) != sorted(args.seq_lens):
        p.error(f"--seq-lens must be ascending, got {args.seq_lens}")
    return args


def notes(results: dict) -> list[str]:
    """One line per pattern that did not simply run: the reason."""
    return [f"- `{name}` {p.short}: {r['patterns'][p.name]['status']} - {r['patterns'][p.name]['reason']}"
            for name, r in results.items() for p in PATTERNS if r["patterns"][p.name]["reason"]]


def markdown_report(results: dict, settings: CABSettings, device: dict, load: tuple[dict, dict]) -> str:
    """The markdown file: setup, the pattern table, the efficiency table and the reasons."""
    failed = cab_patterns.failures(results)
    return "\n".join([
        f"# CAB attention patterns and efficiency lengths ({device['device_kind']})",
        "",
        f"Device: `{device['device_kind']}` ({device['platform']}), {device['cpu_count']} CPUs, "
        f"jax {device['jax_version']}. {host.load_note(*load)}",
        "",
        "## Patterns",
        "",
        f"Each implementation{'' if settings.with_pallas else ' except Pallas'} runs through `attnjax.attention` "
        f"with B={settings.batch}, H={settings.heads}, D={settings.head_dim}, float32, T={settings.check_len} (self) "
        f"and S={settings.cross_len} (cross; causal cross is bottom-right aligned). *claims*: the patterns the "
        "registry's `supports` allows (causal needs `mask`, cross needs `cross`). *ok*: it ran and every "
        f"implementation matches the reference within {TOLERANCE['float32']:g} (max error relative to the "
        "reference's max); *unsupported*: unclaimed and it raised NotImplementedError/ValueError as it should; "
        "*causal-only*: claimed, but the mechanism declines every noncausal input (which the registry cannot "
        "express); *FAIL*: a claim that does not hold or an error (including a causality leak: in causal patterns "
        "the outputs of the first half of the queries must not change when the keys and values they cannot see "
        "change). *acts causal*: without a mask the outputs ignore later keys anyway.",
        "",
        cab_patterns.pattern_table(results),
        "",
        f"Claims checked: {'all hold' if not failed else 'FAILED for ' + ', '.join(failed)}.",
        "",
        "## Efficiency length",
        "",
        f"The shortest T in {list(settings.seq_lens)} from which the mechanism's `auto` implementation beats softmax "
        "`xla` (blocked FlashAttention-2 in XLA, O(T) memory) in the same pattern at every longer T measured, "
        f"{settings.mode.replace('_', '+')}, "
        f"B={settings.batch}, H={settings.heads}, D={settings.head_dim}, float32"
        + (f", S = {settings.cross_ratio:g} T in cross patterns" if any(p.cross for p in settings.efficiency_patterns)
           else "")
        + ". Time: medians of interleaved runs, measured in this run; timing stops when a predicted single run "
        f"exceeds {settings.time_budget_s:g} s. Memory: peak of XLA's compiled memory analysis, at every T. "
        "`> T (r at T)`: not ahead at the longest T measured, with its ratio.",
        "",
        cab_efficiency.efficiency_table(results),
        "",
        "## Reasons",
        "",
        *(notes(results) or ["- none"]),
        "",
    ])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the harness; write JSON and markdown; print the report; return the results."""
    args = parse_args(argv)
    settings = cli.settings_from(CABSettings, args)
    device, before = host.device_info(), host.machine_load()
    results = cab_efficiency.run(settings)
    load = (before, host.machine_load())
    md = markdown_report(results, settings, device, load)
    print(md)
    data = {"device": device, "load": {"before": load[0], "after": load[1]},
            "settings": dict(settings.as_dict(), out=str(args.out), name=args.name),
            "baseline": f"{cab_efficiency.BASELINE_MECHANISM}/{cab_efficiency.BASELINE_IMPLEMENTATION}",
            "mechanisms": results, "failures": cab_patterns.failures(results)}
    out = Path(args.out)
    report.write_json(data, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(md)
    print(f"wrote {out / args.name}.{{json,md}}")
    return data


if __name__ == "__main__":
    raise SystemExit(1 if main()["failures"] else 0)
