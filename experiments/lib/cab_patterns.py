"""CAB's four attention patterns, and whether each mechanism serves the ones the registry claims.

CAB (Zhang et al., "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling", ICML 2023)
sorts attention into four patterns, {noncausal, causal} x {self, cross}: noncausal self (NS),
causal self (CS), noncausal cross (NC, ``T != S``) and causal cross (CC, ``T != S``, bottom-right
aligned as everywhere in attnjax). For a registry entry, ``check_entry``

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
   the keys they cannot see change).

Every cell is handled on its own: a mechanism that raises is recorded with the reason and the
table goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import masks, registry
from experiments.lib.accuracy import TOLERANCE, relative_error
from experiments.lib.outcomes import DECLINED, REJECTED, error_text
from experiments.lib.report import markdown_table
from experiments.lib.workload import host_random_qkv

CAUSALITY_TOLERANCE = 1e-5
"""Relative change of earlier outputs above which a perturbation of later keys counts as seen."""


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


@dataclasses.dataclass(frozen=True)
class CABSettings:
    """Sizes of a CAB run; the defaults are the CPU run kept in ``experiments/results``.

    Pattern checks: ``batch``, ``heads``, ``head_dim``, query length ``check_len``, key length
    ``cross_len`` in the cross patterns, Pallas implementations only ``with_pallas``. Efficiency
    lengths (``experiments.lib.cab_efficiency``): candidate ``seq_lens`` (ascending) in each of
    ``efficiency_patterns``, ``S = T · cross_ratio`` in cross patterns, ``mode`` timed, ``repeats``
    interleaved runs stopped after ``max_seconds``, timing only while a predicted single run fits
    ``time_budget_s``. ``mechanisms``: registry names (None: all).
    """

    mechanisms: Optional[Sequence[str]] = None
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    check_len: int = 48
    cross_len: int = 80
    seq_lens: Sequence[int] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    efficiency_patterns: Sequence[Pattern] = (PATTERN_BY_NAME["noncausal_self"], PATTERN_BY_NAME["causal_self"])
    cross_ratio: float = 0.5
    mode: str = "fwd"
    repeats: int = 3
    max_seconds: float = 5.0
    time_budget_s: float = 3.0
    with_pallas: bool = False

    def as_dict(self) -> dict:
        """JSON-ready: the fields, with the efficiency patterns by name."""
        return dict(dataclasses.asdict(self), efficiency_patterns=[p.name for p in self.efficiency_patterns])


def attention_fn(config, pattern: Pattern, implementation: str) -> Callable:
    """``(q, k, v) -> out`` of one mechanism config and implementation in one pattern."""
    mask = pattern.mask()
    return lambda q, k, v: attnjax.attention(q, k, v, mechanism=config, mask=mask, implementation=implementation)


def checked_implementations(entry: registry.Entry, with_pallas: bool) -> tuple:
    """The implementations run in the pattern checks (Pallas only when asked)."""
    return tuple(i for i in entry.implementations if with_pallas or i != "pallas")


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
    return relative_error(perturbed[:, :c + 1], out[:, :c + 1]) > CAUSALITY_TOLERANCE


def run_pattern(entry: registry.Entry, pattern: Pattern, settings: CABSettings) -> dict:
    """Every checked implementation of one mechanism in one pattern, compared with the reference.

    In causal patterns every implementation that runs is also checked for a causality leak
    (``sees_future``); in noncausal ones the reference is checked for ignoring later keys.
    """
    kv_len = settings.cross_len if pattern.cross else settings.check_len
    q, k, v = host_random_qkv(0, settings.batch, settings.check_len, settings.heads, settings.head_dim,
                              kv_len=kv_len)
    config = entry.config()
    outputs, results, ignores_later_keys = {}, {}, None
    for impl in checked_implementations(entry, settings.with_pallas):
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
        err = relative_error(out, reference)
        results[impl]["max_rel_err"] = err
        if err > TOLERANCE["float32"]:
            results[impl].update(outcome="error", error=f"differs from the reference: max rel err {err:.2e}")
    return {"T": settings.check_len, "S": kv_len, "claimed": pattern.needs <= entry.supports,
            "ignores_later_keys": ignores_later_keys, "implementations": results}


def with_outcome(results: dict, outcome: str) -> list[str]:
    """The implementations whose result in one pattern has this ``outcome`` (``ok``, ``declined``, ...)."""
    return [i for i, r in results.items() if r["outcome"] == outcome]


def causal_only(runs: dict) -> bool:
    """Declines noncausal self with ``NotImplementedError`` everywhere, yet runs causal self."""
    ns, cs = runs["noncausal_self"]["implementations"], runs["causal_self"]["implementations"]
    return bool(ns) and len(with_outcome(ns, "declined")) == len(ns) and bool(with_outcome(cs, "ok"))


def verdict(run: dict, pattern: Pattern, is_causal_only: bool) -> tuple[str, str]:
    """``(status, reason)``: status ``ok``, ``unsupported`` (as declared) or ``FAIL``."""
    impls = run["implementations"]
    ran, errors, rejected = with_outcome(impls, "ok"), with_outcome(impls, "error"), with_outcome(impls, "rejected")
    if errors:
        return "FAIL", "; ".join(f"{i}: {impls[i]['error']}" for i in errors)
    if ran and rejected:
        return "FAIL", "; ".join(f"{i} raised {impls[i]['error']} where {ran[0]} runs" for i in rejected)
    first_refusal = next((impls[i]["error"] for i in impls if i not in ran), "")
    if ran:
        if not run["claimed"]:
            return "FAIL", f"runs ({', '.join(ran)}) although the registry does not claim {sorted(pattern.needs)}"
        declined = with_outcome(impls, "declined")
        return "ok", f"{', '.join(declined)} declined" if declined else ""
    if not run["claimed"]:
        return "unsupported", f"not claimed (needs {sorted(pattern.needs)}); {first_refusal}"
    if is_causal_only and not pattern.causal:
        return "unsupported", f"causal-only (found by running; the registry cannot say so); {first_refusal}"
    return "FAIL", f"claimed but no implementation ran: {first_refusal}"


def check_entry(entry: registry.Entry, settings: CABSettings) -> dict:
    """The four patterns of one mechanism: claims, per-implementation outcomes and verdicts."""
    runs = {p.name: run_pattern(entry, p, settings) for p in PATTERNS}
    only_causal = causal_only(runs)
    for p in PATTERNS:
        status, reason = verdict(runs[p.name], p, only_causal)
        if status == "ok" and runs[p.name]["ignores_later_keys"]:
            reason = "; ".join(filter(None, [reason, "ignores later keys without a mask: acts causal"]))
        runs[p.name].update(status=status, reason=reason)
    return {"family": entry.family, "paper": entry.paper, "supports": sorted(entry.supports),
            "causal_only": only_causal, "patterns": runs}


def failures(results: dict) -> list[str]:
    """``mechanism/pattern`` of every pattern whose claim did not hold."""
    return [f"{name}/{p}" for name, r in results.items() for p, run in r["patterns"].items() if run["status"] == "FAIL"]


def _pattern_cell(run: dict) -> str:
    status = run["status"]
    if status == "ok":
        errs = [r["max_rel_err"] for r in run["implementations"].values() if "max_rel_err" in r]
        ran = with_outcome(run["implementations"], "ok")
        causal = ", acts causal" if run["ignores_later_keys"] else ""
        return f"ok ({len(ran)} impl{'s' * (len(ran) > 1)}" + (f", err {max(errs):.0e}" if errs else "") + causal + ")"
    if status == "unsupported":
        return "causal-only" if run["reason"].startswith("causal-only") else "unsupported"
    return status


def pattern_table(results: dict) -> str:
    """One row per mechanism: claimed patterns, then the verdict of each pattern."""
    rows = [[name, r["family"], " ".join(p.short for p in PATTERNS if r["patterns"][p.name]["claimed"]),
             *(_pattern_cell(r["patterns"][p.name]) for p in PATTERNS)] for name, r in results.items()]
    return markdown_table(["mechanism", "family", "claims", *(f"{p.short} ({p.name})" for p in PATTERNS)], rows)
