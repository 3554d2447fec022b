"""Start Prefect's temporary local server at once, in its own process, while the CLI sets up the rest.

Without ``PREFECT_API_URL`` a flow run starts Prefect's temporary server on its first API call
(``SubprocessASGIServer``: ``python -m uvicorn prefect.server.api.server:create_app`` on a free
local port) and waits for it. That costs the CLI twice: Prefect first imports the whole server
package in the CLI's own process (~5 s, only to launch a subprocess that imports it again), then
waits for the subprocess (~5 s). The CLI launches the same command itself, right after checking
its arguments, so the server starts on the other core while this process imports the pipeline and
opens the MLflow store; :func:`use_prefect_server` then points this process at it, through
``PREFECT_API_URL`` and Prefect's global settings (not a settings context: Prefect's worker
threads that start outside the flow's context would read an empty API URL and start a second
server). The server is Prefect's own, with the environment Prefect gives it (temporary, UI off,
this process's settings), one per process, stopped at exit. If it cannot start, the flow starts
Prefect's own and reports the error.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

_server: subprocess.Popen | None = None
_port: int | None = None
_ready = False
START_ATTEMPTS = 3  # a port found free can be taken before the server binds it
_OURS = "FP8_PREFECT_TEMPORARY_API_URL"  # the PREFECT_API_URL this process set for its own server


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch() -> None:
    """Prefect's own command and environment for its temporary server
    (``prefect.server.api.server.SubprocessASGIServer._run_uvicorn_command``)."""
    global _server, _port, _ready
    import prefect
    from prefect.settings import get_current_settings

    if _server is None:
        atexit.register(stop_prefect_server)  # a relaunch replaces _server, which the hook reads
    _port, _ready = _free_port(), False
    env = {**{k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", _OURS)},
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    _server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
         "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(_port),
         "--log-level", "error", "--lifespan", "on"], env=env, stdin=subprocess.DEVNULL)


def start_prefect_server_early() -> None:
    """Launch the temporary server, if this process will need one and has none; returns at once."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if _server is not None and _server.poll() is None:
        return
    if settings.api.url and settings.api.url != os.environ.get(_OURS):  # configured by the user
        return
    if not settings.server.ephemeral.enabled:
        return
    _forget_url()
    _launch()


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_until_ready() -> str | None:
    """The API URL once the server answers, or None if it could not start."""
    global _ready
    from prefect.settings import get_current_settings

    deadline = time.monotonic() + get_current_settings().server.ephemeral.startup_timeout_seconds
    attempts = 1
    while _server is not None and time.monotonic() < deadline:
        url = f"http://127.0.0.1:{_port}/api"
        if _ready or _answers(url):
            _ready = True
            return url
        if _server.poll() is not None:  # exited: most likely its port was taken meanwhile
            if attempts >= START_ATTEMPTS:
                return None
            attempts += 1
            _launch()
            continue
        time.sleep(0.05)
    return None


def use_prefect_server() -> None:
    """Point this process's Prefect at the server launched early, once it answers; nothing to do
    when none was launched (an API URL is configured). If it failed, it is stopped and the flow
    starts Prefect's own server (and reports why that fails, if it does)."""
    if _server is None:
        return
    url = _wait_until_ready()
    if url is None:
        stop_prefect_server()
        return
    if os.environ.get("PREFECT_API_URL") != url:
        from prefect.context import refresh_global_settings_context

        os.environ["PREFECT_API_URL"] = os.environ[_OURS] = url
        refresh_global_settings_context()


def _forget_url() -> None:
    if os.environ.get(_OURS) and os.environ.get("PREFECT_API_URL") == os.environ[_OURS]:
        from prefect.context import refresh_global_settings_context

        del os.environ["PREFECT_API_URL"]
        refresh_global_settings_context()
    os.environ.pop(_OURS, None)


def _drain_prefect_workers() -> None:
    """Let Prefect's log and event workers send what they hold while the server can still take it;
    they stop, and the next flow starts new ones on the settings of the day. (A worker keeps the
    client it started with: left running past the server's stop, it retried the dead URL at
    interpreter exit for 18 minutes.) At exit Prefect has drained them already."""
    for module, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        worker = getattr(sys.modules.get(module), name, None)
        if worker is not None:
            worker.drain_all(timeout=10, at_exit=False)


def stop_prefect_server() -> None:
    global _server, _ready
    server, _server, _ready = _server, None, False
    if server is not None and server.poll() is None:
        _drain_prefect_workers()
    _forget_url()
    if server is None or server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
