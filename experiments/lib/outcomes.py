"""How a path says no, and how an error is recorded in a table cell or a JSON field."""

from __future__ import annotations

DECLINED, REJECTED = (NotImplementedError,), (ValueError, TypeError)
"""How a mechanism says no: ``NotImplementedError`` declines a pattern (``auto`` falls back on it);
``ValueError``/``TypeError`` rejects the inputs."""


def error_text(e: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters), for tables and JSON."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
