"""Where results go, and writing them: JSON, markdown tables and the json/md/png triple of a benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
"""Kept results of full runs (committed)."""
SMOKE_DIR = RESULTS_DIR / "smoke"
"""Where ``--smoke`` runs write by default: ignored by git, never committed."""


def write_json(data: Any, name: str, out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``data`` to ``out_dir/name`` (indented JSON, creating the directory) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def save_benchmark(results: dict, report: str, args, plot: Callable[[Path], Any]) -> None:
    """Write ``<out>/<name>.json`` (``results``), ``.md`` (``report``) and ``.png`` (``plot(path)``)."""
    out = Path(args.out)
    write_json(results, f"{args.name}.json", out)
    (out / f"{args.name}.md").write_text(report)
    plot(out / f"{args.name}.png")
    print(f"wrote {out / args.name}.{{json,md,png}}")


def jsonable_args(args) -> dict:
    """An argparse namespace as a JSON-ready dict (paths become strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table whose columns are padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"
