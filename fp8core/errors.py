"""The engine's error vocabulary: one root for what the user must fix, and how any error reads.

:class:`FP8Error` is raised for a wrong input or setting (a model that does not load, data that
does not match it, a bad flag value); its message says what is wrong and how to fix it, on its
first line. Everything else that escapes the engine is an internal error. Callers (the CLI, the
flows) print a user error as one line and keep tracebacks for the rest.
"""

from __future__ import annotations


class FP8Error(ValueError):
    """The user's to fix: the message says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
