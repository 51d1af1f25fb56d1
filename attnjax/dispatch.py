"""The one implementation-fallback loop, shared by every entry point that offers ``implementation=``.

Several implementations stand behind one op, as in tokamax: "reference" (naive), "recurrent" (one
token at a time), "xla" (blocked/chunked) and "pallas" (a kernel). A path that can't serve a request
raises ``NotImplementedError``; "auto" tries ``auto_order()`` best first and takes the first that
serves it. ``attnjax.attention``, the block-sparse engine and ``linear_attention`` all call
``dispatch``.
"""

from __future__ import annotations

import difflib
from typing import Callable, Mapping, Optional

import jax

IMPLEMENTATIONS = ("reference", "recurrent", "xla", "pallas")
"""Every implementation name. "reference": naive and obviously correct; "recurrent": one token at
a time (recurrent mechanisms); "xla": blocked/chunked with O(T) memory; "pallas": a kernel."""

AUTO_ORDER = ("pallas", "xla", "reference")
"""What "auto" tries, best first, on GPU/TPU (``auto_order``)."""


def auto_order(backend: Optional[str] = None) -> tuple:
    """Implementations "auto" tries, best first. On CPU, Pallas (interpret mode) is never picked."""
    backend = backend or jax.default_backend()
    return AUTO_ORDER if backend in ("gpu", "tpu") else AUTO_ORDER[1:]


def check_implementation(implementation: str) -> None:
    """``ValueError`` (naming the closest name) unless ``implementation`` is a known implementation
    name or "auto"."""
    allowed = IMPLEMENTATIONS + ("auto",)
    if implementation not in allowed:
        close = difflib.get_close_matches(str(implementation), allowed, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown implementation {implementation!r};{hint} expected one of {allowed}")


def dispatch(paths: Mapping[str, Callable], implementation: str, *args, what: str, **kwargs):
    """Call ``paths[implementation](*args, **kwargs)``, or under "auto" the first path that serves.

    Args:
      paths: implementation name -> function; the names an op offers.
      implementation: a name in ``paths`` or "auto".
      what: the op's name for error messages (e.g. "mechanism 'softmax'").
    Raises:
      ValueError for an unknown implementation name; NotImplementedError when the named path is
      missing or refuses, or when no path in ``auto_order()`` serves the request (with each reason).
    """
    check_implementation(implementation)
    if implementation != "auto":
        if implementation not in paths:
            raise NotImplementedError(f"{what} has no {implementation!r} implementation; available: {list(paths)}")
        return paths[implementation](*args, **kwargs)
    reasons: dict[str, list] = {}
    for name in auto_order():
        if name in paths:
            try:
                return paths[name](*args, **kwargs)
            except NotImplementedError as e:
                reasons.setdefault(str(e), []).append(name)
    tried = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in reasons.items())
    raise NotImplementedError(f"no implementation of {what} serves this request ({tried or 'no path to try'})")
