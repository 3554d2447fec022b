"""Start Prefect's temporary local server in the background while the CLI sets up the rest.

Without ``PREFECT_API_URL`` a flow run starts a temporary server subprocess on its first API call
and waits for it (~4 s), after importing Prefect's server package (~3 s). The CLI starts it here
instead, right after checking its arguments, so that the wait overlaps with importing the pipeline
and opening the MLflow store (~4 s); the flow then finds the server already up (Prefect keeps one
server instance per process). If the early start fails, the flow's own start reports the error.
"""

from __future__ import annotations

import threading

_started: threading.Thread | None = None


def start_prefect_server_early() -> None:
    """Begin starting the temporary server, if this process will need one; returns at once."""
    global _started
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if _started is not None or settings.api.url or not settings.server.ephemeral.enabled:
        return

    # Both the server (in the thread) and MLflow's SQL store (in this thread, meanwhile) import
    # SQLAlchemy's ORM, whose modules import each other: two threads importing it at once can
    # hand one of them a half-initialised module ("sqlalchemy.orm.exc has no attribute
    # UnmappedClassError", seen under load). Imported here first, it is complete for both.
    import sqlalchemy.ext.asyncio  # noqa: F401
    import sqlalchemy.orm  # noqa: F401

    def start() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception:  # the flow starts it again and reports what goes wrong
            pass

    _started = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    _started.start()


def wait_for_prefect_server() -> None:
    """Block until an early start (if any) has finished."""
    if _started is not None:
        _started.join()
