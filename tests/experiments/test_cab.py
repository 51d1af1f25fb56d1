"""The CAB pattern harness: claims, verdicts, the causality test and the efficiency sweep at tiny sizes."""

import dataclasses
import json
from typing import ClassVar

import jax.numpy as jnp
import pytest

from attnjax import registry
from attnjax.softmax.softmax import softmax_attention_reference
from experiments import cab
from experiments.lib import cab_efficiency, cab_patterns, cli

TINY = ["--check-len", "24", "--cross-len", "40", "--heads", "2", "--head-dim", "16", "--repeats", "1"]


def test_cab_runs_softmax_and_lightning_and_their_claims_hold(tmp_path):
    data = cab.main(["--mechanisms", "softmax,lightning", "--seq-lens", "64", *TINY, "--out", str(tmp_path),
                     "--name", "tiny"])
    assert json.loads((tmp_path / "tiny.json").read_text())["failures"] == data["failures"] == []
    softmax, lightning = data["mechanisms"]["softmax"], data["mechanisms"]["lightning"]
    assert {p: r["status"] for p, r in softmax["patterns"].items()} == dict.fromkeys(cab_patterns.PATTERN_BY_NAME, "ok")
    assert all(r["claimed"] for r in softmax["patterns"].values())
    # Lightning's ALiBi decay needs a causal mask: it declines noncausal inputs, which the registry can't say.
    assert lightning["causal_only"] and not softmax["causal_only"]
    assert {p: r["status"] for p, r in lightning["patterns"].items()} == {
        "noncausal_self": "unsupported", "causal_self": "ok", "noncausal_cross": "unsupported", "causal_cross": "ok"}
    cc = lightning["patterns"]["causal_cross"]
    assert (cc["T"], cc["S"]) == (24, 40) and cc["implementations"]["xla"]["max_rel_err"] < 1e-4
    assert softmax["patterns"]["noncausal_self"]["ignores_later_keys"] is False
    assert softmax["efficiency"]["causal_self"] == {"skipped": "the baseline itself", "implementation": "xla"}
    eff = lightning["efficiency"]["causal_self"]
    assert eff["implementation"] == "xla" and [p["T"] for p in eff["points"]][0] == 64
    assert all(p["memory_ratio"] > 0 and "time_ratio" in p for p in eff["points"])
    assert "noncausal_self" in lightning["efficiency"] and "skipped" in lightning["efficiency"]["noncausal_self"]
    md = (tmp_path / "tiny.md").read_text()
    assert "| lightning" in md and "causal-only" in md and "Host load average" in md


@dataclasses.dataclass(frozen=True)
class _Leaky:
    """Claims masks but ignores them: causal patterns must catch the leak. Not registered."""

    name: ClassVar[str] = "leaky"
    family: ClassVar[str] = "test"
    paper: ClassVar[str] = "none"
    supports: ClassVar[frozenset] = frozenset({"mask"})

    def implementations(self):
        def reference(q, k, v, *, mask=None, **_):
            return softmax_attention_reference(q, k, v)
        return {"reference": reference}


def _entry(config: type) -> registry.Entry:
    return registry.Entry(name=config.name, family=config.family, paper=config.paper, config=config,
                          implementations=tuple(config().implementations()), supports=config.supports)


def test_a_mechanism_that_ignores_the_causal_mask_fails_and_unclaimed_cross_is_unsupported():
    settings = cli.settings_from(cab_patterns.CABSettings, cab.parse_args(TINY))
    result = cab_patterns.check_entry(_entry(_Leaky), settings)
    statuses = {p: r["status"] for p, r in result["patterns"].items()}
    assert statuses == {"noncausal_self": "ok", "noncausal_cross": "unsupported", "causal_self": "FAIL",
                        "causal_cross": "unsupported"}
    assert "causality leak" in result["patterns"]["causal_self"]["reason"]
    assert "not claimed" in result["patterns"]["noncausal_cross"]["reason"]
    assert cab_patterns.failures({"leaky": result}) == ["leaky/causal_self"]


def _run(claimed, **outcomes):
    return {"claimed": claimed, "implementations": {i: {"outcome": o, "error": f"{o}!"} for i, o in outcomes.items()}}


@pytest.mark.parametrize("run, causal_only, expected", [
    (_run(True, reference="ok", xla="ok"), False, "ok"),
    (_run(True, reference="ok", recurrent="declined"), False, "ok"),
    (_run(True, reference="declined"), False, "FAIL"),
    (_run(True, reference="declined"), True, "unsupported"),
    (_run(False, reference="declined"), False, "unsupported"),
    (_run(False, reference="rejected"), False, "unsupported"),
    (_run(False, reference="ok"), False, "FAIL"),
    (_run(True, reference="ok", xla="rejected"), False, "FAIL"),
    (_run(True, reference="ok", xla="error"), False, "FAIL"),
])
def test_verdict_rules(run, causal_only, expected):
    assert cab_patterns.verdict(run, cab_patterns.PATTERN_BY_NAME["noncausal_self"], causal_only)[0] == expected


def test_patterns_and_future_split():
    assert [p.short for p in cab_patterns.parse_patterns("ns,causal_cross")] == ["NS", "CC"]
    assert cab_patterns.PATTERN_BY_NAME["causal_cross"].needs == {"mask", "cross"}
    assert cab_patterns.PATTERN_BY_NAME["noncausal_self"].needs == frozenset()
    assert cab_patterns.future_split(8, 8) == (4, 5)  # query 4 sees keys 0..4
    assert cab_patterns.future_split(2, 2) is None  # query 1 sees every key
    assert cab_patterns.future_split(4, 10) == (2, 9)  # bottom-right: query 2 sits at key position 8
    assert cab_patterns.future_split(8, 4) == (4, 1)  # queries 0..3 see no key at all, query 4 only key 0
    with pytest.raises(Exception):
        cab_patterns.parse_patterns("diagonal")


def test_attempt_records_instead_of_raising():
    q = k = v = jnp.ones((1, 4, 1, 2))

    def declines(q, k, v):
        raise NotImplementedError("nope")

    def crashes(q, k, v):
        raise RuntimeError("boom")

    assert cab_patterns.attempt(declines, q, k, v) == (None, {"outcome": "declined",
                                                              "error": "NotImplementedError: nope"})
    assert cab_patterns.attempt(crashes, q, k, v)[1]["outcome"] == "error"
    assert cab_patterns.attempt(lambda q, k, v: q[:, :2], q, k, v)[1]["error"].startswith("output shape")


def test_efficiency_length_is_where_the_mechanism_stays_ahead():
    points = [{"T": 256, "r": 0.9}, {"T": 512, "r": 1.2}, {"T": 1024, "r": 0.8}, {"T": 2048, "r": 0.5}, {"T": 4096}]
    assert cab_efficiency.stays_ahead_from(points, "r") == 1024  # the win at 256 alone does not count
    assert cab_efficiency.stays_ahead_from(points[:2], "r") is None  # behind at the longest T measured
    assert cab_efficiency.stays_ahead_from([], "r") is None
