"""E3: byte-level language modelling on the Python standard library's own ``.py`` sources.

The corpus is the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, without
``site-packages``): real text on every machine, no download. Files are read as bytes in sorted path
order, each followed by a NUL byte, and split into train and validation by a hash of the relative path
(``valid_fraction`` of the files), so the split is fixed and the two sides share no file.

Per mechanism, a small ``experiments.lib.model.LanguageModel`` (256 byte tokens) trains at context ``T``
on random train windows. Validation reports bits per byte (mean cross-entropy / ln 2) on the same
validation bytes cut into windows of ``T``, ``2T`` and ``4T``: the longer windows give more context
(interpolation would improve) but put positions beyond the trained range (extrapolation may break).
``last T`` scores only the last ``T`` positions of each window, the ones that are farthest out.

    python -m experiments.lm_bytes              # CPU default: 5 mechanisms, about 7 minutes on 2 cores
    python -m experiments.lm_bytes --d-model 256 --num-layers 4 --seq-len 512 --steps 5000 --batch-size 64
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments.lib import cli, host, report
from experiments.lib.model import LanguageModel, ModelConfig, mixer_names, num_params
from experiments.lib.training import IGNORE, Batch, TrainConfig, evaluate, train

SEPARATOR = b"\x00"
"""Byte appended after each file (never in Python source)."""
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Directories under the stdlib root that are not the standard library."""
CONTEXT_MULTIPLES = (1, 2, 4)
"""Evaluation window lengths, as multiples of the training context."""
SMOKE = dict(seq_len=16, d_model=16, num_layers=1, num_heads=2, steps=3, batch_size=2, warmup_steps=1,
             eval_windows=2, based_window=8)
"""Defaults under ``--smoke`` (explicit flags still win): a tiny model, a few steps, for tests."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Union[str, Path]) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under ``root``, sorted, skipping ``EXCLUDED_DIRS``."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts))


def in_validation(relative_path: str, valid_fraction: float) -> bool:
    """Whether a file is held out: SHA-256 of its relative path, first 8 bytes as a fraction, < ``valid_fraction``."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < valid_fraction


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and validation bytes (uint8 arrays) and the files they came from."""

    train: np.ndarray
    valid: np.ndarray
    train_files: tuple[str, ...]
    valid_files: tuple[str, ...]


def load_corpus(root: Optional[Union[str, Path]] = None, valid_fraction: float = 0.05) -> Corpus:
    """Read every stdlib source file under ``root`` (default ``stdlib_root()``) and split it by path hash."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    root = stdlib_root() if root is None else Path(root)
    files = source_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}")
    sides: dict[bool, list[str]] = {False: [], True: []}
    for f in files:
        sides[in_validation(f, valid_fraction)].append(f)
    if not sides[True] or not sides[False]:
        raise ValueError(f"valid_fraction={valid_fraction} leaves one side empty ({len(files)} files under {root})")

    def read(names):
        return np.frombuffer(b"".join((root / n).read_bytes() + SEPARATOR for n in names), np.uint8)

    return Corpus(read(sides[False]), read(sides[True]), tuple(sides[False]), tuple(sides[True]))


def train_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: Union[int, Sequence[int]]) -> Batch:
    """Random windows of ``data``: ``inputs [B, T]`` and next-byte ``targets [B, T]`` (int32), set by ``seed``."""
    if len(data) <= seq_len + 1:
        raise ValueError(f"data has {len(data)} bytes, too few for windows of {seq_len + 1}")
    starts = np.random.default_rng(seed).integers(0, len(data) - seq_len - 1, batch_size)
    windows = data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(data: np.ndarray, window: int, num_windows: int) -> np.ndarray:
    """``[num_windows, window + 1]`` uint8 windows at evenly spaced offsets of ``data`` (deterministic)."""
    if len(data) < window + 1:
        raise ValueError(f"data has {len(data)} bytes, too few for a window of {window + 1}")
    starts = np.linspace(0, len(data) - window - 1, num_windows).astype(np.int64)
    return data[starts[:, None] + np.arange(window + 1)]


def split_windows(windows: np.ndarray, length: int, score_last: Optional[int] = None) -> Batch:
    """Cut ``[N, W + 1]`` windows into ``[N·W/length, length]`` inputs and next-byte targets.

    Every piece scores its own ``length`` targets, so each cut scores the same ``N·W`` bytes. With
    ``score_last``, only each piece's last ``score_last`` targets count (the others are ``IGNORE``).
    """
    n, w = windows.shape[0], windows.shape[1] - 1
    if w % length:
        raise ValueError(f"window {w} is not a multiple of length {length}")
    data = windows.astype(np.int32)
    inputs = data[:, :-1].reshape(n * w // length, length)
    targets = data[:, 1:].reshape(n * w // length, length).copy()
    if score_last is not None:
        targets[:, :length - score_last] = IGNORE
    return inputs, targets


def bits_per_byte(model: LanguageModel, windows: np.ndarray, length: int, score_last: Optional[int] = None,
                  batch_size: int = 16) -> float:
    """Validation bits per byte: summed cross-entropy / (ln 2 · scored bytes) over ``split_windows``."""
    inputs, targets = split_windows(windows, length, score_last)
    rows = max(batch_size * windows.shape[1] // (length + 1), 1)
    batches = [(inputs[i:i + rows], targets[i:i + rows]) for i in range(0, len(inputs), rows)]
    return evaluate(model, batches)["bits"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; the defaults take about 7 minutes on a 2-core CPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=lambda s: s.split(","),
                   default=["softmax", "lightning", "based_linear", "transnormer", "based"],
                   help=f"comma-separated mixers: {', '.join(mixer_names())}")
    p.add_argument("--seq-len", type=int, default=128, help="training context T")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=4)
    p.add_argument("--based-window", type=int, default=32, help="sliding window of the 'based' block")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows of 4T bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", type=Path, default=None, help="source tree (default: the stdlib)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    cli.add_output_flags(p, "lm_bytes")
    args = cli.parse_with_smoke(p, argv, SMOKE)
    unknown = set(args.mechanisms) - set(mixer_names())
    if unknown:
        p.error(f"unknown mechanisms {sorted(unknown)}; known: {mixer_names()}")
    return args


def model_config(args: argparse.Namespace, mechanism: str) -> ModelConfig:
    """The byte LM for one mechanism (the ``based`` block gets ``--based-window``)."""
    options = {"window": args.based_window} if mechanism == "based" else {}
    return ModelConfig(vocab_size=256, mixer=mechanism, d_model=args.d_model, num_layers=args.num_layers,
                             num_heads=args.num_heads, mlp_ratio=args.mlp_ratio, mixer_options=options)


def run_one(args: argparse.Namespace, corpus: Corpus, windows: np.ndarray, mechanism: str) -> dict:
    """Train one byte LM and measure validation bits per byte at each ``CONTEXT_MULTIPLES`` of T."""
    config = model_config(args, mechanism)
    model = LanguageModel(config, rngs=nnx.Rngs(args.seed))
    train_config = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                                     weight_decay=args.weight_decay)
    start = time.perf_counter()
    history = train(model, lambda step: train_batch(corpus.train, args.batch_size, args.seq_len, (args.seed, step)),
                    train_config, desc=mechanism, progress=args.progress)
    seconds = time.perf_counter() - start
    T = args.seq_len
    bpb = {f"{m}T": bits_per_byte(model, windows, m * T) for m in CONTEXT_MULTIPLES}
    last = {f"{m}T": bits_per_byte(model, windows, m * T, score_last=T) for m in CONTEXT_MULTIPLES if m > 1}
    return {"mechanism": mechanism, "bpb": bpb, "bpb_last_T": last, "params": num_params(model),
            "train_seconds": seconds, "final_train_bpb": history[-1]["loss"] / math.log(2), "history": history}


def table(rows: Sequence[dict], seq_len: int) -> str:
    """Markdown: validation bits per byte per mechanism at T, 2T, 4T (all positions, and the last T)."""
    headers = ["mechanism", "params"] + [f"bpb @ {m}T={m * seq_len}" for m in CONTEXT_MULTIPLES] + [
        f"last T @ {m}T" for m in CONTEXT_MULTIPLES if m > 1]
    lines = [[r["mechanism"], f"{r['params']:,}"] + [f"{r['bpb'][f'{m}T']:.3f}" for m in CONTEXT_MULTIPLES]
             + [f"{r['bpb_last_T'][f'{m}T']:.3f}" for m in CONTEXT_MULTIPLES if m > 1] for r in rows]
    return report.markdown_table(headers, lines)


def markdown(rows: Sequence[dict], args: argparse.Namespace, argv: Sequence[str], run_info: dict) -> str:
    """The markdown page: command, settings, corpus, machine and load, and the bits-per-byte table."""
    corpus, device = run_info["corpus"], run_info["device"]
    return "\n".join([
        f"# Byte-level LM on the Python standard library — {device['platform']}", "",
        "`" + " ".join(["python -m experiments.lm_bytes", *argv]) + "`", "",
        f"Corpus: {corpus['train_files']} train files ({corpus['train_bytes'] / 2 ** 20:.1f} MiB) and "
        f"{corpus['valid_files']} validation files ({corpus['valid_bytes'] / 2 ** 20:.1f} MiB) of this interpreter's "
        f"stdlib, split by path hash. Model: d_model {args.d_model}, {args.num_layers} blocks, {args.num_heads} heads, "
        f"MLP ratio {args.mlp_ratio}, RoPE in the attention layers, BASED window {args.based_window}. Training: "
        f"T = {args.seq_len}, {args.steps} AdamW steps of {args.batch_size} windows (lr {args.lr}, warmup "
        f"{args.warmup_steps}, cosine). Validation bits per byte over the same {corpus['scored_bytes_per_eval']:,} "
        f"bytes cut into windows of T, 2T and 4T; `last T @ kT` scores only the last T positions of each kT "
        f"window (positions beyond the trained context).", "",
        host.machine_line(run_info), "",
        table(rows, args.seq_len), ""])


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    """Train every mechanism, print the table, write ``<name>.json`` and ``<name>.md`` to ``--out``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = host.start_run()
    corpus = load_corpus(args.root, args.valid_fraction)
    windows = eval_windows(corpus.valid, max(CONTEXT_MULTIPLES) * args.seq_len, args.eval_windows)
    rows = []
    for mechanism in tqdm(args.mechanisms, desc="lm_bytes", disable=not args.progress, dynamic_ncols=True):
        rows.append(run_one(args, corpus, windows, mechanism))
        if args.progress:
            bpb = ", ".join(f"{k}: {v:.3f}" for k, v in rows[-1]["bpb"].items())
            tqdm.write(f"{mechanism}: bits per byte {bpb} ({rows[-1]['train_seconds']:.0f} s)")
    corpus_info = {"train_bytes": len(corpus.train), "valid_bytes": len(corpus.valid),
                   "train_files": len(corpus.train_files), "valid_files": len(corpus.valid_files),
                   "scored_bytes_per_eval": int(windows.shape[0] * (windows.shape[1] - 1))}
    run_info = host.finish_run(started, corpus=corpus_info)
    md = markdown(rows, args, argv, run_info)
    print(md)
    report.write_json({"args": report.jsonable_args(args), **run_info, "results": rows}, f"{args.name}.json",
                      args.out)
    (Path(args.out) / f"{args.name}.md").write_text(md)
    return rows


if __name__ == "__main__":
    main()
