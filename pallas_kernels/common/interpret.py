"""Interpret mode: when a kernel runs in the Pallas interpreter, and a one-time warning that it does.

On CPU there is no Pallas lowering, so every kernel's ``interpret=None`` default runs it in the
interpreter (correct, and far slower than the ``xla`` path, which ``implementation="auto"`` picks on
CPU). A caller who asked for ``implementation="pallas"`` gets ``InterpretModeWarning`` the first time
each kernel runs so in the process; an explicit ``interpret=`` is a choice and does not warn.
"""

from __future__ import annotations

import warnings
from typing import Optional


class InterpretModeWarning(UserWarning):
    """A Pallas kernel runs in interpret mode because the backend is CPU (correct, slow)."""


_WARNED: set = set()


def default_interpret(interpret: Optional[bool], backend: str, kernel: str) -> bool:
    """``bool(interpret)`` when given; else True exactly when ``backend`` is "cpu", warning
    ``InterpretModeWarning`` on the first such call of ``kernel`` in the process.

    Args:
      interpret: the caller's choice, or None for the backend's default.
      backend: the platform the kernel runs on ("cpu", "gpu", "tpu", ...).
      kernel: the kernel package's name for the message (e.g. "flash").
    """
    if interpret is not None:
        return bool(interpret)
    if backend != "cpu":
        return False
    if kernel not in _WARNED:
        _WARNED.add(kernel)
        warnings.warn(f"pallas_kernels.{kernel} runs in Pallas interpret mode on CPU: correct, but far slower than "
                      "implementation='xla' (warned once per kernel)", InterpretModeWarning, stacklevel=3)
    return True


__all__ = ["InterpretModeWarning", "default_interpret"]
