"""MQAR runs: train a small ``LanguageModel`` per (mechanism, d_model, pairs), score it on held-out answers.

``sweep`` is the study of ``python -m experiments.mqar``; ``compare`` one small task per mechanism,
for the main job. The defaults of ``MQARSettings`` are the CPU sweep kept in ``experiments/results``
(about 15 minutes on 2 cores).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Optional, Sequence

from flax import nnx
from tqdm import tqdm

from experiments.lib.model import LanguageModel, ModelConfig, decode_state_size, num_params
from experiments.lib.mqar_data import MQARConfig, mqar_batch
from experiments.lib.report import markdown_table
from experiments.lib.training import TrainConfig, evaluate, train


@dataclasses.dataclass(frozen=True)
class MQARSettings:
    """A sweep over mechanisms × widths × pair counts, and how each model is built and trained.

    A mechanism may be given as ``name:head_dim`` (e.g. ``based_linear:8``); heads = d_model / head_dim.
    ``mlp_ratio=0``: no MLP (Zoology's MQAR models). ``short_conv``: causal conv kernel before each block.
    """

    mechanisms: Sequence[str] = ("softmax", "lightning", "based_linear:8", "based_linear")
    d_models: Sequence[int] = (64,)
    kv_pairs: Sequence[int] = (4, 8, 16)
    seq_len: int = 64
    vocab_size: int = 256
    power_a: float = 0.01
    random_non_queries: bool = False
    num_layers: int = 2
    head_dim: int = 16
    mlp_ratio: int = 0
    short_conv: int = 3
    steps: int = 250
    batch_size: int = 64
    lr: float = 1e-2
    warmup_steps: int = 30
    weight_decay: float = 0.1
    test_examples: int = 512
    seed: int = 0
    progress: bool = True


QUICK = dict(d_models=(64,), kv_pairs=(8,), seq_len=32, steps=200, batch_size=64, warmup_steps=20,
             test_examples=256)
"""The ``compare(quick=True)`` setting: one width, one pair count, a short run."""


def parse_mechanism(spec: str) -> tuple[str, Optional[int]]:
    """``"based_linear:8"`` -> ``("based_linear", 8)``; ``"softmax"`` -> ``("softmax", None)`` (default head_dim)."""
    name, _, head_dim = spec.partition(":")
    return name, int(head_dim) if head_dim else None


def run_one(settings: MQARSettings, mechanism: str, d_model: int, num_kv_pairs: int) -> dict:
    """Train one model on one MQAR task and measure its test accuracy on the answer positions."""
    task = MQARConfig(vocab_size=settings.vocab_size, seq_len=settings.seq_len, num_kv_pairs=num_kv_pairs,
                      power_a=settings.power_a, random_non_queries=settings.random_non_queries)
    name, head_dim = parse_mechanism(mechanism)
    head_dim = head_dim or settings.head_dim
    model_config = ModelConfig(vocab_size=settings.vocab_size, mixer=name, d_model=d_model,
                               num_layers=settings.num_layers, num_heads=max(d_model // head_dim, 1),
                               head_dim=head_dim, mlp_ratio=settings.mlp_ratio, short_conv=settings.short_conv)
    train_config = TrainConfig(steps=settings.steps, learning_rate=settings.lr, warmup_steps=settings.warmup_steps,
                               weight_decay=settings.weight_decay)
    model = LanguageModel(model_config, rngs=nnx.Rngs(settings.seed))
    start = time.perf_counter()
    history = train(model, lambda step: mqar_batch(task, settings.batch_size, (settings.seed, 0, step)), train_config,
                    desc=f"{mechanism} d={d_model} N={num_kv_pairs}", progress=settings.progress)
    seconds = time.perf_counter() - start
    test = mqar_batch(task, settings.test_examples, (settings.seed, 1))
    batches = [(test[0][i:i + 256], test[1][i:i + 256]) for i in range(0, settings.test_examples, 256)]
    result = evaluate(model, batches)
    return {"mechanism": mechanism, "d_model": d_model, "num_kv_pairs": num_kv_pairs,
            "num_heads": model_config.num_heads, "head_dim": head_dim,
            "accuracy": result["accuracy"], "test_loss": result["loss"],
            "state_size": decode_state_size(model_config, settings.seq_len),
            "params": num_params(model), "train_seconds": seconds,
            "final_train_loss": history[-1]["loss"], "history": history}


def sweep(settings: MQARSettings) -> list[dict]:
    """``run_one`` over mechanisms × d_models × kv_pairs, in that order."""
    grid = list(itertools.product(settings.mechanisms, settings.d_models, settings.kv_pairs))
    rows = []
    for mechanism, d_model, pairs in tqdm(grid, desc="mqar", disable=not settings.progress, dynamic_ncols=True):
        rows.append(run_one(settings, mechanism, d_model, pairs))
        if settings.progress:
            tqdm.write(f"{mechanism} d_model={d_model} N={pairs}: accuracy {rows[-1]['accuracy']:.3f} "
                       f"({rows[-1]['train_seconds']:.0f} s)")
    return rows


def quick_settings(mechanisms: Sequence[str], seed: int = 0) -> MQARSettings:
    """``QUICK`` for ``mechanisms``, without progress bars (d_model 64, 8 pairs, T = 32, 200 steps of batch 64)."""
    return MQARSettings(mechanisms=tuple(mechanisms), seed=seed, progress=False, **QUICK)


def compare(mechanisms: Sequence[str], *, quick: bool = True, seed: int = 0) -> list[dict]:
    """Train each mechanism on one MQAR task and return its row (accuracy, state size, ...).

    ``quick=True``: ``quick_settings`` (about a minute for softmax, lightning and based_linear on two CPU
    cores); ``quick=False``: the default sweep of ``MQARSettings`` for those mechanisms.
    """
    settings = (quick_settings(mechanisms, seed) if quick
                else MQARSettings(mechanisms=tuple(mechanisms), seed=seed, progress=False))
    return sweep(settings)


def table(rows: Sequence[dict]) -> str:
    """Markdown: one row per (mechanism, d_model) with its state size, one accuracy column per pair count."""
    pairs = sorted({r["num_kv_pairs"] for r in rows})
    by_key = {(r["mechanism"], r["d_model"], r["num_kv_pairs"]): r for r in rows}
    lines = []
    for mechanism, d_model in dict.fromkeys((r["mechanism"], r["d_model"]) for r in rows):
        row = by_key[mechanism, d_model, pairs[0]]
        state = "?" if row["state_size"] is None else f"{row['state_size']:,}"
        lines.append([mechanism, d_model, state, f"{row['params']:,}"]
                     + [f"{by_key[mechanism, d_model, n]['accuracy']:.3f}" if (mechanism, d_model, n) in by_key
                        else "" for n in pairs])
    return markdown_table(["mechanism", "d_model", "state floats", "params"] + [f"N={n}" for n in pairs], lines)
