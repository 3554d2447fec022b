"""Which task failures are worth a retry: transient I/O, never bad input.

A missing file or corrupt data fails the same way every time, so retrying it only delays the
one-line error; a flaky network filesystem, a Dask worker lost mid-task or a busy disk may not.
"""

from __future__ import annotations

TRANSIENT = (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)
PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

RETRIES = 2
RETRY_DELAY_SECONDS = [1, 5]


def is_transient(exc: BaseException | None) -> bool:
    if exc is None or isinstance(exc, ValueError):  # every user error of this project is a ValueError
        return False
    if isinstance(exc, TRANSIENT):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, PERMANENT_OS_ERRORS) and getattr(exc, "errno", None) not in (28,)  # ENOSPC
    return type(exc).__module__.startswith(("distributed", "dask"))  # a lost worker, a comm failure


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the result itself could not be read: treat as transient
        exc = err
    return is_transient(exc if isinstance(exc, BaseException) else None)


# The options every I/O-bound task uses.
IO_RETRIES = dict(retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS, retry_condition_fn=retry_transient)
