"""Registry conformance: every mechanism × implementation against its reference (``attnjax.testing.conformance``).

Generated from ``attnjax.registry.entries()``: a registered mechanism gets these tests without
writing any. Each fast path is compared with the reference, output and gradients (q, k, v, bias,
sinks), on odd lengths with tiles of 8, on the cases its ``supports`` claims; under jit; in bfloat16
(finite, bfloat16 out) and under vmap. A path that refuses a request (``NotImplementedError``, which
"auto" falls back on) or a request the reference does not define is a skip that says why. The
one-case-per-option sweep is ``slow``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import pytest

from attnjax import registry
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.softmax.softmax import Softmax, softmax_attention_reference
from attnjax.sparse import BlockSelector
from attnjax.testing import conformance

ENTRIES = {e.name: e for e in registry.entries()}

# At these lengths (T ≈ 21, tiles of 8) most block selectors' defaults list every allowed block; the
# rule behind that warning is tested in tests/sparse/test_dense_selection.py.
pytestmark = pytest.mark.filterwarnings("ignore::attnjax.sparse.DenseSelectionWarning")


def _config(name: str):
    return conformance.small_tiles(ENTRIES[name].config())


def _params(case_fn, implementations=None):
    return [pytest.param(e.name, impl, case.name, id=f"{e.name}-{impl}-{case.name}", marks=_marks(e, impl, case.name))
            for e in ENTRIES.values() for impl in e.implementations
            if impl != "reference" and (implementations is None or impl in implementations)
            for case in case_fn(e.config())]


PALLAS_BLOCK_SELECTORS = ("sparse_window", "moba")
"""Block selectors whose ``pallas`` path the default suite runs: every block selector's pallas path is
the one kernel ``pallas_kernels.block_sparse`` (tested on its own in tests/kernels/test_block_sparse.py)
on the selector's lists, which its ``xla`` path already checks; one static and one content-based
selector keep the kernel-on-selected-lists wiring covered, the others run in the slow suite."""


SCORE_OPTIONS = ("bias", "logits_soft_cap", "sinks", "return_lse")
"""What ``claimed`` adds to ``core`` (``conformance.cases``)."""


def _marks(entry, implementation: str, case: str) -> tuple:
    """``plain`` (no option) is ``slow`` where the mechanism takes masks: its ``core`` and ``claimed`` cases run
    the same path with a causal mask (and GQA, cross lengths where claimed), so the default suite keeps those.
    ``core`` is ``slow`` for the ``xla`` path of a mechanism whose ``claimed`` case adds score options: ``claimed``
    is ``core`` plus those options, and a mechanism's ``xla`` path serves what the mechanism claims (``core`` stays
    for the other paths, which may refuse an option and skip ``claimed``).
    Block selectors outside ``PALLAS_BLOCK_SELECTORS`` run here in the slow suite only: every block selector is the
    block-sparse engine on its lists, and each selector's own tests check its lists against a brute force of its
    rule and the engine against the dense reference. Every ``pallas`` path's
    ``core`` case is ``slow`` (interpret mode on CPU; the kernels' own tests in tests/kernels run their masks and
    options, and ``claimed`` runs here)."""
    if case == "plain" and "mask" in entry.supports:
        return (pytest.mark.slow,)
    if issubclass(entry.config, BlockSelector) and entry.name not in PALLAS_BLOCK_SELECTORS:
        return (pytest.mark.slow,)
    if case == "core" and implementation == "xla" and set(SCORE_OPTIONS) & set(entry.supports):
        return (pytest.mark.slow,)
    if implementation == "pallas" and (case == "core" or (issubclass(entry.config, BlockSelector)
                                                          and entry.name not in PALLAS_BLOCK_SELECTORS)):
        return (pytest.mark.slow,)
    return ()


def _case(config, name: str, case_fn=conformance.cases) -> conformance.Case:
    return next(c for c in case_fn(config) if c.name == name)


def _run(check, *args):
    try:
        check(*args)
    except conformance.CaseNotDefined as e:
        pytest.skip(f"not defined by the reference: {e}")
    except NotImplementedError as e:
        pytest.skip(f"this path refuses the request (auto falls back): {e}")


@pytest.mark.parametrize("name,implementation,case", _params(conformance.cases))
def test_matches_reference(name, implementation, case):
    config = _config(name)
    _run(conformance.check_against_reference, config, implementation, _case(config, case))


@pytest.mark.slow
@pytest.mark.parametrize("name,implementation,case", _params(conformance.option_cases))
def test_matches_reference_per_option(name, implementation, case):
    config = _config(name)
    _run(conformance.check_against_reference, config, implementation,
         _case(config, case, conformance.option_cases))


@pytest.mark.parametrize("name", list(ENTRIES))
@pytest.mark.parametrize("implementation", ["xla", pytest.param("reference", marks=pytest.mark.slow)])
def test_bfloat16_finite(name, implementation):
    if implementation not in ENTRIES[name].implementations:
        pytest.skip(f"{name} has no {implementation} path")
    config = _config(name)
    _run(conformance.check_bf16, config, implementation, _case(config, "claimed"))


FAMILY_FIRSTS = {next(e.name for e in ENTRIES.values() if e.family == family)
                 for family in {e.family for e in ENTRIES.values()}}
"""The first registered mechanism of each family: ``test_vmap`` (jax's batching of a mechanism's code, which
uses no per-mechanism batching rule) runs for these by default and for every mechanism in the slow suite."""


@pytest.mark.parametrize("name", [n if n in FAMILY_FIRSTS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ENTRIES])
def test_vmap(name):
    config = _config(name)
    implementation = "xla" if "xla" in ENTRIES[name].implementations else "reference"
    _run(conformance.check_vmap, config, implementation, _case(config, "core"))


@pytest.mark.parametrize("name", list(ENTRIES))
def test_every_entry_is_checked_on_some_case(name):
    """A registered mechanism must define at least one of its default cases (else it is never checked): traced only,
    the checks above run the defined cases."""
    config = _config(name)
    if not any(conformance.defines(config, case) for case in conformance.cases(config)):
        pytest.fail(f"{name}: the reference defines none of {[c.name for c in conformance.cases(config)]}")


@dataclasses.dataclass(frozen=True)
class _WrongScale(Softmax):
    """A throwaway entry whose fast path is subtly wrong: a 2% larger logit scale."""

    name: ClassVar[str] = "throwaway_wrong_scale"

    def implementations(self):
        def xla(q, k, v, *, scale=None, **kwargs):
            return flash_attention_xla(q, k, v, scale=1.02 * (scale or q.shape[-1] ** -0.5), block_q=8, block_kv=8,
                                       **kwargs)
        return {"reference": softmax_attention_reference, "xla": xla}


@dataclasses.dataclass(frozen=True)
class _DropsMask(Softmax):
    """A throwaway entry whose fast path ignores the mask."""

    name: ClassVar[str] = "throwaway_drops_mask"

    def implementations(self):
        def xla(q, k, v, *, mask=None, **kwargs):
            return flash_attention_xla(q, k, v, block_q=8, block_kv=8, **kwargs)
        return {"reference": softmax_attention_reference, "xla": xla}


@pytest.mark.parametrize("wrong,case", [(_WrongScale(), "plain"), (_DropsMask(), "core")])
def test_a_wrong_fast_path_fails_conformance(wrong, case):
    """The check the parametrized suite runs catches a wrong fast path (the entry is not registered,
    so the README table and the other suites don't see it)."""
    with pytest.raises(AssertionError):
        conformance.check_against_reference(wrong, "xla", _case(wrong, case))


def test_the_right_fast_path_passes_the_same_check():
    right = functools.partial(conformance.check_against_reference, Softmax(block_q=8, block_kv=8), "xla")
    right(_case(Softmax(), "core"))
