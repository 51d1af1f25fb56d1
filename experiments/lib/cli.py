"""Command-line flags the scripts share, ``--smoke`` handling, and settings dataclasses built from flags."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar

import jax

from attnjax import registry
from experiments.lib.report import RESULTS_DIR, SMOKE_DIR

ACCELERATORS = ("gpu", "tpu")
"""Backends where Pallas kernels compile for real (on CPU they only run in interpret mode)."""

Settings = TypeVar("Settings")


def parse_ints(text: str) -> list[int]:
    """``"1k,2048"`` -> ``[1024, 2048]`` (``k`` means 1024)."""
    return [int(float(t[:-1]) * 1024) if t.lower().endswith("k") else int(t) for t in text.split(",") if t]


def selected_entries(names: Optional[Sequence[str]]) -> list[registry.Entry]:
    """``attnjax.registry`` entries by name, in registry order (all of them when ``names`` is None)."""
    entries = registry.entries()
    if names is None:
        return entries
    unknown = set(names) - {e.name for e in entries}
    if unknown:
        raise SystemExit(f"unknown mechanisms {sorted(unknown)}; registered: {[e.name for e in entries]}")
    return [e for e in entries if e.name in names]


def settings_from(cls: type[Settings], args: argparse.Namespace) -> Settings:
    """The dataclass ``cls`` with each field that ``args`` has taken from it (the others keep their defaults)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def benchmark_parser(doc: str, seq_lens: Sequence[int], *, heads: int = 8, head_dim: int = 64
                     ) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark shares: ``--seq-lens``, ``--batch``, ``--heads``, ``--head-dim``,
    ``--dtype``. Add the benchmark's own flags, then ``add_output_flags`` and ``parse_with_smoke``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=parse_ints, default=list(seq_lens),
                   help="comma-separated sequence lengths (1k = 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--head-dim", type=int, default=head_dim)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def add_pallas_flag(p: argparse.ArgumentParser, what: str) -> None:
    """``--with-pallas/--no-with-pallas``: time ``what`` too; by default only on GPU/TPU."""
    p.add_argument("--with-pallas", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also time {what} (default: on GPU/TPU only; on CPU Pallas runs in interpret mode, "
                        "which is meaningless to time)")


def add_training_flags(p: argparse.ArgumentParser, defaults: Any) -> None:
    """``--steps``, ``--batch-size``, ``--lr``, ``--warmup-steps``, ``--weight-decay`` and ``--test-examples``,
    defaulting to the same-named attributes of a study's settings (``defaults``)."""
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--test-examples", type=int, default=defaults.test_examples)


def add_output_flags(p: argparse.ArgumentParser, stem: str) -> None:
    """``--out``, ``--name`` (default ``<stem>_<backend>``) and ``--smoke``."""
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="output directory (default experiments/results; under --smoke experiments/results/smoke, "
                        "which git ignores)")
    p.add_argument("--name", default=f"{stem}_{jax.default_backend()}", help="output file stem")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a _smoke file stem in the smoke directory: "
                                                        "checks it runs")


def parse_with_smoke(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], smoke: Mapping[str, Any]
                     ) -> argparse.Namespace:
    """Parse the flags of ``add_output_flags`` and the script's own.

    Under ``--smoke`` the ``smoke`` defaults apply, the stem gets ``_smoke`` and ``--out`` defaults to
    ``SMOKE_DIR`` (explicit flags still win), so a smoke run never lands among the kept results. An
    unset ``--with-pallas`` (``add_pallas_flag``) becomes "on GPU/TPU only".
    """
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**smoke, name=f"{p.get_default('name')}_smoke", out=SMOKE_DIR)
        args = p.parse_args(argv)
    if getattr(args, "with_pallas", False) is None:
        args.with_pallas = jax.default_backend() in ACCELERATORS
    return args
