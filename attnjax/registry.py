"""The single list of attention mechanisms.

A mechanism is a frozen config class with class-level metadata (``name``, ``family``, ``paper``,
``supports``, ``decodes``, ``sequence_parallel``) and an ``implementations()`` method that maps
implementation names (see ``attnjax.dispatch.IMPLEMENTATIONS``) to functions with the
``attnjax.attention`` signature. ``register`` adds the class here; tests, benchmarks, experiments
and the README's table all iterate over ``entries()``, and ``list()`` prints them as a table.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
from typing import Callable, ClassVar, Mapping, Protocol, Union


OPTIONS = ("mask", "bias", "logits_soft_cap", "sinks", "dropout", "return_lse", "gqa", "kv_heads", "cross")
"""Options of ``attnjax.attention`` that a mechanism may support. "gqa": fewer K/V heads than query
heads; "kv_heads": K and V with different head counts, ``k [B, S, Hk, D]``, ``v [B, S, Hv, Dv]``
(DiffQKV, Lin et al. 2025, "Sigma", Fig. 3: differentially compressed KV); "cross": ``T != S``."""

SEQUENCE_PARALLEL = ("ring", "allgather", "ulysses", "lasp2h", "lasp2")
"""Sequence-parallel schemes a mechanism may claim: ``attnjax.parallel``'s ``ring_attention``,
``allgather_attention``, ``ulysses_attention``, ``lasp2h_attention`` and ``lasp2`` (the plain linear family;
Flow, InLine and RALA through ``lasp2_mechanism`` and their ``chunk_attention``)."""

REQUIRED = ("name", "family", "paper", "supports", "decodes", "sequence_parallel")
"""Class attributes every registered config declares (``decodes`` may be a property of the config)."""


class Mechanism(Protocol):
    """What a registered config class provides.

    ``decodes``: a one-token query against the keys and values so far (a KV cache) gives the
    last row of causal attention, ``attention(q[:, t:t+1], k[:, :t+1], v[:, :t+1], mask=Causal())
    == attention(q, k, v, mask=Causal())[:, t]``, so a model can generate token by token from a
    KV cache. It fails when a row depends on the other queries (a query-normalized or
    block-routed mechanism) or on the number of keys of the call.
    ``sequence_parallel``: the schemes of ``SEQUENCE_PARALLEL`` that compute this mechanism on a
    sequence sharded over a mesh axis (inside ``shard_map``), equal to the single-device result.
    ``tests/test_registry.py`` checks both claims for every registered mechanism.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    paper: ClassVar[str]
    supports: ClassVar[frozenset]
    decodes: bool
    sequence_parallel: ClassVar[tuple]

    def implementations(self) -> Mapping[str, Callable]:
        """Implementation name -> function with the ``attnjax.attention`` signature."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registry row (of the default config): what the README table and parametrized tests read."""

    name: str
    family: str
    paper: str
    config: type
    implementations: tuple
    supports: frozenset
    decodes: bool = False
    sequence_parallel: tuple = ()


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a mechanism config class to the registry under ``cls.name``."""
    for attr in REQUIRED:
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} lacks class attribute {attr!r} needed by the registry")
    unknown = set(cls.supports) - set(OPTIONS)
    if unknown:
        raise ValueError(f"{cls.__name__}.supports has unknown options {sorted(unknown)}; known: {OPTIONS}")
    schemes = set(cls.sequence_parallel) - set(SEQUENCE_PARALLEL)
    if schemes:
        raise ValueError(f"{cls.__name__}.sequence_parallel has unknown schemes {sorted(schemes)}; "
                         f"known: {SEQUENCE_PARALLEL}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"mechanism {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type:
    """The config class registered under ``name``; ``ValueError`` naming the closest name if unknown (else
    listing every registered name)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), builtins.list(_REGISTRY), n=1)
        if close:
            raise ValueError(f"unknown mechanism {name!r}; did you mean {close[0]!r}? (attnjax.registry.list() "
                             f"shows all {len(_REGISTRY)})") from None
        raise ValueError(f"unknown mechanism {name!r}; registered: {sorted(_REGISTRY)}") from None


def resolve(mechanism: Union[str, Mechanism]) -> Mechanism:
    """A config instance from a registry name (default config) or a config instance."""
    if isinstance(mechanism, str):
        return get(mechanism)()
    if not isinstance(mechanism, type) and callable(getattr(mechanism, "implementations", None)):
        return mechanism
    raise TypeError(f"mechanism must be a registry name or a config object, got {type(mechanism).__name__}")


def entries() -> builtins.list[Entry]:
    """Every registered mechanism (its default config), in registration order."""
    rows = []
    for c in _REGISTRY.values():
        config = c()
        rows.append(Entry(name=c.name, family=c.family, paper=c.paper, config=c,
                          implementations=tuple(config.implementations()), supports=frozenset(c.supports),
                          decodes=bool(config.decodes), sequence_parallel=tuple(c.sequence_parallel)))
    return rows


class Listing(builtins.list):
    """A list of ``Entry`` that prints as an aligned table (``repr`` and ``str``), for the REPL."""

    COLUMNS = ("name", "family", "implementations", "options", "decode", "sequence-parallel", "paper")
    PAPER_WIDTH = 40

    def __repr__(self) -> str:
        table = [self.COLUMNS] + [_cells(e, sep=",", paper_width=self.PAPER_WIDTH) for e in self]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.COLUMNS) - 1)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                         for row in table)

    __str__ = __repr__


def list() -> Listing:  # noqa: A001 - the public name DESIGN.md promises: aj.registry.list()
    """Every registered mechanism: ``entries()`` as a ``Listing``, which prints as a table."""
    return Listing(entries())


def markdown_table() -> str:
    """The README's table of mechanisms."""
    header = ("mechanism",) + Listing.COLUMNS[1:]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries():
        name, *cells = _cells(e, sep=", ")
        rows.append("| " + " | ".join((f"`{name}`", *cells)) + " |")
    return "\n".join(rows)


def _cells(e: Entry, *, sep: str, paper_width: int = 0) -> tuple:
    """The cells of one row: name, family, implementations, options, decode, sequence-parallel, paper."""
    paper = e.paper if not paper_width or len(e.paper) <= paper_width else e.paper[:paper_width - 1] + "…"
    return (e.name, e.family, sep.join(e.implementations), sep.join(o for o in OPTIONS if o in e.supports),
            "yes" if e.decodes else "no", sep.join(e.sequence_parallel) or "-", paper)
