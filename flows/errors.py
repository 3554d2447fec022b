"""User errors: which exceptions are the user's to fix, and how they read (one line, no traceback).

The CLI prints them as ``fp8-convert: error: <line>``; a flow run (CLI, deployment or nightly)
ends FAILED with the same line as its state message. Prefect's engines log every failure with
its traceback; :func:`quiet_user_error_tracebacks` drops the traceback from those records when
the exception is a user error, so the Prefect UI shows the line and nothing under it. Internal
errors keep their tracebacks.
"""

from __future__ import annotations

import logging

from fp8core.errors import first_line


class UsageError(Exception):
    """A malformed command line."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from fp8core.errors import FP8Error

    return (FP8Error, ValidationError, UsageError)  # the config's ConfigError is an FP8Error too


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, user_error_types())


def one_line(exc: BaseException) -> str:
    """The first line of the message; for a parameter validation error, the flag and what is wrong."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").strip().splitlines()[0]
        # our own validators already name the flag; pydantic's built-in messages do not
        return f"--{loc}: {msg}" if loc and not msg.startswith("--") else msg
    return first_line(exc)


class _DropUserErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_user_error(exc):
            record.exc_info, record.exc_text = None, None
        return True


_FILTER = _DropUserErrorTracebacks()
# the loggers Prefect's flow and task engines report failures on (filters do not apply to
# records propagated from child loggers, so each is named)
_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def quiet_user_error_tracebacks() -> None:
    """Idempotent; called when the flows are imported."""
    for name in _ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def failed_state(exc: BaseException):
    """The flow run's end for a user error: FAILED with the one-line message. Called directly (the
    CLI), the flow still raises ``exc`` itself."""
    from prefect.states import Failed

    return Failed(message=one_line(exc), data=exc)
