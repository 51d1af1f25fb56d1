"""The single list of attention mechanisms.

A mechanism is a frozen config class with class-level metadata (``name``, ``family``, ``paper``,
``supports``) and an ``implementations()`` method that maps implementation names (see
``attnjax.dispatch.IMPLEMENTATIONS``) to functions with the ``attnjax.attention`` signature. ``register`` adds the class
here; tests, benchmarks, experiments and the README's table all iterate over ``entries()``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Mapping, Protocol, Union


OPTIONS = ("mask", "bias", "logits_soft_cap", "sinks", "dropout", "return_lse", "gqa", "cross")
"""Options of ``attnjax.attention`` that a mechanism may support."""


class Mechanism(Protocol):
    """What a registered config class provides."""

    name: ClassVar[str]
    family: ClassVar[str]
    paper: ClassVar[str]
    supports: ClassVar[frozenset]

    def implementations(self) -> Mapping[str, Callable]:
        """Implementation name -> function with the ``attnjax.attention`` signature."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registry row: what the README table and parametrized tests read."""

    name: str
    family: str
    paper: str
    config: type
    implementations: tuple
    supports: frozenset


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a mechanism config class to the registry under ``cls.name``."""
    for attr in ("name", "family", "paper", "supports"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} lacks class attribute {attr!r} needed by the registry")
    unknown = set(cls.supports) - set(OPTIONS)
    if unknown:
        raise ValueError(f"{cls.__name__}.supports has unknown options {sorted(unknown)}; known: {OPTIONS}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"mechanism {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type:
    """The config class registered under ``name``; ``ValueError`` listing the names if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mechanism {name!r}; registered: {sorted(_REGISTRY)}") from None


def resolve(mechanism: Union[str, Mechanism]) -> Mechanism:
    """A config instance from a registry name (default config) or a config instance."""
    if isinstance(mechanism, str):
        return get(mechanism)()
    if not isinstance(mechanism, type) and callable(getattr(mechanism, "implementations", None)):
        return mechanism
    raise TypeError(f"mechanism must be a registry name or a config object, got {type(mechanism).__name__}")


def entries() -> list[Entry]:
    """Every registered mechanism, in registration order."""
    return [
        Entry(name=c.name, family=c.family, paper=c.paper, config=c,
              implementations=tuple(c().implementations()), supports=frozenset(c.supports))
        for c in _REGISTRY.values()
    ]


def list() -> list[Entry]:  # noqa: A001 - the public name DESIGN.md promises: aj.registry.list()
    """Alias of ``entries()``: every registered mechanism."""
    return entries()


def markdown_table() -> str:
    """The README's table of mechanisms."""
    rows = ["| mechanism | family | implementations | options | paper |", "|---|---|---|---|---|"]
    for e in entries():
        opts = ", ".join(o for o in OPTIONS if o in e.supports)
        rows.append(f"| `{e.name}` | {e.family} | {', '.join(e.implementations)} | {opts} | {e.paper} |")
    return "\n".join(rows)
