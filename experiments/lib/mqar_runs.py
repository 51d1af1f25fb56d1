"""MQAR runs: train a small language model per (model, d_model) on mixed pair counts, score it per pair count.

``sweep`` is the study of ``python -m experiments.mqar``; ``compare`` one small task per mechanism, for the
main job. A model is a registry mechanism (through ``MultiHeadAttention``), a causal ``attnjax.nn.LAYERS``
layer (``ModelConfig(mixer="layer:<name>")``; the memory layers, Titans, RAT, live there) or an
``attnjax.nn.BLOCKS`` block; ``candidates`` lists every registered one with its family and, where it cannot
train on MQAR, why. ``state_size`` is the x-axis of Zoology (Arora et al. 2023, Fig. 2/3): the floats a model
keeps per sequence to decode the next token, read from its ``init_cache``.

Zoology trains each model on a mixture of MQAR configurations and reports accuracy per configuration;
``run_one`` does the same: every batch mixes the pair counts of ``MQARSettings.kv_pairs`` in equal parts
(one sequence length), and the test set scores each pair count on its own.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from attnjax import registry
from attnjax.nn import BLOCKS
from attnjax.nn.registry import modules
from experiments.lib.model import LAYER_PREFIX, LanguageModel, ModelConfig, num_params
from experiments.lib.mqar_data import MQARConfig, mqar_batch
from experiments.lib.report import markdown_table
from experiments.lib.training import Batch, TrainConfig, evaluate, train

FAMILIES = ("softmax-like", "linear / recurrent", "sparse / local", "memory", "conv / hybrid")
"""The plot's panels: how a model mixes tokens (a label for the figure, not a registry field)."""

REGISTRY_FAMILIES = {"softmax": "softmax-like", "relative": "softmax-like", "linear": "linear / recurrent",
                     "sparse": "sparse / local", "local": "sparse / local", "vision": "sparse / local"}
"""``FAMILIES`` entry of each ``attnjax.registry`` family."""

MODULE_FAMILIES = {
    "layer:transnormer": "linear / recurrent", "layer:based": "linear / recurrent", "layer:flow": "linear / recurrent",
    "layer:kernelized_rpe": "linear / recurrent", "layer:aaren": "linear / recurrent",
    "layer:sliding_window": "sparse / local", "layer:sparse_gin": "sparse / local",
    "layer:routed_sparse": "sparse / local", "layer:routing": "sparse / local", "layer:dynamic_mask": "sparse / local",
    "layer:spt": "sparse / local", "layer:sparsifiner": "sparse / local", "layer:smha_hierarchical": "sparse / local",
    "layer:selective_lookups": "sparse / local",
    "layer:base_conv": "conv / hybrid", "block:baseconv": "conv / hybrid", "block:zoology_hybrid": "conv / hybrid",
    "block:zoology_selective": "conv / hybrid",
    "block:based": "conv / hybrid", "block:transnormer": "linear / recurrent",
}
"""``FAMILIES`` entry of the layers and blocks outside ``attnjax.nn.memory`` (which are "memory") that are not
softmax-like (the rest)."""


OPTIONS = {"sparse_window": {"block_q": 8, "block_kv": 8, "window_blocks": 1},
           **{name: {"chunk_size": 8} for name in ("neural_memory", "titans_mac", "titans_mag", "titans_mal")}}
"""Default options per model name: ``sparse_window`` in blocks of 8 tokens reaching one block back (its
default 64-token blocks would make it dense attention at T = 32); the Titans memories update once per chunk
of 8 tokens (the paper's mini-batch gradient descent, Behrouz et al. 2024, Sec. 3.2) rather than per token,
8x fewer scan steps."""


@dataclasses.dataclass(frozen=True)
class MQARSettings:
    """A sweep over models × widths, each trained on a mixture of pair counts, and how it is built and trained.

    ``mechanisms``: registry names or ``attnjax.nn.BLOCKS`` names; a registry mechanism may be given as
    ``name:head_dim`` (e.g. ``based_linear:8``); heads = d_model / head_dim. ``layers``: causal
    ``attnjax.nn.LAYERS`` names. ``kv_pairs``: the pair counts mixed in every training batch (equal parts) and
    scored one by one on ``test_examples`` held-out sequences each. ``mlp_ratio=0``: no MLP (Zoology's MQAR
    models). ``short_conv``: causal conv kernel before each block. ``options``: per model name (a
    mechanism's without ``:head_dim``), keyword arguments of its registry config or of its layer's or block's
    constructor (``OPTIONS`` by default). The defaults are the CPU study of
    ``python -m experiments.mqar``: a model of each family but memory (whose layers train 5-20x slower per
    step on CPU; ``--layers neural_memory,rat`` adds them).
    """

    mechanisms: Sequence[str] = ("softmax", "lightning", "based_linear:8", "sparse_window", "baseconv")
    layers: Sequence[str] = ()
    d_models: Sequence[int] = (64,)
    kv_pairs: Sequence[int] = (2, 4, 8)
    seq_len: int = 32
    vocab_size: int = 128
    power_a: float = 0.01
    random_non_queries: bool = False
    num_layers: int = 2
    head_dim: int = 16
    mlp_ratio: int = 0
    short_conv: int = 3
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=lambda: dict(OPTIONS))
    steps: int = 200
    batch_size: int = 48
    lr: float = 1e-2
    warmup_steps: int = 20
    weight_decay: float = 0.1
    test_examples: int = 128
    seed: int = 0
    progress: bool = True


QUICK = dict(layers=(), d_models=(64,), kv_pairs=(8,), seq_len=32, steps=200, batch_size=64, warmup_steps=20,
             test_examples=256)
"""The ``compare(quick=True)`` setting: one width, one pair count, a short run."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A registered model: ``kind`` ("mechanism", "layer" or "block"), ``name``, ``family`` (``FAMILIES``) and
    ``skip``: why it cannot train on MQAR (``None`` when it can)."""

    kind: str
    name: str
    family: str
    skip: Optional[str] = None

    @property
    def label(self) -> str:
        """``"softmax"`` for a mechanism, ``"layer:titans_mac"`` / ``"block:baseconv"`` otherwise."""
        return self.name if self.kind == "mechanism" else f"{self.kind}:{self.name}"


def candidates() -> list[Candidate]:
    """Every registered mechanism, layer and block, in registry order, each with its family and skip reason.

    A registry mechanism that takes no mask has no causal form (the model needs ``mask=Causal()``); a layer
    whose ``ModuleSpec.causal`` is false may read later tokens, so it could read the answers.
    """
    rows = [Candidate("mechanism", e.name, REGISTRY_FAMILIES.get(e.family, "softmax-like"),
                      None if "mask" in e.supports else f"takes no mask, so no causal form (family {e.family})")
            for e in registry.entries()]
    for kind in ("layer", "block"):
        for spec in modules(kind):
            family = ("memory" if spec.module.__module__.startswith("attnjax.nn.memory")
                      else MODULE_FAMILIES.get(f"{kind}:{spec.name}", "softmax-like"))
            rows.append(Candidate(kind, spec.name, family,
                                  None if spec.causal else "not causal (ModuleSpec.causal is False)"))
    return rows


def models(settings: MQARSettings) -> list[Candidate]:
    """The ``Candidate`` of each of ``settings.mechanisms`` (registry or block names) and ``settings.layers``, in
    that order (a mechanism's ``:head_dim`` suffix is kept in its ``name``); ``ValueError`` for an unknown name."""
    known = {(c.kind, c.name): c for c in candidates()}
    out = []
    for spec in settings.mechanisms:
        name = parse_mechanism(spec)[0]
        kind = "block" if name in BLOCKS else "mechanism"
        if (kind, name) not in known:
            raise ValueError(f"unknown mechanism {name!r}; known: {sorted(n for k, n in known if k != 'layer')}")
        out.append(dataclasses.replace(known[kind, name], name=spec if kind == "mechanism" else name))
    for name in settings.layers:
        if ("layer", name) not in known:
            raise ValueError(f"unknown layer {name!r}; known: {sorted(n for k, n in known if k == 'layer')}")
        out.append(known["layer", name])
    return out


def parse_mechanism(spec: str) -> tuple[str, Optional[int]]:
    """``"based_linear:8"`` -> ``("based_linear", 8)``; ``"softmax"`` -> ``("softmax", None)`` (default head_dim)."""
    name, _, head_dim = spec.partition(":")
    return name, int(head_dim) if head_dim else None


def build(settings: MQARSettings, model: Candidate, d_model: int) -> LanguageModel:
    """The ``LanguageModel`` of ``model`` at width ``d_model`` (a layer as ``mixer="layer:<name>"``), heads =
    d_model / head_dim. A block's constructor arguments without a default (besides width, heads and ``rngs``)
    come from its registry example (``GraphMoEBlock``'s ``num_experts``), as ``model.layer_kwargs`` does for
    layers; ``settings.options`` win."""
    name, head_dim = parse_mechanism(model.name) if model.kind == "mechanism" else (model.name, None)
    head_dim = head_dim or settings.head_dim
    options = dict(settings.options.get(name, {}))
    if model.kind == "block":
        spec = next(s for s in modules("block") if s.name == name)
        params = list(inspect.signature(spec.module.__init__).parameters.values())[3:]
        options = {**{p.name: spec.kwargs[p.name] for p in params if p.default is inspect.Parameter.empty
                      and p.name != "rngs" and p.name in spec.kwargs}, **options}
    config = ModelConfig(vocab_size=settings.vocab_size, mixer=LAYER_PREFIX + name if model.kind == "layer" else name,
                         d_model=d_model, num_layers=settings.num_layers, num_heads=max(d_model // head_dim, 1),
                         head_dim=head_dim if model.kind != "block" else None, mlp_ratio=settings.mlp_ratio,
                         short_conv=settings.short_conv,
                         mixer_options=options)
    return LanguageModel(config, rngs=nnx.Rngs(settings.seed))


def _floats(tree) -> int:
    """Floats in the array leaves of ``tree`` (complex leaves count two); integer leaves (lengths, positions)
    and scalars are not state."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if leaf.ndim and jnp.issubdtype(leaf.dtype, jnp.inexact):
            total += int(np.prod(leaf.shape)) * (2 if jnp.issubdtype(leaf.dtype, jnp.complexfloating) else 1)
    return total


def state_size(model: LanguageModel, seq_len: int) -> tuple[Optional[int], str]:
    """Floats per sequence the model keeps to decode token ``seq_len + 1``, summed over its blocks, and how.

    The rule: each block's token mixer (the block itself where it has ``init_cache``, else the ``LayerBlock``'s
    layer) gives ``init_cache(1, seq_len)``; its floating array leaves are counted (integer leaves such as
    lengths are bookkeeping, scalars too; a complex float counts two). This is Zoology's (Arora et al. 2023,
    Fig. 2/3) x-axis: ``2·T·H_kv·D`` per block for a softmax KV cache, the fixed ``H·D_k'·D_v`` of a
    linear-attention state, whatever a memory module carries. The short convolutions before the blocks
    (``(k − 1)·d_model`` each, the same for every model) are not counted. How: ``"cache"``; ``"kv"`` for a
    registry mechanism outside the linear family that cannot decode (``init_cache`` raises
    ``NotImplementedError``), which is given its keys and values, ``2·T·H_kv·D`` per block, the least a decoder
    of it keeps; ``"none"`` (size ``None``) for any other module without a cache, or whose ``init_cache``
    refuses these shapes (``ValueError``/``TypeError``).
    """
    total, how = 0, "cache"
    for block in model.blocks:
        mixer = block if hasattr(block, "init_cache") else getattr(block, "mixer", None)
        if mixer is None or not hasattr(mixer, "init_cache"):
            return None, "none"
        try:
            total += _floats(jax.eval_shape(lambda: mixer.init_cache(1, seq_len)))
        except NotImplementedError:
            attention = getattr(mixer, "attention", None)
            if attention is None or attention.mechanism.family == "linear":
                return None, "none"
            total += 2 * seq_len * attention.num_kv_heads * attention.head_dim
            how = "kv"
        except (ValueError, TypeError):
            return None, "none"
    return total, how


def mixed_batch(settings: MQARSettings, batch_size: int, seed: Sequence[int]) -> Batch:
    """``batch_size`` MQAR sequences of length ``settings.seq_len``: equal parts for each pair count of
    ``settings.kv_pairs`` (the remainder goes to the first ones), in that order."""
    counts = [batch_size // len(settings.kv_pairs) + (i < batch_size % len(settings.kv_pairs))
              for i in range(len(settings.kv_pairs))]
    parts = [mqar_batch(task(settings, n), c, (*seed, n)) for n, c in zip(settings.kv_pairs, counts) if c]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def task(settings: MQARSettings, num_kv_pairs: int) -> MQARConfig:
    """The MQAR task of ``settings`` with ``num_kv_pairs`` pairs."""
    return MQARConfig(vocab_size=settings.vocab_size, seq_len=settings.seq_len, num_kv_pairs=num_kv_pairs,
                      power_a=settings.power_a, random_non_queries=settings.random_non_queries)


def run_one(settings: MQARSettings, model: Candidate, d_model: int) -> list[dict]:
    """Train one model on the mixed task and return one row per pair count (test accuracy on the answers).

    Each row has the model's ``state_size`` at ``T`` and ``state_grows``: whether it is larger at ``2T`` (a KV
    cache) rather than fixed (a recurrent state)."""
    lm = build(settings, model, d_model)
    size, how = state_size(lm, settings.seq_len)
    grows = size is not None and (state_size(lm, 2 * settings.seq_len)[0] or 0) > size
    train_config = TrainConfig(steps=settings.steps, learning_rate=settings.lr, warmup_steps=settings.warmup_steps,
                               weight_decay=settings.weight_decay, log_every=max(settings.steps // 10, 1))
    start = time.perf_counter()
    history = train(lm, lambda step: mixed_batch(settings, settings.batch_size, (settings.seed, 0, step)),
                    train_config, desc=f"{model.label} d={d_model}", progress=settings.progress)
    seconds = time.perf_counter() - start
    rows = []
    for n in settings.kv_pairs:
        test = mqar_batch(task(settings, n), settings.test_examples, (settings.seed, 1, n))
        result = evaluate(lm, [(test[0][i:i + 256], test[1][i:i + 256]) for i in range(0, settings.test_examples, 256)])
        rows.append({"mechanism": model.label, "kind": model.kind, "family": model.family, "d_model": d_model,
                     "num_kv_pairs": n, "num_heads": max(d_model // (parse_mechanism(model.name)[1]
                                                                     or settings.head_dim), 1),
                     "accuracy": result["accuracy"], "test_loss": result["loss"], "state_size": size,
                     "state_rule": how, "state_grows": grows, "params": num_params(lm), "train_seconds": seconds,
                     "final_train_loss": history[-1]["loss"], "history": history})
    return rows


def sweep(settings: MQARSettings, *, skipped: Optional[list] = None) -> list[dict]:
    """``run_one`` over the models of ``settings`` × ``d_models``, in that order.

    A model that raises while it is built, trained or scored (a request its mechanism cannot serve at these
    shapes, a module that updates non-parameter state in its forward, which the shared training loop does not
    carry) is left out, so that ``--all`` gets through every model; with ``skipped`` (a list), a dict
    ``{"mechanism", "family", "d_model", "reason"}`` (the exception's type and message) is appended for each.
    """
    grid = list(itertools.product(models(settings), settings.d_models))
    rows = []
    for model, d_model in tqdm(grid, desc="mqar", disable=not settings.progress, dynamic_ncols=True):
        try:
            rows += run_one(settings, model, d_model)
        except Exception as error:  # noqa: BLE001 - recorded with its type and message, as the docstring says
            reason = f"{type(error).__name__}: {' '.join(str(error).split())[:160]}"
            if skipped is not None:
                skipped.append({"mechanism": model.label, "family": model.family, "d_model": d_model,
                                "reason": reason})
            if settings.progress:
                tqdm.write(f"{model.label} d_model={d_model}: skipped ({reason})")
            continue
        if settings.progress:
            tqdm.write(f"{model.label} d_model={d_model}: accuracy "
                       + ", ".join(f"N={r['num_kv_pairs']} {r['accuracy']:.3f}" for r in rows[-len(settings.kv_pairs):])
                       + f" ({rows[-1]['train_seconds']:.0f} s)")
    return rows


def quick_settings(mechanisms: Sequence[str], seed: int = 0) -> MQARSettings:
    """``QUICK`` for ``mechanisms``, without progress bars (d_model 64, 8 pairs, T = 32, 200 steps of batch 64)."""
    return MQARSettings(mechanisms=tuple(mechanisms), seed=seed, progress=False, **QUICK)


def compare(mechanisms: Sequence[str], *, quick: bool = True, seed: int = 0) -> list[dict]:
    """Train each mechanism on one MQAR task and return its row (accuracy, state size, ...).

    ``quick=True``: ``quick_settings`` (about a minute for softmax, lightning and based_linear on two CPU
    cores); ``quick=False``: the default study of ``MQARSettings`` for those mechanisms (no layers).
    """
    settings = (quick_settings(mechanisms, seed) if quick
                else MQARSettings(mechanisms=tuple(mechanisms), layers=(), seed=seed, progress=False))
    return sweep(settings)


def table(rows: Sequence[dict]) -> str:
    """Markdown: one row per (model, d_model) with its family, state size, one accuracy column per pair count.

    A state size marked ``kv`` is the keys-and-values bound of ``state_size`` (the mechanism has no decode).
    """
    pairs = sorted({r["num_kv_pairs"] for r in rows})
    by_key = {(r["mechanism"], r["d_model"], r["num_kv_pairs"]): r for r in rows}
    lines = []
    for mechanism, d_model in dict.fromkeys((r["mechanism"], r["d_model"]) for r in rows):
        row = next(r for r in rows if (r["mechanism"], r["d_model"]) == (mechanism, d_model))
        state = "?" if row["state_size"] is None else f"{row['state_size']:,}"
        state += " (kv)" if row.get("state_rule") == "kv" else ""
        lines.append([mechanism, row.get("family", ""), d_model, state, f"{row['params']:,}"]
                     + [f"{by_key[mechanism, d_model, n]['accuracy']:.3f}" if (mechanism, d_model, n) in by_key
                        else "" for n in pairs] + [f"{row['train_seconds']:.0f}"])
    return markdown_table(["model", "family", "d_model", "state floats", "params"] + [f"N={n}" for n in pairs]
                          + ["train s"], lines)
